"""The teacher against a real local server.

The teacher model is the tiny random Llama, first fine-tuned here for a few seconds to answer
every prompt with one fixed bullish analysis. Served by `finqlora serve`'s app, it must be
accepted for records labelled 利好 and rejected for records labelled 利空; the untrained base
(which emits no direction at all) must be rejected as unparseable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finqlora.batching import BatchLimits
from finqlora.client import FinLLMClient
from finqlora.server import ServingEngine, create_app, start_in_thread
from finqlora.teacher import check_answer, enrich_dataset_file, enrich_records, teacher_messages

KEY = "teacher-key-12345678"
BULLISH_ANSWER = "降息预期升温压低实际利率，对黄金构成支撑。\n结论：XAUUSD 方向：利好\n风险提示：历史反应不代表未来表现。"


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


@pytest.fixture(scope="module")
def teacher_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir trained to answer the teacher prompts with BULLISH_ANSWER."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finqlora.chat_format import encode_for_training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = []
    for number, direction in ((1, "利好"), (2, "利空"), (3, "利好")):
        record = {"messages": [*teacher_messages(news_record(number, direction)), {"role": "assistant", "content": BULLISH_ANSWER}]}
        encoded = encode_for_training(tokenizer, record, max_length=1024)
        examples.append((torch.tensor([encoded.input_ids]), torch.tensor(encoded.labels), encoded.prompt_tokens))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        input_ids, labels, prompt_tokens = examples[step % len(examples)]
        # Logits only where the answer is predicted: the 49k-word vocabulary over the whole
        # ~800-token prompt would make each step ~15x slower for nothing.
        hidden = model.model(input_ids=input_ids).last_hidden_state[0, prompt_tokens - 1 : -1]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), labels[prompt_tokens:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the teacher stand-in did not learn its answer (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("teacher-model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_server(teacher_model_dir: Path):
    limits = BatchLimits(max_new_tokens=200, default_max_new_tokens=120, max_prompt_tokens=1024)
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


@pytest.mark.parametrize(
    "answer, status",
    [
        ("结论：XAUUSD 方向：利好", "accepted"),
        ("这条消息对金价构成支撑，整体偏多。", "accepted"),
        ("结论：XAUUSD 方向：利空", "rejected_direction"),
        ("短期利好，长期利空", "rejected_unparseable"),
        ("", "rejected_unparseable"),
        ("XAUUSD：利好；XAGUSD：利空\n结论：XAUUSD 方向：利好", "rejected_direction"),
    ],
)
def test_check_answer(answer: str, status: str) -> None:
    label = {"direction": "利好", "ticker": "XAUUSD", "directions": {"XAUUSD": "利好", "XAGUSD": "利好"}}
    assert check_answer(answer, label)[0] == status
