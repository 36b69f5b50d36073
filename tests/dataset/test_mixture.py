"""Public-data mixture (`--add-dataset`) and decontamination, on our own tiny synthetic files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.dataset import mixture
from finqlora.dataset.build_config import BuildConfig
from finqlora.dataset.builder import build_dataset
from finqlora.dataset.mixture import AddSource, load_source

# Synthetic texts written for these tests (never text from ../shared/data).
SENTENCES = [
    ("这家虚构公司的季度订单翻倍，股东们很开心", 2),
    ("虚构基金今天净值没怎么动", 1),
    ("测试用的样例股票连续三天下跌，让人心慌", 0),
    ("合成文本：管理层宣布回购计划，市场情绪回暖", 2),
    ("合成文本：监管处罚落地，投资者担心后续影响", 0),
    ("合成文本：成交量与昨日持平，观望为主", 1),
]


def distinct_rows(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """Random synthetic 'sentences' (random CJK characters), pairwise far below the near-duplicate threshold."""
    import random

    rng = random.Random(seed)
    pool = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    return [("".join(rng.choice(pool) for _ in range(24)), i % 3) for i in range(count)]


def write_finfe(path: Path, rows=SENTENCES) -> Path:
    path.write_text("[\n" + ",\n".join(json.dumps(list(r), ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    return path


def write_fpb(path: Path) -> Path:
    lines = ["The fictional firm raised its outlook for the year .@positive", "Sales of the test company were flat .@neutral",
             "The sample bank reported a loss in the quarter .@negative"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_disc(path: Path) -> Path:
    rows = [{"instruction": "解释什么是市盈率。", "input": "", "output": "市盈率是股价除以每股收益。", "history": []},
            {"instruction": "那市净率呢？", "input": "", "output": "市净率是股价除以每股净资产。", "history": [["什么是市盈率？", "股价除以每股收益。"]]}]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_alpaca(path: Path) -> Path:
    rows = [{"instruction": "计算单利。", "input": "本金1000元，年利率3%，2年。", "output": "利息60元。"},
            {"instruction": "什么是久期？", "input": "", "output": "久期衡量债券价格对利率变化的敏感度。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_cfbenchmark(path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["判断情绪。"] * 3, "input": ["合成：业绩大增", "合成：股价平稳", "合成：债务违约"], "response": ["积极", "中性", "消极"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


def write_sharegpt(path: Path) -> Path:
    rows = [{"conversations": [{"from": "human", "value": "什么是市盈率？"}, {"from": "gpt", "value": "股价除以每股收益。"},
                               {"from": "human", "value": "那市净率呢？"}, {"from": "gpt", "value": "股价除以每股净资产。"}],
             "system": "你是金融助手。"}]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


WRITERS = {"finfe": write_finfe, "finfe-choice": write_finfe, "fpb": write_fpb, "disc": write_disc, "alpaca": write_alpaca, "cfbenchmark": write_cfbenchmark,
           "sharegpt": write_sharegpt}


@pytest.mark.parametrize("fmt", mixture.FORMATS)
def test_every_format_loads(fmt: str, tmp_path: Path) -> None:
    path = WRITERS[fmt](tmp_path / f"set.{'json' if fmt in ('finfe', 'disc', 'sharegpt') else 'json' if fmt == 'finfe-choice' else 'txt' if fmt == 'fpb' else 'jsonl' if fmt == 'alpaca' else 'd'}")
    items = load_source(AddSource(path, fmt), seed=0)
    assert items and all(i.instruction and i.output for i in items)
    if fmt == "finfe":
        assert [i.output for i in items[:3]] == ["积极", "中性", "消极"] and items[0].instruction == mixture.FINFE_INSTRUCTION
    if fmt == "fpb":
        assert [i.output for i in items] == ["positive", "neutral", "negative"]
    if fmt == "finfe-choice":  # the text is the input; the options in the instruction; the answer is the letter of the word
        for item, (text, label) in zip(items, SENTENCES):
            lines = item.instruction.splitlines()
            assert lines[0] == mixture.FINFE_CHOICE_INSTRUCTION and item.input == text
            assert [line[:3] for line in lines[1:]] == ["A. ", "B. ", "C. ", "D. "] and {line[3:] for line in lines[1:]} == set(mixture.FINFE_CHOICE_OPTIONS)
            assert lines[1 + "ABCD".index(item.output)] == f"{item.output}. {mixture.FINFE_WORDS[label]}"
        assert items == load_source(AddSource(path, fmt), seed=5)  # the order is the text's, whatever the build's seed
    if fmt == "sharegpt":  # the last question answered; the earlier turn and the system text kept in the input
        assert (items[0].instruction, items[0].output) == ("那市净率呢？", "股价除以每股净资产。")
        assert "什么是市盈率？" in items[0].input and "你是金融助手。" in items[0].input
    if fmt == "disc":
        assert items[1].input.startswith("对话历史：") and "什么是市盈率？" in items[1].input
    if fmt == "cfbenchmark":
        assert [i.output for i in items] == ["积极", "中性", "消极"]


def test_finfe_choice_spreads_the_right_letter_over_four_options(tmp_path: Path) -> None:
    """Over many rows every letter is right about a quarter of the time: the letter carries no hint."""
    items = load_source(AddSource(write_finfe(tmp_path / "f.json", distinct_rows(400, seed=2)), "finfe-choice"), seed=0)
    shares = {letter: sum(item.output == letter for item in items) / len(items) for letter in "ABCD"}
    assert all(0.17 < share < 0.33 for share in shares.values()), shares


@pytest.mark.parametrize(
    "fmt, content, line, words",
    [
        ("finfe", '[\n["好文本", 2],\n["坏标签", 7]\n]', 3, "label 0, 1 or 2"),
        ("finfe", '[\n["好文本", 2],\n["没有结尾", 1\n', 4, "not valid JSON"),
        ("finfe", '{"text": 1}', 1, "expected a JSON list"),
        ("fpb", "A fine sentence .@positive\nno label here\n", 2, "sentence@positive|neutral|negative"),
        ("fpb", "A sentence .@bullish\n", 1, "sentence@positive"),
        ("disc", '[{"instruction": "问", "input": "", "output": "答", "history": []},\n {"instruction": "", "output": "答"}]', 2, "non-empty 'instruction'"),
        ("alpaca", '{"instruction": "问", "output": "答"}\n{"instruction": "问"\n', 2, "not valid JSON"),
        ("alpaca", '{"instruction": "问", "output": "答"}\n{"instruction": "问", "input": "x"}\n', 2, "non-empty 'instruction' and 'output'"),
    ],
)
def test_malformed_files_name_file_line_and_fix(fmt: str, content: str, line: int, words: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.data"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FinqloraError) as caught:
        load_source(AddSource(path, fmt), seed=0)
    assert f"{path}:{line}" in str(caught.value) and words in str(caught.value)
    assert caught.value.hint


def test_cfbenchmark_that_is_not_a_folder(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="CFBenchmark folders are read with the datasets package, not installed")
    path = tmp_path / "file.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(FinqloraError, match="datasets folder"):
        load_source(AddSource(path, "cfbenchmark"), seed=0)


def test_cfbenchmark_without_the_datasets_package_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    (tmp_path / "cfb").mkdir()
    with pytest.raises(FinqloraError, match="needs the datasets package") as caught:
        load_source(AddSource(tmp_path / "cfb", "cfbenchmark"), seed=0)
    assert "finqlora[cfbenchmark]" in caught.value.hint


def test_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    path = write_finfe(tmp_path / "f.json", SENTENCES * 5)
    first = load_source(AddSource(path, "finfe", samples=7), seed=3)
    assert len(first) == 7 and first == load_source(AddSource(path, "finfe", samples=7), seed=3)
    assert first != load_source(AddSource(path, "finfe", samples=7), seed=4)
    with pytest.raises(FinqloraError, match="unknown --add-format"):
        AddSource(path, "csv").validate()


def test_build_mixes_sources_with_their_own_split_and_card(tmp_path: Path) -> None:
    finfe = write_finfe(tmp_path / "f.json", distinct_rows(60))
    alpaca = write_alpaca(tmp_path / "a.jsonl")
    config = BuildConfig(output=tmp_path / "d.jsonl", num_samples=10, templates_only=True, progress=False,
                         add=(AddSource(finfe, "finfe", 40), AddSource(alpaca, "alpaca")))
    result = build_dataset(config)
    public = [r for r in result.records if r["type"] == "public_data"]
    assert len(public) == 42 and {r["label"]["source"] for r in public} == {"f.json", "a.jsonl"}
    finfe_splits = [r["split"] for r in public if r["label"]["source"] == "f.json"]
    assert (finfe_splits.count("train"), finfe_splits.count("val"), finfe_splits.count("test")) == (32, 4, 4)
    card = result.card.read_text(encoding="utf-8")
    assert "## Public data mixed in" in card and "f.json | finfe | 40" in card and "Apache" not in card
    assert mixture.LICENCE_NOTES["finfe"] in card


def test_decontamination_drops_records_equal_or_near_an_eval_item(tmp_path: Path) -> None:
    rows = distinct_rows(30, seed=1)
    finfe = write_finfe(tmp_path / "train.json", rows)
    held_out = write_finfe(tmp_path / "eval.json", [rows[0], (rows[1][0] + "！", rows[1][1])])  # one equal, one near
    config = BuildConfig(output=tmp_path / "d.jsonl", num_samples=5, templates_only=True, progress=False,
                         add=(AddSource(finfe, "finfe"),), decontaminate=(held_out,))
    result = build_dataset(config)
    texts = {r["input"] for r in result.records if r["type"] == "public_data"}
    assert rows[0][0] not in texts and rows[1][0] not in texts and rows[2][0] in texts
    assert result.stats["decontamination"]["dropped"] == 2
    assert "## Decontamination" in result.card.read_text(encoding="utf-8")


def test_decontamination_checks_the_question_in_an_instruction(tmp_path: Path) -> None:
    """DISC-Fin-SFT rows hold the question in `instruction` with an empty input: a row asking an
    evaluation question is dropped all the same (FinEval's CSV folder as the evaluation set)."""
    disc = write_disc(tmp_path / "disc.json")
    exam = tmp_path / "val"
    exam.mkdir()
    (exam / "finance_val.csv").write_text("id,question,A,B,C,D,answer\n0,解释什么是市盈率。,甲,乙,丙,丁,A\n", encoding="utf-8")
    config = BuildConfig(output=tmp_path / "d.jsonl", num_samples=5, templates_only=True, progress=False,
                         add=(AddSource(disc, "disc"),), decontaminate=(exam,))
    result = build_dataset(config)
    kept = [r["instruction"] for r in result.records if r["type"] == "public_data"]
    assert kept == ["那市净率呢？"] and result.stats["decontamination"]["dropped_by_type"] == {"public_data": 1}


def test_eval_texts_read_every_layout(tmp_path: Path) -> None:
    write_finfe(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text('{"text": "合成一"}\n{"input": "合成二"}\n', encoding="utf-8")
    write_fpb(tmp_path / "c.txt")
    assert mixture.eval_texts(tmp_path / "a.json")[0] == SENTENCES[0][0]
    assert mixture.eval_texts(tmp_path / "b.jsonl") == ["合成一", "合成二"]
    assert mixture.eval_texts(tmp_path / "c.txt")[0] == "The fictional firm raised its outlook for the year ."


def test_run_config_data_add_is_validated_and_mapped(tmp_path: Path) -> None:
    from finqlora.core.config import RunConfig

    finfe = write_finfe(tmp_path / "f.json")
    cfg = RunConfig.model_validate({"data": {"add": [{"path": str(finfe), "format": "finfe", "samples": 3}],
                                             "decontaminate": [str(finfe)]}})
    config = BuildConfig.from_run(cfg, db=tmp_path / "s.db", output=tmp_path / "d.jsonl")
    assert config.add == (AddSource(finfe, "finfe", 3),) and config.decontaminate == (finfe,)
    with pytest.raises(Exception, match="format"):
        RunConfig.model_validate({"data": {"add": [{"path": "x", "format": "csv"}]}})


def test_cli_add_dataset_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finqlora.cli import app

    finfe = write_finfe(tmp_path / "f.json")
    out = tmp_path / "d.jsonl"
    args = ["build", "--templates-only", "-n", "4", "-o", str(out), "-q", "--add-dataset", str(finfe), "--add-format", "finfe", "--add-samples", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sum(1 for line in out.read_text(encoding="utf-8").splitlines() if '"public_data"' in line) == 5
    bad = CliRunner().invoke(app, ["build", "--templates-only", "-o", str(out), "--add-dataset", str(finfe)])
    assert isinstance(bad.exception, FinqloraError) and "--add-format" in str(bad.exception)


def test_run_config_eval_benchmarks_are_decontaminated_automatically(tmp_path: Path) -> None:
    from finqlora.core.config import RunConfig

    held_out = write_finfe(tmp_path / "held.json")
    cfg = RunConfig.model_validate({"eval": {"benchmarks": [f"finfe:{held_out}"]}})
    assert BuildConfig.from_run(cfg, db=tmp_path / "s.db", output=tmp_path / "d.jsonl").decontaminate == (held_out,)
