"""Event-study returns: conventions, gaps, tolerances, incremental reruns."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from finqlora.store.db import connect, init_db, read_impacts, transaction
from finqlora.core.errors import FinqloraError
from finqlora.store.impacts import STATUS_CODES, compute_impacts, event_returns
from finqlora.store.ingest import Bars, NewsRecord, store_bars, store_news

T = 1_780_000_020 - (1_780_000_020 % 86400) + 10 * 3600  # some day, 10:00 UTC


def _bars(minutes: list[int], closes: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([T + 60 * m for m in minutes], dtype=np.int64), np.array(closes, dtype=np.float64)


def _status(result, i: int) -> str:
    return STATUS_CODES[int(result.status[i])]


def test_post_and_pre_returns_follow_the_documented_formulas():
    minutes = list(range(-130, 131))
    closes = [100.0 + 0.1 * m for m in minutes]
    ts, close = _bars(minutes, closes)
    # Event 30 s after the 10:00 bar: t0 is the 10:00 bar (the last at or before t).
    results = event_returns(ts, close, np.array([T + 30]), windows=[5, 120], pre_windows=[120])
    by_window = {r.window_min: r for r in results}
    assert set(by_window) == {5, 120, -120}
    assert by_window[5].t0_ts[0] == T
    assert by_window[5].ret[0] == pytest.approx(100.5 / 100.0 - 1)
    assert by_window[120].ret[0] == pytest.approx(112.0 / 100.0 - 1)
    assert by_window[-120].ret[0] == pytest.approx(100.0 / 88.0 - 1)
    assert by_window[-120].end_ts[0] == T - 120 * 60


def test_event_exactly_on_a_bar_uses_that_bar():
    ts, close = _bars([0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15])
    (result,) = event_returns(ts, close, np.array([T + 60]), windows=[2], pre_windows=[])
    assert result.t0_ts[0] == T + 60
    assert result.ret[0] == pytest.approx(13 / 11 - 1)


def test_missing_bar_at_window_end_gives_nan_never_zero():
    # Bars stop at 10:03 and resume at 10:20: the 10-minute window ends inside the gap.
    ts, close = _bars([0, 1, 2, 3, 20, 21], [50, 50, 50, 50, 50, 50])
    (result,) = event_returns(ts, close, np.array([T]), windows=[10], pre_windows=[])
    assert np.isnan(result.ret[0])
    assert _status(result, 0) == "no_end_bar"
    assert result.end_ts[0] == -1


def test_end_tolerance_bounds_how_far_a_price_is_carried():
    ts, close = _bars([0, 1, 2, 3, 4, 6], [100, 100, 100, 100, 101, 103])  # 10:05 missing
    (exact,) = event_returns(ts, close, np.array([T]), windows=[5], pre_windows=[], end_tolerance_min=0)
    (lenient,) = event_returns(ts, close, np.array([T]), windows=[5], pre_windows=[], end_tolerance_min=1)
    assert np.isnan(exact.ret[0]) and _status(exact, 0) == "no_end_bar"
    assert lenient.ret[0] == pytest.approx(0.01)  # the 10:04 bar, one minute before the end
    assert lenient.end_ts[0] == T + 240


def test_stale_t0_bar_means_market_closed():
    ts, close = _bars([0, 1, 2], [1, 2, 3])
    # 20 minutes after the last bar but not the end of the data: another bar comes later.
    ts = np.append(ts, T + 3600)
    close = np.append(close, 4.0)
    (result,) = event_returns(ts, close, np.array([T + 20 * 60]), windows=[5], pre_windows=[], t0_tolerance_min=5)
    assert _status(result, 0) == "no_t0_bar" and np.isnan(result.ret[0])
    (wide,) = event_returns(ts, close, np.array([T + 4 * 60]), windows=[5], pre_windows=[], t0_tolerance_min=5)
    assert wide.t0_ts[0] == T + 120  # 2 minutes old: within tolerance, but 10:07 is in the gap
    assert _status(wide, 0) == "no_end_bar"


def test_events_beyond_the_last_bar_are_pending_and_before_the_first_have_no_t0():
    ts, close = _bars(list(range(0, 10)), list(range(1, 11)))
    results = event_returns(ts, close, np.array([T - 3600, T + 8 * 60, T + 3600]), windows=[5], pre_windows=[])
    assert [_status(results[0], i) for i in range(3)] == ["no_t0_bar", "pending", "pending"]


def test_vectorised_returns_match_a_plain_loop_on_random_gappy_bars():
    rng = np.random.default_rng(7)
    minutes = np.sort(rng.choice(np.arange(0, 3000), size=2000, replace=False))
    ts = T + 60 * minutes
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, len(ts))))
    events = T + rng.integers(-100, 3100 * 60, 400)
    windows, pre = [5, 10, 15, 30, 120], [30, 120]
    results = event_returns(ts, close, events, windows, pre, t0_tolerance_min=5, end_tolerance_min=1)
    bar_at = dict(zip(ts.tolist(), close.tolist()))

    def last_at_or_before(t):
        earlier = [b for b in ts.tolist() if b <= t]
        return earlier[-1] if earlier else None

    for result in results:
        for i, t in enumerate(events.tolist()):
            t0 = last_at_or_before(t)
            expected = None
            if t0 is not None and t - t0 <= 300:
                target = t0 + result.window_min * 60
                end = last_at_or_before(target)
                if end is not None and target - end <= 60 and target <= ts[-1]:
                    a, b = bar_at[t0], bar_at[end]
                    expected = b / a - 1 if result.window_min > 0 else a / b - 1
            if expected is None:
                assert np.isnan(result.ret[i]), (result.window_min, t)
            else:
                assert result.ret[i] == pytest.approx(expected, rel=1e-12), (result.window_min, t)


def test_unsorted_bars_are_refused():
    with pytest.raises(FinqloraError, match="not strictly increasing"):
        event_returns(np.array([T + 60, T]), np.array([1.0, 2.0]), np.array([T]))


def _store(tmp_path, bar_minutes, events):
    path = init_db(tmp_path / "store.db")
    conn = connect(path)
    minutes = np.array(bar_minutes, dtype=np.int64)
    close = 2000.0 + minutes.astype(np.float64)
    with transaction(conn):
        store_bars(conn, "XAUUSD", Bars(T + 60 * minutes, close, close, close, close, np.ones(len(minutes))))
        store_news(
            conn,
            [NewsRecord(source="test", source_id=str(i), ts_utc=T + offset, tz_offset_min=0, content=f"消息{i}号：测试事件") for i, offset in enumerate(events)],
            dedup=False,
        )
    return path, conn


def test_compute_impacts_stores_fractions_nulls_and_negative_pre_windows(tmp_path):
    path, conn = _store(tmp_path, list(range(-120, 11)) + list(range(40, 200)), [0, 25 * 60])
    report = compute_impacts(conn=conn)
    assert report.computed_events == {"XAUUSD": 2}
    rows = {(e, w): (r, s) for e, w, r, s in conn.execute("SELECT event_id, window_min, ret, status FROM event_impacts")}
    assert rows[("test:0", 5)] == (pytest.approx(2005 / 2000 - 1), "ok")
    assert rows[("test:0", -120)] == (pytest.approx(2000 / 1880 - 1), "ok")
    assert rows[("test:0", 15)] == (None, "no_end_bar")  # 10:15 lies in the 10:10 - 10:40 gap
    assert rows[("test:1", 5)] == (None, "no_t0_bar")  # 10:25: market "closed"
    assert read_impacts(conn)["test:0"][("XAUUSD", 5)] == pytest.approx(0.0025)
    assert ("XAUUSD", 15) not in read_impacts(conn)["test:0"]
    # Users' query shape keeps working: window_min 15 is post-event.
    joined = conn.execute(
        "SELECT e.event_id, ei_post.ret FROM events e LEFT JOIN event_impacts ei_post "
        "ON e.event_id = ei_post.event_id AND ei_post.window_min = 5 ORDER BY e.event_id"
    ).fetchall()
    assert joined[0][1] == pytest.approx(0.0025) and joined[1][1] is None
    wide = conn.execute("SELECT ret_post_5m, ret_post_15m, ret_pre_120m FROM event_impacts_wide WHERE event_id = 'test:0'").fetchone()
    assert wide == (pytest.approx(0.0025), None, pytest.approx(2000 / 1880 - 1))


def test_rerun_only_computes_new_and_pending_events(tmp_path):
    path, conn = _store(tmp_path, list(range(-130, 60)), [0, 30 * 60])
    first = compute_impacts(conn=conn)
    assert first.computed_events["XAUUSD"] == 2
    status = dict(conn.execute("SELECT event_id, status FROM event_impacts WHERE window_min = 120"))
    assert status == {"test:0": "pending", "test:1": "pending"}
    second = compute_impacts(conn=conn)
    assert second.computed_events["XAUUSD"] == 2  # pending rows are retried
    # New bars arrive; the pending 120-minute windows become known.
    more = np.arange(60, 200, dtype=np.int64)
    close = 2000.0 + more
    with transaction(conn):
        store_bars(conn, "XAUUSD", Bars(T + 60 * more, close, close, close, close, np.ones(len(more))))
    compute_impacts(conn=conn)
    assert conn.execute("SELECT ret FROM event_impacts WHERE event_id = 'test:0' AND window_min = 120").fetchone()[0] == pytest.approx(0.06)
    done = compute_impacts(conn=conn)
    assert done.computed_events["XAUUSD"] == 0 and done.skipped_events["XAUUSD"] == 2
    with transaction(conn):
        store_news(conn, [NewsRecord(source="test", source_id="new", ts_utc=T + 600, tz_offset_min=0, content="新的消息")], dedup=False)
    assert compute_impacts(conn=conn).computed_events["XAUUSD"] == 1
    assert compute_impacts(conn=conn, recompute=True).computed_events["XAUUSD"] == 3


def test_unknown_ticker_and_empty_prices_are_explained(tmp_path):
    path, conn = _store(tmp_path, [0, 1, 2], [0])
    with pytest.raises(FinqloraError, match="no price bars stored for SPX"):
        compute_impacts(conn=conn, tickers=["SPX"])
    empty = init_db(tmp_path / "empty.db")
    with pytest.raises(FinqloraError, match="no price bars"):
        compute_impacts(empty)
    with pytest.raises(FinqloraError, match="positive"):
        compute_impacts(conn=conn, windows=[0, 5])


def test_impacts_cli_prints_coverage(tmp_path, capsys):
    from finqlora.cli import main

    path, conn = _store(tmp_path, list(range(-130, 140)), [0])
    conn.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["db", "impacts", "--db", str(path), "--windows", "5,15", "--pre-windows", "30"])
    assert exit_info.value.code == 0
    check = sqlite3.connect(path)
    assert sorted(w for (w,) in check.execute("SELECT window_min FROM event_impacts")) == [-30, 5, 15]
    assert "XAUUSD" in capsys.readouterr().out
