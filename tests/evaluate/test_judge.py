"""`finqlora eval --judge`: both orders cancel a position bias, the rubric's verdict is parsed,
kappa against a rating round, the report section, and our own server as the judge."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from finqlora.evaluate.judge import outcome, parse_verdict, run_judge
from finqlora.models.client import FinLLMClient, Provider

QUESTIONS = ["美联储加息对黄金有何影响？", "人民币贬值对出口企业意味着什么？", "央行降准的作用是什么？", "什么是市盈率？"]


def _eval_dir(folder: Path) -> Path:
    """An evaluation folder as `finqlora eval` leaves it: items and both models' generations."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"id": f"q{i}", "task": "template", "messages": [{"role": "user", "content": q}], "reference": ""} for i, q in enumerate(QUESTIONS)]
    (folder / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    answers = {"base": "不太清楚。", "finetuned": "【专业】从利率、美元与实际收益率三个渠道分析。"}
    for variant, text in answers.items():
        (folder / f"generations_{variant}.jsonl").write_text(
            "".join(json.dumps({"id": item["id"], "output": f"{text}（{i}）"}, ensure_ascii=False) + "\n" for i, item in enumerate(items)), encoding="utf-8")
    return folder


def _judge_server(decide: Callable[[str], str]):
    """A minimal OpenAI-compatible endpoint whose answers come from a deterministic function of the prompt."""
    from fastapi import FastAPI

    from finqlora.serve.server import start_in_thread

    app = FastAPI()
    calls: list[str] = []

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        calls.append(prompt)
        return {"id": "j", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": decide(prompt)}}]}

    return start_in_thread(app), calls


def _client(url: str) -> FinLLMClient:
    return FinLLMClient([Provider("custom", url + "/v1", "no-key", "judge")], max_retries=0)


def test_a_judge_that_always_prefers_a_gives_half(tmp_path: Path) -> None:
    running, calls = _judge_server(lambda _prompt: '{"A": {"专业性": 4, "准确性": 4}, "B": {"专业性": 3, "准确性": 3}, "better": "A"}')
    try:
        summary = run_judge(_eval_dir(tmp_path / "eval"), _client(running.url), model="judge")
    finally:
        running.stop()
    assert summary["judgements"] == 8 and summary["parsed"] == 8 and len(calls) == 8
    assert summary["win_rate"] == 0.5 and summary["losses"] == 4 and summary["chose_position_a"] == 1.0
    assert summary["position_consistency"] == 0.0  # every pair flips with the order
    assert summary["mean_scores"]["base"] == summary["mean_scores"]["finetuned"] == {"professional": 3.5, "accuracy": 3.5}


def test_a_judge_of_content_and_its_kappa_with_raters(tmp_path: Path) -> None:
    """A judge that prefers the answer marked 【专业】 wherever it is shown: consistent, all wins;
    a rating round on the same folder gives Cohen's kappa judge vs each rater; the report shows both."""
    from finqlora.evaluate.ratings import create_round, save_rating

    def decide(prompt: str) -> str:
        a_part = prompt.split("【回答 A】")[1].split("【回答 B】")[0]
        return "更好：A" if "【专业】" in a_part else "更好：B"  # no JSON: the fallback pattern

    eval_dir = _eval_dir(tmp_path / "eval")
    rating_round = create_round(eval_dir, ["张三", "李四"], name="r1", seed=1)
    scores = {"A": {"professional": 3, "accuracy": 3}, "B": {"professional": 3, "accuracy": 3}}
    for pair in rating_round.pairs:
        for rater in ("张三", "李四"):
            a_is = rating_round.raters[rater]["a_is"][pair["item"]]
            agree = rater == "张三" or pair["item"] in ("q0", "q1")  # 李四 prefers base on q2, q3
            wanted = "finetuned" if agree else "base"
            save_rating(rating_round, rater, pair["item"], "A" if a_is == wanted else "B", scores)
    running, calls = _judge_server(decide)
    try:
        summary = run_judge(eval_dir, _client(running.url), model="judge")
        again = run_judge(eval_dir, _client(running.url), model="judge")  # everything cached: no new call
    finally:
        running.stop()
    assert len(calls) == 8 and again == summary
    assert summary["win_rate"] == 1.0 and summary["position_consistency"] == 1.0 and summary["mean_scores"]["base"]["accuracy"] is None
    agreement = summary["agreement_with_raters"][0]
    assert agreement["round"] == "r1" and agreement["raters"]["张三"] == {"items": 4, "cohen_kappa": 1.0}
    assert agreement["raters"]["李四"]["cohen_kappa"] == 0.0  # judge all wins, 李四 half: p_o = p_e = 0.5
    from finqlora.report.report import build_report

    (eval_dir / "metrics.json").write_text(json.dumps({"meta": {}, "significance_level": 0.05, "bootstrap": {"resamples": 100}, "table": [], "tasks": {}}), encoding="utf-8")
    html = build_report(eval_dir, tmp_path / "report", lang="en").html.read_text(encoding="utf-8")
    assert "LLM judge" in html and "100.0% [" in html and "Cohen&#39;s kappa, judge vs rater" in html
    assert '<td>张三</td><td class="num">4</td><td class="num">1.000</td>' in html


def test_parse_verdict_and_outcome() -> None:
    assert parse_verdict('好的。{"A": {"专业性": 5, "准确性": 4}, "B": {"专业性": 2, "准确性": 2}, "better": "B"}') == {
        "better": "B", "scores": {"A": {"professional": 5, "accuracy": 4}, "B": {"professional": 2, "accuracy": 2}}}
    assert parse_verdict('{"better": "tie"}')["better"] == "tie"
    assert parse_verdict("两者相当，better: tie")["better"] == "tie"
    assert parse_verdict("我无法判断")["better"] is None
    assert outcome("A", "finetuned") == "win" and outcome("A", "base") == "loss" and outcome("B", "base") == "win"
    assert outcome("tie", "base") == "tie" and outcome(None, "base") is None


@pytest.mark.slow
def test_our_own_server_as_the_judge(tmp_path: Path) -> None:
    """`finqlora serve`'s engine with builtin:smollm2-135m-instruct on 127.0.0.1 (with a key) judges
    through the CLI's path; a 135M model's verdicts are not the point, the round trip is."""
    from finqlora.cli.evaluate import _print_judge
    from finqlora.serve.batching import BatchLimits
    from finqlora.serve.server import ServingEngine, create_app, start_in_thread

    engine = ServingEngine.load("builtin:smollm2-135m-instruct", limits=BatchLimits(max_new_tokens=8, default_max_new_tokens=8), device="cpu")
    running = start_in_thread(create_app(engine, api_key="judge-key-12345678"))
    try:
        client = FinLLMClient.from_env("local", env={"FINQLORA_BASE_URL": running.url + "/v1", "FINQLORA_API_KEY": "judge-key-12345678",
                                                     "FINQLORA_MAX_RETRIES": "0", "FINQLORA_TIMEOUT": "600"})  # a loaded 2-core CI machine
        summary = run_judge(_eval_dir(tmp_path / "eval"), client, limit=1, max_tokens=8)  # one pair, both orders: 2 calls
    finally:
        running.stop()
    assert summary["pairs"] == 1 and summary["judgements"] == 2 and summary["parsed"] + summary["unparsed"] == 2
    assert summary["judge_model"] == "base" and (tmp_path / "eval" / "judge" / "judgements.jsonl").read_text(encoding="utf-8").count("\n") == 2
    _print_judge(summary)  # the CLI's summary line prints whatever the verdicts were
