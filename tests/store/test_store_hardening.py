"""Store faults and hostile news lines (issue 18 item 6, store part): error + hint, exit 2, nothing stored."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.store import db, ingest

BASE = 1_780_300_000  # 2026-06-01


def _flash(i: int, **fields) -> dict:
    record = {"id": str(9000 + i), "source": "cls", "ctime": BASE + 60 * i, "level": "C",
              "content": f"【合成{i}】合成测试快讯第{i}条，编号{i * 977}。", "raw_keep": {"bold": 0}}
    record.update(fields)
    return record


def _news(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines), encoding="utf-8")
    return path


def _events(store: Path) -> int:
    return sqlite3.connect(store).execute("SELECT COUNT(*) FROM events").fetchone()[0]


# --- wrongly typed or out-of-range fields ---------------------------------------------------

BAD_LINES = {
    "content_number": (_flash(1, content=123), "field `content` must be a string"),
    "level_list": (_flash(1, level=["A"]), "field `level` must be a string"),
    "ctime_huge": (_flash(1, ctime=1e300), "field `ctime`"),
    "ctime_year_minus_1199": (_flash(1, ctime=-99999999999), "outside the years 1900-2199"),
    "id_dict": (_flash(1, id={"a": 1}), "field `id` must be a string or an integer"),
    "title_list": (_flash(1, title=["t"]), "field `title` must be a string"),
    "url_object": (_flash(1, url={"x": 1}), "field `url` must be a string"),
    "nested_brackets": ("[" * 100_000, "nested deeper than"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_item6_store_bad_field_names_file_line_field_and_exits_2(tmp_path, cli, case):
    line, needle = BAD_LINES[case]
    path = _news(tmp_path / "news.jsonl", [_flash(0), line, _flash(2)])
    store = tmp_path / "store.db"
    db.init_db(store)
    result = cli("db", "ingest-news", str(path), "--db", str(store))
    assert result.exit_code == 2, result.output
    assert f"{path}, line 2" in result.output and needle in result.output, result.output
    assert "hint:" in result.output and "--skip-bad" in result.output and "Traceback" not in result.output
    assert len(result.output) < 1000
    assert _events(store) == 0  # all or nothing
    # --skip-bad skips exactly that line, counts it and says why.
    result = cli("db", "ingest-news", str(path), "--db", str(store), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped 1 lines" in result.output and "line 2" in result.output
    assert _events(store) == 2


def test_item6_store_generic_jsonl_fields_are_checked_too(tmp_path):
    path = _news(tmp_path / "wire.jsonl", [{"id": 1, "time": BASE, "text": ["not", "text"]}])
    with pytest.raises(FinqloraError) as caught:
        ingest.read_news_file(path, "jsonl", source="wire", mapping={"content": "text"})
    assert "line 1" in str(caught.value) and "field `text` must be a string" in str(caught.value)


def test_item6_store_bar_times_out_of_range_are_refused(tmp_path):
    csv = tmp_path / "bars.csv"
    csv.write_text("ts,close\n1780300000000,10\n9999999999999,11\n", encoding="utf-8")  # ms; the second is 2286
    with pytest.raises(FinqloraError) as caught:
        ingest.read_bars_file(csv)
    assert "line 3" in str(caught.value) and "1900-2199" in str(caught.value)


def test_item6_store_parse_time_bounds():
    assert db.parse_time(BASE, tz=None)[0] == BASE
    assert db.parse_time(BASE * 1000, tz=None)[0] == BASE  # milliseconds
    for value in (1e300, float("inf"), float("nan"), -99999999999, "0001-01-01T00:00:00Z", True):
        with pytest.raises(ValueError):
            db.parse_time(value, tz=None)


# --- read-only, locked and full databases --------------------------------------------------


def _make_read_only(path: Path, request) -> None:
    path.chmod(0o444)
    probe = sqlite3.connect(path)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("CREATE TABLE probe (x)")
        probe.rollback()
        writable = True
    except sqlite3.OperationalError:
        writable = False
    probe.close()
    if writable:  # root ignores permissions: make the file immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a file read-only here (root without chattr +i)")
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], check=False))


def test_item6_store_read_only_database(tmp_path, cli, request):
    store = tmp_path / "store.db"
    db.init_db(store)
    _make_read_only(store, request)
    path = _news(tmp_path / "news.jsonl", [_flash(0)])
    result = cli("db", "ingest-news", str(path), "--db", str(store))
    assert result.exit_code == 2, result.output
    assert "is read-only" in result.output and "hint:" in result.output and "Traceback" not in result.output
    assert _events(store) == 0


def test_item6_store_locked_by_another_writer(tmp_path, cli, monkeypatch):
    store = tmp_path / "store.db"
    db.init_db(store)
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.3)
    holder = sqlite3.connect(store, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    holder.execute("INSERT INTO finqlora_meta(key, value) VALUES ('other', 'writer')")
    try:
        path = _news(tmp_path / "news.jsonl", [_flash(0)])
        result = cli("db", "ingest-news", str(path), "--db", str(store))
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 2, result.output
    assert "locked by another writer (waited 0.3 s)" in result.output and "hint:" in result.output
    assert _events(store) == 0


def test_item6_store_full_disk_rolls_back_with_a_clear_error(tmp_path, cli, monkeypatch):
    # A real SQLITE_FULL: the store may not grow beyond its current pages (as on a full disk).
    store = tmp_path / "store.db"
    db.init_db(store)
    real_open = ingest.open_store

    def open_on_full_disk(path):
        conn = real_open(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(ingest, "open_store", open_on_full_disk)
    long_text = "合成的长文本，用于填满数据库页。" * 400
    path = _news(tmp_path / "news.jsonl", [_flash(i, content=f"{long_text}{i}") for i in range(50)])
    result = cli("db", "ingest-news", str(path), "--db", str(store))
    assert result.exit_code == 2, result.output
    assert "the disk is full" in result.output and "free some disk space" in result.output
    assert _events(store) == 0


def test_item6_store_a_folder_that_cannot_hold_the_database(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("db", "init", "--db", str(blocker / "store.db"))
    assert result.exit_code == 2 and "hint:" in result.output and "Traceback" not in result.output
