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

# Ids and text that pandas' CSV defaults would read as missing are valid ids here.
NA_LOOKALIKES = st.sampled_from(["NA", "null", "None", "nan", "N/A", "NULL", "#N/A", "<NA>"])
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
