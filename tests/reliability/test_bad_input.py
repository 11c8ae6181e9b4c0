"""Bad input is refused: schema-driven fuzzing of the services, property tests of the readers,
oversize bodies, paths that try to leave their folders, forged and replayed webhooks."""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from pipelines.config import EventLogConfig
from pipelines.errors import DataError
from pipelines.events import EVENT_COLUMNS, TS_DTYPE, coerce_events, read_events
from pipelines.feedback import EVENT_TYPES
from pipelines.readers import read_event_log, read_movielens, read_sasrec, read_session_clicks

# --- schemathesis against the real model service and through the gateway ----------------------
#
# schemathesis's pytest plugin (lazy schemas) does not run under pytest 9 (it sets
# `Function._nodeid`), so its Python API drives hypothesis directly: a strategy of
# cases per operation, positive and negative, each sent and checked.

# Per operation and mode: enough to hit every field with valid and invalid values, few
# enough that both runs (service and gateway) stay well under a minute on 2 loaded cores.
EXAMPLES = 20
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure reproduces
    suppress_health_check=list(HealthCheck),
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking against a live server
)
APIS = ("/recommend", "/similar", "/feedback", "/info")


def _fuzz(schema_url: str, base_url: str, paths: tuple[str, ...]) -> list[str]:
    """Every operation under `paths`, fuzzed; the names of the operations run."""
    schema = schemathesis.openapi.from_url(schema_url)
    ran = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path not in paths:
            continue
        # A GET without parameters has no invalid form to generate.
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @FUZZ
            def run(case):
                case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

            run()
            ran.append(f"{op.method.upper()} {op.path} ({mode.value})")
    return ran


def test_model_service_never_answers_5xx_or_off_schema(stack):
    url = stack.service.url
    ran = _fuzz(url + "/docs.json", url, (*APIS, "/livez", "/readyz", "/healthz"))
    assert len(ran) == 2 * 4 + 3, ran


def test_gateway_never_answers_5xx_or_off_schema(stack):
    """The same schema through the gateway, which passes the APIs through."""
    ran = _fuzz(stack.service.url + "/docs.json", stack.gateway.url, APIS[:3])
    assert len(ran) == 2 * 3, ran


# --- every event-file reader: arbitrary bytes are a DataError or a canonical table -------------

# ATTNFLOW_FUZZ_EXAMPLES=2000 for a deeper search than the default run's.
READ_SETTINGS = settings(
    max_examples=int(os.environ.get("ATTNFLOW_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# Bytes that look like CSV often enough to reach the parsers' deeper paths.
CSV_ALPHABET = st.sampled_from(
    [*"0123456789,.;:-+eE\t \n\r\"'abcxyzTZ/", "\x00", "é", "nan", "inf", "1e999", "-0"]
)
csv_texts = st.lists(CSV_ALPHABET, max_size=300).map("".join)
raw_bytes = st.one_of(
    st.binary(max_size=600),
    csv_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda h, t: (h + "\n" + t).encode(),
        st.sampled_from(
            HEADERS := [
                "user_id,item_id,ts,event",
                "user_id,item_id,ts,event,value,dwell_s,text",
                "userId,movieId,rating,timestamp",
                "SessionId\tItemId\tTime",
                "visitor,article,when,action,seconds",
            ]
        ),
        csv_texts,
    ),
)


def _only_data_errors(fn, *args):
    """Call `fn`; a DataError is a refusal, anything else escapes (a bug)."""
    try:
        return fn(*args)
    except DataError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message  # one line, no traceback
        return None


def _is_canonical(events: pd.DataFrame) -> None:
    assert list(events.columns) == EVENT_COLUMNS
    assert str(events["ts"].dtype) == TS_DTYPE


def _scratch(name: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="attnflow-fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return path


@given(data=raw_bytes, suffix=st.sampled_from([".csv", ".parquet", ".txt"]))
@READ_SETTINGS
def test_read_events_refuses_garbage_with_a_data_error_only(data, suffix):
    path = _scratch("events" + suffix, data)
    try:
        for unit in (None, "ms", "iso"):
            events = _only_data_errors(read_events, path, "auto", unit)
            if events is not None:
                _is_canonical(events)
    finally:
        shutil.rmtree(path.parent)


@given(data=raw_bytes)
@READ_SETTINGS
def test_sasrec_reader_refuses_garbage_with_a_data_error_only(data):
    path = _scratch("games.txt", data)
    try:
        source = _only_data_errors(read_sasrec, path)
        if source is not None:
            out = _only_data_errors(source.to_canonical)
            if out is not None:
                _is_canonical(out[0])
    finally:
        shutil.rmtree(path.parent)


@given(data=raw_bytes, more=raw_bytes)
@READ_SETTINGS
def test_session_click_reader_refuses_garbage_with_a_data_error_only(data, more):
    path = _scratch("clicks.txt", data)
    other = path.parent / "clicks2.txt"
    other.write_bytes(more)
    try:
        source = _only_data_errors(read_session_clicks, [path, other], 1800.0)
        if source is not None:
            out = _only_data_errors(source.to_canonical)
            if out is not None:
                _is_canonical(out[0])
    finally:
        shutil.rmtree(path.parent)


@given(ratings=raw_bytes, movies=raw_bytes, tags=raw_bytes)
@READ_SETTINGS
def test_movielens_reader_refuses_garbage_with_a_data_error_only(ratings, movies, tags):
    folder = _scratch("ratings.csv", ratings).parent
    (folder / "movies.csv").write_bytes(movies)
    (folder / "tags.csv").write_bytes(tags)
    try:
        source = _only_data_errors(read_movielens, folder)
        if source is not None:
            out = _only_data_errors(source.to_canonical)
            if out is not None:
                _is_canonical(out[0])
    finally:
        shutil.rmtree(folder)


MAPPING = {"user_id": "visitor", "item_id": "article", "ts": "when", "event": "action"}


@given(
    data=raw_bytes,
    unit=st.sampled_from(["s", "ms", "us", "iso"]),
    dwell=st.booleans(),
)
@READ_SETTINGS
def test_event_log_mapping_refuses_garbage_with_a_data_error_only(data, unit, dwell):
    path = _scratch("log.csv", data)
    columns = {**MAPPING, "dwell_s": "seconds" if dwell else None}
    cfg = EventLogConfig(path=path, columns=columns, ts_unit=unit)
    try:
        source = _only_data_errors(read_event_log, cfg, path.parent)
        if source is not None:
            out = _only_data_errors(source.to_canonical)
            if out is not None:
                _is_canonical(out[0])
    finally:
        shutil.rmtree(path.parent)


cells = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
)


@given(
    rows=st.lists(st.fixed_dictionaries({c: cells for c in EVENT_COLUMNS}), max_size=8),
    unit=st.sampled_from([None, "s", "ms", "iso"]),
)
@READ_SETTINGS
def test_coerce_events_refuses_any_mix_of_values_with_a_data_error_only(rows, unit):
    frame = pd.DataFrame(rows, columns=EVENT_COLUMNS)
    events = _only_data_errors(coerce_events, frame, unit)
    if events is not None:
        _is_canonical(events)


# --- valid generated logs round-trip through CSV and Parquet ----------------------------------

# Ids and text that pandas' CSV defaults would read as missing, numbers or booleans.
NA_LOOKALIKES = st.sampled_from(
    ["NA", "null", "None", "nan", "N/A", "NULL", "#N/A", "<NA>", "INF", "-inf", "007", "TRUE"]
)
ids = NA_LOOKALIKES | st.text(
    alphabet=string.ascii_letters + string.digits + "-_:@.", min_size=1, max_size=10
)
valid_events = st.lists(
    st.fixed_dictionaries(
        {
            "user_id": ids,
            "item_id": ids,
            "ts": st.datetimes(
                min_value=datetime(1995, 1, 1),
                max_value=datetime(2035, 1, 1),
                timezones=st.just(UTC),
            ),
            "event": st.sampled_from(sorted(EVENT_TYPES)),
            "value": st.none() | st.floats(0.5, 5.0),
            "dwell_s": st.none() | st.floats(0, 1800),
            "text": st.none()
            | NA_LOOKALIKES
            | st.text(string.ascii_letters + " ,.!?'\"é", min_size=1, max_size=20),
        }
    ),
    min_size=1,
    max_size=20,
)


@given(rows=valid_events, fmt=st.sampled_from(["csv", "parquet"]))
@READ_SETTINGS
def test_valid_event_logs_round_trip(rows, fmt):
    original = coerce_events(pd.DataFrame(rows, columns=EVENT_COLUMNS))
    folder = Path(tempfile.mkdtemp(prefix="attnflow-roundtrip-"))
    try:
        path = folder / f"events.{fmt}"
        if fmt == "csv":
            out = original.copy()
            out["ts"] = out["ts"].map(lambda t: t.isoformat())
            out.to_csv(path, index=False)
        else:
            original.to_parquet(path, index=False)
        back = read_events(path)
        # Ids that look like numbers come back as the same text; "nan"-like text is not an id.
        pd.testing.assert_frame_equal(back, original, check_exact=False, rtol=1e-12)
    finally:
        shutil.rmtree(folder)


# --- oversize bodies: 413 from the service and from the gateway, never a 5xx -----------------

OVERSIZE = 1_100_000  # over serve.max_body_bytes (1 000 000)


def _chunked(total: int, chunk: int = 50_000):
    """A body sent with Transfer-Encoding: chunked (no Content-Length to refuse it by)."""
    for _ in range(total // chunk):
        yield b"x" * chunk


def test_oversize_bodies_are_refused_by_the_service_and_the_gateway(stack):
    import httpx

    big = b'{"history": ["' + b"x" * OVERSIZE + b'"]}'
    targets = [
        (stack.service.url, ["/recommend", "/similar", "/feedback"]),
        (stack.gateway.url, ["/recommend", "/similar", "/feedback", "/admin/weight"]),
    ]
    with httpx.Client(timeout=30, trust_env=False) as http:
        for base, paths in targets:
            for path in paths:
                headers = {"Content-Type": "application/json"}
                if path.startswith("/admin"):
                    headers["Authorization"] = f"Bearer {stack.admin_token}"
                sized = http.post(base + path, content=big, headers=headers)
                chunked = http.post(base + path, content=_chunked(OVERSIZE), headers=headers)
                for r in (sized, chunked):
                    assert r.status_code == 413, (base, path, r.status_code, r.text[:200])
        # Both still answer a normal request afterwards.
        ok = http.post(stack.gateway.url + "/recommend", json={"history": [], "k": 3})
        assert ok.status_code == 200, ok.text


# --- names and paths that try to leave their folders -----------------------------------------


def test_dataset_names_that_escape_are_unknown():
    import pytest

    from pipelines.datasets import resolve_dataset
    from pipelines.errors import DatasetUnavailable

    for name in ("../etc", "/etc/passwd", "ml-latest-small/../../x", "..", "games/../games"):
        with pytest.raises(DatasetUnavailable, match="unknown dataset"):
            resolve_dataset(name)


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """A zip archive with the given members (names written as given, unchecked)."""
    import stat
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _download_spec(archive: Path):
    """A registry entry whose official download is `archive` (a file:// URL, checksum pinned)."""
    from pipelines.datasets import DatasetSpec, sha256_file

    return DatasetSpec(
        name="evil",
        reader="movielens",
        files=("ratings.csv",),
        url=archive.as_uri(),
        sha256=sha256_file(archive),
        archive="zip",
        archive_prefix="evil",
    )


def test_archives_with_members_that_escape_are_refused_and_write_nothing(tmp_path):
    """Zip slip: `../`, absolute and symlink members refuse the whole archive, even when
    its checksum matches (the registry pins what was published, not what is safe)."""
    import pytest

    from pipelines.datasets import UnsafeArchive, _download

    good = {"evil/ratings.csv": b"userId,movieId,rating,timestamp\n1,2,3.0,4\n"}
    cases = {
        "dotdot": ({**good, "evil/../../escaped.txt": b"pwned"}, None),
        "absolute": ({**good, str(tmp_path / "escaped.txt"): b"pwned"}, None),
        "backslash": ({**good, "..\\..\\escaped.txt": b"pwned"}, None),
        "symlink": (good, {"evil/link": str(tmp_path)}),
    }
    for label, (members, links) in cases.items():
        work = tmp_path / label
        work.mkdir()
        archive = _zip(work / "evil.zip", members, links)
        cache = work / "cache"
        with pytest.raises(UnsafeArchive, match="refusing to unpack"):
            _download(_download_spec(archive), cache, timeout=5)
        # Nothing was written: no dataset folder, no escaped file anywhere near.
        assert not (cache / "datasets" / "evil").exists(), label
        assert not list(tmp_path.rglob("escaped.txt")), label
        assert not list(cache.rglob("*.csv")), label
    # The same archive without the bad member unpacks.
    clean = _zip(tmp_path / "clean.zip", good)
    folder = _download(_download_spec(clean), tmp_path / "clean-cache", timeout=5)
    assert (folder / "ratings.csv").read_bytes() == good["evil/ratings.csv"]


ESCAPING_PATHS = {
    "paths.data_dir": "../outside",
    "paths.reports_dir": "reports/../../outside",
    "paths.models_dir": "..",
    "paths.checkpoints_dir": "./../x",
    "paths.gx_root": "../..",
    "ingest.eventlog.path": "data/../../../etc/passwd",
    "ingest.eventlog.items_path": "../items.csv",
    "ingest.feedback_dir": "../feedback",
    "serve.feedback_log": "../../served.jsonl",
}


def test_config_paths_that_climb_out_of_the_repository_are_refused_naming_the_key():
    import pytest

    from pipelines.config import load_config
    from pipelines.errors import ConfigError

    for key, value in ESCAPING_PATHS.items():
        with pytest.raises(ConfigError) as err:
            load_config("params.yaml", [f"{key}={value}"])
        message = str(err.value)
        assert "\n" not in message and key in message and "leaves the repository root" in message
    # Paths under the root (even through `..` that stays inside) and absolute paths are fine.
    cfg = load_config(
        "params.yaml",
        ["paths.data_dir=data/../data2", "ingest.eventlog.path=/srv/logs/events.csv"],
    )
    assert cfg.paths.data_dir == Path("data/../data2")
    assert cfg.ingest.eventlog.path == Path("/srv/logs/events.csv")


# --- webhooks: forged, replayed, stale and oversize deliveries start no rollout --------------

WEBHOOK_SECRET = "webhook-test-" + os.urandom(8).hex()


def _alias_delivery(version: str = "7", alias: str = "challenger", name: str = "attnflow") -> bytes:
    import json

    return json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "data": {"name": name, "alias": alias, "version": version},
        }
    ).encode()


def _signed(
    body: bytes, delivery: str, ts: int | str, secret: str = WEBHOOK_SECRET
) -> dict[str, str]:
    from pipelines.webhooks import sign

    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": str(ts),
        "X-MLflow-Signature": sign(secret, delivery, str(ts), body),
    }


def start_receiver(root: Path, state: Path, prefect_api: str):
    """The webhook receiver (`python -m services.webhook`) for the project at `root`,
    answering on /livez; returns its handle and base URL. `prefect_api` "": a rollout
    would be a local process, leaving a log."""
    import sys
    import time

    import httpx

    from services.launch import free_port, spawn

    port = free_port()
    receiver = spawn(
        "webhook",
        [sys.executable, "-m", "services.webhook", "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={
            "ATTNFLOW_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "ATTNFLOW_ROOT": str(root),
            "ATTNFLOW_STATE_DIR": str(state),
            "PREFECT_API_URL": prefect_api,
        },
        log_dir=root / "logs",
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/livez", timeout=1, trust_env=False)
            return receiver, base
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                receiver.stop()
                raise AssertionError(receiver.log_tail()) from None
            time.sleep(0.2)


def _rollout_traces(state: Path) -> list[str]:
    """What `trigger_rollout` leaves behind: rollout logs (and any lock) in the state dir."""
    run = state / "run"
    found = [p.name for p in run.glob("rollout*")] if run.exists() else []
    return found + [p.name for p in state.rglob("*.lock")]


def test_forged_replayed_stale_and_oversize_webhooks_start_no_rollout(tmp_path):
    import json
    import time

    import httpx

    from services.launch import stop_all

    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    # A delivery the receiver saw before it restarted: its replay memory is on disk.
    seen_id = "delivery-seen-before"
    (state / "run" / "webhook-deliveries.json").write_text(json.dumps({seen_id: time.time()}))
    receiver, base = start_receiver(tmp_path, state, prefect_api="")
    url = f"{base}/webhook"
    try:
        body, now = _alias_delivery(), int(time.time())
        forged = dict(_signed(body, "d-forged", now, secret="not-the-secret"))
        tampered = _signed(body, "d-tampered", now)
        unsigned = {"Content-Type": "application/json"}
        attempts = {
            "wrong secret": (body, forged, 401),
            "body changed after signing": (_alias_delivery(version="8"), tampered, 401),
            "no signature headers": (body, unsigned, 401),
            "signature of another delivery id": (
                body,
                {**_signed(body, "d-a", now), "X-MLflow-Delivery-Id": "d-b"},
                401,
            ),
            "replayed (seen before a restart)": (body, _signed(body, seen_id, now), 400),
            "stale timestamp": (body, _signed(body, "d-stale", now - 3600), 400),
            "future timestamp": (body, _signed(body, "d-future", now + 3600), 400),
            "timestamp not a number": (body, _signed(body, "d-nan", "soon"), 400),
            "oversize": (b"{" + b" " * 70_000 + b"}", _signed(b"{}", "d-big", now), 413),
        }
        with httpx.Client(timeout=10, trust_env=False) as http:
            for label, (content, headers, status) in attempts.items():
                r = http.post(url, content=content, headers=headers)
                assert r.status_code == status, (label, r.status_code, r.text)
            # A genuine delivery that asks for no rollout is accepted (the checks above
            # are not refusing everything); its replay is then refused.
            other = _alias_delivery(name="someone-elses-model")
            fresh = _signed(other, "d-fresh", now)
            assert http.post(url, content=other, headers=fresh).status_code == 202
            replay = http.post(url, content=other, headers=fresh)
            assert replay.status_code == 400 and "replay" in replay.json()["error"]
        assert _rollout_traces(state) == []
        assert not (tmp_path / ".attnflow").exists()  # nothing under the root's default either
        log_text = receiver.log_path.read_text()
        assert log_text.count("delivery refused") >= len(attempts)
        assert WEBHOOK_SECRET not in log_text
    finally:
        stop_all([receiver])
