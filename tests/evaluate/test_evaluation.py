"""Evaluation: held-out selection, metrics from cached generations, and a real run on a tiny
model with a LoRA adapter (same weights for base, cache reused on re-run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.core.config import RunConfig
from finqlora.evaluate.evaluation import BenchmarkSpec, EvalOptions, build_items, compute_metrics, evaluate, general_texts, load_test_records


def _record(i: int, kind: str, split: str) -> dict:
    if kind == "news_impact":
        direction = ["利好", "利空", "中性"][i % 3]
        return {"id": f"n{i}", "type": kind, "instruction": "判断这条快讯对黄金的影响方向。", "input": f"快讯{i}：美联储官员发表讲话。",
                "output": f"方向：{direction}", "split": split, "event_id": f"e{i}", "event_time": "2026-06-01T00:00:00Z",
                "label": {"direction": direction, "ticker": "XAUUSD", "window_min": 30, "directions": {"XAUUSD": direction},
                          "returns": {"XAUUSD": {"-30": 0.001, "30": 0.002}}, "threshold": 0.001}}
    if kind == "report_qa":
        return {"id": f"q{i}", "type": kind, "instruction": "计算净利率。", "input": "营业收入：1000万元\n净利润：125万元",
                "output": "答案：12.50%", "split": split, "event_id": None, "event_time": None,
                "label": {"metric": "net_margin", "answer": 12.5, "unit": "%", "tolerance": 0.01}}
    return {"id": f"t{i}", "type": "template", "instruction": "解释什么是市盈率。", "input": "", "output": "市盈率是股价除以每股收益。",
            "split": split, "event_id": None, "event_time": None, "label": {}}


def _write_dataset(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_test_split_and_stratified_sample(tmp_path: Path) -> None:
    records = [_record(i, "news_impact", "test" if i % 2 else "train") for i in range(40)]
    records += [_record(i, "report_qa", "test") for i in range(10)]
    path = _write_dataset(tmp_path / "d.jsonl", records)
    held_out = load_test_records(path)
    assert len(held_out) == 30 and all(r["split"] == "test" for r in held_out)
    sample = load_test_records(path, max_samples=12, seed=1)
    assert len(sample) == 12
    assert sum(r["type"] == "news_impact" for r in sample) == 8  # keeps the 2:1 mix
    assert load_test_records(path, max_samples=12, seed=1) == sample
    with pytest.raises(FinqloraError, match="no records with split 'validation'"):
        load_test_records(path, split="validation")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"bad.jsonl:2: not valid JSON"):
        load_test_records(tmp_path / "bad.jsonl")


def test_metrics_from_hand_made_generations(tmp_path: Path) -> None:
    records = [_record(i, "news_impact", "test") for i in range(6)] + [_record(i, "report_qa", "test") for i in range(2)]
    items = build_items(records)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    base = ["利好"] * 6 + ["答案：12.50%", "大约 13%"]
    tuned = ["方向：利好", "方向：利空", "The impact is neutral.", "方向：利好", "方向：利空", "不知道"] + ["答案：12.5%", "答案：12.51%"]
    for variant, outputs in (("base", base), ("finetuned", tuned)):
        (tmp_path / f"generations_{variant}.jsonl").write_text(
            "".join(json.dumps({"id": item["id"], "output": out}, ensure_ascii=False) + "\n" for item, out in zip(items, outputs)), encoding="utf-8")
    metrics = compute_metrics(tmp_path, bootstrap_resamples=200)
    rows = {row["key"]: row for row in metrics["table"]}
    # base right on n0, n3 (利好); tuned right on n0, n1, n2, n3, n4; n5 unparseable
    assert rows["news_impact.accuracy"]["base"] == pytest.approx(2 / 6)
    assert rows["news_impact.accuracy"]["finetuned"] == pytest.approx(5 / 6)
    assert rows["news_impact.parse_rate"]["finetuned"] == pytest.approx(5 / 6)
    assert rows["news_impact.accuracy"]["mcnemar"]["finetuned_only"] == 3
    assert rows["news_impact.accuracy"]["p_value"] == pytest.approx(0.25)  # 2 * (1/2)^3
    assert rows["news_impact.accuracy"]["verdict"] == "no significant difference"
    lo, hi = rows["news_impact.accuracy"]["delta_ci"]
    assert lo <= 0.5 <= hi
    # 12.51 is within the 0.01 tolerance of 12.5; "大约 13%" is not
    assert rows["report_qa.accuracy"]["base"] == 0.5 and rows["report_qa.accuracy"]["finetuned"] == 1.0
    assert metrics["tasks"]["news_impact"]["finetuned"]["confusion"]["matrix"][2] == [0, 0, 1, 1]  # 中性 row: 1 right, 1 unparsed
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "per_item.jsonl").exists()
    (tmp_path / "generations_finetuned.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(FinqloraError, match="generations missing for 0 base and 8 fine-tuned items"):
        compute_metrics(tmp_path)


def test_general_text_set_is_shipped() -> None:
    texts = general_texts()
    assert 30 <= len(texts) <= 60
    assert {t["lang"] for t in texts} == {"zh", "en"}
    assert len({t["id"] for t in texts}) == len(texts)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model: outputs differ from base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_evaluate_end_to_end_with_cache(tmp_path: Path, tiny_model_dir: Path, tiny_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [_record(i, "news_impact", "test") for i in range(5)] + [_record(i, "report_qa", "test") for i in range(2)] + [_record(0, "template", "test")]
    data = _write_dataset(tmp_path / "data.jsonl", records)
    bench = tmp_path / "fpb.txt"
    bench.write_text("Sales rose 10 % .@positive\nThe board met today .@neutral\n", encoding="utf-8")
    out = tmp_path / "eval"
    options = EvalOptions(output=out, model=str(tiny_model_dir), adapter=str(tiny_adapter), data=data, max_new_tokens=6, batch_size=4,
                          bootstrap_resamples=100, progress=False, benchmarks=[BenchmarkSpec(str(bench), "fpb")])
    # Base first (before training, as the pipeline does), then the full comparison reuses it.
    from dataclasses import replace

    base_only = evaluate(replace(options, adapter=None, variants=("base",)))
    assert base_only["variants"] == ["base"] and not (out / "metrics.json").exists()
    metrics = evaluate(options)
    timings = json.loads((out / "eval_config.json").read_text(encoding="utf-8"))["timings"]
    assert timings["generate_base"]["generated"] == 0 and timings["generate_base"]["reused"] == 10
    assert timings["generate_finetuned"]["generated"] == 10
    assert timings["choice_base"]["reused"] == 7 and timings["choice_finetuned"]["scored"] == 7  # 5 news + 2 benchmark rows
    for name in ("items.jsonl", "generations_base.jsonl", "generations_finetuned.jsonl", "perplexity_base.jsonl", "forgetting_finetuned.jsonl",
                 "choice_base.jsonl", "choice_finetuned.jsonl", "metrics.json", "eval_config.json"):
        assert (out / name).exists(), name
    assert not (out / "report.html").exists()  # the report is its own stage
    meta = json.loads((out / "eval_config.json").read_text(encoding="utf-8"))
    assert meta["adapter_merged"] is True and meta["scoring"] == "both"
    assert "generation_speed" not in meta["timings"]  # the base answers came from the earlier call, not this run
    assert metrics["generation_cost"]["finetuned_to_base_speed"] > 0
    assert metrics["n_items"] == 10 and metrics["items_by_task"]["benchmark"] == 2
    keys = {row["key"] for row in metrics["table"]}
    assert {"news_impact.accuracy", "report_qa.accuracy", "overlap.rouge_l", "overlap.bleu", "perplexity.reference",
            "perplexity.general_text", "benchmark.fpb.accuracy", "news_impact.choice_accuracy", "benchmark.fpb.choice_accuracy"} <= keys
    base_rows = [json.loads(line) for line in (out / "generations_base.jsonl").read_text(encoding="utf-8").splitlines()]
    tuned_rows = [json.loads(line) for line in (out / "generations_finetuned.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in base_rows] == [r["id"] for r in tuned_rows]
    assert any(b["output"] != t["output"] for b, t in zip(base_rows, tuned_rows))  # the adapter is really on for "finetuned"
    rows = {row["key"]: row for row in metrics["table"]}
    assert rows["perplexity.reference"]["base"] != rows["perplexity.reference"]["finetuned"]

    # Base answers are the plain base model's answers (adapter off = same weights, same template).
    from finqlora.models.generation import GenerationSettings, generate_answers
    from finqlora.models.loading import load_model

    plain = load_model(str(tiny_model_dir), progress=False)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    direct = generate_answers(plain.model, plain.tokenizer, [i["messages"] for i in items[:3]], GenerationSettings(max_new_tokens=6, repetition_penalty=options.repetition_penalty, no_repeat_ngram_size=options.no_repeat_ngram_size), progress=False)
    assert direct == [r["output"] for r in base_rows[:3]]

    # Re-running never regenerates: generation is now forbidden, and the metrics are the same.
    import finqlora.models.generation

    def forbidden(*args, **kwargs):
        raise AssertionError("generation ran although every answer was cached")

    monkeypatch.setattr(finqlora.models.generation, "generate", forbidden)
    again = evaluate(options)
    assert again["table"] == metrics["table"]
    # A changed generation setting invalidates the cache (and would regenerate).
    options.max_new_tokens = 7
    with pytest.raises(AssertionError, match="generation ran"):
        evaluate(options)


def test_evaluate_needs_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="no --adapter given"):
        evaluate(EvalOptions(output=tmp_path, model="builtin:smollm2-135m-instruct", data=tmp_path / "x.jsonl"))


def test_from_run_is_the_one_mapping_of_the_run_config(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({
        "name": "x",
        "train": {"model": "builtin:smollm2-135m-instruct", "device": "cpu", "max_length": 768, "chat_template": "chatml"},
        "eval": {"max_samples": 7, "max_new_tokens": 32, "batch_size": 2, "scoring": "choice",
                 "benchmarks": ["finfe:/data/finfe.json", {"path": "/data/fpb.txt", "format": "fpb", "limit": 50, "label_map": "pos=利好"}]},
    })
    options = EvalOptions.from_run(cfg, output=tmp_path / "eval", data=tmp_path / "d.jsonl", adapter=tmp_path / "adapter", variants=("base",))
    assert (options.model, options.adapter, options.device, options.chat_template) == ("builtin:smollm2-135m-instruct", str(tmp_path / "adapter"), "cpu", "chatml")
    assert (options.max_samples, options.max_new_tokens, options.batch_size, options.max_length) == (7, 32, 2, 768)
    assert options.scoring == "choice" and options.variants == ("base",)
    assert options.benchmarks == [BenchmarkSpec("/data/finfe.json", "finfe"), BenchmarkSpec("/data/fpb.txt", "fpb", "pos=利好", None, 50)]
    defaults = EvalOptions(output=tmp_path)
    assert (options.split, options.top_p, options.seed, options.bootstrap_resamples) == (defaults.split, defaults.top_p, defaults.seed, defaults.bootstrap_resamples)
    # The eval CLI's options are shorthands for eval keys (no default of their own; tests/core/test_config_schema.py),
    # and the schema's defaults are EvalOptions' own.
    import inspect

    from finqlora.cli.evaluate import eval_main

    parameters = inspect.signature(eval_main).parameters
    for cli_name, field_name in (("max_new_tokens", "max_new_tokens"), ("batch_size", "batch_size"), ("scoring", "scoring"), ("bootstrap", "bootstrap_resamples")):
        assert parameters[cli_name].default.default is None, cli_name
        assert RunConfig().eval.model_dump()[field_name] == getattr(defaults, field_name), field_name


def test_benchmark_entries_are_validated() -> None:
    from pydantic import ValidationError

    for bad in (["/data/finfe.json"], ["parquet:/x"], [{"path": "/x", "format": "csv"}], [{"path": "/x", "format": "fpb", "limit": 0}]):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"eval": {"benchmarks": bad}})
    assert BenchmarkSpec.parse("fpb:/data/a@b.txt") == BenchmarkSpec("/data/a@b.txt", "fpb")
    with pytest.raises(FinqloraError, match="has no format"):
        BenchmarkSpec.parse("/data/x.json")


def test_choice_only_metrics_need_no_generations(tmp_path: Path) -> None:
    """Choice scores alone give accuracy rows with McNemar, intervals and baselines."""
    records = [_record(i, "news_impact", "test") for i in range(6)]
    items = build_items(records)
    assert items[0]["choice"] == {"options": ["利好", "利空", "中性"], "classes": ["利好", "利空", "中性"]}
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    (tmp_path / "eval_config.json").write_text(json.dumps({"scoring": "choice"}), encoding="utf-8")
    # truth cycles 利好, 利空, 中性; base always picks option 0 (利好), fine-tuned is right on all but n5
    picks = {"base": [0] * 6, "finetuned": [0, 1, 2, 0, 1, 0]}
    for variant, chosen in picks.items():
        (tmp_path / f"choice_{variant}.jsonl").write_text("".join(
            json.dumps({"id": item["id"], "choice": c, "scores": [0.0, -1.0, -2.0]}) + "\n" for item, c in zip(items, chosen)), encoding="utf-8")
    metrics = compute_metrics(tmp_path, bootstrap_resamples=200)
    rows = {row["key"]: row for row in metrics["table"]}
    assert set(rows) == {"news_impact.choice_accuracy", "news_impact.choice_macro_f1", "news_impact.choice_mcc"}
    accuracy = rows["news_impact.choice_accuracy"]
    assert accuracy["base"] == pytest.approx(2 / 6) and accuracy["finetuned"] == pytest.approx(5 / 6)
    assert (accuracy["mcnemar"]["base_only"], accuracy["mcnemar"]["finetuned_only"]) == (0, 3) and accuracy["test"] == "McNemar exact"
    block = metrics["tasks"]["choice"]["news_impact"]
    assert block["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 3) and block["baselines"]["random"]["accuracy"] == pytest.approx(1 / 3)
    from sklearn.metrics import matthews_corrcoef

    truth = [item["label"]["direction"] for item in items]
    tuned = [["利好", "利空", "中性"][c] for c in picks["finetuned"]]
    assert block["base"]["mcc"] == 0.0 and block["finetuned"]["mcc"] == pytest.approx(matthews_corrcoef(truth, tuned))
    assert rows["news_impact.choice_mcc"]["finetuned_ci"] == block["finetuned"]["mcc_ci"] and len(block["finetuned"]["mcc_ci"]) == 2
    assert "log-probability per character of the option" in block["normalisation"]
    per_item = [json.loads(line) for line in (tmp_path / "per_item.jsonl").read_text(encoding="utf-8").splitlines()]
    assert per_item[5]["finetuned"] == {"choice": "利好", "choice_correct": False}


def test_merged_adapter_gives_the_same_logits(tiny_model_dir: Path, tiny_adapter: Path) -> None:
    """Generation uses the merged model; perplexity and choice scores must not move."""
    import torch

    from finqlora.models.loading import load_model

    loaded = load_model(str(tiny_model_dir), adapter=str(tiny_adapter), device="cpu", progress=False)
    ids = loaded.tokenizer("黄金价格在美联储讲话后上涨。Gold rose.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
        merged = loaded.model.merge_and_unload()(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)  # ...and merging it changes nothing


@pytest.mark.slow
def test_cli_choice_scoring_of_a_benchmark(tmp_path: Path, tiny_model_dir: Path, tiny_adapter: Path) -> None:
    """`finqlora eval --scoring choice --benchmark finfe:PATH`: no generation, choice rows, and the report."""
    from typer.testing import CliRunner

    from finqlora.cli import app

    bench = tmp_path / "finfe.json"
    bench.write_text(json.dumps([["公司业绩大幅增长", 2], ["市场表现平稳", 1], ["亏损继续扩大", 0], ["营收明显下滑", 0]], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--scoring", "choice",
                                      "--showcase-samples", "0", "--benchmark", f"finfe:{bench}", "--no-forgetting", "--bootstrap", "100", "--lang", "en", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out / "generations_base.jsonl").exists() and (out / "choice_finetuned.jsonl").exists()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [row["key"] for row in metrics["table"]] == ["benchmark.finfe.choice_accuracy", "benchmark.finfe.choice_macro_f1"]
    assert metrics["tasks"]["choice"]["benchmark.finfe"]["options"] == ["积极", "消极", "中性"]  # in the order of the classes 利好, 利空, 中性
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Benchmark finfe: accuracy (choice)" in html and "choice scoring only" in html


def _market_record(i: int, case: str, relation: str | None = None) -> dict:
    label = {"case": case, "ticker": "XAUUSD", "window_min": 15}
    output = f"案例类型：{case}\n依据：……"
    if relation:
        label["relation"] = relation
        output = f"案例类型：{case}\n结论：{relation}（……）"
    return {"id": f"m{i}", "type": "market_analysis", "instruction": "判断市场反应属于哪种情形。", "input": f"快讯{i}",
            "output": output, "split": "test", "event_id": f"e{i}", "event_time": "2026-06-01T00:00:00Z", "label": label}


def test_importance_questions_are_scored_on_their_own_answer(tmp_path: Path) -> None:
    """A 重要性与波动 question names its type: it is scored on 高于/接近/低于常态 (its own task), and
    the four cases are scored after the answer's fixed opening 案例类型：, where a trained model states them."""
    from finqlora.dataset.labels import CASE_ANSWER_PREFIX, IMPORTANCE, IMPORTANCE_ANSWER_PREFIX, MARKET_CASES, RELATIONS

    records = [_market_record(i, MARKET_CASES[i % 4]) for i in range(8)]
    records += [_market_record(8 + i, IMPORTANCE, RELATIONS[i % 3]) for i in range(6)]
    items = build_items(records)
    assert items[0]["choice"] == {"options": sorted(MARKET_CASES), "classes": sorted(MARKET_CASES), "answer_prefix": CASE_ANSWER_PREFIX}
    assert items[8]["choice"] == {"options": list(RELATIONS), "classes": list(RELATIONS), "answer_prefix": IMPORTANCE_ANSWER_PREFIX}
    # The prefixes are how the references open: what the builder writes (checked on real builds in test_builder).
    assert all(item["reference"].startswith(item["choice"]["answer_prefix"]) for item in items)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    (tmp_path / "eval_config.json").write_text(json.dumps({"scoring": "choice"}), encoding="utf-8")
    for variant in ("base", "finetuned"):
        rows = []
        for item in items:
            truth = item["label"].get("relation") or item["label"]["case"]
            right = item["choice"]["classes"].index(truth)
            chosen = right if variant == "finetuned" else 0
            rows.append(json.dumps({"id": item["id"], "choice": chosen, "scores": [0.0] * len(item["choice"]["options"])}))
        (tmp_path / f"choice_{variant}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    metrics = compute_metrics(tmp_path, bootstrap_resamples=200)
    choice = metrics["tasks"]["choice"]
    assert choice["market_analysis"]["n"] == 8 and choice["market_importance"]["n"] == 6
    rows = {row["key"]: row for row in metrics["table"]}
    assert rows["market_importance.choice_accuracy"]["finetuned"] == 1.0
    assert rows["market_importance.choice_accuracy"]["base"] == pytest.approx(2 / 6)  # always 高于常态
    assert rows["market_analysis.choice_accuracy"]["base"] == pytest.approx(2 / 8)
    assert IMPORTANCE not in choice["market_analysis"]["options"]


def test_under_choice_scoring_a_few_closed_items_per_task_are_still_generated() -> None:
    from finqlora.evaluate.evaluation import generated_items

    records = [_record(i, "news_impact", "test") for i in range(5)] + [_record(i, "report_qa", "test") for i in range(3)]
    records += [_market_record(10 + i, "观望信号") for i in range(4)]
    items = build_items(records)
    shown = generated_items(items, "choice", showcase_samples=2)
    assert [item["id"] for item in shown] == ["n0", "n1", "q0", "q1", "q2", "m10", "m11"]  # open tasks always
    assert [item["id"] for item in generated_items(items, "choice")] == ["q0", "q1", "q2"]
    assert generated_items(items, "both", showcase_samples=0) == items
