"""Evaluation: held-out selection, metrics from cached generations, and a real run on a tiny
model with a LoRA adapter (same weights for base, cache reused on re-run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
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
    with pytest.raises(FinqloraError, match=r"bad.jsonl: line 2 is not valid JSON"):
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
    for name in ("items.jsonl", "generations_base.jsonl", "generations_finetuned.jsonl", "perplexity_base.jsonl", "forgetting_finetuned.jsonl",
                 "metrics.json", "report.html", "report.md", "eval_config.json"):
        assert (out / name).exists(), name
    assert metrics["n_items"] == 10 and metrics["items_by_task"]["benchmark"] == 2
    keys = {row["key"] for row in metrics["table"]}
    assert {"news_impact.accuracy", "report_qa.accuracy", "overlap.rouge_l", "overlap.bleu", "perplexity.reference",
            "perplexity.general_text", "benchmark.fpb.accuracy"} <= keys
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
    direct = generate_answers(plain.model, plain.tokenizer, [i["messages"] for i in items[:3]], GenerationSettings(max_new_tokens=6), progress=False)
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
