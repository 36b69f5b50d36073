"""Generation: greedy determinism, stopping, streaming, resumable JSONL, CLI and guide script."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.models.generation import (
    GenerationSettings,
    build_messages,
    generate,
    generate_answers,
    generate_file,
    read_prompts,
    stream_answer,
    trim_history,
)
from finqlora.models.loading import load_model

REPO = Path(__file__).resolve().parents[2]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol():
    return load_model("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from tests.models.test_models import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gen-adapter") / "adapter")


def test_settings_are_validated():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"repetition_penalty": 0}):
        with pytest.raises(FinqloraError):
            GenerationSettings(**bad)
    assert GenerationSettings().greedy and not GenerationSettings(temperature=0.7).greedy


def test_greedy_answer_is_deterministic_and_stops_at_end_of_turn(smol):
    settings = GenerationSettings(max_new_tokens=40)
    first = generate(smol.model, smol.tokenizer, [FRANCE], settings, progress=False)[0]
    second = generate(smol.model, smol.tokenizer, [FRANCE], settings, progress=False)[0]
    assert first == second
    assert "Paris" in first.text
    assert first.finished and first.new_tokens < 40  # stopped on <|im_end|>, not the limit
    assert "<|im_end|>" not in first.text


def test_batched_left_padded_answers_match_single_ones(smol):
    chats = [
        [{"role": "user", "content": "Explain in two sentences what a central bank does and why interest rates matter."}],
        FRANCE,
        [{"role": "user", "content": "Hi"}],
    ]
    settings = GenerationSettings(max_new_tokens=12)
    batched = generate_answers(smol.model, smol.tokenizer, chats, settings, batch_size=3, progress=False)
    single = generate_answers(smol.model, smol.tokenizer, [FRANCE], settings, batch_size=1, progress=False)
    assert batched[1] == single[0]  # the short prompt was left-padded in the batch
    assert len(batched) == 3 and all(batched)
    assert smol.tokenizer.padding_side == "left"


def test_max_new_tokens_cuts_and_reports_unfinished(smol):
    story = [{"role": "user", "content": "Write a long story about a bank."}]
    result = generate(smol.model, smol.tokenizer, [story], GenerationSettings(max_new_tokens=5), progress=False)[0]
    assert result.new_tokens == 5 and not result.finished


def test_sampling_is_seeded(smol):
    chat = [{"role": "user", "content": "Name a fruit."}]
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=7)
    assert generate_answers(smol.model, smol.tokenizer, [chat], settings, progress=False) == generate_answers(
        smol.model, smol.tokenizer, [chat], settings, progress=False
    )


def test_stream_yields_the_same_text_as_generate(smol):
    settings = GenerationSettings(max_new_tokens=12)
    pieces = list(stream_answer(smol.model, smol.tokenizer, FRANCE, settings))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces).strip() == generate_answers(smol.model, smol.tokenizer, [FRANCE], settings, progress=False)[0]


def test_no_repeat_ngram_size_keeps_a_looping_model_from_repeating(smol):
    """Asked to repeat a word, greedy SmolLM2 loops; with no_repeat_ngram_size=3 no 3-token sequence recurs."""
    prompt = [{"role": "user", "content": "Write the word gold forty times, separated by spaces."}]

    def token_trigrams(settings: GenerationSettings) -> list[tuple[int, ...]]:
        text = generate(smol.model, smol.tokenizer, [prompt], settings, progress=False)[0].text
        ids = smol.tokenizer.encode(text, add_special_tokens=False)
        return [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]

    free = token_trigrams(GenerationSettings(max_new_tokens=48))
    assert len(set(free)) < len(free)  # without the control the random model repeats itself
    controlled = token_trigrams(GenerationSettings(max_new_tokens=48, no_repeat_ngram_size=3))
    assert controlled and len(set(controlled)) == len(controlled)


def test_build_messages_follows_the_dataset_layout():
    assert build_messages("美联储宣布加息25个基点") == [{"role": "user", "content": "美联储宣布加息25个基点"}]
    assert build_messages("新闻", instruction="分析影响", system="你是分析师") == [
        {"role": "system", "content": "你是分析师"},
        {"role": "user", "content": "分析影响\n\n新闻"},
    ]


def test_trim_history_drops_oldest_turns_to_fit(tiny):
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " + "word " * 30}, {"role": "assistant", "content": "answer " * 30}]
    history.append({"role": "user", "content": "last question"})
    kept, dropped = trim_history(tiny.model, tiny.tokenizer, [], history, max_new_tokens=100)
    assert dropped > 0 and dropped % 2 == 0 and kept[-1]["content"] == "last question"
    assert kept[0]["role"] == "user"
    prompt = tiny.tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
    assert len(tiny.tokenizer.encode(prompt)) + 100 <= tiny.model.config.max_position_embeddings


def _write_prompts(path: Path, count: int) -> None:
    rows = [{"id": f"r{i}", "instruction": "Say a number", "input": str(i) * (i + 1), "output": "ok", "type": "template"} for i in range(count)]
    rows[1] = {"prompt": "Hello there"}
    rows[2] = {"id": "m2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_read_prompts_accepts_three_layouts_and_names_bad_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    _write_prompts(path, 4)
    rows = read_prompts(path)
    assert [r.id for r in rows] == ["r0", "line-2", "m2", "r3"]
    assert rows[2].reference == "Hello" and rows[2].messages == [{"role": "user", "content": "Hi"}]
    assert rows[0].messages[-1]["content"] == "Say a number\n\n0" and rows[0].extra == {"type": "template"}
    path.write_text('{"prompt": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"prompts.jsonl:2: not valid JSON"):
        read_prompts(path)
    path.write_text('{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"prompts.jsonl:1: record has neither"):
        read_prompts(path)


def test_generate_file_resumes_without_redoing_answers(tiny, tmp_path):
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    _write_prompts(prompts, 6)
    settings = GenerationSettings(max_new_tokens=6)
    first = generate_file(tiny.model, tiny.tokenizer, prompts, output, settings, batch_size=4, progress=False)
    assert (first.total, first.skipped, first.written) == (6, 0, 6)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["reference"] == "ok" and rows[0]["type"] == "template" and rows[1]["reference"] is None
    # Simulate a crash: two rows kept (one marked to prove it is not redone), then half a row.
    kept = [dict(rows[0], answer="KEPT"), rows[1]]
    output.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "m2", "li', encoding="utf-8")
    second = generate_file(tiny.model, tiny.tokenizer, prompts, output, settings, batch_size=4, progress=False)
    assert (second.skipped, second.written) == (2, 4)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert rows[0]["answer"] == "KEPT"
    third = generate_file(tiny.model, tiny.tokenizer, prompts, output, settings, progress=False)
    assert (third.skipped, third.written) == (6, 0)


def test_generate_file_refuses_to_mix_settings_or_inputs(tiny, tmp_path):
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    _write_prompts(prompts, 3)
    generate_file(tiny.model, tiny.tokenizer, prompts, output, GenerationSettings(max_new_tokens=4), progress=False)
    with pytest.raises(FinqloraError, match="other settings .*settings") as info:
        generate_file(tiny.model, tiny.tokenizer, prompts, output, GenerationSettings(max_new_tokens=5), progress=False)
    assert "--overwrite" in info.value.hint
    redo = generate_file(
        tiny.model, tiny.tokenizer, prompts, output, GenerationSettings(max_new_tokens=5), overwrite=True, progress=False
    )
    assert redo.written == 3 and len(output.read_text().splitlines()) == 3
    prompts.write_text(json.dumps({"id": "changed", "prompt": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="does not match"):
        generate_file(tiny.model, tiny.tokenizer, prompts, output, GenerationSettings(max_new_tokens=5), progress=False)


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from finqlora.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_and_ask(tiny_model_dir, tmp_path, capsys):
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    _write_prompts(prompts, 3)
    code, out, err = _run_cli(
        ["generate", "-m", str(tiny_model_dir), "-i", str(prompts), "-o", str(output), "--max-new-tokens", "4"], capsys
    )
    assert code == 0, err
    assert "3 answered, 0 already done (of 3)" in out
    assert (tmp_path / "answers.jsonl.meta.json").is_file()
    code, out, err = _run_cli(["ask", "-m", str(tiny_model_dir), "--json", "--max-new-tokens", "4", "美联储宣布加息25个基点"], capsys)
    assert code == 0, err
    assert json.loads(out)["prompt"] == "美联储宣布加息25个基点"
    code, out, err = _run_cli(["ask", "-m", str(tiny_model_dir), "--compare", "x"], capsys)
    assert code == 2 and "--compare needs --adapter" in err


def test_ask_compare_shows_base_and_finetuned(tiny_adapter, capsys):
    # --model is omitted: the base recorded in the adapter is used.
    code, out, err = _run_cli(["ask", "-a", str(tiny_adapter), "--compare", "--json", "--max-new-tokens", "6", "hello"], capsys)
    assert code == 0, err
    item = json.loads(out)
    assert set(item) == {"prompt", "base", "finetuned"}


def test_guide_script_keeps_working(tiny_adapter, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("test_qlora_model", REPO / "scripts" / "qlora" / "test_qlora_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--adapter_path", str(tiny_adapter), "--test_cases", "美联储宣布加息25个基点", "央行降准", "--max_new_tokens", "5", "--json"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "美联储宣布加息25个基点" in out and "央行降准" in out
    assert script.main(["--adapter_path", str(tmp_path / "missing"), "--test_cases", "x"]) == 2
    assert "adapter folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_qwen_answers_the_chinese_prompt_in_chinese():
    loaded = load_model("builtin:qwen2.5-coder-0.5b-instruct")
    answer = generate_answers(
        loaded.model, loaded.tokenizer, [build_messages("美联储宣布加息25个基点")], GenerationSettings(max_new_tokens=40), progress=False
    )[0]
    han = re.findall(r"[\u4e00-\u9fff]", answer)
    assert len(han) >= 15, answer
    assert any(word in answer for word in ("美联储", "加息", "利率")), answer


def test_cli_chat_streams_keeps_history_and_obeys_commands(tiny_model_dir):
    from typer.testing import CliRunner

    from finqlora.cli import app

    result = CliRunner().invoke(
        app, ["chat", "-m", str(tiny_model_dir), "--max-new-tokens", "3"], input="hello\n/help\n/reset\nagain\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("model>") == 2
    assert "history cleared" in result.stderr and "commands: /reset, /exit" in result.stderr


def test_closing_a_stream_early_stops_generating(tiny):
    import time

    stream = stream_answer(tiny.model, tiny.tokenizer, FRANCE, GenerationSettings(max_new_tokens=900))
    next(stream)
    started = time.perf_counter()
    stream.close()  # stops at the next token instead of waiting for 900 of them
    assert time.perf_counter() - started < 1.0
