"""The BentoML model service, as a real process over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import httpx
import pytest

from pipelines.errors import UnknownUser
from pipelines.inference import ServedModel
from services.launch import PORT_TAKEN, LaunchError, start_model_service, wait_ready_or_relaunch
from services.model_service import (
    FeedbackResponse,
    RecommendResponse,
    RecQuery,
    SimilarResponse,
    recommend_many,
)
from tests.serving.conftest import HTTP, metric


def _post(url: str, path: str, body=None, content: bytes | None = None, **kw) -> httpx.Response:
    if content is not None:
        return HTTP.post(url + path, content=content, timeout=30, **kw)
    return HTTP.post(url + path, json=body, timeout=30, **kw)


# --- batched scoring equals one-by-one scoring (in process) --------------------------------------


def test_batched_recommendations_equal_one_by_one(models):
    model = ServedModel.load(models.trained)
    users = list(model.user_index)[:6]
    items = model.item_ids[1:]
    queries = [
        RecQuery(users[0], None, 10, True, False),
        RecQuery(None, [items[3], "nope", items[7], items[1]], 5, True, True),
        RecQuery(users[1], None, 3, False, False),
        RecQuery("no-such-user", None, 10, True, False),
        RecQuery(None, [], 4, True, False),  # nothing known: popular items
        RecQuery(users[2], None, 20, True, True),
        RecQuery(None, items[:15], 7, False, False),  # a longer history than the rest
        RecQuery(users[3], None, 1, True, False),
    ]
    batched = recommend_many(model, queries)
    for q, got in zip(queries, batched, strict=True):
        if q.user_id == "no-such-user":
            assert isinstance(got, UnknownUser)
            continue
        want = model.recommend(
            user_id=q.user_id,
            history=q.history,
            k=q.k,
            exclude_seen=q.exclude_seen,
            explain=q.explain,
        )
        assert got.items == want.items, q
        assert got.scores == pytest.approx(want.scores, abs=1e-4)
        assert got.unknown_items == want.unknown_items
        if q.explain:
            assert [e["item_id"] for e in got.explanation] == [
                e["item_id"] for e in want.explanation
            ]


# --- the APIs ---------------------------------------------------------------------------------


def test_recommend_for_a_known_user(services, models):
    model = ServedModel.load(models.trained)
    user = list(model.user_index)[5]
    r = _post(services.champion.url, "/recommend", {"user_id": user, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    RecommendResponse.model_validate(body)  # the documented response body
    assert body["items"] == model.recommend(user_id=user, k=7).items
    assert len(body["scores"]) == 7 and body["scores"] == sorted(body["scores"], reverse=True)
    assert body["variant"] == "champion" and body["model_version"] is None
    assert body["explanation"] is None and body["unknown_items"] == []


def test_recommend_for_a_history_with_unknown_items_and_an_explanation(services, models):
    model = ServedModel.load(models.trained)
    history = [model.item_ids[4], "not-an-item", model.item_ids[9], model.item_ids[2]]
    r = _post(services.champion.url, "/recommend", {"history": history, "k": 5, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_items"] == ["not-an-item"]
    assert len(body["items"]) == 5 and not set(body["items"]) & set(history)
    expl = body["explanation"]
    assert expl and {e["item_id"] for e in expl} <= set(history)
    assert all(0 <= e["attention"] <= 1 and e["position"] < 0 for e in expl)


def test_exclude_seen_false_may_repeat_the_history(services, models):
    model = ServedModel.load(models.trained)
    history = model.item_ids[1:6]
    body = {"history": history, "k": 100, "exclude_seen": False}
    items = _post(services.champion.url, "/recommend", body).json()["items"]
    assert set(history) <= set(items)


def test_similar(services, models):
    model = ServedModel.load(models.trained)
    item = model.item_ids[3]
    r = _post(services.champion.url, "/similar", {"item_id": item, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    SimilarResponse.model_validate(body)
    assert body["items"] == model.similar(item, 4).items and item not in body["items"]
    r = _post(services.champion.url, "/similar", {"item_id": "nope", "k": 4})
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["item_id"]


def test_feedback_is_appended_and_an_unwritable_log_answers_503(services, tmp_path):
    url, log = services.champion.url, services.champion_log
    before = log.read_text() if log.exists() else ""
    events = [
        {"user_id": "u1", "item_id": "i1", "event": "impression", "event_id": "fb-1"},
        {"user_id": "u1", "item_id": "i1", "event": "click", "dwell_s": 3.0, "event_id": "fb-2"},
    ]
    r = _post(url, "/feedback", {"events": events})
    assert r.status_code == 200 and r.json() == {"written": 2, "duplicates": 0}
    FeedbackResponse.model_validate(r.json())
    r = _post(url, "/feedback", {"events": events})  # a client retry
    assert r.json() == {"written": 0, "duplicates": 2}
    good = log.read_text()
    assert good.startswith(before) and good.count("\n") == before.count("\n") + 2

    # The log's folder becomes unwritable (re-pointed at /proc): 503, nothing lost.
    link = services.feedback_link
    link.unlink()
    link.symlink_to("/proc/self/attnflow-nowhere")
    try:
        more = [{"user_id": "u2", "item_id": "i2", "event": "view", "event_id": "fb-3"}]
        r = _post(url, "/feedback", {"events": more})
        assert r.status_code == 503, r.text
        assert "cannot be written" in r.json()["error"]
    finally:
        link.unlink()
        link.symlink_to(services.feedback_real)
    assert log.read_text() == good  # earlier events intact
    r = _post(url, "/feedback", {"events": more})  # and it recovers
    assert r.status_code == 200 and r.json()["written"] == 1
    assert json.loads(log.read_text().splitlines()[-1])["event_id"] == "fb-3"


BAD_REQUESTS = [
    ("/recommend", {}, 400, []),  # neither user_id nor history
    ("/recommend", {"user_id": "u1", "history": ["i1"]}, 400, []),  # both
    ("/recommend", {"user_id": 17}, 400, ["user_id"]),
    ("/recommend", {"user_id": "u1", "k": "ten"}, 400, ["k"]),
    ("/recommend", {"user_id": "u1", "k": 0}, 400, ["k"]),
    ("/recommend", {"user_id": "u1", "k": 101}, 400, ["k"]),  # over serve.max_k
    ("/recommend", {"user_id": "u1", "k": 2.5}, 400, ["k"]),
    ("/recommend", {"history": "i1"}, 400, ["history"]),
    ("/recommend", {"history": [1, 2]}, 400, ["history", 0]),
    ("/recommend", {"history": ["i1"] * 201}, 400, ["history"]),  # over serve.max_history
    ("/recommend", {"user_id": "u1", "explain": "yes"}, 400, ["explain"]),
    ("/recommend", {"user_id": "u1", "colour": "red"}, 400, ["colour"]),
    ("/recommend", {"user_id": "nobody-at-all"}, 404, ["user_id"]),
    ("/recommend", [1, 2, 3], 400, []),
    ("/similar", {"k": 3}, 400, ["item_id"]),
    ("/similar", {"item_id": "i1", "k": -1}, 400, ["k"]),
    ("/feedback", {"events": []}, 400, ["events"]),
    ("/feedback", {"events": [{"user_id": "u", "item_id": "i"}]}, 400, ["events", 0, "event"]),
    ("/feedback", {"events": [{"user_id": "u", "item_id": "i", "event": "x"}]}, 400, None),
    (
        "/feedback",
        {"events": [{"user_id": "u", "item_id": "i", "event": "view", "ts": 1e99}]},
        400,
        None,
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "loc"), BAD_REQUESTS)
def test_malformed_requests_get_4xx_naming_the_field(services, path, body, status, loc):
    r = _post(services.champion.url, path, body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if loc is not None:
        assert next(d["loc"] for d in detail)[: len(loc)] == loc, detail


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b'{"user_id": ', {"Content-Type": "application/json"}, 400),
        (b"user_id=u1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        (b"--b\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 415),
        (b"\xff\xfe", {"Content-Type": "application/json"}, 400),
        (b'{"history": ["' + b"x" * 1_100_000 + b'"]}', {"Content-Type": "application/json"}, 413),
    ],
    ids=["truncated-json", "form", "multipart", "not-utf8", "oversize"],
)
def test_bodies_that_are_not_json_or_too_big_get_4xx(services, content, headers, status):
    r = _post(services.champion.url, "/recommend", content=content, headers=headers)
    assert r.status_code == status, r.text


def test_an_oversize_chunked_body_is_refused(services):
    def chunks():
        for _ in range(30):
            yield b"x" * 50_000

    r = HTTP.post(services.champion.url + "/recommend", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_probes_and_info(services):
    url = services.champion.url
    assert HTTP.get(url + "/livez").status_code == 200
    assert HTTP.get(url + "/readyz").status_code == 200
    info = _post(url, "/info", {}).json()
    assert info["ready"] is True and info["n_users"] > 0 and len(info["digest"]) == 16


def test_a_broken_model_is_alive_but_never_ready_and_answers_503(services):
    url = services.broken.url
    assert HTTP.get(url + "/livez").status_code == 200
    assert HTTP.get(url + "/readyz").status_code == 503
    info = _post(url, "/info", {}).json()
    assert info["ready"] is False and "smoke recommendation failed" in info["not_ready_reason"]
    r = _post(url, "/recommend", {"history": ["i1"]})
    assert r.status_code == 503 and "not ready" in r.json()["error"]


def test_concurrent_requests_are_batched(services, models):
    """Under concurrent load, one forward pass scores several requests."""
    url = services.champion.url
    users = list(ServedModel.load(models.trained).user_index)
    before = HTTP.get(url + "/metrics").text
    n = 240

    async def load() -> list[int]:
        sem = asyncio.Semaphore(48)
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> int:
                async with (
                    sem,
                    s.post(
                        url + "/recommend", json={"user_id": users[i % len(users)], "k": 10}
                    ) as r,
                ):
                    await r.read()
                    return r.status

            return await asyncio.gather(*(one(i) for i in range(n)))

    statuses = asyncio.run(load())
    assert statuses == [200] * n
    after = HTTP.get(url + "/metrics").text
    requests = metric(after, "attnflow_batch_size_sum") - metric(before, "attnflow_batch_size_sum")
    batches = metric(after, "attnflow_batch_size_count") - metric(
        before, "attnflow_batch_size_count"
    )
    singles = metric(after, "attnflow_batch_size_bucket", le="1.0") - metric(
        before, "attnflow_batch_size_bucket", le="1.0"
    )
    assert requests == n
    assert batches < n / 2, (requests, batches)  # on average more than two a batch
    assert singles < batches  # some batches held more than one request


def test_metrics_count_requests_errors_and_latency(services):
    url = services.champion.url
    _post(url, "/recommend", {"user_id": "nobody-at-all"})
    text = HTTP.get(url + "/metrics").text
    assert metric(text, "attnflow_requests_total", api="recommend", outcome="ok") > 0
    assert metric(text, "attnflow_requests_total", api="recommend", outcome="unknown_user") > 0
    assert metric(text, "bentoml_service_request_total", endpoint="/recommend") > 0
    assert metric(text, "bentoml_service_request_duration_seconds_count", endpoint="/recommend")


def test_a_model_that_cannot_load_fails_the_launch_fast_with_the_reason(tmp_path):
    """No restart loop and no timeout: the launcher reports why at once."""
    started = time.monotonic()
    with pytest.raises(LaunchError, match="could not be loaded"):
        start_model_service(
            tmp_path / "no-such-model",
            log_dir=tmp_path,
            env={"BENTOML_HOME": str(tmp_path / "bentoml")},
            timeout=120,
        )
    assert time.monotonic() - started < 60


def test_a_service_whose_port_was_taken_starts_again_on_another(models, tmp_path):
    """A port that another process took before the service bound it: relaunched, not failed."""
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        first = start_model_service(
            models.trained, port=taken, log_dir=tmp_path, env=env, wait=False
        )
        handle = None
        try:
            handle = wait_ready_or_relaunch(
                first,
                lambda: start_model_service(models.trained, log_dir=tmp_path, env=env, wait=False),
                timeout=180,
            )
            assert handle.port != taken and not first.alive()
            assert PORT_TAKEN in first.log_tail(80)
            assert HTTP.get(handle.url + "/readyz").status_code == 200
        finally:
            first.stop()
            if handle is not None:
                handle.stop()


def test_a_warm_spare_waits_unready_then_adopts_one_model_for_the_admin_only(models, tmp_path):
    """The spare a rollout hands its challenger to: not ready, admin-only, one model only."""
    from services.launch import adopt, start_spare_service

    token = "spare-test-token"
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "ATTNFLOW_ADMIN_TOKEN": token}
    spare = start_spare_service(env=env, log_dir=tmp_path, feedback_log=tmp_path / "fb.jsonl")
    try:
        with pytest.raises(LaunchError, match="401"):  # waits for the warm-up, then refused
            adopt(spare.url, str(models.trained), "challenger", "wrong-token", timeout=180)
        assert HTTP.get(spare.url + "/readyz").status_code == 503
        info = _post(spare.url, "/info", {}).json()
        assert info["ready"] is False and info["not_ready_reason"].startswith("spare")
        assert _post(spare.url, "/recommend", {"history": ["i1"]}).status_code == 503

        info = adopt(spare.url, str(models.trained), "challenger", token, timeout=60)
        assert info["ready"] is True and info["variant"] == "challenger"
        assert info["source"] == str(models.trained) and len(info["digest"]) == 16
        assert HTTP.get(spare.url + "/readyz").status_code == 200
        user = next(iter(ServedModel.load(models.trained).user_index))
        r = _post(spare.url, "/recommend", {"user_id": user, "k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        assert r.json()["variant"] == "challenger"

        with pytest.raises(LaunchError, match="409"):  # it serves this model, and only it
            adopt(spare.url, str(models.random), "challenger", token, timeout=30)
        assert _post(spare.url, "/info", {}).json()["source"] == str(models.trained)
    finally:
        spare.stop()
