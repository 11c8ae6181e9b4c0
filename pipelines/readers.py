"""Readers: each source format to raw tables, then to canonical events and items.

A reader returns a `RawSource`: the tables exactly as read (validated by the raw
input suite before anything else happens) and a `to_canonical` step that turns
them into the canonical events and items tables of `pipelines.events`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import EventLogConfig, IngestConfig
from pipelines.errors import DataError
from pipelines.events import coerce_events, coerce_items, read_table, to_timestamps

# Order-only sources (the SASRec files) get synthetic timestamps: one second per line
# from this anchor, so that sorting by time keeps the file's order.
ORDER_ONLY_ANCHOR = pd.Timestamp("2000-01-01", tz="UTC")


@dataclass(frozen=True)
class RawTable:
    """What the raw input suite expects of one table as read."""

    # column -> allowed numeric pandas dtype names; None: any type (text, ids of any kind)
    types: dict[str, list[str] | None]
    not_null: tuple[str, ...] = ()
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


@dataclass
class RawSource:
    """Tables as read from a source, their expectations, and the canonical conversion."""

    name: str
    frames: dict[str, pd.DataFrame]
    schema: dict[str, RawTable]
    convert: Callable[[dict[str, pd.DataFrame]], tuple[pd.DataFrame, pd.DataFrame]]

    def to_canonical(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(events, items) in the canonical schema.

        The tables are checked against their raw contract first (`check`): the ingest
        stage's raw suite has done so already, but a conversion must never meet a
        column it cannot handle, whoever calls it, or it fails with a traceback.
        """
        self.check()
        try:
            return self.convert(self.frames)
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            # What the contract cannot express (an id too large for its type, ...).
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{self.name}: cannot convert to canonical events ({first})") from None

    def check(self) -> None:
        """Refuse tables that break the raw contract: a `DataError` naming table and column."""
        for table, spec in self.schema.items():
            frame = self.frames.get(table)
            if frame is None:
                raise DataError(f"{self.name}: no {table!r} table was read")
            if frame.empty:
                raise DataError(f"{self.name}: table {table!r} has no rows")
            missing = [c for c in spec.types if c not in frame.columns]
            if missing:
                found = ", ".join(map(str, frame.columns))
                raise DataError(
                    f"{self.name}: table {table!r} lacks column(s) {', '.join(missing)}; "
                    f"found: {found}"
                )
            for col, types in spec.types.items():
                if types is not None and frame[col].dtype.name not in types:
                    raise DataError(
                        f"{self.name}: table {table!r} column {col!r} holds "
                        f"{frame[col].dtype.name} values, expected one of {', '.join(types)}"
                    )
            for col in spec.not_null:
                if frame[col].isna().any():
                    raise DataError(f"{self.name}: table {table!r} column {col!r} has empty values")


INT = ["int64", "int32", "Int64"]
FLOAT = ["float64", "float32", *INT]
ANY = None  # text columns: pandas may read a column of digits as numbers, which is fine


# --- MovieLens ---------------------------------------------------------------------------


def read_movielens(folder: Path) -> RawSource:
    """MovieLens (ml-latest-small layout): ratings -> `rate`, tags -> `comment` events."""
    frames = {
        "ratings": read_table(folder / "ratings.csv"),
        "movies": read_table(folder / "movies.csv"),
        "tags": read_table(folder / "tags.csv"),
    }
    schema = {
        "ratings": RawTable(
            types={"userId": INT, "movieId": INT, "rating": FLOAT, "timestamp": INT},
            not_null=("userId", "movieId", "rating", "timestamp"),
            ranges={"rating": (0.5, 5.0), "timestamp": (0, None)},
        ),
        "movies": RawTable(
            types={"movieId": INT, "title": ANY, "genres": ANY}, not_null=("movieId", "title")
        ),
        "tags": RawTable(
            types={"userId": INT, "movieId": INT, "tag": ANY, "timestamp": INT},
            not_null=("userId", "movieId", "timestamp"),
        ),
    }
    return RawSource("movielens", frames, schema, _movielens_canonical)


def _movielens_canonical(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ratings, movies, tags = frames["ratings"], frames["movies"], frames["tags"]
    rate = pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "ts": ratings["timestamp"],
            "event": "rate",
            "value": ratings["rating"],
        }
    )
    comment = pd.DataFrame(
        {
            "user_id": tags["userId"],
            "item_id": tags["movieId"],
            "ts": tags["timestamp"],
            "event": "comment",
            "text": tags["tag"],
        }
    )
    events = coerce_events(pd.concat([rate, comment], ignore_index=True), ts_unit="s")
    # Item text: title, genres and the item's most used tags (all free text a model can read).
    top_tags = (
        tags.assign(tag=tags["tag"].astype("str").str.strip().str.lower())
        .groupby(["movieId", "tag"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["movieId", "n", "tag"], ascending=[True, False, True])
        .groupby("movieId")["tag"]
        .apply(lambda s: ", ".join(s.head(8)))
    )
    genres = movies["genres"].fillna("").replace("(no genres listed)", "")
    text = movies["title"].astype("str") + ". " + genres.str.replace("|", ", ")
    tag_text = movies["movieId"].map(top_tags).fillna("")
    text = text.where(tag_text == "", text + ". Tags: " + tag_text)
    items = coerce_items(
        pd.DataFrame(
            {"item_id": movies["movieId"], "title": movies["title"], "genres": genres, "text": text}
        )
    )
    return events, items


# --- SASRec "user item" files -----------------------------------------------------------------


def read_sasrec(path: Path) -> RawSource:
    """SASRec format: `user item` per line, each user's lines in time order (order only)."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        raw = pd.read_csv(
            path, sep=r"\s+", header=None, names=["user", "item"], engine="c", encoding="utf-8"
        )
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a `user item` file ({str(exc).splitlines()[0]})") from None
    schema = {"interactions": RawTable(types={"user": INT, "item": INT}, not_null=("user", "item"))}
    return RawSource("sasrec", {"interactions": raw}, schema, _sasrec_canonical)


def _sasrec_canonical(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = frames["interactions"]
    ts = ORDER_ONLY_ANCHOR + pd.to_timedelta(np.arange(len(raw)), unit="s")
    events = coerce_events(
        pd.DataFrame({"user_id": raw["user"], "item_id": raw["item"], "ts": ts, "event": "view"})
    )
    items = coerce_items(pd.DataFrame({"item_id": np.sort(raw["item"].unique())}))
    items["text"] = ""  # the games data carries no item text
    return events, items


# --- session click logs (yoochoose) -----------------------------------------------------------


def read_session_clicks(paths: list[Path], dwell_cap_s: float) -> RawSource:
    """Session click logs (`SessionId ItemId Time`, tab separated): a pseudo-user per session."""
    parts = []
    for p in paths:
        try:
            parts.append(pd.read_csv(p, sep="\t", encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{p}: not a click log ({str(exc).splitlines()[0]})") from None
    clicks = pd.concat(parts, ignore_index=True)
    schema = {
        "clicks": RawTable(
            types={"SessionId": INT, "ItemId": INT, "Time": FLOAT},
            not_null=("SessionId", "ItemId", "Time"),
            ranges={"Time": (0, None)},
        )
    }
    return RawSource(
        "session_clicks",
        {"clicks": clicks},
        schema,
        lambda frames: _sessions_canonical(frames, dwell_cap_s),
    )


def session_dwell(session: pd.Series, ts_s: pd.Series, cap_s: float) -> pd.Series:
    """Dwell of each click: seconds to the next click of the same session, capped at `cap_s`.

    Rows must be sorted by (session, time). The last click of a session gets NaN
    (nobody knows how long it held attention).
    """
    nxt = ts_s.shift(-1)
    same = session.shift(-1) == session
    gap = (nxt - ts_s).where(same)
    return gap.clip(lower=0, upper=cap_s)


def _sessions_canonical(
    frames: dict[str, pd.DataFrame], dwell_cap_s: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    clicks = frames["clicks"].sort_values(["SessionId", "Time"], kind="stable")
    dwell = session_dwell(clicks["SessionId"], clicks["Time"].astype("float64"), dwell_cap_s)
    events = coerce_events(
        pd.DataFrame(
            {
                "user_id": "s" + clicks["SessionId"].astype("str"),
                "item_id": clicks["ItemId"],
                "ts": clicks["Time"],
                "event": "click",
                "dwell_s": dwell,
            }
        ),
        ts_unit="s",
    )
    items = coerce_items(pd.DataFrame({"item_id": np.sort(clicks["ItemId"].unique())}))
    items["text"] = ""
    return events, items


# --- any CSV / Parquet event log through a column mapping -----------------------------------


def read_event_log(cfg: EventLogConfig, base: Path = Path(".")) -> RawSource:
    """An event log of your own, its columns mapped by `ingest.eventlog.columns`."""
    if cfg.path is None:
        raise DataError("ingest.dataset is 'eventlog' but ingest.eventlog.path is not set")
    path = cfg.path if cfg.path.is_absolute() else base / cfg.path
    frames = {"events": read_table(path, cfg.format)}
    if cfg.items_path is not None:
        items_path = cfg.items_path if cfg.items_path.is_absolute() else base / cfg.items_path
        frames["items"] = read_table(items_path)
    mapping = cfg.columns.model_dump()
    wanted = {canon: col for canon, col in mapping.items() if col is not None}
    missing = [col for col in wanted.values() if col not in frames["events"].columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {', '.join(missing)} named in ingest.eventlog.columns are "
            f"missing; found: {', '.join(map(str, frames['events'].columns))}"
        )
    types: dict[str, list[str] | None] = {wanted["user_id"]: ANY, wanted["item_id"]: ANY}
    types[wanted["ts"]] = ANY if cfg.ts_unit == "iso" else FLOAT
    schema = {
        "events": RawTable(
            types=types, not_null=(wanted["user_id"], wanted["item_id"], wanted["ts"])
        )
    }

    def convert(fr: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
        src = fr["events"]
        df = pd.DataFrame({canon: src[col] for canon, col in wanted.items()})
        if "event" not in df:
            df["event"] = cfg.default_event
        unit = None if cfg.ts_unit == "iso" else cfg.ts_unit
        df["ts"] = to_timestamps(df["ts"], "ts", unit or "iso")
        events = coerce_events(df)
        if "items" in fr:
            items = coerce_items(fr["items"])
        else:
            items = coerce_items(pd.DataFrame({"item_id": np.sort(events["item_id"].unique())}))
            items["text"] = ""
        return events, items

    return RawSource("eventlog", frames, schema, convert)


# --- dispatch --------------------------------------------------------------------------------


def read_source(cfg: IngestConfig, base: Path = Path(".")) -> RawSource:
    """The raw source named by `ingest.dataset` (registry name, `synthetic` or `eventlog`)."""
    from pipelines.datasets import get_spec, resolve_dataset

    if cfg.dataset == "eventlog":
        return read_event_log(cfg.eventlog, base)
    if cfg.dataset == "synthetic":
        from pipelines.synthetic import generate

        events, items = generate(cfg.synthetic)
        schema = {
            "events": RawTable(
                types={"user_id": ANY, "item_id": ANY, "ts": ANY},
                not_null=("user_id", "item_id", "ts"),
            )
        }
        return RawSource(
            "synthetic",
            {"events": events, "items": items},
            schema,
            lambda fr: (fr["events"], fr["items"]),
        )
    spec = get_spec(cfg.dataset)
    folder = resolve_dataset(cfg.dataset)
    if spec.reader == "movielens":
        return read_movielens(folder)
    if spec.reader == "sasrec":
        return read_sasrec(folder / spec.files[0])
    if spec.reader == "session_clicks":
        return read_session_clicks([folder / f for f in spec.files], cfg.dwell_cap_s)
    raise DataError(f"dataset {cfg.dataset!r}: no reader {spec.reader!r}")
