"""The synthetic sample store: structure, determinism, consistency of news and prices."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from finqlora.store.db import check_db, connect, get_meta, read_events, read_impacts
from finqlora.core.errors import FinqloraError
from finqlora.store.sample_db import build_sample_db


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample_db(tmp_path_factory.mktemp("sample") / "sample.db", seed=0)


def _dump(path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
        for table in ("events", "prices", "event_impacts")
    }


def test_sample_has_the_full_structure_and_says_it_is_synthetic(sample):
    assert check_db(sample).problems == []
    conn = connect(sample, readonly=True)
    meta = get_meta(conn)
    assert meta["synthetic"] == "true" and "SYNTHETIC" in meta["description"]
    events = read_events(conn)
    assert len(events) >= 300
    span_days = (events[-1].ts_utc - events[0].ts_utc) / 86400
    assert span_days >= 21
    assert {e.star for e in events} >= {2, 4, 5}
    assert all(e.published_at.endswith("Z") and e.content for e in events)
    assert set(dict(conn.execute("SELECT ticker, COUNT(*) FROM prices GROUP BY ticker"))) == {"XAUUSD", "XAGUSD"}
    statuses = dict(conn.execute("SELECT status, COUNT(*) FROM event_impacts WHERE ticker = 'XAUUSD' AND window_min = 120 GROUP BY status"))
    # Some events fall at weekends / in gaps, so "unknown" is exercised too.
    assert statuses["ok"] > 300 and statuses["no_t0_bar"] > 0 and statuses["no_end_bar"] > 0
    windows = {w for (w,) in conn.execute("SELECT DISTINCT window_min FROM event_impacts")}
    assert windows == {5, 10, 15, 30, 120, -120}


def test_same_seed_same_database_other_seed_other_database(sample, tmp_path):
    again = build_sample_db(tmp_path / "again.db", seed=0)
    assert _dump(again) == _dump(sample)
    other = build_sample_db(tmp_path / "other.db", seed=1)
    assert _dump(other)["events"] != _dump(sample)["events"]


def test_second_feed_retellings_are_linked_to_their_originals(sample):
    rows = sqlite3.connect(sample).execute("SELECT event_id, primary_event_id FROM events WHERE source = 'sample_b'").fetchall()
    assert len(rows) >= 20
    linked = [(e, p) for e, p in rows if p is not None]
    # A re-telling "sample_b:bNNNNN" belongs to "sample_a:NNNNN".
    assert len(linked) >= 0.9 * len(rows)
    assert all(p == "sample_a:" + e.split(":b")[1] for e, p in linked)


def test_news_direction_agrees_with_the_synthetic_price_reaction(sample):
    conn = connect(sample, readonly=True)
    impacts = read_impacts(conn)
    up, down = [], []
    for event in read_events(conn, primaries_only=True):
        ret = impacts.get(event.event_id, {}).get(("XAUUSD", 15))
        if ret is None:
            continue
        if "局势升级" in event.content:
            up.append(ret)
        elif "局势有所缓和" in event.content:
            down.append(ret)
    assert len(up) >= 5 and len(down) >= 3
    assert sum(r > 0 for r in up) / len(up) >= 0.7
    assert sum(r < 0 for r in down) / len(down) >= 0.6


def test_price_flashes_quote_the_synthetic_bars(sample):
    conn = sqlite3.connect(sample)
    checked = 0
    for ts, content in conn.execute("SELECT ts_utc, content FROM events WHERE title LIKE '现货黄金日内%'"):
        quoted = float(re.search(r"现报([\d.]+)美元", content).group(1))
        (close,) = conn.execute("SELECT close FROM prices WHERE ticker = 'XAUUSD' AND ts <= ? ORDER BY ts DESC LIMIT 1", (ts,)).fetchone()
        assert quoted == pytest.approx(close, abs=0.01)
        checked += 1
    assert checked >= 10


def test_existing_file_is_not_overwritten_without_asking(sample, tmp_path):
    target = tmp_path / "s.db"
    target.write_text("keep me", encoding="utf-8")
    with pytest.raises(FinqloraError, match="already exists"):
        build_sample_db(target)
    assert target.read_text(encoding="utf-8") == "keep me"
    build_sample_db(target, overwrite=True)
    assert not list(tmp_path.glob(".s.db*"))  # no temporary files left behind


def test_cli_sample_and_stats_json(tmp_path, capsys):
    from finqlora.cli import main

    path = tmp_path / "cli.db"
    with pytest.raises(SystemExit) as info:
        main(["db", "sample", "--db", str(path)])
    assert info.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["db", "stats", "--db", str(path), "--json"])
    assert info.value.code == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["synthetic"] is True and stats["events"] >= 300
    assert stats["by_source"]["sample_a"] > stats["by_source"]["sample_b"] > 0
    coverage = stats["coverage"]["XAUUSD"]["15"]
    assert 0.8 < coverage["coverage"] <= 1.0 and coverage["by_status"]["ok"] == coverage["known"]
    assert stats["returns"]["XAUUSD"]["15"]["count"] == coverage["known"]
    with pytest.raises(SystemExit) as info:
        main(["db", "stats", "--db", str(path)])
    assert info.value.code == 0
    assert "SYNTHETIC" in capsys.readouterr().out
