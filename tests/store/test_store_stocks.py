"""Stock links of events (CLS `stocks` + `raw_keep.stock_list`): stored, migrated, read back."""

from __future__ import annotations

import json
import sqlite3

from finqlora.store import db, ingest
from finqlora.store.db import connect, read_events

BASE = 1_780_300_000


def _flash(i: int, **extra) -> dict:
    record = {
        "id": str(5000 + i),
        "source": "cls",
        "ctime": BASE + 60 * i,
        "level": "C",
        "content": f"【合成标题{i}】合成测试快讯第{i}条，公司公告签订新合同，编号{i * 131}。",
        "raw_keep": {"bold": 0},
    }
    record.update(extra)
    return record


def test_cls_stock_links_are_stored_with_codes_from_stock_list(tmp_path):
    rows = [
        _flash(0, stocks=[{"code": "", "name": "甲公司"}, {"code": "", "name": "乙公司"}],
               raw_keep={"stock_list": [{"StockID": "sz000001", "name": "甲公司"}, {"StockID": "920001.BJ", "name": "乙公司"}]}),
        _flash(1, stocks=[], raw_keep={"stock_list": [{"StockID": "sh600000", "name": "丙公司"}]}),
        _flash(2, stocks=[{"code": "", "name": "丁公司"}]),  # a source that gives names only
        _flash(3),
    ]
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    store = tmp_path / "store.db"
    ingest.ingest_news(store, [path])
    stored = dict(sqlite3.connect(store).execute("SELECT event_id, stocks FROM events").fetchall())
    assert json.loads(stored["cls:5000"]) == [{"code": "sz000001", "name": "甲公司"}, {"code": "920001.BJ", "name": "乙公司"}]
    assert stored["cls:5003"] is None
    events = {e.event_id: e for e in read_events(connect(store, readonly=True))}
    assert events["cls:5000"].stocks == ["sz000001", "920001.BJ"]
    assert events["cls:5001"].stocks == ["sh600000"]
    assert events["cls:5002"].stocks == ["丁公司"]
    assert events["cls:5003"].stocks == []


def test_a_version_1_store_stays_readable_and_is_upgraded_on_write(tmp_path):
    store = tmp_path / "old.db"
    db.init_db(store)
    with sqlite3.connect(store) as conn:  # make it look like a store written before `stocks`
        conn.execute("ALTER TABLE events DROP COLUMN stocks")
        conn.execute("UPDATE finqlora_meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO events (event_id, content, ts_utc, source) VALUES ('x:1', 'old text', ?, 'x')", (BASE,))
    old = read_events(connect(store, readonly=True))
    assert [(e.event_id, e.stocks) for e in old] == [("x:1", [])]
    path = tmp_path / "news.jsonl"
    path.write_text(json.dumps(_flash(0, stocks=["sz000002"]), ensure_ascii=False) + "\n", encoding="utf-8")
    ingest.ingest_news(store, [path])
    conn = connect(store, readonly=True)
    assert db.get_meta(conn)["schema_version"] == str(db.SCHEMA_VERSION)
    assert {e.event_id: e.stocks for e in read_events(conn)} == {"x:1": [], "cls:5000": ["sz000002"]}


def test_check_names_a_missing_stocks_column_and_migrate_adds_it(tmp_path):
    user = tmp_path / "user.db"
    with sqlite3.connect(user) as conn:
        conn.execute("CREATE TABLE events (event_id TEXT, content TEXT, ts_utc INTEGER)")
    report = db.check_db(user)
    assert any(p.column == "stocks" for p in report.problems)
    db.migrate_db(user)
    assert "stocks" in db.table_columns(sqlite3.connect(user), "events")
