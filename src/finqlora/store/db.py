"""The event store: a SQLite database compatible with users' `finance_analysis.db`.

Tables (see docs/store.md for every column):

- `events`: one row per news item. The columns users already have (`event_id`, `content`,
  `star`) plus ours: `source`, `source_id`, `title`, `published_at` (ISO-8601 UTC,
  'YYYY-MM-DDTHH:MM:SSZ'), `ts_utc` (unix seconds), `tz_offset_min` (the offset the source
  gave, e.g. 480 for +08:00), `importance` (the source's raw level, e.g. CLS A/B/C),
  `subjects` (JSON list), `url`, and `primary_event_id` (set when the row is a cross-source
  duplicate of another event; NULL for primaries), and `stocks` (JSON list of
  {"code", "name"}: the stocks the source links to the event, e.g. CLS `stock_list`).
- `event_impacts(event_id, ticker, window_min, ret, ...)`: `ret` is a FRACTION (0.0012 =
  +0.12%). `window_min` 5/10/15/30/120 is the post-event return close(t0+w)/close(t0)-1; a
  NEGATIVE `window_min` -w (-120, -30, ...) is the pre-event return close(t0)/close(t0-w)-1,
  so users' queries on 5..120 keep meaning "after the event". A return that cannot be known
  (no bar at a window end) is stored as `ret` NULL with a `status` saying why; never zero.
- `prices(ticker, ts, open, high, low, close, volume)`: OHLCV bars, `ts` unix seconds UTC.
- `price_batches(batch_id, ticker, first_ts, last_ts, bars)`: the time range of the new bars of
  each ingest, so `compute_impacts` can redo the events whose windows later bars cover (bars
  loaded out of order), and `finqlora_meta` key `impacts_price_batch:<ticker>` the last batch
  the stored impacts have seen.
- `finqlora_meta(key, value)`: schema version and provenance (e.g. `synthetic` = `true` for
  the sample database).
- view `event_impacts_wide`: one row per (event, ticker) with `ret_post_5m` .. `ret_post_120m`,
  `ret_pre_30m`, `ret_pre_120m`, for queries written against a wide layout.

A user's database is only read by `connect(..., readonly=True)`, `check_db` and the read
API; it is changed only by `migrate_db`, which backs it up first. (A hot journal that an
interrupted write left beside a file is rolled back before a read-only open: that restores the
last committed state, SQLite's own recovery, and changes no committed data.)
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import InputError, json_loads

# 2: events.stocks (the stock links a source gives an event) and the price_batches table. A
# version-1 finqlora store is brought up to date in place by `open_store` (tables and columns
# are only added, never changed).
SCHEMA_VERSION = 2
_UNIX_RE = re.compile(r"\d{9,13}(\.\d+)?")  # unix seconds or milliseconds, not e.g. '20260601'
SQLITE_MAGIC = b"SQLite format 3\x00"
# How long a write waits for another writer's lock before giving up (seconds).
BUSY_TIMEOUT_S = 10.0
# Publication times and bar times must lie in [1900, 2200): anything else is a unit or data
# error (e.g. ctime -99999999999 would be the year -1199), not a time.
MIN_TS = -2_208_988_800  # 1900-01-01T00:00:00Z
MAX_TS = 7_258_118_400  # 2200-01-01T00:00:00Z

# Post-event windows users' queries expect, in minutes; pre-event windows are stored negated.
DEFAULT_WINDOWS = (5, 10, 15, 30, 120)
DEFAULT_PRE_WINDOWS = (120,)

# Names a user's database may give its publication-time column, in order of preference.
TIME_COLUMN_CANDIDATES = (
    "ts_utc",
    "published_at",
    "publish_time",
    "pub_time",
    "datetime",
    "ctime",
    "event_time",
    "time",
    "timestamp",
    "created_at",
    "date",
)

# column name -> SQL type (and constraint) of every column finqlora adds to `events`.
EVENT_COLUMNS: dict[str, str] = {
    "event_id": "TEXT PRIMARY KEY",
    "content": "TEXT",
    "star": "INTEGER CHECK (star IS NULL OR star BETWEEN 1 AND 5)",
    "source": "TEXT",
    "source_id": "TEXT",
    "title": "TEXT",
    "published_at": "TEXT",
    "ts_utc": "INTEGER",
    "tz_offset_min": "INTEGER",
    "importance": "TEXT",
    "subjects": "TEXT",
    "url": "TEXT",
    "primary_event_id": "TEXT",
    "stocks": "TEXT",
}

IMPACT_COLUMNS: dict[str, str] = {
    "event_id": "TEXT NOT NULL",
    "ticker": "TEXT NOT NULL",
    "window_min": "INTEGER NOT NULL",
    "ret": "REAL",
    "status": "TEXT",
    "t0_ts": "INTEGER",
    "end_ts": "INTEGER",
    "close_t0": "REAL",
    "close_end": "REAL",
}

PRICE_COLUMNS: dict[str, str] = {
    "ticker": "TEXT NOT NULL",
    "ts": "INTEGER NOT NULL",
    "open": "REAL",
    "high": "REAL",
    "low": "REAL",
    "close": "REAL NOT NULL",
    "volume": "REAL",
}

# One row per (event, ticker) with a column per window, for queries written against the
# `ret_post_15m` style that some guides assume; the table itself stays long (one row a window).
_WIDE_COLUMNS = ",\n".join(
    [f"    MAX(CASE WHEN window_min = {w} THEN ret END) AS ret_post_{w}m" for w in DEFAULT_WINDOWS]
    + [f"    MAX(CASE WHEN window_min = -{w} THEN ret END) AS ret_pre_{w}m" for w in (30, 120)]
)

_SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS events (
    {", ".join(f"{name} {decl}" for name, decl in EVENT_COLUMNS.items())}
);
CREATE INDEX IF NOT EXISTS idx_events_ts ON events(ts_utc);
CREATE INDEX IF NOT EXISTS idx_events_source ON events(source, ts_utc);
CREATE INDEX IF NOT EXISTS idx_events_primary ON events(primary_event_id);
CREATE TABLE IF NOT EXISTS event_impacts (
    {", ".join(f"{name} {decl}" for name, decl in IMPACT_COLUMNS.items())},
    PRIMARY KEY (event_id, ticker, window_min)
);
CREATE INDEX IF NOT EXISTS idx_impacts_ticker ON event_impacts(ticker, window_min);
CREATE TABLE IF NOT EXISTS prices (
    {", ".join(f"{name} {decl}" for name, decl in PRICE_COLUMNS.items())},
    PRIMARY KEY (ticker, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS price_batches (
    batch_id INTEGER PRIMARY KEY,
    ticker TEXT NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    bars INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS finqlora_meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE VIEW IF NOT EXISTS event_impacts_wide AS
SELECT event_id, ticker,
{_WIDE_COLUMNS}
FROM event_impacts GROUP BY event_id, ticker;
"""


@dataclass
class Event:
    """One news event as the rest of finqlora sees it."""

    event_id: str
    ts_utc: int | None
    published_at: str | None
    content: str
    title: str | None
    star: int | None
    source: str | None
    primary_event_id: str | None
    importance: str | None = None
    subjects: list[str] = field(default_factory=list)
    # Codes of the linked stocks ('sz001373'); the name where the source gave no code.
    stocks: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Time helpers (shared with ingest)


def iso_utc(ts: int) -> str:
    """Unix seconds -> 'YYYY-MM-DDTHH:MM:SSZ'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def get_zone(name: str) -> ZoneInfo | timezone:
    """A time zone from a name ('UTC', 'Asia/Shanghai') or a fixed offset ('+08:00')."""
    if re.fullmatch(r"[+-]\d{2}:?\d{2}", name):
        sign = 1 if name[0] == "+" else -1
        digits = name[1:].replace(":", "")
        return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FinqloraError(
            f"unknown time zone {name!r}",
            hint="use an IANA name such as 'Asia/Shanghai' or 'UTC', or a fixed offset such as '+08:00'",
        ) from exc


def parse_time(value: object, *, tz: ZoneInfo | timezone | None) -> tuple[int, int] | None:
    """A publication time -> (unix seconds UTC, original offset in minutes).

    Accepts unix seconds or milliseconds (numbers or digit strings) and ISO-8601 strings.
    A string without a zone needs `tz`; without it a ValueError says so (callers turn it
    into an error that names the file and line). Returns None for empty values.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"time {value!r} is a boolean, not a time")
    if isinstance(value, (int, float)) or (isinstance(value, str) and _UNIX_RE.fullmatch(value.strip())):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"time {value!r} is not a finite number")
        if seconds > 1e11:  # milliseconds
            seconds /= 1000.0
        ts = check_ts(int(seconds), value)
        offset = 0
        if tz is not None:
            delta = datetime.fromtimestamp(ts, tz).utcoffset()
            offset = int(delta.total_seconds() // 60) if delta is not None else 0
        return ts, offset
    text = str(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"cannot read {_shorten(value)} as a time (expected ISO-8601 or unix seconds)") from exc
    if parsed.tzinfo is None:
        if tz is None:
            raise ValueError(f"time {value!r} has no time zone")
        parsed = parsed.replace(tzinfo=tz)
    delta = parsed.utcoffset()
    offset = int(delta.total_seconds() // 60) if delta is not None else 0
    try:
        stamp = int(parsed.timestamp())
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"time {_shorten(value)} is outside the years 1900-2199") from exc
    return check_ts(stamp, value), offset


def check_ts(ts: int, value: object = None) -> int:
    """`ts` if it lies in [MIN_TS, MAX_TS) (1900-2199), else a ValueError quoting `value`."""
    if not MIN_TS <= ts < MAX_TS:
        raise ValueError(
            f"time {_shorten(ts if value is None else value)} is outside the years 1900-2199 "
            "(unix seconds or milliseconds expected)"
        )
    return ts


def _shorten(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# ---------------------------------------------------------------------------------------
# Connecting and creating


def _looks_like_sqlite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(16) == SQLITE_MAGIC


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a finqlora or user database; refuses files that are not SQLite.

    A read-only connection can never change the file (SQLite `mode=ro`).
    """
    db_path = Path(path)
    if db_path.is_dir():
        raise FinqloraError(f"{db_path} is a folder, not a database file", hint="pass the path of a .db file")
    exists = db_path.exists() and db_path.stat().st_size > 0
    if exists and not _looks_like_sqlite(db_path):
        raise FinqloraError(
            f"{db_path} is not a SQLite database (its first bytes are not 'SQLite format 3')",
            hint="check the path; create a new store with `finqlora db init --db NEW.db`",
        )
    if readonly:
        if not exists:
            raise FinqloraError(
                f"database {db_path} does not exist",
                hint="create it with `finqlora db init --db PATH` or `finqlora db sample --db PATH`",
            )
    if readonly and exists:
        _roll_back_hot_journal(db_path)
    try:
        if readonly:
            conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path)
    except (OSError, sqlite3.Error) as exc:
        raise store_error(exc, db_path) or FinqloraError(
            f"cannot open {db_path}: {exc}", hint="check the path and that its folder exists and is writable"
        ) from exc
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    try:
        conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise store_error(exc, db_path) or FinqloraError(
            f"{db_path} cannot be read as SQLite: {exc}", hint="the file may be damaged; restore it from a backup"
        ) from exc
    return conn


def journal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-journal")


def _roll_back_hot_journal(db_path: Path) -> None:
    """Let SQLite roll back the journal an interrupted write left beside the file.

    A killed or disk-full ingest leaves `PATH-journal` holding the pages it had changed; until
    a read-write connection rolls them back, the file itself is inconsistent and a `mode=ro`
    connection cannot read it (SQLITE_READONLY_ROLLBACK). Any read-write open does the
    rollback; SQLite only replays a journal that no live writer holds, so a running writer is
    left alone. Where the file or its folder is not writable nothing happens here and
    `store_error` explains the read that fails.
    """
    journal = journal_path(db_path)
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    if not (os.access(db_path, os.W_OK) and os.access(db_path.parent, os.W_OK)):
        return
    try:
        conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S)
        try:
            conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # the read-only open that follows reports the problem


def store_error(exc: BaseException, path: str | Path | None) -> FinqloraError | None:
    """A clear FinqloraError for the ways writing a store fails (read-only, locked, full, I/O).

    None for other errors (constraint violations, bugs), which callers let through as they are.
    """
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    where = str(path) if path else "the database"
    if name == "SQLITE_READONLY_ROLLBACK":
        journal = journal_path(Path(where)).name if path else "its -journal file"
        return FinqloraError(
            f"{where} has a hot journal ({journal}) left by a write that was interrupted (killed, or the disk was full); "
            "SQLite must roll it back before the file can be read, and that needs write access to the file and its folder",
            hint=f"give this user write access to {where} and its folder (or free disk space) and run any finqlora command on it: "
            f"the first one rolls the journal back. Do not delete {journal} or copy the file without it: "
            "without the journal the file is corrupt",
        )
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return FinqloraError(
            f"{where} is read-only: {exc}",
            hint="check the file's and its folder's permissions (or the mount); nothing was stored",
        )
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in text:
        return FinqloraError(
            f"{where} is damaged: {exc}",
            hint=f"run `finqlora db check --db {where}` for details and restore the file from a backup "
            "(a copy taken without its -journal file while a write was interrupted is corrupt)",
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return FinqloraError(
            f"{where} is locked by another writer (waited {BUSY_TIMEOUT_S:g} s)",
            hint="another finqlora command (or a program such as a DB browser) is writing to it: "
            "wait for it to finish, close it, and run this again; nothing was stored",
        )
    if name == "SQLITE_FULL" or "disk is full" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return FinqloraError(
            f"{where}: the disk is full ({exc})",
            hint="free some disk space (SQLite needs room for its journal too) and run this again; nothing was stored",
        )
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_IOERR")) or "unable to open database" in text or "disk i/o error" in text:
        return FinqloraError(
            f"cannot write {where}: {exc}",
            hint="check that the file's folder exists and is writable (SQLite writes a journal beside the file) "
            "and that the disk is healthy; nothing was stored",
        )
    return None


def _database_path(conn: sqlite3.Connection) -> str | None:
    try:
        for _, name, file in conn.execute("PRAGMA database_list"):
            if name == "main":
                return file or None
    except sqlite3.Error:
        pass
    return None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: all or nothing.

    A read-only file, a lock held past BUSY_TIMEOUT_S, a full disk or an I/O error become a
    FinqloraError that says so (`store_error`); other errors pass through unchanged.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise
        conn.commit()
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        error = store_error(exc, _database_path(conn))
        if error is None:
            raise
        raise error from exc


def table_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({_quote(table)})")]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def init_db(path: str | Path) -> Path:
    """Create a new store (or bring an existing finqlora store up to date); returns the path.

    Refuses a database that has an `events` table finqlora did not create: such a user
    database goes through `finqlora db check --migrate`, which backs it up first.
    """
    db_path = Path(path)
    conn = connect(db_path)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "events" in tables and "finqlora_meta" not in tables:
            raise FinqloraError(
                f"{db_path} already holds an events table that finqlora did not create",
                hint=f"run `finqlora db check --db {db_path}` to see what it lacks, then add `--migrate` (a backup is made first)",
            )
        with transaction(conn):
            for statement in _split_sql(_SCHEMA_SQL):
                conn.execute(statement)
            _add_missing_columns(conn)
            set_meta(conn, "schema_version", str(SCHEMA_VERSION))
            conn.execute(
                "INSERT OR IGNORE INTO finqlora_meta(key, value) VALUES ('created_at', ?)",
                (iso_utc(int(time.time())),),
            )
    finally:
        conn.close()
    return db_path


def _split_sql(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO finqlora_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def meta_int(value: object) -> int | None:
    """A whole number stored as text in a user's database (`finqlora_meta`), or None.

    Digits only and at most 18 of them: the value comes from a file anyone may have edited,
    and int() of an arbitrary string can fail (letters) or refuse (more than 4,300 digits).
    """
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _star(value: object) -> int | None:
    """A user's `star` cell (integer, real or digits) as an int; None for text, NaN, inf or huge."""
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return meta_int(value) if isinstance(value, str) else None


def get_meta(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(conn.execute("SELECT key, value FROM finqlora_meta").fetchall())
    except sqlite3.OperationalError:
        return {}


def open_store(path: str | Path) -> sqlite3.Connection:
    """Open a store for writing, creating it if it does not exist; refuses an unmigrated user DB."""
    db_path = Path(path)
    if not db_path.exists() or db_path.stat().st_size == 0:
        init_db(db_path)
    conn = connect(db_path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    meta = get_meta(conn)
    version = meta_int(meta.get("schema_version")) or 0
    if "finqlora_meta" in tables and 1 <= version < SCHEMA_VERSION:
        _upgrade_store(conn)
        version = SCHEMA_VERSION
    if "finqlora_meta" not in tables or version < SCHEMA_VERSION:
        conn.close()
        raise FinqloraError(
            f"{db_path} is not (yet) a finqlora store: it lacks tables or columns finqlora writes to",
            hint=f"run `finqlora db check --db {db_path} --migrate` (it backs the file up first)",
        )
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> list[str]:
    """Add the finqlora columns an existing table lacks (inside the caller's transaction)."""
    added = []
    for table, spec in (("events", EVENT_COLUMNS), ("event_impacts", IMPACT_COLUMNS), ("prices", PRICE_COLUMNS)):
        existing = set(table_columns(conn, table))
        if not existing:
            continue
        for column, decl in spec.items():
            if column not in existing:
                # ALTER TABLE cannot add PRIMARY KEY / NOT NULL columns: keep the type only.
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl.split()[0]}")
                added.append(f"{table}.{column}")
    return added


def _upgrade_store(conn: sqlite3.Connection) -> None:
    """Bring an older finqlora store to SCHEMA_VERSION: add the columns it lacks (data untouched)."""
    with transaction(conn):
        for statement in _split_sql(_SCHEMA_SQL):  # every statement is CREATE ... IF NOT EXISTS
            conn.execute(statement)
        _add_missing_columns(conn)
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))


# ---------------------------------------------------------------------------------------
# Reading


def find_time_column(columns: list[str]) -> str | None:
    lowered = {name.lower(): name for name in columns}
    for candidate in TIME_COLUMN_CANDIDATES:
        if candidate in lowered:
            return lowered[candidate]
    return None


def read_events(
    conn: sqlite3.Connection,
    *,
    naive_tz: str | None = None,
    primaries_only: bool = False,
) -> list[Event]:
    """All events ordered by time (events without a readable time last).

    Works on finqlora stores and on users' databases: when there is no `ts_utc` column the
    publication time is read from the first column named like one in
    `TIME_COLUMN_CANDIDATES`; times written without a zone need `naive_tz` (e.g.
    'Asia/Shanghai'), otherwise a FinqloraError says which column and what to do.
    """
    columns = table_columns(conn, "events")
    if not columns:
        raise FinqloraError("the database has no events table", hint="run `finqlora db check --db PATH` to see what is missing")
    missing = [name for name in ("event_id", "content") if name not in columns]
    if missing:
        raise FinqloraError(
            f"the events table lacks the column(s) {', '.join(missing)}",
            hint="run `finqlora db check --db PATH` for what they are used for",
        )
    time_column = find_time_column(columns)
    wanted = ["event_id", "content"] + [
        name
        for name in ("title", "star", "source", "primary_event_id", "importance", "subjects", "published_at", "stocks")
        if name in columns
    ]
    if time_column and time_column not in wanted:
        wanted.append(time_column)
    where = " WHERE primary_event_id IS NULL" if primaries_only and "primary_event_id" in columns else ""
    rows = conn.execute(f"SELECT {', '.join(_quote(c) for c in wanted)} FROM events{where}").fetchall()
    zone = get_zone(naive_tz) if naive_tz else None
    events: list[Event] = []
    for row in rows:
        record = dict(zip(wanted, row))
        ts: int | None = None
        if time_column is not None and record.get(time_column) not in (None, ""):
            try:
                parsed = parse_time(record[time_column], tz=zone)
            except ValueError as exc:
                hint = (
                    "pass the zone these times were written in (e.g. naive_tz='Asia/Shanghai'), "
                    "or run `finqlora db check --db PATH --migrate --tz Asia/Shanghai` once to store UTC times"
                    if "no time zone" in str(exc)
                    else "correct or delete that row's time (SQL UPDATE/DELETE on events)"
                )
                raise FinqloraError(f"events.{time_column} of event {record['event_id']!r}: {exc}", hint=hint) from exc
            ts = parsed[0] if parsed else None
        published = record.get("published_at")
        if ts is not None and (not published or not str(published).endswith("Z")):
            published = iso_utc(ts)
        subjects_raw = record.get("subjects")
        subjects = _json_list(subjects_raw)
        star = record.get("star")
        events.append(
            Event(
                event_id=str(record["event_id"]),
                ts_utc=ts,
                published_at=published if ts is not None else None,
                content=record.get("content") or "",
                title=record.get("title"),
                star=_star(star),
                source=record.get("source"),
                primary_event_id=record.get("primary_event_id"),
                importance=record.get("importance"),
                subjects=subjects,
                stocks=stock_codes(record.get("stocks")),
            )
        )
    events.sort(key=lambda e: (e.ts_utc is None, e.ts_utc or 0, e.event_id))
    return events


def _json_list(value: object) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        try:
            parsed = json_loads(value)
        except InputError:  # plain text, or JSON past the bounds (depth, digits)
            return [part.strip() for part in re.split(r"[,，;；]", value) if part.strip()]
        return [str(item) for item in parsed] if isinstance(parsed, list) else [str(parsed)]
    return [str(value)]


def stock_codes(value: object) -> list[str]:
    """The stored `stocks` JSON ([{"code", "name"}, ...] or plain codes) -> codes (names where no code)."""
    if not value:
        return []
    try:
        parsed = json_loads(value) if isinstance(value, str) else value
    except InputError:
        return _json_list(value)
    if not isinstance(parsed, list):
        parsed = [parsed]
    codes = []
    for item in parsed:
        code = (item.get("code") or item.get("name")) if isinstance(item, dict) else item
        if code not in (None, ""):
            codes.append(str(code))
    return codes


def read_impacts(conn: sqlite3.Connection) -> dict[str, dict[tuple[str, int], float]]:
    """event_id -> {(ticker, window_min): ret} for every KNOWN return (NULL rows are left out)."""
    if not table_columns(conn, "event_impacts"):
        return {}
    impacts: dict[str, dict[tuple[str, int], float]] = {}
    for event_id, ticker, window, ret in conn.execute(
        "SELECT event_id, ticker, window_min, ret FROM event_impacts WHERE ret IS NOT NULL"
    ):
        impacts.setdefault(str(event_id), {})[(str(ticker), int(window))] = float(ret)
    return impacts


# ---------------------------------------------------------------------------------------
# Checking and migrating users' databases


@dataclass
class CheckProblem:
    severity: str  # "fatal": the pipeline cannot run; "warning": a feature is disabled
    table: str
    column: str | None
    disables: str
    kind: str = "missing"  # or "suspicious": present but probably wrong

    def describe(self) -> str:
        if self.kind == "damaged":
            return f"damaged file: {self.disables}"
        where = f"{self.table}.{self.column}" if self.column else f"table {self.table}"
        return f"{self.kind} {where}: {self.disables}"


# Median |post-event return| above which stored returns are probably percent: a typical 5-120
# minute move is ~0.05% (0.0005 as a fraction); a median of 1% would be extraordinary.
PERCENT_SUSPICION = 0.01


def _median_abs_return(conn: sqlite3.Connection) -> float | None:
    values = sorted(
        abs(row[0])
        for row in conn.execute("SELECT ret FROM event_impacts WHERE ret IS NOT NULL AND window_min > 0 LIMIT 20000")
        if isinstance(row[0], (int, float))
    )
    return values[len(values) // 2] if values else None


@dataclass
class CheckReport:
    path: str
    schema_version: int | None
    time_column: str | None
    counts: dict[str, int]
    problems: list[CheckProblem]

    @property
    def ok(self) -> bool:
        return not any(p.severity == "fatal" for p in self.problems)

    @property
    def damaged(self) -> bool:
        return any(p.kind == "damaged" for p in self.problems)

    @property
    def migratable(self) -> bool:
        """True when `--migrate` would add something (never to a damaged file)."""
        if self.damaged:
            return False
        return any(p.kind == "missing" for p in self.problems) or (self.schema_version or 0) < SCHEMA_VERSION


_WHAT_EVENT_COLUMNS_DO = {
    "event_id": ("fatal", "events cannot be identified, linked to impacts or split without leaking"),
    "content": ("fatal", "there is no news text to build instructions from"),
    "star": ("warning", "importance (star 1-5) is unknown: no star filter or importance-based analysis samples"),
    "source": ("warning", "events cannot be grouped by source and cross-source duplicates cannot be linked"),
    "title": ("warning", "titles are taken from the content's 【...】 prefix only"),
    "ts_utc": ("warning", "times are re-parsed from the user's time column on every read"),
    "tz_offset_min": ("warning", "the original time-zone offset of each event is not kept"),
    "importance": ("warning", "the source's raw importance level is not kept"),
    "subjects": ("warning", "topic tags are not available to the dataset builder"),
    "primary_event_id": ("warning", "cross-source duplicates cannot be linked: the same event may appear twice"),
    "stocks": ("warning", "the stocks a source links to an event are not kept: equities get no news_impact samples"),
}


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """What SQLite's `quick_check` finds wrong with the file (first problems), or None if it is sound.

    quick_check reads every page (O(N), no index-content cross-check): it catches a file
    copied without its hot journal, truncated or overwritten.
    """
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        found = [str(exc)]
    if found == ["ok"]:
        return None
    lines = [line.strip() for text in found for line in text.splitlines() if line.strip() and not line.startswith("***")]
    return "SQLite's quick_check reports: " + "; ".join(lines[:5]) + " (restore the file from a backup)"


def check_db(path: str | Path) -> CheckReport:
    """Validate any database read-only: what is missing and what each missing piece disables."""
    conn = connect(path, readonly=True)
    try:
        damage = _quick_check(conn)
        if damage:
            # Counting or reading a damaged file may fail or mislead: report the damage alone.
            return CheckReport(str(path), None, None, {}, [CheckProblem("fatal", "file", None, damage, kind="damaged")])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        problems: list[CheckProblem] = []
        counts: dict[str, int] = {}
        for table in ("events", "event_impacts", "prices"):
            if table in tables:
                counts[table] = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        time_column = None
        if "events" not in tables:
            problems.append(CheckProblem("fatal", "events", None, "there are no news events: nothing to build a dataset from"))
        else:
            columns = table_columns(conn, "events")
            for column, (severity, disables) in _WHAT_EVENT_COLUMNS_DO.items():
                if column not in columns:
                    problems.append(CheckProblem(severity, "events", column, disables))
            time_column = find_time_column(columns)
            if time_column is None:
                problems.append(
                    CheckProblem(
                        "fatal",
                        "events",
                        "ts_utc",
                        "no publication time column (looked for " + ", ".join(TIME_COLUMN_CANDIDATES) + "): "
                        "no impacts, no time-ordered splits",
                    )
                )
        if "event_impacts" not in tables:
            problems.append(
                CheckProblem("warning", "event_impacts", None, "no market reactions: news_impact and market_analysis samples are disabled until `finqlora db impacts` runs")
            )
        else:
            columns = table_columns(conn, "event_impacts")
            for column in ("event_id", "ticker", "window_min", "ret"):
                if column not in columns:
                    problems.append(CheckProblem("fatal", "event_impacts", column, "stored impacts cannot be read"))
            for column in ("status", "t0_ts", "end_ts", "close_t0", "close_end"):
                if column not in columns:
                    problems.append(CheckProblem("warning", "event_impacts", column, "why a return is unknown and which bars it came from are not recorded"))
            if "ret" in columns:
                scale = _median_abs_return(conn)
                if scale is not None and scale > PERCENT_SUSPICION:
                    problems.append(
                        CheckProblem(
                            "warning",
                            "event_impacts",
                            "ret",
                            f"returns look like percent, not fractions (median |ret| = {scale:.4g}); finqlora reads "
                            "0.0012 as +0.12%, so labels would be wrong: divide them by 100",
                            kind="suspicious",
                        )
                    )
        if "prices" not in tables:
            problems.append(CheckProblem("warning", "prices", None, "no price bars: `finqlora db impacts` cannot compute returns"))
        else:
            columns = table_columns(conn, "prices")
            for column in ("ticker", "ts", "close"):
                if column not in columns:
                    problems.append(CheckProblem("fatal", "prices", column, "price bars cannot be read"))
        meta = get_meta(conn)
        version = meta_int(meta.get("schema_version"))
        return CheckReport(str(path), version, time_column, counts, problems)
    finally:
        conn.close()


def backup_db(path: str | Path) -> Path:
    """Copy the database (consistently, through SQLite's backup API) next to itself."""
    source_path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = source_path.with_name(f"{source_path.name}.bak-{stamp}")
    counter = 1
    while target.exists():
        target = source_path.with_name(f"{source_path.name}.bak-{stamp}-{counter}")
        counter += 1
    source = connect(source_path, readonly=True)
    try:
        tmp = target.with_name(target.name + ".tmp")
        dest = sqlite3.connect(tmp)
        try:
            source.backup(dest)
        finally:
            dest.close()
        shutil.move(tmp, target)
    finally:
        source.close()
    return target


@dataclass
class MigrationResult:
    backup: Path | None
    added: list[str]
    times_filled: int


def migrate_db(path: str | Path, *, tz: str | None = None) -> MigrationResult:
    """Bring a user's database up to the finqlora schema, after backing it up.

    Adds missing tables and columns (never drops or rewrites existing data), fills `ts_utc`,
    `published_at` and `tz_offset_min` from the user's time column (times without a zone need
    `tz`), and records the schema version. All in one transaction.
    """
    db_path = Path(path)
    report = check_db(db_path)
    if not report.migratable:
        return MigrationResult(None, [], 0)
    zone = get_zone(tz) if tz else None
    backup = backup_db(db_path)
    conn = connect(db_path)
    added: list[str] = []
    filled = 0
    try:
        with transaction(conn):
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            added.extend(_add_missing_columns(conn))
            views = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='view'")}
            for statement in _split_sql(_SCHEMA_SQL):
                if statement.startswith(("CREATE TABLE", "CREATE VIEW")):
                    kind, name = statement.split()[1].lower(), statement.split()[5]
                    if name not in (tables if kind == "table" else views):
                        added.append(f"{kind} {name}")
                conn.execute(statement)
            if "events" in tables:
                conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS idx_events_event_id ON events(event_id)")
                time_column = report.time_column
                if time_column and time_column != "ts_utc":
                    rows = conn.execute(
                        f"SELECT rowid, {_quote(time_column)} FROM events WHERE ts_utc IS NULL AND {_quote(time_column)} IS NOT NULL"
                    ).fetchall()
                    updates = []
                    for rowid, value in rows:
                        try:
                            parsed = parse_time(value, tz=zone)
                        except ValueError as exc:
                            raise FinqloraError(
                                f"events.{time_column} row {rowid}: {exc}",
                                hint="rerun with `--tz ZONE` (the zone these times were written in, e.g. Asia/Shanghai); nothing was changed",
                            ) from exc
                        if parsed:
                            updates.append((parsed[0], iso_utc(parsed[0]) if time_column != "published_at" else None, parsed[1], rowid))
                    conn.executemany(
                        "UPDATE events SET ts_utc = ?, published_at = COALESCE(?, published_at), tz_offset_min = ? WHERE rowid = ?",
                        updates,
                    )
                    filled = len(updates)
            set_meta(conn, "schema_version", str(SCHEMA_VERSION))
            set_meta(conn, "migrated_at", iso_utc(int(time.time())))
    except sqlite3.IntegrityError as exc:
        raise FinqloraError(
            f"cannot migrate {db_path}: {exc}",
            hint="events.event_id must be unique; remove the duplicate ids (nothing was changed; the backup is at " + str(backup) + ")",
        ) from exc
    finally:
        conn.close()
    return MigrationResult(backup, added, filled)
