"""The teacher against a real local server.

The teacher is served by `finqlora serve`'s app. Its model is a real (tiny) Llama whose
weights are wired so that greedy decoding always writes one fixed bullish answer: every
layer's output projection is zero, so the next token depends only on the current one, and
the embedding / output rows of the answer's tokens chain each token to the next. (Training
the tiny model to do this takes minutes on a shared CPU; wiring it takes milliseconds.)
Records labelled 利好 must be accepted, records labelled 利空 rejected; the random base
model, which states no direction at all, is rejected as unparseable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finqlora.serve.batching import BatchLimits
from finqlora.models.client import FinLLMClient
from finqlora.serve.server import ServingEngine, create_app, start_in_thread
from finqlora.dataset.teacher import check_answer, enrich_dataset_file, enrich_records

KEY = "teacher-key-12345678"
BULLISH_ANSWER = "XAUUSD Direction: bullish (gold supported by lower real rates)"


def news_record(number: int, direction: str, split: str = "train", messages: bool = False) -> dict:
    label = {
        "direction": direction,
        "ticker": "XAUUSD",
        "window_min": 15,
        "directions": {"XAUUSD": direction},
        "returns": {"XAUUSD": {"-120": 0.0004, "5": 0.0011 if direction == "利好" else -0.0011, "15": 0.002 if direction == "利好" else -0.002}},
        "threshold": 0.0009,
    }
    instruction = "这条消息对现货黄金意味着什么？请给出方向、幅度和风险提示。"
    news = f"快讯：某央行官员第{number}次表示年内可能降息，市场关注后续数据。"
    base = {"id": f"ni-{number}", "type": "news_impact", "split": split, "event_id": f"e{number}", "event_time": "2026-03-02T00:16:49Z", "label": label}
    if messages:
        return {**base, "messages": [{"role": "user", "content": f"{instruction}\n\n{news}"}, {"role": "assistant", "content": "原答案"}]}
    return {**base, "instruction": instruction, "input": news, "output": f"原答案 结论：XAUUSD 方向：{direction}"}


OTHER_RECORD = {"id": "rq-1", "type": "report_qa", "instruction": "毛利率是多少？", "input": "营收100元，成本60元。", "output": "40%",
                "split": "train", "event_id": None, "event_time": None, "label": {"metric": "毛利率", "answer": 40.0, "unit": "%", "tolerance": 0.5}}  # fmt: skip


def wire_teacher(tiny_model_dir: Path, answer: str, out: Path) -> Path:
    """A Llama with tiny_model_dir's shape and tokenizer that always answers `answer`."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from finqlora.core.chat_format import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    config.max_position_embeddings = 4096  # teacher prompts with two tickers pass 1024 tokens
    model = LlamaForCausalLM(config)
    prompt_end = tokenizer.encode(render_prompt(tokenizer, [{"role": "user", "content": "x"}]), add_special_tokens=False)[-1]
    chain = [prompt_end, *tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    current = chain[:-1]
    assert len(set(current)) == len(current) <= config.hidden_size, "each token must lead to exactly one next token"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, next_token) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), config.hidden_size).float()
            model.lm_head.weight[next_token, i] = 10.0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher that always answers BULLISH_ANSWER."""
    return wire_teacher(tiny_model_dir, BULLISH_ANSWER, tmp_path_factory.mktemp("teacher-model"))


@pytest.fixture(scope="module")
def teacher_server(teacher_model_dir: Path):
    limits = BatchLimits(max_new_tokens=200, default_max_new_tokens=120, max_prompt_tokens=3000)
    engine = ServingEngine.load(str(teacher_model_dir), limits=limits, base_name="teacher", device="cpu")
    running = start_in_thread(create_app(engine, api_key=KEY))
    yield running
    running.stop()


def teacher_client(server) -> FinLLMClient:
    return FinLLMClient.from_env(server.url + "/v1", env={"FINQLORA_API_KEY": KEY, "FINQLORA_MAX_RETRIES": "0"})


def test_answers_are_checked_against_the_label_and_cached(teacher_server, tmp_path: Path) -> None:
    records = [news_record(1, "利好"), news_record(2, "利空"), news_record(3, "利好", messages=True), OTHER_RECORD]
    cache = tmp_path / "cache.jsonl"
    enriched, stats = enrich_records(records, teacher_client(teacher_server), "teacher", cache, max_tokens=120, progress=False)

    assert (stats.candidates, stats.accepted, stats.rejected_direction, stats.other_records) == (3, 2, 1, 1)
    assert (stats.asked, stats.cache_hits) == (3, 0)
    accepted, rejected, accepted_messages, other = enriched
    assert accepted["output"] == BULLISH_ANSWER
    assert accepted["teacher"] == {"model": "teacher", "provider": "custom", "status": "accepted", "parsed_direction": "利好", "cached": False}
    assert rejected["output"] == records[1]["output"], "a rejected answer must not replace the builder's"
    assert rejected["teacher"]["status"] == "rejected_direction" and rejected["teacher"]["parsed_direction"] == "利好"
    assert accepted_messages["messages"][-1] == {"role": "assistant", "content": BULLISH_ANSWER}
    assert "teacher" not in other and other == OTHER_RECORD
    assert records[0]["output"].startswith("原答案"), "the input records must not be changed in place"
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 3


def test_cache_answers_without_the_server(teacher_server, tmp_path: Path) -> None:
    records = [news_record(1, "利好"), news_record(2, "利空")]
    cache = tmp_path / "cache.jsonl"
    first, _ = enrich_records(records, teacher_client(teacher_server), "teacher", cache, max_tokens=120, progress=False)
    # A client pointing at a dead port: every answer must now come from the cache.
    dead = FinLLMClient.from_env("http://127.0.0.1:9/v1", env={"FINQLORA_API_KEY": KEY, "FINQLORA_MAX_RETRIES": "0"})
    again, stats = enrich_records(records, dead, "teacher", cache, progress=False)
    assert (stats.asked, stats.cache_hits) == (0, 2)
    assert [r["output"] for r in again] == [r["output"] for r in first]
    assert all(r["teacher"]["cached"] for r in again)


def test_a_teacher_without_directions_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = ServingEngine.load(str(tiny_model_dir), limits=BatchLimits(max_prompt_tokens=1024, max_new_tokens=16), device="cpu")
    running = start_in_thread(create_app(engine, api_key=KEY))
    try:
        records = [news_record(1, "利好"), news_record(2, "利空")]
        enriched, stats = enrich_records(records, teacher_client(running), "base", tmp_path / "c.jsonl", max_tokens=16, progress=False)
    finally:
        running.stop()
    assert stats.rejected_unparseable == 2 and stats.accepted == 0
    assert [r["output"] for r in enriched] == [r["output"] for r in records]


def test_enrich_dataset_file_rewrites_the_file_and_its_stats(teacher_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = tmp_path / "instructions.jsonl"
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [news_record(1, "利好"), OTHER_RECORD]), encoding="utf-8")
    (tmp_path / "instructions.stats.json").write_text(json.dumps({"records": 2}), encoding="utf-8")
    monkeypatch.setenv("FINQLORA_API_KEY", KEY)
    stats = enrich_dataset_file(dataset, teacher_server.url + "/v1", "teacher", max_tokens=120, progress=False)
    assert stats.accepted == 1
    rows = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["output"] == BULLISH_ANSWER and rows[0]["teacher"]["status"] == "accepted"
    summary = json.loads((tmp_path / "instructions.stats.json").read_text(encoding="utf-8"))
    assert summary["records"] == 2 and summary["teacher"]["accepted"] == 1 and summary["teacher"]["acceptance_rate"] == 1.0
    assert (tmp_path / "instructions.teacher_cache.jsonl").exists()


_PAD = "传导路径：降息预期升温，实际利率回落，持有黄金的机会成本下降。"


@pytest.mark.parametrize(
    "answer, status",
    [
        (_PAD + "结论：XAUUSD 方向：利好", "accepted"),
        ("这条消息对金价构成支撑，整体偏多。" + _PAD, "accepted"),
        (_PAD + "结论：XAUUSD 方向：利空", "rejected_direction"),
        ("短期利好，长期利空", "rejected_unparseable"),
        ("", "rejected_unparseable"),
        ("XAUUSD：利好；XAGUSD：利空\n结论：XAUUSD 方向：利好" + _PAD, "rejected_direction"),
        ("结论：XAUUSD 方向：利好", "rejected_length"),
        (_PAD * 40 + "结论：XAUUSD 方向：利好", "rejected_length"),
        (_PAD + "发布后金价上涨0.20%。结论：XAUUSD 方向：利好", "rejected_realized_numbers"),
        (_PAD + "快讯提到的2.5%目标。结论：XAUUSD 方向：利好", "accepted"),  # a number of the input may be quoted
    ],
)
def test_check_answer(answer: str, status: str) -> None:
    label = {"direction": "利好", "ticker": "XAUUSD", "directions": {"XAUUSD": "利好", "XAGUSD": "利好"},
             "returns": {"XAUUSD": {"15": 0.002, "30": 0.0025}}}
    assert check_answer(answer, label, "快讯：某官员称通胀将回到2.5%的目标。")[0] == status


def test_a_rewrite_quoting_the_realized_move_is_rejected_and_keeps_the_rule_text(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A served teacher that writes the realized 15-minute move into its answer."""
    answer = "XAUUSD Direction: bullish, gold rose 0.35 after the news"
    model_dir = wire_teacher(tiny_model_dir, answer, tmp_path / "numeric-teacher")
    engine = ServingEngine.load(str(model_dir), limits=BatchLimits(max_new_tokens=200, default_max_new_tokens=120, max_prompt_tokens=3000),
                                base_name="teacher", device="cpu")
    running = start_in_thread(create_app(engine, api_key=KEY))
    try:
        record = news_record(1, "利好")
        record["label"]["returns"]["XAUUSD"]["15"] = 0.0035
        enriched, stats = enrich_records([record], teacher_client(running), "teacher", tmp_path / "c.jsonl", max_tokens=120, progress=False)
    finally:
        running.stop()
    assert (stats.accepted, stats.rejected_realized_numbers) == (0, 1)
    assert enriched[0]["output"] == record["output"] and enriched[0]["teacher"]["status"] == "rejected_realized_numbers"


def test_finqlora_build_with_a_teacher(teacher_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`finqlora build --teacher URL --teacher-model NAME` over the synthetic sample store."""
    from typer.testing import CliRunner

    from finqlora.cli import app
    from finqlora.store.sample_db import build_sample_db

    db = tmp_path / "sample.db"
    build_sample_db(db, seed=0)
    output = tmp_path / "ds.jsonl"
    monkeypatch.setenv("FINQLORA_API_KEY", KEY)
    args = ["build", "--db", str(db), "--output", str(output), "-n", "12", "--quiet",
            "--teacher", teacher_server.url + "/v1", "--teacher-model", "teacher", "--teacher-max-tokens", "120"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    marked = [r for r in rows if "teacher" in r]
    assert marked and all(r["type"] == "news_impact" for r in marked)
    for row in marked:
        bullish = row["label"]["direction"] == "利好"
        assert (row["teacher"]["status"] == "accepted") == bullish
        assert (row["output"] == BULLISH_ANSWER) == bullish
    summary = json.loads((tmp_path / "ds.stats.json").read_text(encoding="utf-8"))["teacher"]
    assert summary["candidates"] == len(marked) and summary["model"] == "teacher"
    assert "news-impact answers accepted" in result.output
