"""The attnflow model service (BentoML 1.4): one model version, answering in raw ids.

Start it with

    ATTNFLOW_MODEL_SOURCE=models:/attnflow@champion \\
        bentoml serve services.model_service:ModelService --host 127.0.0.1 --port 3000

The model is fetched once, at start (`pipelines.registry.fetch_model`: a local model
folder, or a registry URI whose alias is pinned to a version then), and the service
keeps serving that version. A spare (`ATTNFLOW_SPARE=1`, no source) starts with
everything imported but no model, and fetches its one model when /adopt names it.
APIs (JSON in, JSON out):

    POST /recommend  {"user_id"| "history", "k", "exclude_seen", "explain"}
    POST /similar    {"item_id", "k"}
    POST /feedback   {"events": [{user_id, item_id, event, ts?, value?, dwell_s?, ...}]}
    POST /info       which model this is and whether it is ready
    POST /adopt      {"source", "variant"}: a warm spare takes on its model (admin token)
    GET  /livez, /readyz (ready after a smoke recommendation), /metrics (Prometheus)

Bad input is answered 4xx naming the field at fault, never 5xx: 400 for a body
that does not validate (BentoML's pydantic errors, `detail[].loc` names the field),
404 for an unknown user or item, 413 for a body over `serve.max_body_bytes`, 415 for
a body that is not JSON. 503 means the service cannot do it now (feedback log not
writable, overloaded); 500 is a bug.

Environment:

    ATTNFLOW_MODEL_SOURCE   model folder or models:/ URI (required, except for a spare)
    ATTNFLOW_PARAMS         params.yaml to read `serve` from (default ./params.yaml)
    ATTNFLOW_SET            ';'-separated overrides, e.g. "serve.max_k=20;serve.max_batch_size=8"
    ATTNFLOW_FEEDBACK_LOG   feedback log path (default serve.feedback_log)
    ATTNFLOW_ROOT           project root for registry URIs (MLflow store; default .)
    ATTNFLOW_VARIANT        the variant this service reports when the gateway does not
                            say (X-Attnflow-Variant request header); default "champion"
    ATTNFLOW_SPARE          "1" (with no model source): start warm and wait for /adopt
    ATTNFLOW_ADMIN_TOKEN    bearer token /adopt requires (without it /adopt is shut)
    ATTNFLOW_TEST_DELAY_MS  fault injection for tests and drills only: every /recommend and
                            /similar waits this long first (a slow model)

Recommendations are computed by a micro-batcher: requests that arrive while the
model is busy are scored together in one forward pass (up to `serve.max_batch_size`).
An idle model scores a request at once, so batching adds no latency at low load and
`serve.max_latency_ms` (a batch window) is not needed; a request queued longer than
`serve.max_queue_ms` is shed with 503 (the service is overloaded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import bentoml
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.responses import Response

from pipelines.config import ServeConfig, load_config
from pipelines.errors import UnknownUser
from pipelines.feedback import FeedbackEvent, FeedbackLog, FeedbackLogUnavailable
from pipelines.privacy import redact, user_ref

if TYPE_CHECKING:  # torch and the model load in the worker (ModelService.__init__) only:
    # `bentoml serve` imports this module in its starter process too, before the worker
    from pipelines.inference import ServedModel

log = logging.getLogger("attnflow.serve")

SOURCE_ENV = "ATTNFLOW_MODEL_SOURCE"
PARAMS_ENV = "ATTNFLOW_PARAMS"
SET_ENV = "ATTNFLOW_SET"
FEEDBACK_ENV = "ATTNFLOW_FEEDBACK_LOG"
VARIANT_ENV = "ATTNFLOW_VARIANT"
DELAY_ENV = "ATTNFLOW_TEST_DELAY_MS"  # fault injection: a slow model (tests, drills)
SPARE_ENV = "ATTNFLOW_SPARE"  # "1" with no model source: a warm spare waiting for /adopt
ADMIN_TOKEN_ENV = "ATTNFLOW_ADMIN_TOKEN"  # bearer token of /adopt
VARIANT_HEADER = "x-attnflow-variant"
VARIANTS = ("champion", "challenger")


@cache
def serve_config() -> ServeConfig:
    """The `serve` section: params.yaml (`ATTNFLOW_PARAMS`) with `ATTNFLOW_SET` overrides.

    Raises `ConfigError` for a bad file or override; the service then starts with the
    defaults, never ready, and says why in /info.
    """
    overrides = [o.strip() for o in os.environ.get(SET_ENV, "").split(";") if o.strip()]
    return load_config(os.environ.get(PARAMS_ENV, "params.yaml"), overrides).serve


def _limits() -> ServeConfig:
    """The configuration the request validators check against (defaults if it is bad)."""
    try:
        return serve_config()
    except Exception:
        return ServeConfig()


# --- request and response bodies -------------------------------------------------------------


class RecommendRequest(BaseModel):
    """Exactly one of `user_id` (a known user) or `history` (raw item ids, oldest first)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(None, min_length=1, max_length=256)
    history: list[str] | None = None
    k: int = Field(10, ge=1, strict=True)
    exclude_seen: bool = Field(True, strict=True)
    explain: bool = Field(False, strict=True)

    @field_validator("history")
    @classmethod
    def _history_capped(cls, v: list[str] | None) -> list[str] | None:
        limit = _limits().max_history
        if v is not None and len(v) > limit:
            raise ValueError(f"at most {limit} items (serve.max_history), got {len(v)}")
        return v

    @field_validator("k")
    @classmethod
    def _k_capped(cls, v: int) -> int:
        limit = _limits().max_k
        if v > limit:
            raise ValueError(f"at most {limit} (serve.max_k), got {v}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendResponse(BaseModel):
    """Items best first, their scores, ignored history items, optional explanation."""

    items: list[str]
    scores: list[float]
    unknown_items: list[str]
    explanation: list[dict[str, Any]] | None
    model_version: str | None
    variant: str


class SimilarRequest(BaseModel):
    """Items closest to `item_id`."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, strict=True)

    @field_validator("k")
    @classmethod
    def _k_capped(cls, v: int) -> int:
        limit = _limits().max_k
        if v > limit:
            raise ValueError(f"at most {limit} (serve.max_k), got {v}")
        return v


class SimilarResponse(BaseModel):
    """Similar items, most similar first, with cosine similarities."""

    items: list[str]
    scores: list[float]
    model_version: str | None
    variant: str


class FeedbackRequest(BaseModel):
    """A batch of served feedback events (written all or nothing)."""

    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEvent] = Field(min_length=1)

    @field_validator("events")
    @classmethod
    def _capped(cls, v: list[FeedbackEvent]) -> list[FeedbackEvent]:
        limit = _limits().max_feedback_events
        if len(v) > limit:
            raise ValueError(f"at most {limit} events a request (serve.max_feedback_events)")
        return v


class AdoptRequest(BaseModel):
    """The model a spare service takes on (admin only)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=1000)  # model folder or models:/ URI
    variant: str = Field("challenger", pattern="^(champion|challenger)$")


class FeedbackResponse(BaseModel):
    """Events written and retried events skipped (same event_id)."""

    written: int
    duplicates: int


def _json(data: dict[str, Any], status: int = 200) -> Response:
    """A JSON response, serialised once with orjson.

    The APIs return responses rather than their pydantic models: BentoML would
    validate and serialise the model again, which costs more than scoring a request.
    The models above still document the bodies (OpenAPI) and the tests hold them.
    """
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, field: str | None, message: str) -> Response:
    """An error body shaped like BentoML's validation errors: `detail[].loc` names the field."""
    detail = [{"loc": [field] if field else [], "msg": message}]
    return _json({"error": message, "detail": detail}, status)


# --- micro-batching ----------------------------------------------------------------------------

In = TypeVar("In")
Out = TypeVar("Out")


class Overloaded(Exception):
    """A request waited in the batch queue longer than `serve.max_queue_ms`."""


class MicroBatcher(Generic[In, Out]):
    """Natural (greedy) batching of calls to a batch function run on one model thread.

    When the model thread is idle, a request is dispatched at once; requests that
    arrive while it is busy queue up and go together in the next call, up to
    `max_batch_size`. Latency therefore never waits for a batch to fill, and the
    batch size grows with load. A request that waited longer than `max_wait_s`
    before its batch started fails with `Overloaded` (shed, not queued forever).
    `fn` returns one result per input, or an exception instance for an input that
    failed on its own (for example an unknown user).
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out | Exception]],
        executor: concurrent.futures.Executor,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.fn = fn
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._pending: list[tuple[In, asyncio.Future[Out], float]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        """Queue one input and wait for its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, fut, time.monotonic()))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # let requests parsed in this loop turn join the first batch
        while self._pending:
            take = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            now = time.monotonic()
            live = []
            for item, fut, queued in take:
                if fut.done():  # the client went away
                    continue
                if now - queued > self.max_wait_s:
                    fut.set_exception(Overloaded(f"queued {1000 * (now - queued):.0f} ms"))
                    continue
                live.append((item, fut))
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await loop.run_in_executor(
                    self.executor, self.fn, [item for item, _ in live]
                )
            except Exception as exc:  # the whole batch failed: each caller sees why
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


# --- batched scoring ---------------------------------------------------------------------------


@dataclass
class RecQuery:
    """One recommendation request, already validated."""

    user_id: str | None
    history: list[str] | None
    k: int
    exclude_seen: bool
    explain: bool


def recommend_many(model: ServedModel, queries: list[RecQuery]) -> list[Any]:
    """`ServedModel.recommend` for many queries with one forward pass per exclude_seen group.

    Each result is a `pipelines.inference.Recommendation`, or the exception that query
    raised on its own (`UnknownUser`). Results equal `model.recommend(...)` query by
    query (a test holds this); rows are right-padded to the longest history, which the
    encoder masks out.
    """
    import torch

    from pipelines.inference import Recommendation
    from pipelines.sequences import Batch

    results: list[Any] = [None] * len(queries)
    rows: list[tuple[int, Batch, list[str]]] = []
    offset = model.mask_token is not None
    for n, q in enumerate(queries):
        try:
            if q.history is not None:
                batch, unknown = model._batch_for_history(q.history)
            else:
                batch, unknown = model._batch_for_user(str(q.user_id)), []
        except UnknownUser as exc:
            results[n] = exc
            continue
        if int(batch.lengths[0]) - offset <= 0:  # nothing known: the popular items
            results[n] = model._popular(q.k, unknown)
        else:
            rows.append((n, batch, unknown))
    for exclude in (True, False):
        group = [r for r in rows if queries[r[0]].exclude_seen is exclude]
        if not group:
            continue
        width = max(b.items.shape[1] for _, b, _ in group)

        def stack(name: str, group=group, width=width) -> torch.Tensor:
            parts = [getattr(b, name) for _, b, _ in group]
            return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

        batch = Batch(
            items=stack("items"),
            gaps=stack("gaps"),
            events=stack("events"),
            weights=stack("weights"),
            lengths=torch.cat([b.lengths for _, b, _ in group]),
        )
        k_max = max(queries[n].k for n, _, _ in group)
        idx, scores = model.recommender.recommend(batch, k=k_max, exclude_seen=exclude)
        idx, scores = idx.tolist(), scores.tolist()
        for row, (n, single, unknown) in enumerate(group):
            q = queries[n]
            rec = Recommendation(
                items=[model.item_ids[i] for i in idx[row][: q.k]],
                scores=[round(float(s), 6) for s in scores[row][: q.k]],
                unknown_items=unknown,
            )
            if q.explain:
                rec.explanation = model._explain(single)
            results[n] = rec
    return results


# --- body size and media type -------------------------------------------------------------------


class BodyGuard:
    """ASGI middleware: refuse POST bodies over `serve.max_body_bytes` (413) or not JSON (415).

    It reads the whole (bounded) body before the API sees it, so a chunked body of
    unknown length is refused as well as one with a large Content-Length.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = _limits().max_body_bytes
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if ctype not in (b"application/json", b""):
            return await _send_json(send, 415, "body must be application/json", "body")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_json(send, 413, f"body over {limit} bytes", "body")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_json(send, 413, f"body over {limit} bytes", "body")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, message: str, field: str) -> None:
    import json

    body = json.dumps({"error": message, "detail": [{"loc": [field], "msg": message}]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- the published OpenAPI document ------------------------------------------------------------


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"loc": {"type": "array"}, "msg": {"type": "string"}},
            },
        },
    },
}
ERROR_STATUSES = {
    "400": "Bad Request: the body does not validate; detail[].loc names the field",
    "404": "Not Found: unknown user_id or item_id",
    "413": "Payload Too Large: the body is over serve.max_body_bytes",
    "415": "Unsupported Media Type: the body is not application/json",
    "500": "Internal Server Error: a bug (logged)",
    "503": "Service Unavailable: not ready, overloaded, or the feedback log is not writable",
}
API_BODIES = {
    "/recommend": (RecommendRequest, RecommendResponse),
    "/similar": (SimilarRequest, SimilarResponse),
    "/feedback": (FeedbackRequest, FeedbackResponse),
}


def _openapi30(schema: Any) -> Any:
    """Pydantic's `anyOf: [X, {type: null}]` as OpenAPI 3.0's `X` + `nullable: true`."""
    if isinstance(schema, list):
        return [_openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi30(v) for k, v in schema.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) == 1:
            del out["anyOf"]
            out = {**rest[0], **out, "nullable": True}
    if out.get("type") == "null":  # a bare null (never on its own in these models)
        out = {k: v for k, v in out.items() if k != "type"} | {"nullable": True}
    return out


def _body_schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's JSON schema (refs into components) and its definitions, OpenAPI 3.0 style."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return _openapi30(schema), _openapi30(defs)


def openapi_fixups(doc: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document BentoML generates, made to say what the service really does.

    BentoML flattens `Optional` fields to their non-null type (so a `null`
    `model_version` or `explanation` breaks its own schema), documents error bodies
    with a string `detail` (ours is a list naming the field), and knows nothing of the
    413 / 415 / 503 answers. Clients and schema-driven tests (schemathesis) read this
    document, so it is corrected here: bodies from the pydantic models in OpenAPI 3.0
    form (`nullable`), and every error status with its real body.
    """
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        components[name] = ERROR_SCHEMA
    for path, (request, response) in API_BODIES.items():
        op = doc.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        req_schema, req_defs = _body_schema(request)
        resp_schema, resp_defs = _body_schema(response)
        components.update(req_defs)
        components.update(resp_defs)
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": req_schema}},
        }
        responses = op.setdefault("responses", {})
        responses["200"] = {
            "description": "Successful Response",
            "content": {"application/json": {"schema": resp_schema}},
        }
        for status, text in ERROR_STATUSES.items():
            responses[status] = {
                "description": text,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
    return _openapi30(doc)


class OpenAPIFix:
    """ASGI middleware: serve `openapi_fixups` of BentoML's /docs.json."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/docs.json":
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                start.update(msg)
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = orjson.dumps(openapi_fixups(orjson.loads(body)))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.exception("could not correct the OpenAPI document; serving it as is")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send(
            {"type": "http.response.start", "status": start.get("status", 500), "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


# --- the service -------------------------------------------------------------------------------


@bentoml.service(
    name="attnflow",
    workers=1,  # one model copy per process; scale with processes behind the gateway
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},  # per-request log lines cost more than scoring
    # No trace exporter is configured, so spans for the hot APIs would only cost CPU
    # (a fifth of a request's); set tracing.excluded_urls in a config to trace them.
    tracing={"excluded_urls": ["/recommend", "/similar", "/feedback"]},
    # latency buckets in the range this service answers in (the default starts at 5 ms)
    metrics={
        "enabled": True,
        "duration": {
            "buckets": [
                0.001,
                0.0025,
                0.005,
                0.01,
                0.015,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
            ]
        },
    },
)
class ModelService:
    """One attnflow model version behind /recommend, /similar and /feedback."""

    def __init__(self) -> None:
        import torch

        try:
            cfg, config_error = serve_config(), None
        except Exception as exc:  # raising would make BentoML restart the worker forever
            cfg, config_error = ServeConfig(), f"configuration: {exc}"
        torch.set_num_threads(cfg.torch_threads)
        self.source = os.environ.get(SOURCE_ENV, "")
        self.model: ServedModel | None = None
        self.model_name: str | None = None
        self.model_version: str | None = None  # pinned at fetch time; None for a folder
        self.model_digest: str | None = None
        self.ready, self.not_ready_reason = False, "starting"
        self.default_variant = os.environ.get(VARIANT_ENV, "champion")
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0) / 1000
        if self.delay_s:
            log.warning("fault injection: %s=%s ms", DELAY_ENV, os.environ[DELAY_ENV])
        self.feedback_log = FeedbackLog(os.environ.get(FEEDBACK_ENV) or cfg.feedback_log)
        # One thread owns the model: torch parallelises inside an op, not across requests.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._metrics()
        self.batcher: MicroBatcher[RecQuery, Any] = MicroBatcher(
            self._score,
            self.executor,
            max_batch_size=cfg.max_batch_size,
            max_wait_s=cfg.max_queue_ms / 1000,
            on_batch=self.batch_size.observe,
        )
        # A model that cannot load leaves the service alive but never ready, with the
        # reason in /info: raising here would make BentoML restart the worker forever.
        self.spare = not self.source and os.environ.get(SPARE_ENV) == "1"
        self.admin_token = (os.environ.get(ADMIN_TOKEN_ENV) or "").encode() or None
        if config_error:
            self.not_ready_reason = config_error
            log.error("%s; the service stays not ready", config_error)
            return
        if self.spare:
            _warm_imports()
            self.not_ready_reason = "spare: waiting for /adopt"
            log.info("spare model service: waiting for a model to adopt")
            return
        self._load(self.source)

    def _load(self, source: str) -> None:
        """Fetch and load `source`, then smoke-test it; failures leave it not ready."""
        from pipelines.inference import ServedModel
        from pipelines.registry import fetch_model

        self.source = source
        try:
            if not self.source:
                raise ValueError(f"set {SOURCE_ENV} to a model folder or a models:/ URI")
            fetched = fetch_model(self.source, Path(os.environ.get("ATTNFLOW_ROOT", ".")))
            self.model_name, self.model_version = fetched.name, fetched.version
            self.model = ServedModel.load(fetched.folder)
            manifest = Path(fetched.folder) / "manifest.json"
            self.model_digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        except Exception as exc:
            self.not_ready_reason = f"model {self.source!r} could not be loaded: {exc}"
            log.error("%s; the service stays not ready", self.not_ready_reason)
            return
        self._smoke()
        log.info(
            "serving %s (version %s, digest %s), ready=%s",
            self.source,
            self.model_version,
            self.model_digest,
            self.ready,
        )

    def _score(self, queries: list[RecQuery]) -> list[Any]:
        return recommend_many(self.model, queries)

    def _metrics(self) -> None:
        # prometheus_client is imported here, after BentoML set PROMETHEUS_MULTIPROC_DIR.
        from prometheus_client import Counter, Histogram

        self.batch_size = Histogram(
            "attnflow_batch_size",
            "Recommendation requests scored in one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.outcomes = Counter(
            "attnflow_requests", "Requests by API and outcome", ["api", "outcome"]
        )
        self.feedback_events = Counter(
            "attnflow_feedback_events", "Feedback events by result", ["result"]
        )

    def _smoke(self) -> None:
        """Ready only when the model answers: a known user, an empty and a real history."""
        assert self.model is not None
        first = None
        try:
            queries = [RecQuery(None, [], 5, True, False)]
            if self.model.user_index:
                first = next(iter(self.model.user_index))
                queries.append(RecQuery(first, None, 5, True, True))
            if len(self.model.item_ids) > 1:
                queries.append(RecQuery(None, self.model.item_ids[1:3], 5, True, False))
                self.model.similar(self.model.item_ids[1], 5)
            for res in recommend_many(self.model, queries):
                if isinstance(res, Exception):
                    raise res
                if not all(map(_finite, res.scores)):
                    raise ValueError("non-finite scores")
        except Exception as exc:  # any failure: alive but never ready
            # The reason is logged and shown in /info: never with a raw user id in it.
            self.not_ready_reason = redact(f"smoke recommendation failed: {exc!r}", [first])
            log.error("%s; the service stays not ready", self.not_ready_reason)
            return
        self.ready, self.not_ready_reason = True, None

    def __is_ready__(self) -> bool:
        return self.ready

    def _unready(self, ctx: bentoml.Context, api: str) -> Response:
        self.outcomes.labels(api, "not_ready").inc()
        ctx.response.status_code = 503
        return _error(503, None, f"not ready: {self.not_ready_reason}")

    def _failed(
        self, ctx: bentoml.Context, api: str, exc: Exception, user_id: str | None
    ) -> Response:
        """Log an unexpected failure (traceback redacted of the user id) and answer 500.

        Left to BentoML, the traceback would be logged with the exception's text, which
        may quote the raw user id (a KeyError does).
        """
        import traceback

        text = "".join(traceback.format_exception(exc))
        log.error("%s failed for user %s:\n%s", api, user_ref(user_id), redact(text, [user_id]))
        self.outcomes.labels(api, "error").inc()
        ctx.response.status_code = 500
        return _error(500, None, f"{api} failed: {type(exc).__name__} (see the service log)")

    def _variant(self, ctx: bentoml.Context) -> str:
        claimed = ctx.request.headers.get(VARIANT_HEADER)
        return claimed if claimed in VARIANTS else self.default_variant

    @bentoml.api(route="/recommend")
    async def recommend(self, req: RecommendRequest, /, ctx: bentoml.Context) -> RecommendResponse:
        """Top-k items for a known user or an explicit history."""
        if not self.ready:
            return self._unready(ctx, "recommend")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        query = RecQuery(req.user_id, req.history, req.k, req.exclude_seen, req.explain)
        try:
            rec = await self.batcher.submit(query)
        except UnknownUser:
            self.outcomes.labels("recommend", "unknown_user").inc()
            ctx.response.status_code = 404
            return _error(404, "user_id", f"unknown user_id {req.user_id!r}")
        except Overloaded as exc:
            self.outcomes.labels("recommend", "overloaded").inc()
            ctx.response.status_code = 503
            return _error(503, None, f"overloaded: {exc}")
        except Exception as exc:  # a bug: logged without the raw user id, answered 500
            return self._failed(ctx, "recommend", exc, req.user_id)
        self.outcomes.labels("recommend", "ok").inc()
        return _json(
            {
                "items": rec.items,
                "scores": rec.scores,
                "unknown_items": rec.unknown_items,
                "explanation": rec.explanation,
                "model_version": self.model_version,
                "variant": self._variant(ctx),
            }
        )

    @bentoml.api(route="/similar")
    async def similar(self, req: SimilarRequest, /, ctx: bentoml.Context) -> SimilarResponse:
        """Items whose vectors are closest to the item's."""
        if not self.ready:
            return self._unready(ctx, "similar")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        loop = asyncio.get_running_loop()
        try:
            rec = await loop.run_in_executor(self.executor, self.model.similar, req.item_id, req.k)
        except KeyError:
            self.outcomes.labels("similar", "unknown_item").inc()
            ctx.response.status_code = 404
            return _error(404, "item_id", f"unknown item_id {req.item_id!r}")
        except Exception as exc:  # a bug: logged, answered 500
            return self._failed(ctx, "similar", exc, None)
        self.outcomes.labels("similar", "ok").inc()
        return _json(
            {
                "items": rec.items,
                "scores": rec.scores,
                "model_version": self.model_version,
                "variant": self._variant(ctx),
            }
        )

    @bentoml.api(route="/feedback")
    async def feedback(self, req: FeedbackRequest, /, ctx: bentoml.Context) -> FeedbackResponse:
        """Append the events to the feedback log, durably; 503 if it cannot be written."""
        try:
            # fsync blocks: off the event loop, and off the model thread.
            result = await asyncio.to_thread(self.feedback_log.append, req.events)
        except FeedbackLogUnavailable as exc:
            self.feedback_events.labels("unwritable").inc(len(req.events))
            ctx.response.status_code = 503
            return _error(503, None, str(exc))
        except ValidationError as exc:  # cannot happen after request validation; be safe
            ctx.response.status_code = 400
            return _error(400, "events", str(exc))
        self.feedback_events.labels("written").inc(result.written)
        self.feedback_events.labels("duplicate").inc(result.duplicates)
        return _json({"written": result.written, "duplicates": result.duplicates})

    @bentoml.api(route="/adopt")
    async def adopt(self, req: AdoptRequest, /, ctx: bentoml.Context) -> dict[str, Any]:
        """A spare takes on its one model version (admin: bearer token); then as if started so.

        401 without the token, 409 when this service is not a waiting spare, 503 when
        the model cannot be loaded (the spare then stays not ready: stop it).
        """
        if not _bearer_matches(ctx.request.headers.get("authorization"), self.admin_token):
            ctx.response.status_code = 401
            return _error(401, None, f"adopt: bearer token required ({ADMIN_TOKEN_ENV})")
        if not self.spare or self.source:
            ctx.response.status_code = 409
            return _error(409, None, "adopt: not a waiting spare (it serves one model only)")
        self.source = req.source  # claimed now: a second /adopt is refused while this loads
        self.default_variant = req.variant
        await asyncio.get_running_loop().run_in_executor(self.executor, self._load, req.source)
        if not self.ready:
            ctx.response.status_code = 503
            return _error(503, None, f"adopt: {self.not_ready_reason}")
        return _json(self._info())

    @bentoml.api(route="/info")
    async def info(self) -> dict[str, Any]:
        """Which model this service serves, and whether it is ready (for the gateway)."""
        return self._info()

    def _info(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "version": self.model_version,
            "source": self.source,
            "digest": self.model_digest,
            "ready": self.ready,
            "not_ready_reason": self.not_ready_reason,
            "variant": self.default_variant,
            "n_items": len(self.model.item_ids) - 1 if self.model else None,
            "n_users": len(self.model.user_index) if self.model else None,
        }


def _warm_imports() -> None:
    """Import what loading a model needs, so that a spare's /adopt only loads weights.

    Started ahead of need, a spare takes on a model in about a second instead of a
    cold start's ten or more, most of which is these imports (see `services.stack`).
    """
    import mlflow.artifacts  # noqa: F401  (fetch_model: registry downloads)
    import safetensors.torch  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401
    from transformers import BertModel, GPT2Model  # noqa: F401  (the two backbones)

    import pipelines.inference  # noqa: F401


def _bearer_matches(header: str | None, token: bytes | None) -> bool:
    """Whether an Authorization header carries `token` (never without a token set)."""
    import hmac

    if token is None or not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


ModelService.add_asgi_middleware(BodyGuard)
ModelService.add_asgi_middleware(OpenAPIFix)
