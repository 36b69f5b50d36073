"""Bars loaded out of order must not leave stale impacts (issue 18 item 8). Synthetic bars only."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from finqlora.cli import main

JUNE = 1_780_272_000  # 2026-06-01T00:00:00Z
DAY = 86_400


def _bars_csv(path: Path, start: int, days: int, seed: int) -> Path:
    """1-minute synthetic bars over `days` days from `start`, with a few gaps."""
    rng = np.random.default_rng(seed)
    ts = np.arange(start, start + days * DAY, 60)
    ts = ts[rng.random(len(ts)) > 0.02]  # missing bars, as in real feeds
    close = 2000 * np.exp(np.cumsum(rng.normal(0, 2e-4, len(ts))))
    lines = ["datetime_utc,close"] + [f"{int(t)},{c:.4f}" for t, c in zip(ts, close)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _news(path: Path) -> Path:
    # Events in the first hours of June: their pre-event windows and t0 bars lie in May.
    offsets = [30, 90, 600, 1800, 3600, 5400, 7000, 10_000, 3 * DAY // 2]
    rows = [
        {"id": str(i), "source": "cls", "ctime": JUNE + offset, "level": "C", "content": f"合成快讯{i}：测试事件，编号{i * 37}。"}
        for i, offset in enumerate(offsets)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(*args: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 0


def _impacts(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as conn:
        return conn.execute(
            "SELECT event_id, ticker, window_min, ret, status, t0_ts, end_ts FROM event_impacts ORDER BY event_id, window_min"
        ).fetchall()


@pytest.fixture
def files(tmp_path):
    return {
        "news": _news(tmp_path / "news.jsonl"),
        "may": _bars_csv(tmp_path / "may.csv", JUNE - 2 * DAY, 2, seed=1),
        "june": _bars_csv(tmp_path / "june.csv", JUNE, 2, seed=2),
    }


def test_item8_previous_months_bars_recompute_the_stale_impacts(tmp_path, files, capsys):
    in_order = tmp_path / "in_order.db"
    _run("db", "ingest-news", str(files["news"]), "--db", str(in_order))
    _run("db", "ingest-prices", str(files["may"]), str(files["june"]), "--db", str(in_order), "--ticker", "XAUUSD")
    _run("db", "impacts", "--db", str(in_order))

    late = tmp_path / "late.db"
    _run("db", "ingest-news", str(files["news"]), "--db", str(late))
    _run("db", "ingest-prices", str(files["june"]), "--db", str(late), "--ticker", "XAUUSD")
    _run("db", "impacts", "--db", str(late))
    before = _impacts(late)
    assert before != _impacts(in_order)  # the edge events lack their May bars
    assert any(window == -120 and status == "no_end_bar" for _, _, window, _, status, _, _ in before)
    _run("db", "ingest-prices", str(files["may"]), "--db", str(late), "--ticker", "XAUUSD")
    capsys.readouterr()
    _run("db", "impacts", "--db", str(late))  # no --recompute
    assert "recomputed" in capsys.readouterr().out
    assert _impacts(late) == _impacts(in_order)
    # Nothing new: the next run does no work.
    from finqlora.store.impacts import compute_impacts

    again = compute_impacts(late)
    assert again.computed_events == {"XAUUSD": 0} and again.refreshed_events == {"XAUUSD": 0}


def test_item8_only_events_whose_windows_the_new_bars_reach_are_redone(tmp_path, files):
    from finqlora.store.impacts import compute_impacts

    store = tmp_path / "store.db"
    _run("db", "ingest-news", str(files["news"]), "--db", str(store))
    _run("db", "ingest-prices", str(files["june"]), "--db", str(store), "--ticker", "XAUUSD")
    compute_impacts(store)
    _run("db", "ingest-prices", str(files["may"]), "--db", str(store), "--ticker", "XAUUSD")
    report = compute_impacts(store)
    # Events whose pre-event window (120 min + 5 min t0 and 1 min end tolerance) reaches back
    # into May are redone (offsets up to 7,000 s); those at 10,000 s and 1.5 days are not.
    assert report.refreshed_events["XAUUSD"] == 7
    assert report.computed_events["XAUUSD"] == 7 and report.skipped_events["XAUUSD"] == 2
