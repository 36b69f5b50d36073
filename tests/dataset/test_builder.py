"""The dataset builder on the synthetic sample store and on small hand-made stores."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from finqlora.dataset import builder, labelling, lengths, split
from finqlora.core import textdedup
from finqlora.dataset.answer_parser import parse_direction, parse_number
from finqlora.dataset.build_config import BuildConfig
from finqlora.dataset.builder import build_dataset
from finqlora.core.chat_format import record_to_chat
from finqlora.core.records import user_content
from finqlora.store.db import Event, init_db
from finqlora.core.errors import FinqloraError
from finqlora.dataset.labels import LabelRules, direction, threshold_for
from finqlora.store.sample_db import build_sample_db
from finqlora.evaluate.evaluation import build_items

REPO = Path(__file__).resolve().parents[2]
FINQLORA = [sys.executable, "-c", "from finqlora.cli import main; main()"]


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sample_db(tmp_path_factory.mktemp("store") / "sample.db", seed=0)


@pytest.fixture(scope="module")
def sample_build(sample_db: Path, tmp_path_factory: pytest.TempPathFactory) -> builder.BuildResult:
    out = tmp_path_factory.mktemp("build") / "instructions.jsonl"
    return build_dataset(BuildConfig(output=out, db=sample_db, num_samples=300, progress=False))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------
# Hand-made stores


_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"


def _text(rng: random.Random, length: int = 40) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(length))


def make_store(
    path: Path,
    *,
    events: int = 80,
    with_prices: bool = True,
    with_impacts: bool = True,
    reposts: int = 0,
    long_text: int = 0,
    seed: int = 0,
    relevant: bool = True,
) -> tuple[Path, list[str]]:
    """A store with `events` unrelated random texts one hour apart, plus `reposts` near-copies.

    With `relevant` each text starts with a Fed tag, so the relevance rule lets gold label it.

    Returns the path and the ids of the reposts (each a near-duplicate of an earlier event).
    """
    init_db(path)
    rng = random.Random(seed)
    conn = sqlite3.connect(path)
    start = 1_780_000_000
    rows, impacts, repost_ids = [], [], []
    for i in range(events):
        ts = start + i * 3600
        content = ("【美联储】" if relevant else "") + _text(rng, long_text or 40)
        rows.append((f"e{i:04d}", content, rng.randint(1, 5), "test", None, ts, ts))
        for window in (-120, 5, 10, 15, 30, 120):
            impacts.append((f"e{i:04d}", "XAUUSD", window, rng.gauss(0, 0.001 * (abs(window) / 15) ** 0.5)))
        if i < reposts:
            repost_id = f"r{i:04d}"
            repost_ids.append(repost_id)
            rows.append((repost_id, content + "（转载）", 2, "test", None, ts + 600, ts + 600))
            for window in (-120, 5, 10, 15, 30, 120):
                impacts.append((repost_id, "XAUUSD", window, rng.gauss(0, 0.001)))
    with conn:
        conn.executemany(
            "INSERT INTO events (event_id, content, star, source, title, ts_utc, published_at) "
            "VALUES (?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', ?, 'unixepoch'))",
            rows,
        )
        if with_prices:
            conn.executemany(
                "INSERT INTO prices (ticker, ts, open, high, low, close, volume) VALUES ('XAUUSD', ?, 1, 1, 1, 1, 1)",
                [(start + 60 * k,) for k in range(10)],
            )
        if with_impacts:
            conn.executemany("INSERT INTO event_impacts (event_id, ticker, window_min, ret) VALUES (?, ?, ?, ?)", impacts)
    conn.close()
    return path, repost_ids


# ---------------------------------------------------------------------------------------
# Mix, split and labels on the sample store


def test_mix_and_split_counts(sample_build: builder.BuildResult) -> None:
    stats = sample_build.stats
    by_type = stats["by_type"]
    assert (by_type["market_analysis"], by_type["report_qa"]) == (60, 60)
    # news_impact takes only events the relevance rule allows; the sample DB has a few too few.
    assert 175 <= by_type["news_impact"] <= 180
    assert stats["records"] == sum(stats["by_split"].values()) == 120 + by_type["news_impact"]
    assert sample_build.output.exists() and sample_build.card.exists() and sample_build.stats_path.exists()
    assert json.loads(sample_build.stats_path.read_text(encoding="utf-8")) == stats


def test_splits_are_strictly_ordered_in_time_and_share_no_event(sample_build: builder.BuildResult) -> None:
    records = _read(sample_build.output)
    times = {s: [r["event_time"] for r in records if r["split"] == s and r["event_time"]] for s in ("train", "val", "test")}
    assert all(times.values())
    assert max(times["train"]) < min(times["val"])
    assert max(times["val"]) < min(times["test"])
    splits_of_event: dict[str, set[str]] = {}
    for r in records:
        if r["event_id"]:
            splits_of_event.setdefault(r["event_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_event.values())


def test_news_labels_follow_the_rule_on_stored_returns(sample_build: builder.BuildResult, sample_db: Path) -> None:
    records = [r for r in _read(sample_build.output) if r["type"] == "news_impact"]
    stats = sample_build.stats
    conn = sqlite3.connect(sample_db)
    try:
        for r in records:
            label = r["label"]
            stored = {
                (t, w): ret
                for t, w, ret in conn.execute(
                    "SELECT ticker, window_min, ret FROM event_impacts WHERE event_id = ? AND ret IS NOT NULL", (r["event_id"],)
                )
            }
            assert set(label) >= {"direction", "ticker", "window_min", "directions", "returns", "threshold"}
            assert label["window_min"] == 15
            for ticker, by_window in label["returns"].items():
                assert {(ticker, int(w)): v for w, v in by_window.items()} == {k: v for k, v in stored.items() if k[0] == ticker}
            for ticker, dir_ in label["directions"].items():
                sigma = stats["thresholds"][f"{ticker}@15"]["sigma"]
                assert label["thresholds"][ticker] == pytest.approx(threshold_for(sigma))
                assert label["zs"][ticker] == pytest.approx(stored[(ticker, 15)] / sigma, abs=1e-4)
                expected = direction(stored[(ticker, 15)], label["thresholds"][ticker])
                adjacent = sorted(w for (t, w) in stored if t == ticker and w > 0)
                i = adjacent.index(15)
                neighbours = adjacent[max(i - 1, 0):i] + adjacent[i + 1:i + 2]
                assert neighbours == labelling.adjacent_windows(stored, ticker, 15)
                held = all(stored[(ticker, w)] * stored[(ticker, 15)] > 0 for w in neighbours)
                assert dir_ == (expected if held or expected == "中性" else "中性")
                assert label["relevance"][ticker]["relevant"]
            assert label["direction"] == label["directions"][label["ticker"]]
            assert label["threshold"] == label["thresholds"][label["ticker"]]
    finally:
        conn.close()
    assert {r["label"]["direction"] for r in records} == {"利好", "利空", "中性"}


def test_outputs_say_what_the_labels_say(sample_build: builder.BuildResult) -> None:
    for r in _read(sample_build.output):
        if r["type"] == "news_impact":
            assert parse_direction(r["output"], r["label"]["ticker"]).direction == r["label"]["direction"]
            for part in ("传导路径：", "历史参照：", "可能改变判断的因素：", "置信度："):
                assert part in r["output"]
            assert "%" not in r["output"] and "发布后" not in r["output"]
        elif r["type"] == "report_qa":
            assert parse_number(r["output"], r["label"]["unit"]).value == pytest.approx(r["label"]["answer"])
        elif r["type"] == "market_analysis":
            assert r["output"].startswith(f"案例类型：{r['label']['case']}")
            # Choice scoring puts each option after this opening (evaluate/evaluation.py).
            prefix = build_items([r])[0]["choice"]["answer_prefix"]
            label = r["label"].get("relation") if r["label"]["case"] == "重要性与波动" else r["label"]["case"]
            assert r["output"].startswith(prefix + label)


def test_market_cases_are_balanced(sample_build: builder.BuildResult) -> None:
    cases = sample_build.stats["by_label"]["market_analysis.case"]
    assert set(cases) == {"预期兑现", "观望信号", "趋势延续", "反应消退", "重要性与波动"}
    assert max(cases.values()) - min(cases.values()) <= 6


def test_same_seed_gives_byte_identical_files(sample_db: Path, tmp_path: Path) -> None:
    files = []
    for run in ("a", "b", "c"):
        out = tmp_path / run / "instructions.jsonl"
        build_dataset(BuildConfig(output=out, db=sample_db, num_samples=120, seed=0 if run != "c" else 1, progress=False))
        files.append([out.read_bytes(), out.with_name("instructions.stats.json").read_bytes(), out.with_name("instructions.card.md").read_bytes()])
    assert files[0] == files[1]
    assert files[0][0] != files[2][0]


def test_byte_identical_across_processes(sample_db: Path, tmp_path: Path) -> None:
    """Separate processes with different string-hash seeds still write the same bytes."""
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed / "instructions.jsonl"
        run = subprocess.run(
            [*FINQLORA, "build", "--db", str(sample_db), "--output", str(out), "-n", "80", "--quiet"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert run.returncode == 0, run.stderr
        outputs.append((out.read_bytes(), out.with_name("instructions.stats.json").read_bytes()))
    assert outputs[0] == outputs[1]


def test_messages_format(sample_db: Path, tmp_path: Path) -> None:
    alpaca = build_dataset(BuildConfig(output=tmp_path / "a.jsonl", db=sample_db, num_samples=40, progress=False))
    messages = build_dataset(BuildConfig(output=tmp_path / "m.jsonl", db=sample_db, num_samples=40, format="messages", progress=False))
    for a, m in zip(_read(alpaca.output), _read(messages.output)):
        assert set(m) == {"messages", "id", "type", "split", "event_id", "event_time", "label"}
        assert [x["role"] for x in m["messages"]] == ["user", "assistant"]
        assert m["messages"][0]["content"] == user_content(a["instruction"], a["input"])
        assert record_to_chat(m) == record_to_chat(a)
        assert {k: a[k] for k in ("id", "type", "split", "event_id", "event_time", "label")} == {k: m[k] for k in ("id", "type", "split", "event_id", "event_time", "label")}


def test_card_and_stats_describe_the_build(sample_build: builder.BuildResult) -> None:
    stats = sample_build.stats
    assert stats["source"]["database"]["sha256"]
    assert stats["rules"]["direction"].startswith("利好 if r > t")
    assert stats["length_tokens"]["total"]["max"] <= 512
    assert set(stats["by_ticker"]) == {"XAUUSD", "XAGUSD"}
    card = sample_build.card.read_text(encoding="utf-8")
    for heading in ("## Contents", "## Labels", "## Split (by event time)", "## Direction thresholds", "## Rules", "## Lengths (tokens)"):
        assert heading in card


# ---------------------------------------------------------------------------------------
# Dedup and split mechanics


def test_near_duplicates_are_removed_before_sampling(tmp_path: Path) -> None:
    db, reposts = make_store(tmp_path / "dups.db", events=80, reposts=15)
    result = build_dataset(BuildConfig(output=tmp_path / "d.jsonl", db=db, num_samples=100, mix=(1, 0, 0), embargo_min=0, progress=False))
    assert result.stats["dedup"]["near_duplicates_dropped"] == 15
    ids = {r["event_id"] for r in result.records}
    assert not ids & set(reposts)
    assert len(ids) == 80  # every original once (fewer than asked for: the notice says so)


def test_dedup_keeps_the_earliest_and_never_chains() -> None:
    base = "美联储宣布维持联邦基金利率目标区间不变，符合市场预期，声明称通胀仍然偏高。"
    texts = [base, base + "（转载）", "央行开展逆回购操作，中标利率持平，当日有资金到期。", base.replace("不变", "不变化")]
    result = textdedup.deduplicate(texts)
    assert result.keep == [0, 2]
    assert result.duplicate_of == {1: 0, 3: 0}
    assert textdedup.text_similarity("【标题】财联社6月1日电，正文内容相同", "【标题】6月2日电，正文内容相同") == 1.0


def test_cross_group_duplicates_finds_pairs_across_groups_only() -> None:
    a = "美联储宣布维持联邦基金利率目标区间不变，符合市场预期。"
    b = "央行开展逆回购操作，中标利率持平，当日有资金到期。"
    pairs = textdedup.cross_group_duplicates([[a, b], [b + "。"], [a]])
    assert pairs == [(0, 0, 2, 0), (0, 1, 1, 0)]
    assert textdedup.cross_group_duplicates([[a, a], [b]]) == []


def _event(i: int, ts: int) -> Event:
    return Event(f"e{i}", ts, None, "x", None, 3, "test", None)


def test_split_by_time_keeps_ties_together_and_embargoes() -> None:
    times = [0, 60, 120, 120, 120, 180, 7200, 7260, 20000, 20060]
    plan = split.split_by_time([_event(i, t) for i, t in enumerate(times)], (0.4, 0.3, 0.3), embargo_min=0)
    assert [e.ts_utc for e in plan.pools["train"]] == [0, 60, 120, 120, 120]  # the tie at 120 stays in train
    assert [e.ts_utc for e in plan.pools["val"]] == [180, 7200, 7260]
    assert [e.ts_utc for e in plan.pools["test"]] == [20000, 20060]
    embargoed = split.split_by_time([_event(i, t) for i, t in enumerate(times)], (0.4, 0.3, 0.3), embargo_min=5)
    assert [e.ts_utc for e in embargoed.pools["val"]] == [7200, 7260]  # 180 is 1 min after train's end
    assert embargoed.embargoed == 1


# ---------------------------------------------------------------------------------------
# Trimming


def test_long_inputs_are_trimmed_and_outputs_kept(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "long.db", events=60, long_text=900)
    result = build_dataset(BuildConfig(output=tmp_path / "t.jsonl", db=db, num_samples=40, mix=(1, 0, 0), embargo_min=0, progress=False))
    assert result.stats["length_tokens"]["trimmed"] == 40
    assert any("trimmed" in n for n in result.notices)
    for r in result.records:
        assert lengths.TRIM_MARK in r["input"]
        assert r["output"].endswith(f"方向：{r['label']['direction']}")
    assert result.stats["length_tokens"]["total"]["max"] <= 512


@pytest.mark.slow
def test_trimming_with_the_models_tokenizer(sample_db: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from finqlora.core.chat_format import encode_for_training
    from finqlora.models.loading import load_tokenizer

    result = build_dataset(BuildConfig(output=tmp_path / "tok.jsonl", db=sample_db, num_samples=60, tokenizer=str(tiny_model_dir), max_length=384, progress=False))
    assert result.stats["length_tokens"]["counted_with"] != "estimate"
    assert result.stats["length_tokens"]["trimmed"] > 0  # SmolLM2's tokenizer spends many tokens on Chinese
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for record in result.records:
        encoded = encode_for_training(tokenizer, record, 384)
        assert not encoded.trimmed, record["id"]
        assert len(encoded.input_ids) <= 384


# ---------------------------------------------------------------------------------------
# Templates fallback and bad input


def test_no_database_builds_from_templates_and_says_so(tmp_path: Path) -> None:
    result = build_dataset(BuildConfig(output=tmp_path / "t.jsonl", num_samples=150, progress=False))
    assert result.stats["by_type"] == {"template": 150}
    assert any("built-in" in n and "no --db" in n for n in result.notices)
    assert result.stats["by_split"] == {"train": pytest.approx(120, abs=6), "val": pytest.approx(15, abs=6), "test": pytest.approx(15, abs=6)}
    split_of: dict[str, set[str]] = {}
    for r in result.records:
        split_of.setdefault(r["label"]["template_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert len(split_of) >= 120


def test_templates_only_ignores_the_database(sample_db: Path, tmp_path: Path) -> None:
    result = build_dataset(BuildConfig(output=tmp_path / "t.jsonl", db=sample_db, templates_only=True, num_samples=30, progress=False))
    assert result.stats["by_type"] == {"template": 30}
    assert any("--templates-only" in n for n in result.notices)


def test_missing_database_file(tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="does not exist") as info:
        build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=tmp_path / "nope.db", progress=False))
    assert "--templates-only" in info.value.hint


def test_file_that_is_not_sqlite(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    bogus.write_text("event_id,content\n1,hello\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="not a SQLite database"):
        build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=bogus, progress=False))


def test_database_without_impacts_or_prices(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "bare.db", with_prices=False, with_impacts=False)
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=50, progress=False))
    assert result.stats["by_type"] == {"report_qa": 10, "template": 40}
    [notice] = [n for n in result.notices if "no price bars and no event impacts" in n]
    assert "40 built-in template records" in notice and "finqlora db ingest-prices" in notice


def test_database_with_prices_but_no_impacts(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "noimp.db", with_prices=True, with_impacts=False)
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=20, progress=False))
    assert any("no event impacts" in n and "finqlora db impacts" in n for n in result.notices)


def test_primary_window_that_was_not_computed(sample_db: Path, tmp_path: Path) -> None:
    rules = LabelRules(primary_window=60)
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=sample_db, num_samples=20, rules=rules, progress=False))
    assert any("no event has a stored return at the primary window (60 min)" in n for n in result.notices)
    assert result.stats["by_type"] == {"report_qa": 4, "template": 16}


def test_report_qa_only_mix_needs_no_market_data(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "bare.db", with_prices=False, with_impacts=False)
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=30, mix=(0, 0, 1), progress=False))
    assert result.stats["by_type"] == {"report_qa": 30}
    assert result.notices == []


def test_asking_for_more_than_exists_says_how_many_were_made(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "small.db", events=60)
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=500, embargo_min=0, progress=False))
    made = len(result.records)
    assert made < 500
    assert result.stats["by_type"]["news_impact"] == 60  # every event once
    assert any(f"asked for 500 samples, made {made}" in n for n in result.notices)
    assert any("news_impact/train: asked for 240" in n for n in result.notices)


def test_events_without_time_are_reported(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "notime.db", events=60)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE events SET ts_utc = NULL, published_at = NULL WHERE event_id IN ('e0001', 'e0002')")
    result = build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=20, progress=False))
    assert any("2 event(s) have no readable publication time" in n for n in result.notices)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    for bad in (
        dict(num_samples=0),
        dict(mix=(1.0, -1.0, 1.0)),
        dict(split=(0.0, 0.5, 0.5)),
        dict(format="csv"),
        dict(max_length=10),
        dict(dedup_threshold=1.5),
    ):
        with pytest.raises(FinqloraError):
            build_dataset(BuildConfig(output=tmp_path / "x.jsonl", progress=False, **bad))
    with pytest.raises(FinqloraError, match="too few training-period returns"):
        db, _ = make_store(tmp_path / "tiny.db", events=10)
        build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, progress=False))


# ---------------------------------------------------------------------------------------
# Command line and the guide's script


def test_guide_script_and_data_show(sample_db: Path, tmp_path: Path) -> None:
    script = REPO / "scripts" / "qlora" / "build_instruction_dataset.py"
    out = tmp_path / "data" / "qlora" / "instructions.jsonl"
    run = subprocess.run(
        [sys.executable, str(script), "--db", str(sample_db), "--output", str(out), "--num_samples", "30", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 30
    show = subprocess.run([*FINQLORA, "data", "show", str(out), "-n", "2"], capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "#1" in show.stdout and "#2" in show.stdout and "#3" not in show.stdout
    assert "instruction" in show.stdout and "label" in show.stdout


def test_cli_errors_are_readable(tmp_path: Path) -> None:
    bad_mix = subprocess.run([*FINQLORA, "build", "--mix", "60,40", "--output", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad_mix.returncode == 2
    # rich wraps long lines at the terminal width: compare with whitespace collapsed.
    assert "'data.mix': Value error, expects three numbers" in " ".join(bad_mix.stderr.split())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\n{not json\n', encoding="utf-8")
    show = subprocess.run([*FINQLORA, "data", "show", str(broken), "-n", "3"], capture_output=True, text=True, timeout=120)
    assert show.returncode == 2
    assert "line 2: not valid JSON" in " ".join(show.stderr.split())


def test_build_config_from_run_maps_the_data_section(tmp_path: Path) -> None:
    from finqlora.core.config import RunConfig

    cfg = RunConfig.model_validate({"name": "x", "data": {"num_samples": 42, "seed": 7, "format": "messages"},
                                    "train": {"model": "builtin:smollm2-135m-instruct", "max_length": 384}})
    config = BuildConfig.from_run(cfg, db=tmp_path / "s.db", output=tmp_path / "d.jsonl")
    assert (config.num_samples, config.seed, config.format) == (42, 7, "messages")
    assert config.tokenizer == "builtin:smollm2-135m-instruct" and config.max_length == 384
    assert config.db == tmp_path / "s.db" and config.output == tmp_path / "d.jsonl"
    cfg.data.tokenizer = "builtin:qwen2.5-coder-0.5b-instruct"
    assert BuildConfig.from_run(cfg, db=tmp_path / "s.db", output=tmp_path / "d.jsonl").tokenizer == cfg.data.tokenizer
    cfg.data.tokenizer = "chars"  # the character estimate
    assert BuildConfig.from_run(cfg, db=None, output=tmp_path / "d.jsonl").tokenizer is None
    # Every builder option is a data key (finqlora run can set them all).
    rich = RunConfig.model_validate({"data": {"mix": "50,30,20", "split": [70, 15, 15], "primary_window": 30, "threshold_k": 0.8,
                                              "primary_ticker": "XAGUSD", "dedup_threshold": 0.9, "embargo_min": 60, "tz": "Asia/Shanghai",
                                              "templates_only": True}})
    mapped = BuildConfig.from_run(rich, db=None, output=tmp_path / "d.jsonl")
    assert (mapped.mix, mapped.split, mapped.rules.primary_window, mapped.rules.threshold_k) == ((50, 30, 20), (70, 15, 15), 30, 0.8)
    assert (mapped.primary_ticker, mapped.dedup_threshold, mapped.embargo_min, mapped.naive_tz, mapped.templates_only) == (
        "XAGUSD", 0.9, 60, "Asia/Shanghai", True)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def realized_numbers_in_answer(record: dict) -> set[str]:
    """Numbers of an answer that appear in none of its input and match a realized return."""
    realized = set()
    for by_window in record["label"]["returns"].values():
        for ret in by_window.values():
            for digits in (1, 2, 3, 4):
                realized.add(f"{abs(ret) * 100:.{digits}f}")
            realized.add(f"{abs(ret):.4f}")
    known = set(_NUMBER.findall(record["instruction"] + record["input"]))
    return {n for n in _NUMBER.findall(record["output"]) if n not in known and n in realized}


def test_ex_ante_answers_hold_no_realized_number(sample_build: builder.BuildResult) -> None:
    news = [r for r in _read(sample_build.output) if r["type"] == "news_impact"]
    assert news
    leaks = {r["id"]: realized_numbers_in_answer(r) for r in news}
    assert not {k: v for k, v in leaks.items() if v}
    # The check itself can fail: an answer quoting its move is caught.
    leaky = dict(news[0], output=news[0]["output"] + f"（实际 {abs(news[0]['label']['returns']['XAUUSD']['15']) * 100:.2f}%）")
    assert realized_numbers_in_answer(leaky)


def test_ex_post_cases_keep_realized_numbers_in_the_input(sample_build: builder.BuildResult) -> None:
    cases = [r for r in _read(sample_build.output) if r["type"] == "market_analysis"]
    assert cases and all("%" in r["input"] for r in cases)


def test_irrelevant_events_are_not_labelled(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path / "irrelevant.db", events=80, relevant=False)
    with pytest.raises(FinqloraError, match="only 0 relevant events"):
        build_dataset(BuildConfig(output=tmp_path / "x.jsonl", db=db, num_samples=40, mix=(1, 0, 0), embargo_min=0, progress=False))
    result = build_dataset(BuildConfig(output=tmp_path / "y.jsonl", db=db, num_samples=40, mix=(1, 1, 0), embargo_min=0, progress=False))
    assert "news_impact" not in result.stats["by_type"]
    assert result.stats["relevance"]["by_ticker"]["XAUUSD"]["none"] == 80
    assert len(result.stats["relevance"]["examples"]["left_out"]) == 10


def test_direction_must_hold_across_adjacent_windows() -> None:
    rules = LabelRules()
    ctx = labelling.LabelContext(rules, {("XAUUSD", w): 0.001 for w in (5, 10, 15, 30, 120)}, "XAUUSD", {})
    held = {("XAUUSD", 5): -0.002, ("XAUUSD", 10): 0.001, ("XAUUSD", 15): 0.002, ("XAUUSD", 30): 0.0015, ("XAUUSD", 120): -0.001}
    assert labelling.ticker_direction(held, "XAUUSD", ctx) == ("利好", pytest.approx(2.0), True)
    turned = {**held, ("XAUUSD", 30): -0.0001}
    assert labelling.ticker_direction(turned, "XAUUSD", ctx) == ("中性", pytest.approx(2.0), False)
    off = labelling.LabelContext(LabelRules(hold_adjacent=False), ctx.sigmas, "XAUUSD", {})
    assert labelling.ticker_direction(turned, "XAUUSD", off)[0] == "利好"


_CASE_ROW = re.compile(r"- 发布(前|后)(\d+)分钟：([+-][\d.]+)%（该窗口典型波动 σ=([\d.]+)%，即 ([+-][\d.]+)σ）")


def test_market_labels_are_knowable_from_the_input(sample_build: builder.BuildResult) -> None:
    """The case and the 重要性与波动 comparison recomputed from the numbers the input states (not
    the stored returns) give the label: the answer uses only what the input makes knowable."""
    from finqlora.dataset.labels import IMPORTANCE, importance_relation, market_case

    checked = 0
    for r in _read(sample_build.output):
        if r["type"] != "market_analysis":
            continue
        if r["label"]["case"] == IMPORTANCE:
            ret = float(re.search(r"发布后\d+分钟收益：([+-][\d.]+)%", r["input"]).group(1))
            median = float(re.search(r"中位数：([\d.]+)%", r["input"]).group(1))
            assert importance_relation(abs(ret), median) == r["label"]["relation"], r["input"]
        else:
            rows = _CASE_ROW.findall(r["input"])
            assert rows, r["input"]
            windows = [(-1 if side == "前" else 1) * int(minutes) for side, minutes, *_ in rows]
            zs = {w: float(z) for w, (*_, z) in zip(windows, rows)}
            for w, (*_, ret, sigma, z) in zip(windows, rows):
                assert float(z) == pytest.approx(float(ret) / float(sigma), rel=0.02, abs=0.02)  # both shown rounded
            assert market_case(zs, {w: 1.0 for w in zs}) == r["label"]["case"], r["input"]
        checked += 1
    assert checked >= 40
