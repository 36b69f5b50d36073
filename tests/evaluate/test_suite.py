"""The finance-zh suite: loaders of each published format (and malformed files), the hub path,
the suite table in metrics.json, and `finqlora eval --suite` end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finqlora.core.errors import FinqloraError
from finqlora.evaluate.benchmarks import cloze_form, load_benchmark
from finqlora.evaluate.evaluation import build_items, generated_items
from finqlora.evaluate.scoring import compute_metrics, parse_letter
from finqlora.evaluate.suite import SUITES, check_sets, load_set, load_suite, parse_set_arguments

FINEVAL_HEADER = "id,question,A,B,C,D,answer\n"


def _fineval(folder: Path, subject: str = "banking", rows: int = 4, *, bom: bool = False, explanation: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = FINEVAL_HEADER.replace("answer", "answer,explanation") if explanation else FINEVAL_HEADER
    lines = [f"{i},第{i}题：下列哪项是货币政策工具？,再贴现,关税,消费税,出口退税,{'ABCD'[i % 4]}" + (",因为" if explanation else "") for i in range(rows)]
    path = folder / f"{subject}_val.csv"
    path.write_text(("\ufeff" if bom else "") + header + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cflue(path: Path) -> Path:
    rows = [
        {"名称": "证券从业资格", "task": "单项选择题", "question": "股票属于哪类证券？", "choices": "{'A': '债权证券', 'B': '权益证券', 'C': '货币证券', 'D': '商品证券'}", "answer": "B", "analysis": None},
        {"名称": "银行初级资格", "task": "多项选择题", "question": "商业银行的收入包括（）。", "choices": "{'A': '利息收入', 'B': '手续费收入', 'C': '税收', 'D': '罚没收入'}", "answer": "AB", "analysis": "略"},
        {"名称": "初级会计职称", "task": "判断题", "question": "所有者凭借所有者权益参与利润分配。（）", "choices": "{'A': '对', 'B': '错'}", "answer": "A", "analysis": "略"},
    ]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_fineval_and_ceval_csv_loaders(tmp_path: Path) -> None:
    _fineval(tmp_path / "val", "banking")
    _fineval(tmp_path / "val", "auditing", rows=2, bom=True, explanation=True)  # FinEval's dev files: BOM + explanation
    bench = load_benchmark(tmp_path / "val", "fineval")
    assert bench.kind == "multiple_choice" and len(bench.items) == 6 and bench.labels == ["A", "B", "C", "D"]
    first = bench.items[0]  # files in name order: auditing first
    assert first.options == ("A", "B", "C", "D") and first.label == "A" and "auditing" in first.instruction
    assert first.input.splitlines()[1:] == ["A. 再贴现", "B. 关税", "C. 消费税", "D. 出口退税"]
    items = build_items([], [bench])
    assert items[0]["choice"] == {"options": ["A", "B", "C", "D"], "classes": ["A", "B", "C", "D"]} and items[0]["label"]["kind"] == "multiple_choice"
    # the cloze form: the question alone, the option texts scored, the letters still the classes
    cloze = build_items([], [cloze_form(bench)])
    assert cloze[0]["id"] == "val-cloze/" + first.id and cloze[0]["formulation"] == "cloze"
    assert cloze[0]["choice"] == {"options": ["再贴现", "关税", "消费税", "出口退税"], "classes": ["A", "B", "C", "D"]}
    assert cloze[0]["messages"][-1]["content"].endswith("第0题：下列哪项是货币政策工具？") and "A." not in cloze[0]["messages"][-1]["content"]
    assert "只回答选项字母" not in cloze[0]["messages"][-1]["content"] and "auditing" in cloze[0]["messages"][-1]["content"]
    assert generated_items(items + cloze, "both") == items  # a cloze answer is never generated and parsed as a letter
    # C-Eval in the suite: only its finance subjects are read from a folder of all subjects
    ceval = tmp_path / "ceval"
    for subject in ("accountant", "tax_accountant", "high_school_physics"):
        _fineval(ceval, subject, rows=3, explanation=True)
    entry = next(s for s in SUITES["finance-zh"] if s.name == "ceval-finance")
    loaded = load_set(entry, str(ceval))
    assert len(loaded.items) == 6 and {item.id.split("-")[1] for item in loaded.items} == {"accountant", "tax_accountant"}


def test_cloze_form_leaves_out_items_whose_options_cannot_be_told_apart(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "tax_val.csv").write_text(FINEVAL_HEADER + "0,税率是多少？,10%,10%,20%,30%,C\n1,哪项是直接税？,所得税,增值税,消费税,关税,A\n", encoding="utf-8")
    bench = cloze_form(load_benchmark(folder, "fineval"))
    assert bench.name == "val-cloze" and bench.formulation == "cloze" and [item.input for item in bench.items] == ["哪项是直接税？"]
    assert bench.skipped == {"option texts blank or repeated (cloze)": 1}
    judge = cloze_form(load_benchmark(_cflue(tmp_path / "knowledge.json"), "cflue"))
    assert [item.instruction for item in judge.items] == ["以下是中国关于证券从业资格考试的单项选择题，请直接写出正确答案。", "以下是中国关于初级会计职称考试的判断题，请判断对错。"]
    assert [item.cloze.options for item in judge.items] == [("债权证券", "权益证券", "货币证券", "商品证券"), ("对", "错")]
    with pytest.raises(FinqloraError, match="not a multiple-choice item"):
        cloze_form(load_benchmark(write_finfe_file(tmp_path / "f.json"), "finfe"))


def write_finfe_file(path: Path) -> Path:
    path.write_text(json.dumps([["业绩大增", 2], ["平稳", 1]], ensure_ascii=False), encoding="utf-8")
    return path


def test_cflue_loader_keeps_single_answer_questions(tmp_path: Path) -> None:
    bench = load_benchmark(_cflue(tmp_path / "knowledge.json"), "cflue")
    assert [item.label for item in bench.items] == ["B", "A"] and bench.skipped == {"more than one correct option": 1}
    assert bench.items[1].options == ("A", "B") and "判断题" in bench.items[1].instruction
    items = build_items([], [bench])
    assert items[1]["choice"]["options"] == ["A", "B"]  # each item its own letters


def test_cfbenchmark_keeps_its_own_classes(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["判断事件类型"] * 3, "input": ["公司回购股份", "公司高管减持", "公司回购"], "response": ["股份回购", "高管减持", "股份回购"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "event"))
    bench = load_benchmark(tmp_path / "event", "cfbenchmark")
    assert bench.kind == "classes" and bench.labels == ["股份回购", "高管减持"]
    assert build_items([], [bench])[0]["choice"] == {"options": ["股份回购", "高管减持"], "classes": ["股份回购", "高管减持"]}
    datasets.Dataset.from_dict({"instruction": ["x"] * 2, "input": ["a", "b"], "response": ["股份回购", " "]}).save_to_disk(str(tmp_path / "blank"))
    with pytest.raises(FinqloraError, match=r"blank: row 1: empty response"):
        load_benchmark(tmp_path / "blank", "cfbenchmark")
    sentiment = {"instruction": ["情绪"] * 2, "input": ["利润大增", "亏损"], "response": ["积极", "消极"]}
    datasets.Dataset.from_dict(sentiment).save_to_disk(str(tmp_path / "sentiment"))
    assert load_benchmark(tmp_path / "sentiment", "cfbenchmark").kind == "sentiment"


@pytest.mark.parametrize(("name", "text", "fmt", "message"), [
    ("noanswer.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n", "fineval", r"noanswer.csv: columns .* missing answer"),
    ("badletter_val.csv", FINEVAL_HEADER + "0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", "ceval", r"badletter_val.csv: line 3: answer 'E' is not one of the options A, B, C, D"),
    ("empty_val.csv", FINEVAL_HEADER + "0, ,a,b,c,d,A\n", "fineval", r"empty_val.csv: line 2: empty question"),
    ("latin.csv", None, "fineval", r"latin.csv: not UTF-8"),
    ("notlist.json", '{"question": "q"}', "cflue", r"notlist.json: expected a JSON list"),
    ("broken.json", '[{"question": "q",', "cflue", r"broken.json: not valid JSON"),
    ("nochoices.json", '[{"question": "q", "answer": "A"}]', "cflue", r"nochoices.json: row 0: .*question, choices and answer"),
    ("badchoices.json", '[{"question": "q", "choices": "{\'A\': ", "answer": "A"}]', "cflue", r"badchoices.json: row 0: choices is not a dict"),
    ("oneoption.json", '[{"question": "q", "choices": {"A": "x"}, "answer": "A"}]', "cflue", r"oneoption.json: row 0: .*at least two options"),
])
def test_malformed_suite_files_name_file_and_row(tmp_path: Path, name: str, text: str | None, fmt: str, message: str) -> None:
    path = tmp_path / name
    if text is None:
        path.write_bytes("id,question,A,B,C,D,answer\n0,caf\xe9,a,b,c,d,A\n".encode("latin-1"))
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(FinqloraError, match=message):
        load_benchmark(path, fmt)


def test_suite_arguments_are_checked(tmp_path: Path) -> None:
    assert parse_set_arguments(["fineval=/x/val", "cflue = /y.json"]) == {"fineval": "/x/val", "cflue": "/y.json"}
    with pytest.raises(FinqloraError, match="not NAME=PATH"):
        parse_set_arguments(["fineval"])
    with pytest.raises(FinqloraError, match="has no set mmlu"):
        check_sets("finance-zh", {"mmlu": "x"})
    with pytest.raises(FinqloraError, match="no set given"):
        check_sets("finance-zh", {})
    with pytest.raises(FinqloraError, match="unknown suite"):
        load_suite("finance-en", {"fineval": "x"})
    with pytest.raises(FinqloraError, match="no .csv files"):
        (tmp_path / "none").mkdir()
        load_suite("finance-zh", {"fineval": str(tmp_path / "none")})


def test_hub_sets_go_through_load_dataset(tmp_path: Path) -> None:
    """`hf:ID` is read with datasets.load_dataset; a local folder laid out as the hub's C-Eval
    (one config per subject, README configs) takes the same path without the network."""
    pytest.importorskip("datasets")
    repo = tmp_path / "ceval-exam"
    configs = []
    for subject in ("accountant", "college_economics"):
        _fineval(repo / subject, subject, rows=2, explanation=True).rename(repo / subject / "val.csv")
        configs.append(f"- config_name: {subject}\n  data_files:\n  - split: val\n    path: {subject}/val.csv\n")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n", encoding="utf-8")
    entry = next(s for s in SUITES["finance-zh"] if s.name == "ceval-finance")
    with pytest.raises(FinqloraError, match="could not load split"):  # tax_accountant is not there
        load_set(entry, f"hf:{repo}")
    partial = type(entry)(entry.name, entry.format, entry.what, entry.hub_split, ("accountant", "college_economics"))
    bench = load_set(partial, f"hf:{repo}")
    assert len(bench.items) == 4 and bench.kind == "multiple_choice" and bench.path == f"hf:{repo}"
    fineval_hub = tmp_path / "fineval-hub"
    _fineval(fineval_hub, "banking", rows=3).rename(fineval_hub / "test.csv")
    fineval = next(s for s in SUITES["finance-zh"] if s.name == "fineval")
    assert len(load_set(fineval, f"hf:{fineval_hub}@test").items) == 3


def test_parse_letter() -> None:
    assert parse_letter("答案：C\n解析：……", ["A", "B", "C", "D"]) == "C"
    assert parse_letter("B. 关税", ["A", "B", "C", "D"]) == "B"
    assert parse_letter("I think a good answer is D", ["A", "B", "C", "D"]) == "D"  # 'I' and 'a' are not options
    assert parse_letter("A选项错误，答案是C", ["A", "B", "C", "D"]) == "C"  # the stated answer wins
    assert parse_letter("无法判断", ["A", "B"]) is None


def test_suite_table_in_metrics(tmp_path: Path) -> None:
    """Per-set rows from the choice caches, the majority baseline, sets not given, and the average."""
    _fineval(tmp_path / "val", "banking", rows=8)
    benches = load_suite("finance-zh", {"fineval": str(tmp_path / "val"), "cflue": str(_cflue(tmp_path / "cflue.json"))})
    items = build_items([], benches)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    suite = {"name": "finance-zh", "sets": {"fineval": str(tmp_path / "val"), "cflue": str(tmp_path / "cflue.json")}, "limit": None}
    (tmp_path / "eval_config.json").write_text(json.dumps({"scoring": "choice", "suite": suite}), encoding="utf-8")
    letters = "ABCD"
    assert [b.name for b in benches] == ["fineval", "fineval-cloze", "cflue", "cflue-cloze"]
    # base always answers A; fine-tuned is right on every FinEval item (both forms) and wrong on every CFLUE item
    picks = {"base": [0] * len(items),
             "finetuned": [letters.index(i["label"]["class"]) if i["benchmark"].startswith("fineval") else 1 - letters.index(i["label"]["class"]) for i in items]}
    for variant, chosen in picks.items():
        (tmp_path / f"choice_{variant}.jsonl").write_text("".join(
            json.dumps({"id": item["id"], "choice": c, "scores": [0.0] * len(item["choice"]["options"])}) + "\n" for item, c in zip(items, chosen)), encoding="utf-8")
    metrics = compute_metrics(tmp_path, bootstrap_resamples=300)
    rows = {row["set"]: row for row in metrics["suite"]["sets"]}
    # a given multiple-choice set has its cloze row right below; a set not given has none
    expected = [name for s in SUITES["finance-zh"] for name in ((s.name, s.cloze_name) if s.name in suite["sets"] else (s.name,))]
    assert [row["set"] for row in metrics["suite"]["sets"]] == expected
    assert rows["fineval-cloze"]["formulation"] == "cloze" and rows["fineval"]["formulation"] == "letter" and rows["finfe"]["formulation"] is None
    assert rows["fineval-cloze"]["n"] == 8 and rows["fineval-cloze"]["finetuned"] == 1.0 and rows["cflue-cloze"]["finetuned"] == 0.0
    assert not rows["finfe"]["evaluated"] and rows["fineval"]["evaluated"]
    fineval = rows["fineval"]  # answers ABCDABCD: base right on 2 of 8
    assert fineval["n"] == 8 and fineval["base"] == pytest.approx(0.25) and fineval["finetuned"] == 1.0 and fineval["delta"] == pytest.approx(0.75)
    assert fineval["majority"] == pytest.approx(0.25) and fineval["p_value"] == pytest.approx(2 * 0.5**6)  # McNemar exact, 6 discordant
    assert rows["cflue"]["base"] == pytest.approx(0.5) and rows["cflue"]["finetuned"] == 0.0
    average = metrics["suite"]["average"]
    assert average["sets"] == ["fineval", "cflue"] and average["n"] == 10
    assert average["base"] == pytest.approx((0.25 + 0.5) / 2) and average["finetuned"] == pytest.approx((1.0 + 0.0) / 2)
    low, high = average["delta_ci"]
    assert low <= average["delta"] <= high and high - low > 0
    from finqlora.report.report import build_report

    paths = build_report(tmp_path, tmp_path / "report", lang="en")
    html, markdown = paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")
    assert "Finance evaluation suite finance-zh" in html and "<td class=\"num\">+75.0 [" in html and "not evaluated (no copy given)" in html
    assert "| fineval | 8 | 25.0 | 100.0 | +75.0 [" in markdown and "| average (2 sets, each weighs the same) | 10 | 37.5 | 50.0 | +12.5 [" in markdown


@pytest.mark.slow
def test_cli_eval_suite(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`finqlora eval --suite finance-zh --suite-set ...` on the tiny model: one table, metrics.json's suite."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from finqlora.cli import app

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    _fineval(tmp_path / "val", "banking", rows=4)
    finfe = tmp_path / "finfe.json"
    finfe.write_text(json.dumps([["业绩大增", 2], ["平稳", 1], ["亏损扩大", 0]], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--scoring", "choice", "--suite", "finance-zh",
                                      "--suite-set", f"fineval={tmp_path / 'val'}", "--suite-set", f"finfe={finfe}", "--no-forgetting",
                                      "--bootstrap", "100", "--output", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    assert "suite finance-zh" in result.output and "not given" in result.output
    suite = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["suite"]
    assert [(row["set"], row["n"]) for row in suite["sets"] if row["evaluated"]] == [("finfe", 3), ("fineval", 4), ("fineval-cloze", 4)]
    assert suite["average"]["n"] == 7 and suite["average"]["sets"] == ["finfe", "fineval"]  # the cloze row is beside the average, not in it
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--suite-set", "fineval=x", "--output", str(out)])
    assert isinstance(bad.exception, FinqloraError) and "--suite-set needs --suite" in str(bad.exception)


def test_suite_sets_decontaminate_the_build(tmp_path: Path) -> None:
    """Every local suite set joins the build's decontamination, FinEval's CSV folder and CFLUE's JSON included."""
    from finqlora.core.config import RunConfig
    from finqlora.dataset.build_config import BuildConfig
    from finqlora.dataset.mixture import contaminated, eval_texts

    _fineval(tmp_path / "val", "banking", rows=2)
    cflue = _cflue(tmp_path / "cflue.json")
    cfg = RunConfig.model_validate({"eval": {"suite": {"sets": {"fineval": str(tmp_path / "val"), "cflue": str(cflue), "ceval-finance": "hf:ceval/ceval-exam"}}}})
    build = BuildConfig.from_run(cfg, db=tmp_path / "x.db", output=tmp_path / "d.jsonl")
    assert [str(p) for p in build.decontaminate] == [str(tmp_path / "val"), str(cflue)]  # hub sets cannot be read offline
    questions = eval_texts(tmp_path / "val")
    assert questions == ["第0题：下列哪项是货币政策工具？", "第1题：下列哪项是货币政策工具？"] and "股票属于哪类证券？" in eval_texts(cflue)
    hits = contaminated(["第1题：下列哪项是货币政策工具？", "黄金价格上涨"], {"fineval": questions}, 0.7)
    assert hits == {0: "fineval"}


def test_run_config_suite_reaches_the_evaluation(tmp_path: Path) -> None:
    """`eval.suite` in a run config: validated once, and mapped to the eval stages' options."""
    from pydantic import ValidationError

    from finqlora.core.config import RunConfig
    from finqlora.evaluate.evaluation import EvalOptions, SuiteSpec

    cfg = RunConfig.model_validate({"eval": {"suite": {"sets": {"fineval": "data/fineval/val"}, "max_items": 50}}})
    options = EvalOptions.from_run(cfg, output=tmp_path / "eval", data=tmp_path / "d.jsonl")
    assert options.suite == SuiteSpec("finance-zh", {"fineval": "data/fineval/val"}, 50)
    for bad in ({"name": "finance-en", "sets": {"fineval": "x"}}, {"sets": {}}, {"sets": {"fineval": "x"}, "max_items": 0}):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"eval": {"suite": bad}})
