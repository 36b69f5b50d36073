"""Issue 29, store and CLI part: hot journals, stale impacts after a narrower call, printed data
read as markup, unbounded JSON/YAML/CSV readers, unwritable outputs, non-finite config floats.

Every test is named after its item of the issue, uses small files made here, and runs the CLI
through its real entry point (`finqlora.cli.main`), as a user's command would.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import read_jsonl
from finqlora.store import db

BASE = 1_780_300_000  # 2026-06-01
JUNE = 1_780_272_000  # 2026-06-01T00:00:00Z
DAY = 86_400


def _flash(i: int, **fields) -> dict:
    record = {"id": str(7000 + i), "source": "cls", "ctime": BASE + 60 * i, "level": "C",
              "content": f"【合成{i}】合成测试快讯第{i}条，编号{i * 977}。"}
    record.update(fields)
    return record


def _lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines), encoding="utf-8")
    return path


def _minimal_config(tmp_path: Path) -> Path:
    config = tmp_path / "minimal.yaml"
    config.write_text(f"name: x\ntrain:\n  output_dir: {tmp_path / 'runs' / 'x'}\n", encoding="utf-8")
    return config


def _events(store: Path) -> int:
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]


# --- item 3: a hot journal left by a killed or disk-full ingest ------------------------------

# A writer that changes many pages (a small cache spills them into the file) and is killed
# before COMMIT: the file is left inconsistent, with the old pages in a hot journal beside it.
_KILLED_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("PRAGMA cache_size = 10")
conn.execute("BEGIN")
conn.executemany(
    "INSERT INTO events (event_id, content, source, ts_utc) VALUES (?, ?, 'killed', 1780300000)",
    [(f"killed:{i}", "x" * 200) for i in range(5000)],
)
os._exit(9)
"""


@pytest.fixture
def hot_store(tmp_path, cli) -> Path:
    store = tmp_path / "k.db"
    news = _lines(tmp_path / "news.jsonl", [_flash(i) for i in range(40)])
    assert cli("db", "ingest-news", str(news), "--db", str(store)).exit_code == 0
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(store)], timeout=60)
    assert killed.returncode == 9
    assert Path(f"{store}-journal").stat().st_size > 0  # the hot journal
    return store


def test_item3_hot_journal_is_rolled_back_before_a_read(hot_store, cli):
    result = cli("db", "check", "--db", str(hot_store))
    assert result.exit_code == 0, result.output
    assert "read-only" not in result.output and "ok: everything finqlora needs is there" in result.output
    assert not Path(f"{hot_store}-journal").exists()  # rolled back
    assert cli("db", "stats", "--db", str(hot_store)).exit_code == 0
    assert _events(hot_store) == 40  # the killed ingest's rows are gone, the committed ones kept
    with sqlite3.connect(hot_store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_item3_hot_journal_on_a_read_only_file_is_named_as_such(hot_store):
    # What a read-only user meets: SQLite cannot roll the journal back through a read-only
    # connection (SQLITE_READONLY_ROLLBACK). The message must say so, not "work on a copy".
    conn = sqlite3.connect(f"{hot_store.resolve().as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("SELECT COUNT(*) FROM events").fetchone()
    conn.close()
    error = db.store_error(caught.value, hot_store)
    assert error is not None
    assert "hot journal" in error.message and "k.db-journal" in error.message
    assert "copy" not in error.message and "without it" in error.hint and "work on a copy" not in error.hint


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes read-only files anyway")
def test_item3_hot_journal_in_a_read_only_folder_exits_2_with_that_message(hot_store, cli):
    hot_store.chmod(0o444)
    hot_store.parent.chmod(0o555)
    try:
        result = cli("db", "stats", "--db", str(hot_store))
    finally:
        hot_store.parent.chmod(0o755)
        hot_store.chmod(0o644)
    assert result.exit_code == 2 and "hot journal" in result.output and "Traceback" not in result.output


def test_item3_db_check_runs_quick_check_on_a_copy_without_its_journal(hot_store, tmp_path, cli):
    copy = tmp_path / "copy.db"
    shutil.copyfile(hot_store, copy)  # what the old hint led to: the file without its journal
    result = cli("db", "check", "--db", str(copy))
    assert result.exit_code == 1, result.output
    assert "damaged file" in result.output and "quick_check" in result.output
    assert "ok: everything" not in result.output and "--migrate" not in result.output
    result = cli("db", "stats", "--db", str(copy))  # a damaged page met while counting
    assert result.exit_code == 2 and "is damaged" in result.output and "db check" in result.output, result.output


# --- item 4: stale impacts after a narrower `db impacts` call ----------------------------------


def _bars_csv(path: Path, start: int, days: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    ts = np.arange(start, start + days * DAY, 60)
    ts = ts[rng.random(len(ts)) > 0.02]
    close = 2000 * np.exp(np.cumsum(rng.normal(0, 2e-4, len(ts))))
    path.write_text("datetime_utc,close\n" + "".join(f"{int(t)},{c:.4f}\n" for t, c in zip(ts, close)), encoding="utf-8")
    return path


def _impacts(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as conn:
        return conn.execute(
            "SELECT event_id, ticker, window_min, ret, status, t0_ts, end_ts FROM event_impacts ORDER BY event_id, window_min"
        ).fetchall()


def test_item4_a_narrower_impacts_call_leaves_no_stale_rows(tmp_path, cli):
    offsets = [30, 90, 600, 1800, 3600, 5400, 7000, 10_000]
    news = _lines(tmp_path / "news.jsonl", [_flash(i, ctime=JUNE + offset) for i, offset in enumerate(offsets)])
    may = _bars_csv(tmp_path / "may.csv", JUNE - 2 * DAY, 2, seed=1)
    june = _bars_csv(tmp_path / "june.csv", JUNE, 2, seed=2)

    in_order = tmp_path / "in_order.db"
    cli("db", "ingest-news", str(news), "--db", str(in_order))
    cli("db", "ingest-prices", str(may), str(june), "--db", str(in_order), "--ticker", "XAUUSD")
    cli("db", "impacts", "--db", str(in_order))

    late = tmp_path / "late.db"
    cli("db", "ingest-news", str(news), "--db", str(late))
    cli("db", "ingest-prices", str(june), "--db", str(late), "--ticker", "XAUUSD")
    cli("db", "impacts", "--db", str(late))
    cli("db", "ingest-prices", str(may), "--db", str(late), "--ticker", "XAUUSD")
    # The narrower call sees the May batch first; the -120 rows it does not compute must not
    # stay `no_end_bar` once the batch is marked seen.
    assert cli("db", "impacts", "--db", str(late), "--windows", "5", "--pre-windows", "").exit_code == 0
    assert cli("db", "impacts", "--db", str(late)).exit_code == 0
    assert _impacts(late) == _impacts(in_order)


# --- item 7: printed data read as rich markup -------------------------------------------------


def test_item7_rich_markup_in_printed_data_is_printed_as_text(tmp_path, cli):
    store = tmp_path / "m.db"
    news = _lines(tmp_path / "news.jsonl", [_flash(0, source="[/evil]"), _flash(1, ctime="[/bad]")])
    result = cli("db", "ingest-news", str(news), "--db", str(store), "--skip-bad")  # a source and a --skip-bad reason
    assert result.exit_code == 0 and "[/evil]: 1" in result.output and "'[/bad]'" in result.output, result.output
    result = cli("db", "stats", "--db", str(store))
    assert result.exit_code == 0 and "[/evil]" in result.output
    bars = tmp_path / "bars.csv"
    bars.write_text(f"ts,close\n{BASE},10\n{BASE + 60},11\n", encoding="utf-8")
    result = cli("db", "ingest-prices", str(bars), "--db", str(store), "--ticker", "[/x]")
    assert result.exit_code == 0 and "read 2 [/x] bars" in result.output
    assert cli("db", "impacts", "--db", str(store)).exit_code == 0
    dataset = _lines(tmp_path / "ds.jsonl", [{"id": "[/x]", "type": "[bold]t", "instruction": "[/i]", "output": "o"}])
    result = cli("data", "show", str(dataset))
    assert result.exit_code == 0 and "#1 [/x] · [bold]t" in result.output and "[/i]" in result.output
    # Error messages: a config path, and a YAML snippet quoted in the hint.
    result = cli("run", "-c", str(tmp_path / "[/x].yaml"))
    assert result.exit_code == 2 and "[/x].yaml" in result.output
    result = cli("run", "-c", str(_minimal_config(tmp_path)), "--from", "[/x]")
    assert result.exit_code == 2 and "[/x]" in result.output, result.output
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\ntrain: [/x\n", encoding="utf-8")
    result = cli("run", "-c", str(bad_yaml))
    assert result.exit_code == 2 and "not valid YAML" in result.output and "[/x" in result.output


# --- item 7: integers over 4,300 digits, deep nesting, bad UTF-8, lone surrogates ----------


def test_item7_huge_integer_ctime_is_a_per_line_error_that_skip_bad_skips(tmp_path, cli):
    huge = '{"id": "9", "source": "cls", "ctime": 1' + "0" * 5000 + ', "content": "x"}'
    news = _lines(tmp_path / "news.jsonl", [_flash(0), huge, _flash(2)])
    store = tmp_path / "s.db"
    result = cli("db", "ingest-news", str(news), "--db", str(store))
    assert result.exit_code == 2 and "line 2" in result.output and "4,300 digits" in result.output, result.output
    result = cli("db", "ingest-news", str(news), "--db", str(store), "--skip-bad")
    assert result.exit_code == 0 and "skipped 1 lines" in result.output and _events(store) == 2


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"[" * 100_000, "nested deeper than"),
        (b'{"id": 1' + b"0" * 5000 + b"}", "4,300 digits"),
        (b'{"instruction": "\xff\xfe"}', "not UTF-8"),
        (b'{"instruction": "x\\ud800"}', "lone surrogate"),
    ],
    ids=["deep", "huge_int", "bad_utf8", "surrogate"],
)
def test_item7_data_show_bad_line_is_an_error_naming_the_line(tmp_path, cli, line, needle):
    dataset = tmp_path / "ds.jsonl"
    dataset.write_bytes(b'{"instruction": "ok", "output": "o"}\n' + line + b"\n")
    result = cli("data", "show", str(dataset))
    assert result.exit_code == 2 and "line 2" in result.output and needle in result.output, result.output
    assert "Traceback" not in result.output and len(result.output) < 600


def test_item7_lone_surrogate_in_ingest_is_a_per_line_error(tmp_path, cli):
    news = _lines(tmp_path / "news.jsonl", [_flash(0), '{"id": "5", "source": "cls", "ctime": 1780300000, "content": "x\\ud800"}'])
    store = tmp_path / "s.db"
    result = cli("db", "ingest-news", str(news), "--db", str(store))
    assert result.exit_code == 2 and "line 2" in result.output and "lone surrogate" in result.output, result.output
    assert cli("db", "ingest-news", str(news), "--db", str(store), "--skip-bad").exit_code == 0 and _events(store) == 1


def test_item7_cache_with_a_torn_tail_mid_character_or_a_huge_int(tmp_path):
    cache = tmp_path / "cache.jsonl"
    whole = json.dumps({"id": "a", "answer": "利好"}, ensure_ascii=False).encode() + b"\n"
    torn = json.dumps({"id": "b", "answer": "利空"}, ensure_ascii=False).encode()[:-4]  # cut inside 空
    cache.write_bytes(whole + torn)
    assert [row["id"] for row in read_jsonl(cache, what="evaluation cache", torn_tail=True)] == ["a"]
    cache.write_bytes(b'{"id": 1' + b"0" * 5000 + b"}\n" + whole)  # not the tail: an error
    with pytest.raises(FinqloraError, match=r"cache.jsonl:1: not valid JSON \(an integer of more than 4,300 digits\)"):
        read_jsonl(cache, what="evaluation cache", torn_tail=True)


def test_item7_deep_nesting_in_a_config_or_set_is_an_error(tmp_path, cli):
    config = tmp_path / "deep.yaml"
    config.write_text("name: x\ntrain:\n  target_modules: " + "[" * 20_000 + "\n", encoding="utf-8")
    result = cli("run", "-c", str(config))
    assert result.exit_code == 2 and "nested deeper than" in result.output, result.output[:500]
    result = cli("run", "-c", str(_minimal_config(tmp_path)), "--set", "train.target_modules=" + "[" * 20_000)
    assert result.exit_code == 2 and "nested deeper than" in result.output and len(result.output) < 600


def test_item7_int_of_a_users_database_cells_never_raises(tmp_path, cli):
    # The next class of the same kind: int() and JSON on cells of a user's database (star,
    # subjects, the schema version in finqlora_meta), which anyone may have edited.
    store = tmp_path / "user.db"
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE events (event_id TEXT, content TEXT, star, ts_utc INTEGER, subjects TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                         [("a", "x", "1" * 5000, BASE, "[1" + "0" * 5000 + "]"), ("b", "y", float("inf"), BASE, "[" * 5000),
                          ("c", "z", 3, BASE, '["黄金"]')])
        conn.execute("CREATE TABLE finqlora_meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO finqlora_meta VALUES ('schema_version', 'abc')")
    conn = db.connect(store, readonly=True)
    try:
        events = db.read_events(conn)
        assert [event.star for event in events] == [None, None, 3]
        assert events[2].subjects == ["黄金"] and len(events[0].subjects) == 1  # kept as text
    finally:
        conn.close()
    result = cli("db", "check", "--db", str(store))
    assert result.exit_code == 0 and "schema version none" in result.output, result.output


# --- item 7: CSV fields over 131,072 characters, nan in a unix-stamp price file ---------------


def test_item7_csv_field_over_131072_characters_is_read(tmp_path, cli):
    news = tmp_path / "news.csv"
    news.write_text(f"time,content,source\n{BASE},{'长' * 200_000},wire\n{BASE + 60},短讯,wire\n", encoding="utf-8")
    store = tmp_path / "s.db"
    result = cli("db", "ingest-news", str(news), "--format", "csv", "--db", str(store))
    assert result.exit_code == 0 and _events(store) == 2, result.output


@pytest.mark.parametrize("stamp", ["nan", "1e300", "inf"])
def test_item7_bad_stamp_in_a_middle_row_of_a_unix_price_csv(tmp_path, cli, stamp):
    bars = tmp_path / "bars.csv"
    bars.write_text(f"ts,close\n{BASE},10\n{stamp},11\n{BASE + 120},12\n", encoding="utf-8")
    result = cli("db", "ingest-prices", str(bars), "--db", str(tmp_path / "s.db"), "--ticker", "XAUUSD")
    assert result.exit_code == 2 and "line 3" in result.output and "Traceback" not in result.output, result.output


# --- item 7: an output folder that cannot be written -----------------------------------------


def test_item7_unwritable_output_folder_for_build_run_and_export_zip(tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    result = cli("build", "--templates-only", "-n", "5", "-q", "-o", str(blocker / "out" / "ds.jsonl"))
    assert result.exit_code == 2 and "cannot write" in result.output and str(blocker) in result.output, result.output
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\ntrain:\n  output_dir: {blocker / 'run'}\n", encoding="utf-8")
    result = cli("run", "-c", str(config))
    assert result.exit_code == 2 and "cannot write" in result.output and str(blocker) in result.output, result.output
    # export zip -o: an adapter folder (a tiny real safetensors file) zipped into the blocked path.
    import torch
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}), encoding="utf-8")
    result = cli("export", "zip", "--run", str(run), "-o", str(blocker / "out.zip"))
    assert result.exit_code == 2 and "cannot write" in result.output and str(blocker) in result.output, result.output


# --- item 8: a YAML alias bomb ---------------------------------------------------------------

_BOMB = "".join(
    f"{name}: &{name} [{','.join([f'*{prev}'] * 9) if prev else ','.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
) + "train: {target_modules: *i}\n"


def test_item8_yaml_alias_bomb_is_refused_at_once(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_BOMB, encoding="utf-8")
    assert len(_BOMB.encode()) < 400
    # A subprocess with a time limit: the unbounded loader ran for minutes and grew to GBs.
    done = subprocess.run(
        [sys.executable, "-m", "finqlora", "run", "-c", str(config)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(db.__file__).parents[2])},
    )
    assert done.returncode == 2 and "alias" in done.stderr and "Traceback" not in done.stderr, done.stderr[-800:]


_FLOW_BOMB = "[" + ", ".join(
    f"&{name} [{','.join([f'*{prev}'] * 9) if prev else ','.join(['lol'] * 9)}]"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
) + "]"


def test_item8_every_yaml_reader_is_bounded(tmp_path):
    from finqlora.core.config import load_config

    with pytest.raises(FinqloraError, match="expands to more than"):
        load_config(None, ["train.target_modules=" + _FLOW_BOMB])
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(_BOMB, encoding="utf-8")
    from finqlora.ui.launch import base_model_of

    assert base_model_of(run) is None  # refused as unreadable, at once


# --- item 9: non-finite floats in the config ---------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_item9_non_finite_config_floats_are_refused(tmp_path, value):
    # Through load_config, as `finqlora run` and `train` call it (a config that passed would
    # start a whole run).
    from finqlora.core.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\ntrain:\n  learning_rate: {value}\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"train\.learning_rate.*finite"):
        load_config(config)
    with pytest.raises(FinqloraError, match=r"eval\.temperature.*finite"):
        load_config(None, [f"eval.temperature={value}"])


def test_item7_a_rating_sheet_saved_as_gbk_or_with_a_huge_field(tmp_path):
    # The next class: the human-eval sheet is a CSV a spreadsheet program wrote back (GBK on
    # Chinese Windows) and is read by the same bounded CSV reader as the store's files.
    from finqlora.evaluate.human_eval import make_sheet, score_sheets

    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.csv"
    make_sheet([{"id": "i0", "question": "问题", "base": "基座", "finetuned": "微调"}], sheet, key, seed=0)
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("item,question,answer_A,answer_B,preference,comment\ni0,问题,甲,乙,A,\n".encode("gbk"))
    with pytest.raises(FinqloraError, match=r"gbk.csv, line 2: not UTF-8") as caught:
        score_sheets([gbk], key)
    assert "CSV UTF-8" in caught.value.hint
    huge = tmp_path / "huge.csv"
    huge.write_text("item,question,answer_A,answer_B,preference,comment\ni0,问题," + "甲" * 200_000 + ",乙,A,\n", encoding="utf-8")
    assert score_sheets([huge], key).per_rater["huge"]["win"] + score_sheets([huge], key).per_rater["huge"]["loss"] == 1


@pytest.mark.parametrize(
    ("line", "needle"),
    [(b'{"prompt": "\xff"}', "not UTF-8"), (b'{"prompt": 1' + b"0" * 5000 + b"}", "4,300 digits"), (b"[" * 100_000, "nested deeper than")],
    ids=["bad_utf8", "huge_int", "deep"],
)
def test_item7_generate_prompts_file_bad_line_is_an_error(tmp_path, line, needle):
    # The next class: `finqlora generate`'s input file goes through the same bounded reader.
    from finqlora.models.generation import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "ok"}\n' + line + b"\n")
    with pytest.raises(FinqloraError, match=rf"prompts.jsonl:2: .*{needle}"):
        read_prompts(prompts)
