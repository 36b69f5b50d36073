"""Choice scoring: the cached, batched scores equal a plain forward pass; a model taught to
prefer an option picks it; the log-probability per character is the length normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from finqlora.core.chat_format import render_prompt
from finqlora.evaluate.choice import normalised_score, pick, score_choices

OPTIONS = ["利好", "利空", "中性"]


def _question(text: str, options=OPTIONS) -> tuple[list[dict[str, str]], list[str]]:
    return [{"role": "user", "content": f"判断这条快讯对黄金的影响方向。\n\n{text}"}], list(options)


def _full_forward_logprobs(model, tokenizer, messages, options) -> list[list[float]]:
    """The reference: one uncached forward pass over prompt + option per option."""
    import torch

    prompt = tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)
    result = []
    for option in options:
        ids = tokenizer.encode(option, add_special_tokens=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
        result.append([float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(ids)])
    return result


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from finqlora.models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", progress=False)


def test_length_normalisation_is_per_character_of_the_option() -> None:
    assert normalised_score([-1.0, -2.0, -3.0], "利好黄金") == pytest.approx(-1.5)
    # A one-character option at -1.0 against a four-character one at -3.0 in all:
    short, long = ([-1.0], "涨"), ([-2.0, -0.5, -0.5], "利好黄金")
    assert pick([sum(short[0]), sum(long[0])]) == 0  # the sum favours the shorter option...
    assert pick([normalised_score(*short), normalised_score(*long)]) == 1  # ...per character it does not (-1.0 vs -0.75)
    # Two options of equal text length rank as their probabilities do, however they tokenize:
    # per token, the two-token option's near-certain second token would halve its cost.
    one_token, two_tokens = ([-1.0], "积极"), ([-1.5, -0.01], "中性")
    assert pick([normalised_score(*one_token), normalised_score(*two_tokens)]) == 0
    assert pick([sum(v) / len(v) for v, _ in (one_token, two_tokens)]) == 1  # what the per-token mean picked
    assert pick([-1.0, -1.0, -2.0]) == 0  # a tie goes to the first listed option
    with pytest.raises(ValueError):
        normalised_score([], "积极")


def test_cached_batched_scores_equal_a_plain_forward_pass(tiny) -> None:
    # Prompts of different lengths (padding inside a batch) and options of 1-4 tokens.
    questions = [
        _question("美联储宣布加息25个基点。"),
        _question("美国非农就业数据大幅不及预期，美元指数下跌，市场押注降息。", ["利好黄金", "利空", "无直接关联", "中性"]),
        _question("央行连续第十个月增持黄金。", ["利好", "利空"]),
    ]
    results = score_choices(tiny.model, tiny.tokenizer, questions, batch_size=2)
    for (messages, options), result in zip(questions, results):
        expected = _full_forward_logprobs(tiny.model, tiny.tokenizer, messages, options)
        assert [len(v) for v in result.token_logprobs] == [len(tiny.tokenizer.encode(o, add_special_tokens=False)) for o in options]
        for got, want in zip(result.token_logprobs, expected):
            assert got == pytest.approx(want, abs=1e-4)
        assert result.scores == pytest.approx([sum(v) / len(o) for v, o in zip(expected, options)], abs=1e-4)
        assert result.choice == pick(result.scores)
    # One question alone (no shared prefix with others) gives the same scores.
    alone = score_choices(tiny.model, tiny.tokenizer, questions[1:2])
    assert alone[0].scores == pytest.approx(results[1].scores, abs=1e-4)


def test_a_model_taught_to_prefer_an_option_picks_it(tiny_model_dir: Path) -> None:
    """Teach a fresh tiny model to answer 利空 to a prompt, then score the three options."""
    import torch

    from finqlora.core.chat_format import encode_for_training
    from finqlora.models.loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    messages, _ = _question("美联储官员暗示将继续加息，美元走强。")
    # Before: whatever the random model prefers; record it so the test shows the change.
    before = score_choices(model, tokenizer, [(messages, OPTIONS)])[0]
    example = encode_for_training(tokenizer, {"messages": [*messages, {"role": "assistant", "content": "利空"}]}, 256)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(30):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    for options in (OPTIONS, ["利空", "中性", "利好"], ["中性", "利好", "利空"]):  # wherever 利空 is listed
        after = score_choices(model, tokenizer, [(messages, options)])[0]
        assert options[after.choice] == "利空", (before.scores, after.scores)
        assert max(after.scores) > before.scores[OPTIONS.index("利空")]


def test_options_without_tokens_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match="have no tokens"):
        score_choices(tiny.model, tiny.tokenizer, [_question("快讯", ["利好", ""])])


def test_an_answer_prefix_joins_the_prompt_and_is_not_scored(tiny) -> None:
    """With `案例类型：` before the options, each option's tokens are scored after prompt + prefix,
    exactly as a plain forward pass over the answer text `prefix + option` gives them."""
    import torch

    from finqlora.dataset.labels import CASE_ANSWER_PREFIX, MARKET_CASES

    messages, options = _question("现货黄金发布后15分钟上涨0.8σ。", MARKET_CASES)
    result = score_choices(tiny.model, tiny.tokenizer, [(messages, options)], answer_prefixes=[CASE_ANSWER_PREFIX])[0]
    prompt = tiny.tokenizer.encode(render_prompt(tiny.tokenizer, messages), add_special_tokens=False)
    prefix = tiny.tokenizer.encode(CASE_ANSWER_PREFIX, add_special_tokens=False)
    for option, got in zip(options, result.token_logprobs):
        answer = tiny.tokenizer.encode(CASE_ANSWER_PREFIX + option, add_special_tokens=False)
        assert answer[: len(prefix)] == prefix
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny.model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
        start = len(prompt) + len(prefix)
        want = [float(logprobs[start - 1 + t, token]) for t, token in enumerate(answer[len(prefix):])]
        assert got == pytest.approx(want, abs=1e-4)
    # No prefix: the same options scored right after the prompt differ (the prefix is really used).
    bare = score_choices(tiny.model, tiny.tokenizer, [(messages, options)])[0]
    assert bare.token_logprobs != result.token_logprobs
