"""The canonical attention-event schema and its readers / writers.

Events table (one row per attention event)::

    user_id  str                  who
    item_id  str                  what
    ts       datetime64[us, UTC]  when
    event    str                  view | click | rate | tag | comment | purchase | ...
    value    float64, nullable    e.g. the rating of a `rate` event
    dwell_s  float64, nullable    seconds of attention, where known
    text     str, nullable        free text of `tag` / `comment` events

Items table: ``item_id, title, genres, text`` (all str; genres `|`-separated).

Ids are strings so that any source's ids fit; the split stage maps them to dense
integer indices.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.errors import DataError

EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "value", "dwell_s", "text"]
REQUIRED_EVENT_COLUMNS = ["user_id", "item_id", "ts", "event"]
ITEM_COLUMNS = ["item_id", "title", "genres", "text"]
TS_DTYPE = "datetime64[us, UTC]"


def empty_events() -> pd.DataFrame:
    """An events table with no rows and the canonical dtypes."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype="str"),
            "item_id": pd.Series([], dtype="str"),
            "ts": pd.Series([], dtype=TS_DTYPE),
            "event": pd.Series([], dtype="str"),
            "value": pd.Series([], dtype="float64"),
            "dwell_s": pd.Series([], dtype="float64"),
            "text": pd.Series([], dtype="str"),
        }
    )


def _as_str_ids(col: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_float_dtype(col):
        # 12.0 -> "12": float ids come from CSV columns that held a NaN somewhere
        finite = col.dropna()
        if not np.all(np.mod(finite, 1) == 0):
            raise DataError(f"column {name!r}: ids must be integers or strings, found fractions")
        out = col.map(lambda v: None if pd.isna(v) else str(int(v)))
        return out.astype("str")
    return col.astype("str").where(col.notna(), None)


def to_timestamps(col: pd.Series, name: str = "ts", unit: str | None = None) -> pd.Series:
    """Parse a column into UTC timestamps; numbers are read in `unit` (default s)."""
    try:
        if pd.api.types.is_datetime64_any_dtype(col):
            out = col.dt.tz_localize("UTC") if col.dt.tz is None else col.dt.tz_convert("UTC")
        elif pd.api.types.is_numeric_dtype(col) and unit != "iso":
            out = pd.to_datetime(col, unit=unit or "s", utc=True)
        else:
            out = pd.to_datetime(col, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
        bad = _first_unparseable(col, unit)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"column {name!r}: cannot read {bad!r} as a timestamp ({reason})") from None
    return out.astype(TS_DTYPE)


def _first_unparseable(col: pd.Series, unit: str | None) -> object:
    for v in col.head(10_000):
        try:
            if isinstance(v, int | float | np.integer | np.floating) and unit != "iso":
                pd.to_datetime(v, unit=unit or "s", utc=True)
            else:
                pd.to_datetime(v, utc=True, format="ISO8601")
        except Exception:
            return v
    return col.iloc[0] if len(col) else None


# Written for a missing number by R, pandas, spreadsheets and databases.
NA_MARKERS = frozenset({"", "na", "n/a", "nan", "-nan", "null", "none", "<na>", "#n/a"})


def _as_float(col: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(col):
        return col.astype("float64")
    out = pd.to_numeric(col, errors="coerce")
    marker = col.astype("str").str.strip().str.lower().isin(NA_MARKERS)
    bad = col[out.isna() & col.notna() & ~marker]
    if len(bad):
        raise DataError(f"column {name!r}: {bad.iloc[0]!r} is not a number")
    return out.astype("float64")


def coerce_events(df: pd.DataFrame, ts_unit: str | None = None) -> pd.DataFrame:
    """Bring a frame with the canonical column names to the canonical dtypes.

    Raises `DataError` naming the column when a required column is missing or a
    value cannot be converted. Range checks (negative dwell, future timestamps)
    are the validation suite's job, not this function's.
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"missing required column(s) {', '.join(missing)}; "
            f"found: {', '.join(map(str, df.columns)) or 'none'}"
        )
    out = pd.DataFrame(
        {
            "user_id": _as_str_ids(df["user_id"], "user_id"),
            "item_id": _as_str_ids(df["item_id"], "item_id"),
            "ts": to_timestamps(df["ts"], "ts", ts_unit),
            "event": df["event"].astype("str").where(df["event"].notna(), None),
            "value": _as_float(df["value"], "value") if "value" in df else np.nan,
            "dwell_s": _as_float(df["dwell_s"], "dwell_s") if "dwell_s" in df else np.nan,
            "text": df["text"].astype("str").where(df["text"].notna(), None)
            if "text" in df
            else None,
        }
    )
    out["value"] = out["value"].astype("float64")
    out["dwell_s"] = out["dwell_s"].astype("float64")
    out["text"] = out["text"].astype("str").where(out["text"].notna(), None)
    return out.reset_index(drop=True)


def coerce_items(df: pd.DataFrame) -> pd.DataFrame:
    """Bring an items frame to the canonical columns (missing ones become empty text)."""
    if "item_id" not in df.columns:
        raise DataError("items table: missing required column 'item_id'")
    out = pd.DataFrame({"item_id": _as_str_ids(df["item_id"], "item_id")})
    for col in ("title", "genres", "text"):
        out[col] = df[col].fillna("").astype("str") if col in df else ""
    if (out["text"] == "").all():
        out["text"] = (out["title"] + ". " + out["genres"].str.replace("|", ", ")).str.strip(". ")
    return out.drop_duplicates("item_id").reset_index(drop=True)


def read_table(path: Path, fmt: str = "auto") -> pd.DataFrame:
    """Read a CSV or Parquet file, turning every low-level failure into one `DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a CSV or Parquet file")
    if fmt == "auto":
        fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        if fmt == "parquet":
            return pq.read_table(path).to_pandas()
        return _read_csv(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not valid CSV ({str(exc).splitlines()[0]})") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable {fmt} file ({str(exc).splitlines()[0]})") from None


# A number written plainly: no leading zeros ("007" is an id), no "inf" / "nan" words.
_PLAIN_NUMBER = r"^(?:[+-]?(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?)$"
_PLAIN_INTEGER = r"^[+-]?(?:0|[1-9]\d*)$"


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV file with ids and text kept as written.

    Every field is read as text first (Arrow's reader: fast, strict UTF-8); a column
    becomes numeric only when each of its non-empty fields is a plainly written
    number. pandas' own inference would turn an id "007" into 7, a comment "INF"
    into infinity, "TRUE" into a boolean and a user called "NA" into a null. Only an
    empty field is missing here; numeric columns still read "NA"-like markers as
    missing later (`_as_float`).
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        names = next(csv.reader(f), [])
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(f"{path}: column {duplicated[0]!r} appears more than once in the header")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as exc:
        reason = str(exc).splitlines()[0]
        if "UTF8" in reason:
            raise DataError(f"{path}: not UTF-8 text ({reason})") from None
        raise DataError(f"{path}: not valid CSV ({reason})") from None
    if table.column_names != names:
        raise DataError(f"{path}: not valid CSV (the header row could not be read)")
    columns = {}
    for name in table.column_names:
        col = table[name]
        present = col.drop_null()
        if len(present) and pc.all(pc.match_substring_regex(present, _PLAIN_NUMBER)).as_py():
            whole = (
                col.null_count == 0
                and pc.all(pc.match_substring_regex(present, _PLAIN_INTEGER)).as_py()
            )
            col = pc.cast(col, pa.int64() if whole else pa.float64())
        columns[name] = col
    return pa.table(columns).to_pandas()


def read_events(path: Path, fmt: str = "auto", ts_unit: str | None = None) -> pd.DataFrame:
    """Read a canonical events file (CSV or Parquet) and coerce its dtypes."""
    df = read_table(path, fmt)
    if df.empty:
        raise DataError(f"{path}: no events (the file has a header but no rows)")
    try:
        return coerce_events(df, ts_unit)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` atomically.

    On any exception the temporary file or folder is removed, so a failed stage
    leaves no half-written output behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            _rmtree(target)
        os.replace(staged, target)
    finally:
        _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a frame as Parquet (atomically, without the pandas index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: object, path: Path) -> None:
    """Write JSON atomically, keys sorted so that unchanged content is byte-identical."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
