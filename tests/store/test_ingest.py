"""News and price ingestion: formats, star mapping, idempotence, dedup, and every bad input."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import pytest

from finqlora.core.textdedup import normalize_flash
from finqlora.store import ingest
from finqlora.store.db import connect, init_db, read_events
from finqlora.core.errors import FinqloraError

BASE = 1_780_300_000  # 2026-06-01 ~08:00 UTC


def _cls(i: int, level: str = "C", *, ts: int | None = None, content: str | None = None, source: str = "cls", bold: int = 0, **extra) -> dict:
    ts = BASE + 60 * i if ts is None else ts
    record = {
        "id": str(1000 + i),
        "source": source,
        "ctime": ts,
        "datetime": "2026-06-01T16:00:00+08:00",
        "level": level,
        "title": "",
        "content": content or f"【测试标题{i}】6月1日电，某地第{i}号测试新闻，内容用于单元测试，与其他条目互不相同的编号{i * 7919}。",
        "subjects": ["测试主题"],
        "raw_keep": {"bold": bold, "recommend": 0},
    }
    record.update(extra)
    return record


def _write_jsonl(path: Path, rows: list, *, gz: bool = False) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _count(db: Path, table: str = "events") -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# --- formats and mapping -----------------------------------------------------------------


def test_cls_slim_gz_is_ingested_with_utc_times_offsets_and_stars(tmp_path):
    path = _write_jsonl(tmp_path / "cls.jsonl.gz", [_cls(0, "A"), _cls(1, "B"), _cls(2, "C", bold=1), _cls(3, "C")], gz=True)
    db = tmp_path / "store.db"
    report = ingest.ingest_news(db, [path])
    assert (report.read, report.inserted, report.already_present) == (4, 4, 0)
    events = {e.event_id: e for e in read_events(connect(db))}
    assert [events[f"cls:100{i}"].star for i in range(4)] == [5, 4, 3, 2]
    first = events["cls:1000"]
    assert first.ts_utc == BASE and first.published_at.endswith("Z")
    assert first.title == "测试标题0"  # empty title taken from the 【...】 prefix
    assert first.importance == "A" and first.subjects == ["测试主题"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT tz_offset_min FROM events WHERE event_id = 'cls:1000'").fetchone() == (480,)


def test_reingesting_the_same_file_adds_nothing(tmp_path):
    path = _write_jsonl(tmp_path / "cls.jsonl", [_cls(i) for i in range(5)])
    db = tmp_path / "store.db"
    ingest.ingest_news(db, [path])
    again = ingest.ingest_news(db, [path, path])
    assert (again.inserted, again.already_present) == (0, 10)
    assert _count(db) == 5


def test_cls_raw_crawler_form_with_nested_subjects(tmp_path):
    raw_record = {
        "id": "2000",
        "ctime": BASE,
        "datetime": "2026-06-01T16:06:40+08:00",
        "level": "B",
        "title": "原始格式标题",
        "content": "【原始格式标题】6月1日电，原始抓取格式的测试内容。",
        "subjects": [],
        "raw": {"id": 2000, "level": "B", "bold": 0, "subjects": [{"subject_name": "宏观", "subject_id": 1}], "shareurl": "https://example.invalid/2000"},
    }
    path = _write_jsonl(tmp_path / "raw.jsonl", [raw_record])
    records, skipped = ingest.read_news_file(path, "cls")
    assert not skipped
    assert records[0].subjects == ["宏观"] and records[0].url == "https://example.invalid/2000"
    raw_only = {"raw": {**raw_record["raw"], "ctime": BASE, "content": "只有嵌套对象的内容。", "title": "嵌套"}}
    path2 = _write_jsonl(tmp_path / "raw2.jsonl", [raw_only])
    (record,), _ = ingest.read_news_file(path2, "cls")
    assert record.event_id == "cls:2000" and record.subjects == ["宏观"] and record.star == 4 and record.title == "嵌套"


def test_other_sources_flags_map_to_stars():
    assert ingest.star_for("ths", None, {"import": "3"}) == 4
    assert ingest.star_for("ths", None, {"import": "1"}) == 3
    assert ingest.star_for("ths", None, {"import": "0"}) == 2
    assert ingest.star_for("eastmoney", None, {"titleColor": 3}) == 4
    assert ingest.star_for("eastmoney", None, {"titleColor": 0}) == 2
    assert ingest.star_for("custom", "5") == 5
    assert ingest.star_for("custom", None) == 2


def test_csv_with_mapping_and_explicit_tz(tmp_path):
    path = tmp_path / "news.csv"
    path.write_text("uid,pub_time,text,imp\nx1,2026-06-01 16:00:00,第一条自定义来源新闻,5\nx2,2026-06-01 16:05:00,第二条自定义来源新闻,\n", encoding="utf-8")
    db = tmp_path / "store.db"
    report = ingest.ingest_news(db, [path], fmt="csv", tz="Asia/Shanghai", mapping={"id": "uid", "time": "pub_time", "content": "text", "star": "imp"}, source="mysource")
    assert report.inserted == 2
    events = {e.event_id: e for e in read_events(connect(db))}
    assert events["mysource:x1"].ts_utc == 1780300800  # 16:00 +08:00 = 08:00 UTC
    assert events["mysource:x1"].star == 5 and events["mysource:x2"].star == 2


def test_generic_file_without_source_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"id": 1, "time": "2026-06-01T08:00:00Z", "content": "没有来源"}])
    with pytest.raises(FinqloraError, match="no source column and no --source"):
        ingest.read_news_file(path, "jsonl")
    (record,), _ = ingest.read_news_file(path, "jsonl", source="wire")
    assert record.event_id == "wire:1"


def test_jsonl_generic_with_zoned_times_needs_no_tz(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"news_id": 1, "published_at": "2026-06-01T08:00:00Z", "body": "带时区的时间无需 --tz", "source": "wire"}])
    db = tmp_path / "store.db"
    ingest.ingest_news(db, [path], fmt="jsonl", mapping={"content": "body"})
    (event,) = read_events(connect(db))
    assert event.event_id == "wire:1" and event.ts_utc == 1780300800


# --- cross-source duplicates ---------------------------------------------------------------


def test_same_event_from_three_sources_is_linked_not_dropped(tmp_path):
    body = "美国劳工部公布数据显示，美国5月季调后非农就业人口增加27.2万人，预期增加18万人，失业率升至4.0%。"
    cls_path = _write_jsonl(tmp_path / "cls.jsonl", [_cls(0, "B", ts=BASE, content=f"【美国5月非农就业人口增加27.2万人】6月1日电，{body}")])
    others = tmp_path / "others.jsonl"
    _write_jsonl(
        others,
        [
            _cls(1, ts=BASE + 90, content=f"【美国5月非农大超预期】{body}", source="eastmoney", raw_keep={"titleColor": 3}),
            _cls(2, ts=BASE + 240, content=f"{body}（央视新闻）", source="ths", raw_keep={"import": "0"}),
            # Same minute, other source, unrelated text: must stay a primary.
            _cls(3, ts=BASE + 60, content="某省发布促进新能源汽车消费的十条措施，包括发放消费券和优化充电设施布局。", source="ths"),
            # Same text but three hours later: a repeat, not the same breaking event.
            _cls(4, ts=BASE + 3 * 3600, content=f"{body}（回顾）", source="ths"),
        ],
    )
    db = tmp_path / "store.db"
    ingest.ingest_news(db, [cls_path])
    report = ingest.ingest_news(db, [others])
    assert report.inserted == 4 and report.linked_duplicates == 2
    links = dict(sqlite3.connect(db).execute("SELECT event_id, primary_event_id FROM events"))
    assert links["eastmoney:1001"] == "cls:1000" and links["ths:1002"] == "cls:1000"
    assert links["cls:1000"] is None and links["ths:1003"] is None and links["ths:1004"] is None
    assert _count(db) == 5


def test_dedup_can_be_switched_off(tmp_path):
    body = "某央行宣布下调基准利率25个基点至3.5%，为年内第二次降息，市场此前普遍预期维持不变。"
    path = _write_jsonl(tmp_path / "n.jsonl", [_cls(0, ts=BASE, content=body), _cls(1, ts=BASE + 30, content=body, source="ths")])
    db = tmp_path / "store.db"
    assert ingest.ingest_news(db, [path], dedup=False).linked_duplicates == 0
    assert ingest.similarity(ingest.shingles(normalize_flash(None, body)), ingest.shingles(normalize_flash(None, "据报道，" + body))) > 0.9


# --- bad input: news -----------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line_and_stores_nothing(tmp_path):
    db = tmp_path / "store.db"
    good = _write_jsonl(tmp_path / "good.jsonl", [_cls(0)])
    ingest.ingest_news(db, [good])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [_cls(1), '{"id": "9", "content": broken', _cls(2)])
    with pytest.raises(FinqloraError) as info:
        ingest.ingest_news(db, [bad])
    assert "bad.jsonl, line 2" in str(info.value) and "--skip-bad" in str(info.value)
    assert _count(db) == 1  # the earlier event is still there, nothing half-written
    report = ingest.ingest_news(db, [bad], skip_bad=True)
    assert report.inserted == 2 and len(report.skipped) == 1 and report.skipped[0].line == 2


def test_csv_missing_column_is_named(tmp_path):
    path = tmp_path / "news.csv"
    path.write_text("id,when,text\n1,2026-06-01T08:00:00Z,正文\n", encoding="utf-8")
    with pytest.raises(FinqloraError) as info:
        ingest.ingest_news(tmp_path / "s.db", [path], fmt="csv", source="x")
    message = str(info.value)
    assert "news.csv" in message and "no time column" in message and "--map time=COLUMN" in message


def test_time_without_zone_and_no_tz_is_refused_with_the_line(tmp_path):
    path = tmp_path / "news.csv"
    path.write_text("id,datetime,content\n1,2026-06-01T08:00:00+08:00,有时区\n2,2026-06-01 08:00:00,没有时区\n", encoding="utf-8")
    with pytest.raises(FinqloraError) as info:
        ingest.ingest_news(tmp_path / "s.db", [path], fmt="csv", source="x")
    assert "news.csv, line 3" in str(info.value) and "--tz" in str(info.value)
    assert not (tmp_path / "s.db").exists() or _count(tmp_path / "s.db") == 0


def test_non_utf8_file_is_refused_with_line(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps(_cls(0), ensure_ascii=False).encode() + b"\n" + '{"content": "中文"}'.encode("gbk") + b"\n")
    with pytest.raises(FinqloraError) as info:
        ingest.read_news_file(path, "cls")
    assert "gbk.jsonl, line 2: not UTF-8" in str(info.value) and "iconv" in str(info.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="empty"):
        ingest.ingest_news(tmp_path / "s.db", [path])


def test_database_that_is_not_sqlite_is_refused(tmp_path):
    fake = tmp_path / "finance_analysis.db"
    fake.write_text("id,content\n1,not a database\n", encoding="utf-8")
    path = _write_jsonl(tmp_path / "n.jsonl", [_cls(0)])
    with pytest.raises(FinqloraError, match="not a SQLite database"):
        ingest.ingest_news(fake, [path])
    assert fake.read_text(encoding="utf-8").startswith("id,content")


def test_record_without_content_is_skipped_and_counted(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [_cls(0), {**_cls(1), "content": "", "brief": ""}])
    records, skipped = ingest.read_news_file(path, "cls")
    assert len(records) == 1 and [(s.line, s.reason) for s in skipped] == [(2, "no content")]


# --- prices ----------------------------------------------------------------------------------

HEADER = "datetime_utc,symbol,open,high,low,close,volume\n"


def _bars_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _bar(minute: int, close: float = 2000.0) -> str:
    return f"2026-06-01 08:{minute:02d}:00,X,{close},{close + 1},{close - 1},{close},10"


def test_prices_ingest_is_idempotent_and_utc(tmp_path):
    path = _bars_csv(tmp_path / "p.csv", [_bar(m, 2000 + m) for m in range(10)])
    db = tmp_path / "s.db"
    report = ingest.ingest_prices(db, "XAUUSD", [path], tz="UTC")
    assert (report.read, report.inserted) == (10, 10) and report.first_ts == 1780300800
    again = ingest.ingest_prices(db, "XAUUSD", [path], tz="UTC")
    assert (again.inserted, again.already_present) == (0, 10)
    assert _count(db, "prices") == 10


def test_prices_without_zone_need_tz(tmp_path):
    path = _bars_csv(tmp_path / "p.csv", [_bar(0)])
    with pytest.raises(FinqloraError) as info:
        ingest.ingest_prices(tmp_path / "s.db", "XAUUSD", [path])
    assert "p.csv, line 2" in str(info.value) and "--tz" in str(info.value)


def test_non_increasing_bar_times_are_refused(tmp_path):
    path = _bars_csv(tmp_path / "p.csv", [_bar(0), _bar(2), _bar(1)])
    with pytest.raises(FinqloraError) as info:
        ingest.ingest_prices(tmp_path / "s.db", "XAUUSD", [path], tz="UTC")
    assert "p.csv, line 4" in str(info.value) and "earlier than the previous bar" in str(info.value) and "sort" in str(info.value)


def test_duplicate_bar_times(tmp_path):
    exact = _bars_csv(tmp_path / "exact.csv", [_bar(0), _bar(1), _bar(1), _bar(2)])
    bars, skipped = ingest.read_bars_file(exact, tz="UTC")
    assert len(bars) == 3 and [(s.line, s.reason) for s in skipped] == [(4, "exact repeat of the previous bar")]
    conflicting = _bars_csv(tmp_path / "conflict.csv", [_bar(0), _bar(1, 2000), _bar(1, 2005)])
    with pytest.raises(FinqloraError) as info:
        ingest.read_bars_file(conflicting, tz="UTC")
    assert "conflict.csv, line 4" in str(info.value) and "first on line 3" in str(info.value)


def test_nan_and_negative_prices_are_skipped_and_counted(tmp_path):
    rows = [_bar(0), "2026-06-01 08:01:00,X,nan,2001,1999,2000,10", "2026-06-01 08:02:00,X,2000,2001,1999,-5,10", "2026-06-01 08:03:00,X,2000,2001,1999,,10", _bar(4)]
    path = _bars_csv(tmp_path / "p.csv", rows)
    report = ingest.ingest_prices(tmp_path / "s.db", "XAUUSD", [path], tz="UTC")
    assert report.inserted == 2 and [s.line for s in report.skipped] == [3, 4, 5]


def test_price_csv_missing_close_column_and_unreadable_number(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("time,price_usd\n2026-06-01T08:00:00Z,1\n", encoding="utf-8")
    with pytest.raises(FinqloraError) as info:
        ingest.read_bars_file(path)
    assert "no close column" in str(info.value) and "--col close=COLUMN" in str(info.value)
    bars, _ = ingest.read_bars_file(path, columns={"close": "price_usd"})
    assert bars.close.tolist() == [1.0]
    bad = _bars_csv(tmp_path / "bad.csv", [_bar(0), "2026-06-01 08:01:00,X,2000,abc,1999,2000,10"])
    with pytest.raises(FinqloraError, match=r"bad.csv, line 3: 'abc' is not a number"):
        ingest.read_bars_file(bad, tz="UTC")


def test_a_bad_second_price_file_stores_nothing_from_the_first(tmp_path):
    db = tmp_path / "s.db"
    good = _bars_csv(tmp_path / "good.csv", [_bar(m) for m in range(5)])
    bad = _bars_csv(tmp_path / "bad.csv", [_bar(10), _bar(9)])
    with pytest.raises(FinqloraError):
        ingest.ingest_prices(db, "XAUUSD", [good, bad], tz="UTC")
    assert not db.exists() or _count(db, "prices") == 0


def test_non_utf8_price_file_is_refused_with_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes((HEADER + _bar(0) + "\n").encode() + "2026-06-01 08:01:00,黄金,1,1,1,1,1\n".encode("gb18030"))
    with pytest.raises(FinqloraError, match=r"p.csv, line 3: not UTF-8"):
        ingest.ingest_prices(tmp_path / "s.db", "XAUUSD", [path], tz="UTC")


def test_empty_and_header_only_price_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(FinqloraError, match="empty"):
        ingest.read_bars_file(empty, tz="UTC")
    header_only = _bars_csv(tmp_path / "h.csv", [])
    with pytest.raises(FinqloraError, match="no bars"):
        ingest.read_bars_file(header_only, tz="UTC")


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_errors_exit_2_with_file_and_line(tmp_path, capsys):
    from finqlora.cli import main

    bad = _write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(SystemExit) as info:
        main(["db", "ingest-news", "--db", str(tmp_path / "s.db"), str(bad)])
    assert info.value.code == 2
    assert "bad.jsonl, line 1" in " ".join(capsys.readouterr().err.split())


def test_cli_ingest_news_and_prices(tmp_path, capsys):
    from finqlora.cli import main

    db = tmp_path / "s.db"
    init_db(db)
    news = _write_jsonl(tmp_path / "n.jsonl", [_cls(i) for i in range(3)])
    prices = _bars_csv(tmp_path / "p.csv", [_bar(m) for m in range(3)])
    for argv in (
        ["db", "ingest-news", "--db", str(db), "--format", "cls", str(news)],
        ["db", "ingest-prices", "--db", str(db), "--ticker", "XAUUSD", "--tz", "UTC", str(prices)],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "3 new" in out and "XAUUSD" in out
