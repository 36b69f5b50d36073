"""Schema, connect, the read API, and check/migrate of users' databases."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from finqlora.store import db
from finqlora.store.impacts import compute_impacts
from finqlora.store.ingest import Bars, store_bars
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file


def _user_db(path: Path, *, time_column: str = "publish_time", times: tuple[str, ...] = ("2026-06-01 16:00:00", "2026-06-01 16:05:00")) -> Path:
    """A database shaped like users' finance_analysis.db (no finqlora columns)."""
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE events (event_id TEXT, content TEXT, star INTEGER, {time_column} TEXT)")
    conn.execute(
        "CREATE TABLE event_impacts (event_id TEXT NOT NULL, ticker TEXT NOT NULL, window_min INTEGER NOT NULL, ret REAL, "
        "PRIMARY KEY (event_id, ticker, window_min))"
    )
    for i, when in enumerate(times):
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (f"e{i}", f"第{i}条新闻", 3, when))
    conn.execute("INSERT INTO event_impacts VALUES ('e0', 'XAUUSD', 15, 0.0021)")
    conn.execute("INSERT INTO event_impacts VALUES ('e1', 'XAUUSD', 15, NULL)")
    conn.commit()
    conn.close()
    return path


def test_init_db_creates_the_schema_and_is_idempotent(tmp_path):
    path = db.init_db(tmp_path / "store.db")
    db.init_db(path)
    conn = db.connect(path)
    assert set(db.EVENT_COLUMNS) <= set(db.table_columns(conn, "events"))
    assert {"event_id", "ticker", "window_min", "ret", "status"} <= set(db.table_columns(conn, "event_impacts"))
    assert {"ticker", "ts", "open", "high", "low", "close", "volume"} <= set(db.table_columns(conn, "prices"))
    assert db.get_meta(conn)["schema_version"] == str(db.SCHEMA_VERSION)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO events (event_id, content, star) VALUES ('x', 'y', 9)")  # star must be 1-5
    assert db.check_db(path).problems == []


def test_connect_refuses_files_that_are_not_sqlite(tmp_path):
    fake = tmp_path / "finance_analysis.db"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(FinqloraError) as info:
        db.connect(fake)
    assert "finance_analysis.db is not a SQLite database" in str(info.value)
    with pytest.raises(FinqloraError, match="does not exist"):
        db.connect(tmp_path / "missing.db", readonly=True)
    with pytest.raises(FinqloraError, match="is a folder"):
        db.connect(tmp_path)


def test_readonly_connection_cannot_write(tmp_path):
    path = db.init_db(tmp_path / "store.db")
    conn = db.connect(path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("INSERT INTO finqlora_meta VALUES ('a', 'b')")


def test_read_events_on_a_user_database_with_another_time_column(tmp_path):
    path = _user_db(tmp_path / "user.db")
    conn = db.connect(path, readonly=True)
    with pytest.raises(FinqloraError) as info:
        db.read_events(conn)
    assert "events.publish_time" in str(info.value) and "Asia/Shanghai" in str(info.value)
    events = db.read_events(conn, naive_tz="Asia/Shanghai")
    assert [e.event_id for e in events] == ["e0", "e1"]
    assert events[0].ts_utc == 1780300800 and events[0].published_at == "2026-06-01T08:00:00Z"
    assert events[0].star == 3 and events[0].source is None and events[0].primary_event_id is None


def test_read_events_with_zoned_or_unix_times_needs_no_zone(tmp_path):
    zoned = _user_db(tmp_path / "zoned.db", time_column="datetime", times=("2026-06-01T16:00:00+08:00",))
    assert db.read_events(db.connect(zoned))[0].ts_utc == 1780300800
    unix = _user_db(tmp_path / "unix.db", time_column="ctime", times=("1780300800",))
    assert db.read_events(db.connect(unix))[0].ts_utc == 1780300800


def test_read_impacts_leaves_out_unknown_returns(tmp_path):
    conn = db.connect(_user_db(tmp_path / "user.db"))
    assert db.read_impacts(conn) == {"e0": {("XAUUSD", 15): pytest.approx(0.0021)}}


def test_check_lists_what_is_missing_without_changing_the_file(tmp_path):
    path = _user_db(tmp_path / "user.db")
    before = sha256_file(path)
    report = db.check_db(path)
    assert report.ok and report.migratable and report.time_column == "publish_time"
    missing = {(p.table, p.column) for p in report.problems}
    assert ("events", "source") in missing and ("events", "primary_event_id") in missing and ("prices", None) in missing
    prices_problem = next(p for p in report.problems if p.table == "prices")
    assert "cannot compute returns" in prices_problem.describe()
    assert sha256_file(path) == before
    with pytest.raises(FinqloraError, match="--migrate"):
        db.open_store(path)
    with pytest.raises(FinqloraError, match="did not create"):
        db.init_db(path)


def test_check_is_fatal_without_events_or_time(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.close()
    report = db.check_db(empty)
    assert not report.ok and any(p.table == "events" and p.severity == "fatal" for p in report.problems)
    timeless = tmp_path / "timeless.db"
    conn = sqlite3.connect(timeless)
    conn.execute("CREATE TABLE events (event_id TEXT, content TEXT)")
    conn.close()
    assert not db.check_db(timeless).ok


def test_migrate_backs_up_adds_columns_and_fills_utc_times(tmp_path):
    path = _user_db(tmp_path / "user.db")
    original = list(sqlite3.connect(path).iterdump())
    result = db.migrate_db(path, tz="Asia/Shanghai")
    assert result.backup is not None and list(sqlite3.connect(result.backup).iterdump()) == original
    assert "events.ts_utc" in result.added and "table prices" in result.added and result.times_filled == 2
    conn = db.connect(path)
    assert conn.execute("SELECT ts_utc, published_at, tz_offset_min, publish_time FROM events WHERE event_id = 'e0'").fetchone() == (
        1780300800,
        "2026-06-01T08:00:00Z",
        480,
        "2026-06-01 16:00:00",  # the user's own column is untouched
    )
    # Users' existing queries keep working.
    assert conn.execute(
        "SELECT e.event_id, ei_post.ret FROM events e LEFT JOIN event_impacts ei_post "
        "ON e.event_id = ei_post.event_id AND ei_post.window_min = 15 ORDER BY e.event_id"
    ).fetchall() == [("e0", 0.0021), ("e1", None)]
    assert "view event_impacts_wide" in result.added
    # ... and queries written for a wide layout have a view to run against.
    assert conn.execute(
        "SELECT e.event_id, ei.ret_post_15m, ei.ret_pre_120m FROM events e "
        "LEFT JOIN event_impacts_wide ei ON e.event_id = ei.event_id ORDER BY e.event_id"
    ).fetchall() == [("e0", 0.0021, None), ("e1", None, None)]
    assert db.check_db(path).problems == []
    conn.close()
    db.open_store(path).close()
    assert db.migrate_db(path).backup is None  # nothing left to do: no second backup


def test_migrate_without_zone_for_naive_times_changes_nothing(tmp_path):
    path = _user_db(tmp_path / "user.db")
    before = sha256_file(path)
    with pytest.raises(FinqloraError) as info:
        db.migrate_db(path)
    assert "--tz" in str(info.value)
    assert sha256_file(path) == before


def test_parse_time_variants():
    zone = db.get_zone("Asia/Shanghai")
    assert db.parse_time("2026-06-01T08:00:00Z", tz=None) == (1780300800, 0)
    assert db.parse_time(1780300800000, tz=None) == (1780300800, 0)  # milliseconds
    assert db.parse_time("1780300800.75", tz=None) == (1780300800, 0)
    assert db.parse_time("2026-06-01 16:00:00", tz=zone) == (1780300800, 480)
    assert db.parse_time("2026-06-01 16:00:00", tz=db.get_zone("+08:00")) == (1780300800, 480)
    with pytest.raises(ValueError, match="no time zone"):
        db.parse_time("2026-06-01 16:00:00", tz=None)
    with pytest.raises(FinqloraError, match="unknown time zone"):
        db.get_zone("Mars/Olympus")


def test_cli_check_exit_codes_and_migrate(tmp_path, capsys):
    from finqlora.cli import main

    path = _user_db(tmp_path / "user.db")
    with pytest.raises(SystemExit) as info:
        main(["db", "check", "--db", str(path)])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "missing events.source" in out and "--migrate" in out
    with pytest.raises(SystemExit) as info:
        main(["db", "check", "--db", str(path), "--migrate", "--tz", "Asia/Shanghai"])
    assert info.value.code == 0
    assert "backup written" in capsys.readouterr().out
    assert list(tmp_path.glob("user.db.bak-*"))
    broken = tmp_path / "noevents.db"
    sqlite3.connect(broken).execute("CREATE TABLE prices (ticker, ts, close)").connection.close()
    with pytest.raises(SystemExit) as info:
        main(["db", "check", "--db", str(broken)])
    assert info.value.code == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["db", "check", "--db", str(broken), "--json"])
    assert info.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and {"severity": "fatal", "table": "events", "column": None}.items() <= report["problems"][0].items()
    with pytest.raises(SystemExit) as info:
        main(["db", "init", "--db", str(tmp_path / "new.db")])
    assert info.value.code == 0 and (tmp_path / "new.db").exists()


def test_check_warns_when_returns_look_like_percent(tmp_path):
    path = _user_db(tmp_path / "user.db")
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO event_impacts VALUES (?, 'XAUUSD', 5, ?)", [(f"p{i}", 0.05 * (i % 7 - 3)) for i in range(50)])
    conn.commit()
    conn.close()
    problem = next(p for p in db.check_db(path).problems if p.column == "ret")
    assert problem.kind == "suspicious" and "percent" in problem.describe()
    assert all(p.column != "ret" for p in db.check_db(_user_db(tmp_path / "fraction.db")).problems)


def test_impacts_keep_a_migrated_users_own_returns(tmp_path):
    path = _user_db(tmp_path / "user.db", time_column="datetime", times=("2026-06-01T16:00:00+08:00", "2026-06-01T16:05:00+08:00"))
    db.migrate_db(path)
    conn = db.connect(path)
    minutes = np.arange(-130, 130)
    close = 2000.0 + minutes
    with db.transaction(conn):
        store_bars(conn, "XAUUSD", Bars(1780300800 + 60 * minutes, close, close, close, close, np.ones(len(minutes))))
    compute_impacts(conn=conn, windows=[5, 15], pre_windows=[120])
    rows = dict(((e, w), r) for e, w, r in conn.execute("SELECT event_id, window_min, ret FROM event_impacts"))
    assert rows[("e0", 15)] == 0.0021  # the user's value, not recomputed
    assert rows[("e1", 15)] is None  # the user's NULL stays too
    assert rows[("e0", 5)] == pytest.approx(2005 / 2000 - 1) and rows[("e0", -120)] == pytest.approx(2000 / 1880 - 1)
    compute_impacts(conn=conn, windows=[5, 15], pre_windows=[120], recompute=True)
    assert conn.execute("SELECT ret FROM event_impacts WHERE event_id = 'e0' AND window_min = 15").fetchone()[0] == pytest.approx(0.0075)


def test_stats_read_a_users_database_without_changing_it(tmp_path):
    from finqlora.store.stats import store_stats

    path = _user_db(tmp_path / "user.db")
    before = sha256_file(path)
    stats = store_stats(path)
    assert stats.events == 2 and stats.by_star == {"3": 2} and not stats.synthetic
    assert stats.coverage["XAUUSD"][15]["known"] == 1 and stats.coverage["XAUUSD"][15]["by_status"] == {"ok": 1, "unknown": 1}
    assert sha256_file(path) == before
