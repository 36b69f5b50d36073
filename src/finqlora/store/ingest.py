"""Ingestion of news and price bars into the event store.

News formats (`--format`):

- `cls`: the CLS telegraph in the slim JSONL(.gz) form and the raw crawler form (a nested
  `raw` API object). The same slim form is used for 东方财富 (`source` = `eastmoney`) and
  同花顺 (`ths`), so these files are read with `--format cls` too.
- `jsonl` / `csv`: any other source, with a column mapping (`--map content=text`) and an
  explicit `--tz` for times written without a zone.

Importance -> `star` (1-5), documented in docs/store.md:

| source    | raw flag                         | star |
|-----------|----------------------------------|------|
| cls       | level A                          | 5    |
| cls       | level B                          | 4    |
| cls       | level C and bold = 1             | 3    |
| cls       | level C                          | 2    |
| ths       | import 3 / 1-2 / 0               | 4 / 3 / 2 |
| eastmoney | titleColor != 0 (red headline)   | 4    |
| eastmoney | titleColor 0                     | 2    |
| other     | a number 1-5 in the star column  | as is |
| other     | A/B/C (CLS-style level)          | as cls |
| other     | no flag                          | 2    |

Every file is read and checked completely before its rows are written, and a whole ingest
(all files of one command) is one transaction: a bad line aborts the run with its file and
line number and the database is unchanged. Re-ingesting a file adds nothing (events are keyed by `source:id`, bars by
(ticker, ts)). The same event told by several sources within `dedup_window_min` minutes with
near-identical text is stored once as the primary (the first stored) and the others are kept
with `primary_event_id` pointing to it.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import hashlib
import io
import json
import math
import re
import sqlite3
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any

import numpy as np

from finqlora.store.db import MAX_TS, MIN_TS, get_zone, iso_utc, open_store, parse_time, transaction
from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import InputError, csv_rows, json_loads
from finqlora.core.textdedup import normalize_flash

NEWS_FORMATS = ("cls", "jsonl", "csv")
NEWS_FIELDS = ("id", "time", "content", "title", "source", "star", "importance", "subjects", "url", "stocks")

# Column names tried, in order, for each field of a jsonl/csv news file without --map.
_NEWS_FIELD_GUESSES: dict[str, tuple[str, ...]] = {
    "id": ("id", "event_id", "news_id", "uid"),
    "time": ("ts_utc", "published_at", "publish_time", "pub_time", "datetime", "ctime", "time", "timestamp", "date"),
    "content": ("content", "text", "body", "brief", "summary"),
    "title": ("title", "headline"),
    "source": ("source",),
    "star": ("star", "stars"),
    "importance": ("level", "importance", "importance_level"),
    "subjects": ("subjects", "tags", "topics"),
    "url": ("url", "link", "shareurl"),
    "stocks": ("stocks", "stock_list", "stock_codes"),
}

PRICE_FIELDS = ("time", "open", "high", "low", "close", "volume")
_PRICE_FIELD_GUESSES: dict[str, tuple[str, ...]] = {
    "time": ("datetime_utc", "datetime", "timestamp", "time", "date", "ts"),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c", "price", "last"),
    "volume": ("volume", "vol", "v"),
}

DEFAULT_DEDUP_WINDOW_MIN = 10
DEFAULT_DEDUP_THRESHOLD = 0.6
MAX_ID_CHARS = 200

_TITLE_RE = re.compile(r"^\s*【([^】]{1,200})】")
_UNIX_STAMP_RE = re.compile(r"\d{9,13}(\.\d+)?")


@dataclass
class NewsRecord:
    """One news item ready to store."""

    source: str
    source_id: str
    ts_utc: int
    tz_offset_min: int
    content: str
    title: str | None = None
    importance: str | None = None
    star: int | None = None
    subjects: list[str] = field(default_factory=list)
    url: str | None = None
    stocks: list[dict[str, str]] = field(default_factory=list)  # [{"code": "sz001373", "name": "翔腾新材"}]

    @property
    def event_id(self) -> str:
        return f"{self.source}:{self.source_id}"


@dataclass
class SkippedRow:
    file: str
    line: int
    reason: str


@dataclass
class NewsIngestReport:
    files: list[str]
    read: int = 0
    inserted: int = 0
    already_present: int = 0
    linked_duplicates: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    by_source: dict[str, int] = field(default_factory=dict)


@dataclass
class PriceIngestReport:
    ticker: str
    files: list[str]
    read: int = 0
    inserted: int = 0
    already_present: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    first_ts: int | None = None
    last_ts: int | None = None


# ---------------------------------------------------------------------------------------
# Reading files


def read_text_file(path: str | Path) -> str:
    """The whole file as text (transparently gunzipped); clear errors for empty / non-UTF-8."""
    file_path = Path(path)
    if not file_path.is_file():
        raise FinqloraError(f"{file_path} does not exist or is not a file", hint="check the path")
    try:
        if file_path.suffix == ".gz":
            with gzip.open(file_path, "rb") as handle:
                data = handle.read()
        else:
            data = file_path.read_bytes()
    except (OSError, EOFError) as exc:
        raise FinqloraError(f"{file_path}: cannot read ({exc})", hint="the file may be truncated or not gzip; re-download it") from exc
    if not data.strip():
        raise FinqloraError(f"{file_path} is empty", hint="check that the export finished; nothing was stored")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FinqloraError(
            f"{file_path}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="convert the file to UTF-8 first, e.g. `iconv -f GB18030 -t UTF-8 IN > OUT`; nothing was stored",
        ) from exc
    return text


def _parse_jsonl(path: Path, *, skip_bad: bool, skipped: list[SkippedRow]) -> Iterable[tuple[int, dict]]:
    text = read_text_file(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json_loads(line)
        except InputError as exc:
            # Also 100k nested `[` and integers of more than 4,300 digits: one bad line each.
            problem = str(exc)
            if skip_bad:
                skipped.append(SkippedRow(str(path), lineno, f"malformed JSON: {problem}"))
                continue
            raise FinqloraError(
                f"{path}, line {lineno}: malformed JSON ({problem})",
                hint="fix or delete that line, or rerun with --skip-bad to skip such lines (they are counted); nothing was stored",
            ) from None
        if not isinstance(obj, dict):
            if skip_bad:
                skipped.append(SkippedRow(str(path), lineno, "not a JSON object"))
                continue
            raise FinqloraError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}", hint="each line must be one {...} record")
        yield lineno, obj


class FieldError(ValueError):
    """A value of the wrong type or range in one record; the message names the field."""


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _text_field(value: object, name: str) -> str | None:
    """A text field: a string (or nothing); numbers, lists and objects are refused."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FieldError(f"field `{name}` must be a string, got {_json_type(value)}")
    return value


def _id_field(value: object, name: str = "id") -> str:
    """An id: a non-empty string or integer of at most MAX_ID_CHARS characters."""
    if value in (None, ""):
        raise FieldError(f"the record has no `{name}`")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError(f"field `{name}` must be a string or an integer, got {_json_type(value)}")
    text = str(value).strip()
    if not text or len(text) > MAX_ID_CHARS:
        raise FieldError(f"field `{name}` must be 1-{MAX_ID_CHARS} characters, got {len(text)}")
    return text


def _time_field(value: object, name: str, *, tz) -> tuple[int, int] | None:
    if isinstance(value, (dict, list, bool)):
        raise FieldError(f"field `{name}` must be unix seconds or an ISO-8601 string, got {_json_type(value)}")
    try:
        return parse_time(value, tz=tz)
    except ValueError as exc:
        if "no time zone" in str(exc):
            raise
        raise FieldError(f"field `{name}`: {exc}") from None


def _subjects(value: object) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        try:
            value = json_loads(value)
        except InputError:
            return [part.strip() for part in re.split(r"[,，;；|]", value) if part.strip()]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [str(value)]
    names = []
    for item in value:
        name = item.get("subject_name") or item.get("name") if isinstance(item, dict) else item
        if name:
            names.append(str(name))
    return names


def stock_links(stocks: object, stock_list: object = None) -> list[dict[str, str]]:
    """The stocks a source links to an event, as [{"code", "name"}] (code '' when unknown).

    CLS gives `stocks` with names but empty codes and `raw_keep.stock_list` with `StockID`:
    codes are taken from the latter by name. A plain string item is read as a code.
    """
    coded: dict[str, str] = {}
    for item in stock_list if isinstance(stock_list, list) else []:
        if isinstance(item, dict) and item.get("name") and item.get("StockID"):
            coded[str(item["name"])] = str(item["StockID"])
    links: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    items = stocks if isinstance(stocks, list) else ([stocks] if stocks else [])
    if not items and isinstance(stock_list, list):
        items = stock_list
    for item in items:
        if isinstance(item, dict):
            name = str(item.get("name") or "")
            code = str(item.get("code") or item.get("StockID") or coded.get(name, ""))
        elif isinstance(item, (str, int)) and str(item).strip():
            name, code = "", str(item).strip()
        else:
            continue
        if (code or name) and (code, name) not in seen:
            seen.add((code, name))
            links.append({"code": code, "name": name})
    return links


def _stock_items(value: object) -> object:
    """A csv/jsonl stocks cell: a JSON list, or codes separated by commas/semicolons."""
    if isinstance(value, str):
        try:
            return json_loads(value)
        except InputError:
            return [part.strip() for part in re.split(r"[,，;；|]", value) if part.strip()]
    return value


def title_from_content(content: str) -> str | None:
    match = _TITLE_RE.match(content)
    return match.group(1).strip() if match else None


def star_for(source: str, importance: str | None, flags: dict | None = None) -> int:
    """Map a source's importance level / flags to star 1-5 (table in the module docstring)."""
    flags = flags or {}
    level = (importance or "").strip().upper()
    if source == "ths":
        raw = str(flags.get("import", "0"))
        return {"3": 4, "2": 3, "1": 3}.get(raw, 2)
    if source == "eastmoney":
        return 4 if flags.get("titleColor") not in (None, 0, "0", "") else 2
    if level in ("A", "B", "C"):
        if level == "A":
            return 5
        if level == "B":
            return 4
        return 3 if flags.get("bold") in (1, "1", True) else 2
    if level in ("1", "2", "3", "4", "5"):
        return int(level)
    return 2


def _cls_record(obj: dict, *, tz) -> NewsRecord | None:
    raw = obj.get("raw") if isinstance(obj.get("raw"), dict) else {}
    keep = obj.get("raw_keep") if isinstance(obj.get("raw_keep"), dict) else {}
    flags = {**raw, **keep}

    def pick(name: str):
        value = obj.get(name)
        return value if value not in (None, "") else raw.get(name)

    source = _text_field(pick("source"), "source") or "cls"
    if source == "财联社":
        source = "cls"
    source_id = _id_field(pick("id"))
    content = (_text_field(pick("content"), "content") or _text_field(pick("brief"), "brief") or "").strip()
    if not content:
        return None
    when = pick("ctime")
    stamp = obj.get("datetime")
    offset = None
    if isinstance(stamp, str) and stamp:
        parsed = _time_field(stamp, "datetime", tz=tz)
        if parsed:
            offset = parsed[1]
            if when in (None, ""):
                when = parsed[0]
    if when in (None, ""):
        raise FieldError("the record has neither `ctime` nor `datetime`")
    ts, default_offset = _time_field(when, "ctime", tz=tz) or (None, 0)
    title = (_text_field(pick("title"), "title") or "").strip() or title_from_content(content)
    importance = _text_field(pick("level"), "level")
    url = _text_field(pick("shareurl"), "shareurl") or _text_field(pick("url"), "url")
    return NewsRecord(
        source=source,
        source_id=str(source_id),
        ts_utc=int(ts),
        # The Chinese feeds publish in Beijing time; keep that offset when only `ctime` is given.
        tz_offset_min=offset if offset is not None else (default_offset if tz is not None else 480),
        content=content,
        title=title,
        importance=str(importance) if importance else None,
        star=star_for(source, importance, flags),
        subjects=_subjects(obj.get("subjects") or raw.get("subjects")),
        url=url,
        stocks=stock_links(obj.get("stocks") or raw.get("stocks"), keep.get("stock_list") or raw.get("stock_list")),
    )


def _resolve_mapping(available: Sequence[str], mapping: dict[str, str], guesses: dict[str, tuple[str, ...]]) -> dict[str, str]:
    lowered = {name.lower(): name for name in available}
    resolved: dict[str, str] = {}
    for name, column in mapping.items():
        resolved[name] = column
    for name, candidates in guesses.items():
        if name in resolved:
            continue
        for candidate in candidates:
            if candidate in lowered:
                resolved[name] = lowered[candidate]
                break
    return resolved


def _generic_record(row: dict, columns: dict[str, str], *, source: str | None, tz) -> NewsRecord | None:
    def get(name: str):
        column = columns.get(name)
        value = row.get(column) if column else None
        return value.strip() if isinstance(value, str) else value

    def field_name(name: str) -> str:
        return columns.get(name) or name

    content = _text_field(get("content"), field_name("content")) or ""
    if not content:
        return None
    parsed = _time_field(get("time"), field_name("time"), tz=tz)
    if parsed is None:
        raise FieldError(f"the time column {columns['time']!r} is empty")
    ts, offset = parsed
    record_source = _text_field(get("source"), field_name("source")) or source
    if not record_source:
        raise FieldError("no source: pass --source NAME or map a source column")
    if get("id") in (None, ""):
        # No id column: a stable id from time + text keeps re-ingestion idempotent.
        source_id = hashlib.sha1(f"{ts}\x00{content}".encode()).hexdigest()[:16]
    else:
        source_id = _id_field(get("id"), field_name("id"))
    star_raw = get("star")
    importance = get("importance")
    if isinstance(importance, (dict, list, bool)):
        raise FieldError(f"field `{field_name('importance')}` must be a string or a number, got {_json_type(importance)}")
    star = None
    if star_raw not in (None, ""):
        try:
            star = int(float(star_raw))
        except (TypeError, ValueError, OverflowError):
            raise FieldError(f"field `{field_name('star')}`: {str(star_raw)[:40]!r} is not a number 1-5") from None
        if not 1 <= star <= 5:
            raise FieldError(f"field `{field_name('star')}`: {star} is outside 1-5")
    if star is None:
        star = star_for(str(record_source), str(importance) if importance else None)
    return NewsRecord(
        source=record_source,
        source_id=source_id,
        ts_utc=ts,
        tz_offset_min=offset,
        content=content,
        title=_text_field(get("title"), field_name("title")) or title_from_content(content),
        importance=str(importance) if importance not in (None, "") else None,
        star=star,
        subjects=_subjects(get("subjects")),
        url=_text_field(get("url"), field_name("url")),
        stocks=stock_links(_stock_items(get("stocks"))),
    )


def read_news_file(
    path: str | Path,
    fmt: str = "cls",
    *,
    tz: str | None = None,
    mapping: dict[str, str] | None = None,
    source: str | None = None,
    skip_bad: bool = False,
) -> tuple[list[NewsRecord], list[SkippedRow]]:
    """Parse one news file completely (no database access). Raises FinqloraError on bad input."""
    file_path = Path(path)
    if fmt not in NEWS_FORMATS:
        raise FinqloraError(f"unknown news format {fmt!r}", hint=f"use one of: {', '.join(NEWS_FORMATS)}")
    zone = get_zone(tz) if tz else None
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(NEWS_FIELDS))
    if unknown:
        raise FinqloraError(f"unknown field(s) in --map: {', '.join(unknown)}", hint=f"fields are: {', '.join(NEWS_FIELDS)}")
    skipped: list[SkippedRow] = []
    records: list[NewsRecord] = []

    def fail(lineno: int, exc: Exception) -> None:
        message = f"{file_path}, line {lineno}: {exc}"
        if "no time zone" in str(exc):
            hint = "pass --tz with the zone these times were written in (e.g. --tz Asia/Shanghai); nothing was stored"
        else:
            hint = "fix that line, or rerun with --skip-bad to skip such lines (they are counted); nothing was stored"
        if skip_bad and "no time zone" not in str(exc):
            skipped.append(SkippedRow(str(file_path), lineno, str(exc)))
            return
        raise FinqloraError(message, hint=hint) from exc

    def collect(rows: Iterable[tuple[int, Any]], make_record: Callable[[Any], NewsRecord | None]) -> tuple[list[NewsRecord], list[SkippedRow]]:
        for lineno, row in rows:
            try:
                record = make_record(row)
            except (ValueError, TypeError, OverflowError) as exc:
                fail(lineno, exc)
                continue
            if record is None:
                skipped.append(SkippedRow(str(file_path), lineno, "no content"))
            else:
                records.append(record)
        return records, skipped

    if fmt == "cls":
        return collect(_parse_jsonl(file_path, skip_bad=skip_bad, skipped=skipped), lambda obj: _cls_record(obj, tz=zone))

    if fmt == "jsonl":
        rows = list(_parse_jsonl(file_path, skip_bad=skip_bad, skipped=skipped))
        available = sorted({key for _, obj in rows for key in obj})
    else:
        text = read_text_file(file_path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        # csv line numbers: header is line 1
        rows = list(csv_rows(reader, file_path, hint="fix that line (or split the long field); nothing was stored"))
        available = list(reader.fieldnames or [])
    columns = _resolve_mapping(available, mapping, _NEWS_FIELD_GUESSES)
    for required in ("time", "content"):
        column = columns.get(required)
        if column is None or (fmt == "csv" and column not in available):
            raise FinqloraError(
                f"{file_path}: no {required} column (the file has: {', '.join(available) or 'no columns'})",
                hint=f"name it with --map {required}=COLUMN; nothing was stored",
            )
    if not source and "source" not in columns:
        raise FinqloraError(
            f"{file_path}: no source column and no --source",
            hint="pass --source NAME (e.g. --source mywire) or --map source=COLUMN; event ids are SOURCE:ID",
        )
    return collect(rows, lambda row: _generic_record(row, columns, source=source, tz=zone))


# ---------------------------------------------------------------------------------------
# Cross-source duplicate linking


def shingles(text: str, size: int = 3) -> frozenset[str]:
    if len(text) <= size:
        return frozenset([text]) if text else frozenset()
    return frozenset({text[i : i + size] for i in range(len(text) - size + 1)})


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Overlap coefficient |A∩B| / min(|A|,|B|): one source often shortens the other's text."""
    if not a or not b:
        return 0.0
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return len(small & large) / len(small)


@dataclass
class _Candidate:
    ts: int
    event_id: str
    source: str
    text_fn: Callable[[], frozenset[str]]
    _shingles: frozenset[str] | None = None

    def grams(self) -> frozenset[str]:
        if self._shingles is None:
            self._shingles = self.text_fn()
        return self._shingles


def link_duplicates(
    conn: sqlite3.Connection,
    records: list[NewsRecord],
    *,
    window_min: int = DEFAULT_DEDUP_WINDOW_MIN,
    threshold: float = DEFAULT_DEDUP_THRESHOLD,
) -> dict[str, str]:
    """event_id -> primary_event_id for the new records that re-tell an event of another source.

    Candidates are primaries already stored and earlier new records, of a different source,
    within `window_min` minutes. Shingles are built lazily, so a single-source ingest costs
    almost nothing. Both texts must have at least 8 shingles (short flashes such as
    "现货黄金涨1%" are too generic to link).
    """
    if not records:
        return {}
    window = window_min * 60
    lo = min(r.ts_utc for r in records) - window
    hi = max(r.ts_utc for r in records) + window
    pool: list[_Candidate] = []
    for event_id, source, ts, title, content in conn.execute(
        "SELECT event_id, source, ts_utc, title, content FROM events "
        "WHERE primary_event_id IS NULL AND ts_utc BETWEEN ? AND ? ORDER BY ts_utc",
        (lo, hi),
    ):
        pool.append(_Candidate(int(ts), event_id, source or "", lambda t=title, c=content: shingles(normalize_flash(t, c or ""))))
    pool_ts = [c.ts for c in pool]
    links: dict[str, str] = {}
    for record in sorted(records, key=lambda r: (r.ts_utc, r.event_id)):
        start = bisect.bisect_left(pool_ts, record.ts_utc - window)
        end = bisect.bisect_right(pool_ts, record.ts_utc + window)
        own: frozenset[str] | None = None
        best_id, best_score = None, threshold
        for candidate in pool[start:end]:
            if candidate.source == record.source or candidate.event_id == record.event_id:
                continue
            if own is None:
                own = shingles(normalize_flash(record.title, record.content))
                if len(own) < 8:
                    break
            other = candidate.grams()
            if len(other) < 8:
                continue
            score = similarity(own, other)
            if score >= best_score:
                best_id, best_score = candidate.event_id, score
        if best_id is not None:
            links[record.event_id] = best_id
            continue
        position = bisect.bisect_right(pool_ts, record.ts_utc)
        pool_ts.insert(position, record.ts_utc)
        candidate = _Candidate(record.ts_utc, record.event_id, record.source, lambda r=record: shingles(normalize_flash(r.title, r.content)))
        candidate._shingles = own  # already built when another source was in the window
        pool.insert(position, candidate)
    return links


# ---------------------------------------------------------------------------------------
# Storing news


def store_news(
    conn: sqlite3.Connection,
    records: list[NewsRecord],
    *,
    dedup: bool = True,
    dedup_window_min: int = DEFAULT_DEDUP_WINDOW_MIN,
    dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD,
) -> tuple[int, int, int]:
    """Insert new records (inside the caller's transaction); returns (inserted, already_present, linked)."""
    unique: dict[str, NewsRecord] = {}
    for record in records:
        unique.setdefault(record.event_id, record)
    existing: set[str] = set()
    ids = list(unique)
    for start in range(0, len(ids), 900):
        chunk = ids[start : start + 900]
        marks = ",".join("?" * len(chunk))
        existing.update(row[0] for row in conn.execute(f"SELECT event_id FROM events WHERE event_id IN ({marks})", chunk))
    new = [r for r in unique.values() if r.event_id not in existing]
    links = link_duplicates(conn, new, window_min=dedup_window_min, threshold=dedup_threshold) if dedup else {}
    conn.executemany(
        "INSERT INTO events (event_id, content, star, source, source_id, title, published_at, ts_utc, tz_offset_min, "
        "importance, subjects, url, primary_event_id, stocks) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            (
                r.event_id,
                r.content,
                r.star,
                r.source,
                r.source_id,
                r.title,
                iso_utc(r.ts_utc),
                r.ts_utc,
                r.tz_offset_min,
                r.importance,
                json.dumps(r.subjects, ensure_ascii=False),
                r.url,
                links.get(r.event_id),
                json.dumps(r.stocks, ensure_ascii=False) if r.stocks else None,
            )
            for r in new
        ],
    )
    duplicates_in_input = len(records) - len(unique)
    return len(new), len(existing) + duplicates_in_input, len(links)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}", markup=False),  # descriptions name data (tickers, files)
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


def ingest_news(
    db_path: str | Path,
    files: Sequence[str | Path],
    *,
    fmt: str = "cls",
    tz: str | None = None,
    mapping: dict[str, str] | None = None,
    source: str | None = None,
    skip_bad: bool = False,
    dedup: bool = True,
    dedup_window_min: int = DEFAULT_DEDUP_WINDOW_MIN,
    dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD,
    progress: bool = False,
) -> NewsIngestReport:
    """Store the new events of every file, all files in one transaction.

    Files are handled one at a time (memory stays bounded by the largest file); a bad line in
    any of them rolls the whole ingest back, so the store never holds half of a command's input.
    """
    if not files:
        raise FinqloraError("no news files given", hint="pass one or more FILE arguments")
    for path in files:
        if not Path(path).is_file():
            raise FinqloraError(f"{path} does not exist or is not a file", hint="check the path; nothing was stored")
    report = NewsIngestReport(files=[str(f) for f in files])
    conn = open_store(db_path)
    try:
        with transaction(conn), _progress(progress) as bar:
            task = bar.add_task("ingesting news", total=len(files))
            for path in files:
                records, skipped = read_news_file(path, fmt, tz=tz, mapping=mapping, source=source, skip_bad=skip_bad)
                report.read += len(records)
                report.skipped.extend(skipped)
                for record in records:
                    report.by_source[record.source] = report.by_source.get(record.source, 0) + 1
                inserted, present, linked = store_news(
                    conn, records, dedup=dedup, dedup_window_min=dedup_window_min, dedup_threshold=dedup_threshold
                )
                report.inserted += inserted
                report.already_present += present
                report.linked_duplicates += linked
                bar.advance(task)
    finally:
        conn.close()
    return report


# ---------------------------------------------------------------------------------------
# Price bars


@dataclass
class Bars:
    """OHLCV bars of one ticker, sorted by time (unix seconds UTC)."""

    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)


def read_bars_file(
    path: str | Path,
    *,
    tz: str | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[Bars, list[SkippedRow]]:
    """Parse and validate one OHLCV CSV file.

    Errors (file + line): missing time/close column, unreadable number or time, a time
    without a zone and no `tz`, bar times going backwards, two different bars at one time.
    Skipped and counted (documented): rows with a NaN/empty/non-positive price or high < low
    or a negative volume, and exact repeats of the previous bar.

    Times and numbers are converted with numpy in one go; the row-by-row path runs only to
    name the line of a value numpy could not read.
    """
    file_path = Path(path)
    zone = get_zone(tz) if tz else None
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(PRICE_FIELDS))
    if unknown:
        raise FinqloraError(f"unknown field(s) in --col: {', '.join(unknown)}", hint=f"fields are: {', '.join(PRICE_FIELDS)}")
    text = read_text_file(file_path)
    rows = csv_rows(csv.reader(io.StringIO(text, newline="")), file_path)
    first = next(rows, None)
    header = [name.strip() for name in (first[1] if first else [])]
    resolved = _resolve_mapping(header, columns, _PRICE_FIELD_GUESSES)
    for required in ("time", "close"):
        if resolved.get(required) not in header:
            raise FinqloraError(
                f"{file_path}: no {required} column (the header has: {', '.join(header) or 'nothing'})",
                hint=f"name it with --col {required}=COLUMN; nothing was stored",
            )
    index = {name: header.index(column) for name, column in resolved.items() if column in header}
    numbered = [(lineno, row) for lineno, row in rows if row and (len(row) > 1 or row[0].strip())]
    for lineno, row in numbered:
        if len(row) < len(header):
            raise FinqloraError(f"{file_path}, line {lineno}: {len(row)} fields, the header has {len(header)}", hint="fix the row; nothing was stored")
    if not numbered:
        raise FinqloraError(f"{file_path} has a header but no bars", hint="check that the export finished; nothing was stored")
    lines = np.array([lineno for lineno, _ in numbered], dtype=np.int64)
    ts = _parse_bar_times([row[index["time"]] for _, row in numbered], lines, zone, file_path)
    out_of_range = (ts < MIN_TS) | (ts >= MAX_TS)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise FinqloraError(
            f"{file_path}, line {lines[i]}: bar time {numbered[i][1][index['time']][:40]!r} is outside the years 1900-2199",
            hint="times must be ISO-8601 or unix seconds/milliseconds; fix that line; nothing was stored",
        )
    close = _float_column(numbered, index["close"], file_path)
    opn = _float_column(numbered, index["open"], file_path) if "open" in index else close.copy()
    high = _float_column(numbered, index["high"], file_path) if "high" in index else np.fmax(opn, close)
    low = _float_column(numbered, index["low"], file_path) if "low" in index else np.fmin(opn, close)
    volume = _float_column(numbered, index["volume"], file_path) if "volume" in index else np.full(len(close), np.nan)

    prices = np.stack([opn, high, low, close])
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(prices).all(axis=0) & (prices > 0).all(axis=0)) | (high < low) | (volume < 0)
    skipped = [SkippedRow(str(file_path), int(line), "NaN, empty, non-positive price, high < low or negative volume") for line in lines[bad]]
    keep = ~bad
    ts, lines = ts[keep], lines[keep]
    values = np.stack([opn, high, low, close, volume], axis=1)[keep]
    step = np.diff(ts)
    if (step < 0).any():
        i = int(np.argmax(step < 0))
        raise FinqloraError(
            f"{file_path}, line {lines[i + 1]}: bar time {iso_utc(int(ts[i + 1]))} is earlier than the previous bar's {iso_utc(int(ts[i]))} (line {lines[i]})",
            hint="bars must be in increasing time order: sort the file by its time column; nothing was stored",
        )
    repeat = np.zeros(len(ts), dtype=bool)
    for i in np.flatnonzero(step == 0).tolist():
        same = np.array_equal(values[i], values[i + 1], equal_nan=True)
        if not same:
            first = i
            while first > 0 and repeat[first]:
                first -= 1
            raise FinqloraError(
                f"{file_path}, line {lines[i + 1]}: a second, different bar at {iso_utc(int(ts[i]))} (first on line {lines[first]})",
                hint="keep one bar per time (remove the duplicate row); nothing was stored",
            )
        repeat[i + 1] = True
        skipped.append(SkippedRow(str(file_path), int(lines[i + 1]), "exact repeat of the previous bar"))
    skipped.sort(key=lambda row: row.line)
    values = values[~repeat]
    bars = Bars(ts[~repeat], values[:, 0], values[:, 1], values[:, 2], values[:, 3], values[:, 4])
    return bars, skipped


_NAIVE_STAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?")


def _fixed_offset_seconds(zone) -> int | None:
    """The zone's offset if it never changes (UTC, '+08:00'), else None."""
    if zone is None:
        return None
    if isinstance(zone, timezone):
        delta = zone.utcoffset(None)
        return int(delta.total_seconds())
    if getattr(zone, "key", "") in ("UTC", "Etc/UTC", "GMT", "Etc/GMT", "Zulu"):
        return 0
    return None


def _parse_bar_times(stamps: list[str], lines: np.ndarray, zone, file_path: Path) -> np.ndarray:
    offset = _fixed_offset_seconds(zone)
    first, last = stamps[0].strip(), stamps[-1].strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns on zone suffixes: take the careful path
            if _UNIX_STAMP_RE.fullmatch(first) and _UNIX_STAMP_RE.fullmatch(last):
                seconds = np.array(stamps, dtype=np.float64)
                # Only first and last were matched: a `nan`, `1e300` or short number between
                # them goes the careful way, which names its line.
                if np.all((seconds >= 1e8) & (seconds < 1e13)):
                    seconds = np.where(seconds > 1e11, seconds / 1000.0, seconds)
                    return seconds.astype(np.int64)
            if offset is not None and _NAIVE_STAMP_RE.fullmatch(first) and _NAIVE_STAMP_RE.fullmatch(last):
                parsed = np.array([s.strip() for s in stamps], dtype="datetime64[s]")
                if not np.isnat(parsed).any():
                    return parsed.astype(np.int64) - offset
    except (ValueError, TypeError, DeprecationWarning, UserWarning, RuntimeWarning):
        pass
    result = np.empty(len(stamps), dtype=np.int64)
    for i, stamp in enumerate(stamps):
        try:
            parsed_one = parse_time(stamp, tz=zone)
            if parsed_one is None:
                raise ValueError("empty time")
        except ValueError as exc:
            hint = (
                "pass --tz with the zone of these times (e.g. --tz UTC); nothing was stored"
                if "no time zone" in str(exc)
                else "fix the time on that line; nothing was stored"
            )
            raise FinqloraError(f"{file_path}, line {lines[i]}: {exc}", hint=hint) from exc
        result[i] = parsed_one[0]
    return result


def _float_column(numbered: list[tuple[int, list[str]]], column: int, file_path: Path) -> np.ndarray:
    """A numeric column; empty cells are NaN (such rows are skipped), other junk is an error."""
    cells = [row[column] for _, row in numbered]
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        pass
    values = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        if not cell.strip():
            values[i] = np.nan
            continue
        try:
            values[i] = float(cell)
        except ValueError:
            raise FinqloraError(f"{file_path}, line {numbered[i][0]}: {cell!r} is not a number", hint="fix the value; nothing was stored") from None
    return values


def store_bars(conn: sqlite3.Connection, ticker: str, bars: Bars) -> int:
    """Insert bars that are not stored yet (inside the caller's transaction); returns how many.

    The time range of the new bars is logged in `price_batches`: impacts computed before them
    are redone where their windows reach into it (see `impacts.compute_impacts`).
    """
    if len(bars):
        lo, hi = int(bars.ts.min()), int(bars.ts.max())
        stored = np.array([row[0] for row in conn.execute("SELECT ts FROM prices WHERE ticker = ? AND ts BETWEEN ? AND ?", (ticker, lo, hi))], dtype=np.int64)
        new_ts = bars.ts[~np.isin(bars.ts, stored)]
        if len(new_ts):
            conn.execute(
                "INSERT INTO price_batches (ticker, first_ts, last_ts, bars) VALUES (?, ?, ?, ?)",
                (ticker, int(new_ts.min()), int(new_ts.max()), int(len(new_ts))),
            )
    before = conn.total_changes
    volume = [None if math.isnan(v) else float(v) for v in bars.volume.tolist()]
    conn.executemany(
        "INSERT OR IGNORE INTO prices (ticker, ts, open, high, low, close, volume) VALUES (?,?,?,?,?,?,?)",
        zip(
            [ticker] * len(bars),
            bars.ts.tolist(),
            bars.open.tolist(),
            bars.high.tolist(),
            bars.low.tolist(),
            bars.close.tolist(),
            volume,
        ),
    )
    return conn.total_changes - before


def ingest_prices(
    db_path: str | Path,
    ticker: str,
    files: Sequence[str | Path],
    *,
    tz: str | None = None,
    columns: dict[str, str] | None = None,
    progress: bool = False,
) -> PriceIngestReport:
    """Validate and store the new bars of every CSV file, all files in one transaction."""
    if not files:
        raise FinqloraError("no price files given", hint="pass one or more CSV FILE arguments")
    if not ticker or not ticker.strip():
        raise FinqloraError("no ticker given", hint="pass --ticker, e.g. --ticker XAUUSD")
    for path in files:
        if not Path(path).is_file():
            raise FinqloraError(f"{path} does not exist or is not a file", hint="check the path; nothing was stored")
    report = PriceIngestReport(ticker=ticker, files=[str(f) for f in files])
    conn = open_store(db_path)
    try:
        with transaction(conn), _progress(progress) as bar:
            task = bar.add_task(f"ingesting {ticker} bars", total=len(files))
            for path in files:
                bars, skipped = read_bars_file(path, tz=tz, columns=columns)
                report.skipped.extend(skipped)
                report.read += len(bars)
                report.inserted += store_bars(conn, ticker, bars)
                bar.advance(task)
        first, last = conn.execute("SELECT MIN(ts), MAX(ts) FROM prices WHERE ticker = ?", (ticker,)).fetchone()
        report.first_ts, report.last_ts = first, last
    finally:
        conn.close()
    report.already_present = report.read - report.inserted
    return report
