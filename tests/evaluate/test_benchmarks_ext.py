"""Each external benchmark format, label mapping, and clear errors on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finqlora.dataset.answer_parser import NEGATIVE, NEUTRAL, POSITIVE
from finqlora.evaluate.benchmarks import load_benchmark, parse_label_map
from finqlora.core.errors import FinqloraError


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_finfe(tmp_path: Path) -> None:
    path = _write(tmp_path / "finfe.json", json.dumps([["大盘今天又跌了，心累", 0], ["横盘整理中", 1], ["这只票要起飞了", 2]], ensure_ascii=False))
    bench = load_benchmark(path, "finfe")
    assert [item.label for item in bench.items] == [NEGATIVE, NEUTRAL, POSITIVE]
    assert bench.items[0].input == "大盘今天又跌了，心累"
    assert "积极、中性或消极" in bench.items[0].instruction
    assert bench.display_names[POSITIVE] == "积极"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[["文本", 0], ["缺标签"]]', "row 1: expected [text, label]"),
        ('[["文本", 5]]', "row 0: label 5 is not in the label map"),
        ('{"text": "x"}', "expected a JSON list"),
        ('[["文本", 0],\n ["x", 1', "not valid JSON"),
    ],
)
def test_finfe_malformed(tmp_path: Path, content: str, message: str) -> None:
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(FinqloraError) as error:
        load_benchmark(path, "finfe")
    assert str(path) in error.value.message and message in error.value.message


def test_fpb_latin1_and_errors(tmp_path: Path) -> None:
    text = "Operating profit rose to EUR 13.1 mn .@positive\nThe company is based in Espoo , Finland .@neutral\n\nSales fell 5 % in the quarter .@negative\n"
    bench = load_benchmark(_write(tmp_path / "fpb.txt", text.replace("Espoo", "Espoo é"), encoding="latin-1"), "fpb")
    assert [item.label for item in bench.items] == [POSITIVE, NEUTRAL, NEGATIVE]
    assert "é" in bench.items[1].input
    bad = _write(tmp_path / "bad.txt", "good line@positive\nno label here\n")
    with pytest.raises(FinqloraError, match=r"bad.txt: line 2: expected 'sentence@label'"):
        load_benchmark(bad, "fpb")
    unknown = _write(tmp_path / "unknown.txt", "text@bullishness\n")
    with pytest.raises(FinqloraError, match=r"line 1: label 'bullishness'"):
        load_benchmark(unknown, "fpb")


def test_jsonl_with_label_map(tmp_path: Path) -> None:
    rows = [{"text": "降准落地", "label": "up"}, {"input": "财报不及预期", "label": "down", "instruction": "判断情绪"}, {"sentence": "维持不变", "label": "flat"}]
    path = _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    with pytest.raises(FinqloraError, match="label 'up' is not in the label map"):
        load_benchmark(path, "jsonl")
    bench = load_benchmark(path, "jsonl", label_map=parse_label_map("up=利好,down=negative,flat=中性"))
    assert [item.label for item in bench.items] == [POSITIVE, NEGATIVE, NEUTRAL]
    assert bench.items[1].instruction == "判断情绪"


def test_jsonl_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b" "label": 1}\n')
    with pytest.raises(FinqloraError, match=r"b.jsonl:2: not valid JSON"):
        load_benchmark(path, "jsonl")
    path = _write(tmp_path / "c.jsonl", '{"content": "a", "label": "positive"}\n')
    with pytest.raises(FinqloraError, match=r"c.jsonl: line 1: needs 'text'"):
        load_benchmark(path, "jsonl")


def test_label_map_parsing(tmp_path: Path) -> None:
    assert parse_label_map("0=消极, 1=中性, 2=positive") == {"0": NEGATIVE, "1": NEUTRAL, "2": POSITIVE}
    mapping_file = _write(tmp_path / "map.json", json.dumps({"看多": "利好", "看空": "利空"}, ensure_ascii=False))
    assert parse_label_map(str(mapping_file)) == {"看多": POSITIVE, "看空": NEGATIVE}
    with pytest.raises(FinqloraError, match="not a known class"):
        parse_label_map("0=sideways")
    with pytest.raises(FinqloraError, match="has no '='"):
        parse_label_map("0:利空")


def test_cfbenchmark_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="CFBenchmark folders are read with the datasets package, not installed")

    rows = {
        "instruction": ["请判断以下新闻的情感倾向（积极、中性、消极）"] * 3,
        "input": ["公司中标大额订单", "公司召开股东大会", "公司被立案调查"],
        "response": ["积极", "中性", "消极"],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "cfb"))
    bench = load_benchmark(tmp_path / "cfb", "cfbenchmark")
    assert [item.label for item in bench.items] == [POSITIVE, NEUTRAL, NEGATIVE]
    assert bench.items[2].instruction.startswith("请判断")
    datasets.Dataset.from_dict({"instruction": ["x"], "text": ["y"]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(FinqloraError, match="missing input, response"):
        load_benchmark(tmp_path / "wrong", "cfbenchmark")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinqloraError, match="not a Hugging Face datasets folder"):
        load_benchmark(tmp_path / "empty", "cfbenchmark")


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="unknown benchmark format"):
        load_benchmark(tmp_path, "mmlu")
    with pytest.raises(FinqloraError, match="benchmark not found"):
        load_benchmark(tmp_path / "nope.json", "finfe")


def test_limit_is_a_seeded_sample(tmp_path: Path) -> None:
    path = _write(tmp_path / "finfe.json", json.dumps([[f"文本{i}", i % 3] for i in range(50)], ensure_ascii=False))
    first = load_benchmark(path, "finfe", limit=10, seed=3)
    again = load_benchmark(path, "finfe", limit=10, seed=3)
    assert [i.id for i in first.items] == [i.id for i in again.items] and len(first.items) == 10


@pytest.mark.shared_data
def test_real_finfe_file(shared_data: Path) -> None:
    bench = load_benchmark(shared_data / "benchmarks" / "finfe" / "train_list.json", "finfe")
    assert len(bench.items) == 16157
    assert set(bench.labels) == {POSITIVE, NEUTRAL, NEGATIVE}
    assert all(item.input for item in bench.items)
