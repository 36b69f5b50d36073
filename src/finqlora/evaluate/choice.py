"""Choice scoring: which of a task's closed options does the model find most likely?

For an item with options (e.g. 积极 / 中性 / 消极), each option is scored as the complete
assistant answer under the same chat template as generation and training: the prompt is
`render_prompt(tokenizer, messages)` (generation prompt included) and the option's tokens
are `tokenizer.encode(option)` right after it, exactly how `encode_for_training` joins a
prompt and its answer.

**Score = log-probability of the option per character of its text** (natural log, the
option's tokens only): `score(o) = (1 / chars(o)) * sum_t log p(o_t | prompt, o_<t)`, the
length normalisation of lm-evaluation-harness's `acc_norm` (it divides by bytes). The plain
sum favours shorter options (every token multiplies in a probability below 1). Dividing by
the number of *tokens* instead is biased the other way: an option whose later tokens are
near-certain once its first is chosen (中 -> 性) has its first token's cost halved. Measured on
600 held-out FinFE items (docs/quality.md): a fine-tuned Qwen 0.5B picked the two-token 中性
for 328 items under the per-token mean against 170 under the per-character score, whose
options (积极/中性/消极, two characters each) then rank exactly as their probabilities do. The
template's end-of-turn marker is not scored: whether a model stops after the word is format
adherence, which the generated answers' parse rate measures, not what it believes.
The predicted option is the one with the highest score (ties: the first listed).

Speed (benchmarks/choice_scoring.py): the token prefix that every prompt of a call shares
(system prompt + instruction of a benchmark) is run once and its key/value cache reused;
each batch of items then runs only its own remaining prompt tokens (left-padded behind the
shared prefix, positions kept contiguous), and every item's options run together on a copy
of that item's cache. Options of one token need no second pass at all: their log-probability
is read off the prompt's last position. Prompts longer than `max_prompt_tokens` lose their
middle (the start holds the instruction, the end the generation prompt), as in training.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finqlora.core.chat_format import render_prompt


@dataclass(frozen=True)
class ChoiceResult:
    """Per-option token log-probabilities and the mean-per-token scores of one item."""

    token_logprobs: list[list[float]]
    scores: list[float]
    choice: int


# What a score is; part of the evaluation cache's key, so scores cached under another rule are redone.
NORMALISATION = "log-probability per character of the option"


def normalised_score(token_logprobs: Sequence[float], option: str) -> float:
    """Log-probability per character of the option's text (see the module docstring for why)."""
    if not token_logprobs:
        raise ValueError("an option must have at least one token")
    return sum(token_logprobs) / max(len(option.strip()), 1)


def pick(scores: Sequence[float]) -> int:
    """Index of the best score; the first listed option wins a tie."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _cache_argument(model: Any) -> str:
    """transformers 5 names the key/value cache `cache`; 4.x called it `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    return output["cache"] if output.get("cache") is not None else output["past_key_values"]


def _trim_middle(ids: list[int], limit: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1  # every prompt keeps at least one own token
    for position in range(max(length, 0)):
        if any(s[position] != first[position] for s in sequences):
            return position
    return max(length, 0)


def _prefix_and_options(tokenizer: Any, prefix: str, options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prefix's tokens and each option's own tokens, cut from the tokens of `prefix + option`
    (the answer is encoded as one text in training, so the option is tokenized in that context)."""
    if not prefix:
        return [], [tokenizer.encode(option, add_special_tokens=False) for option in options]
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    option_ids = []
    for option in options:
        joint = tokenizer.encode(prefix + option, add_special_tokens=False)
        if joint[: len(prefix_ids)] != prefix_ids:
            raise ValueError(f"the answer prefix {prefix!r} is tokenized differently before the option {option!r}")
        option_ids.append(joint[len(prefix_ids):])
    return prefix_ids, option_ids


def score_choices(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[Sequence[dict[str, str]], Sequence[str]]],
    *,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    answer_prefixes: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ChoiceResult]:
    """Score every `(messages, options)` question; results in input order.

    `answer_prefixes` (one per question, "" for none): the fixed words a trained answer opens
    with before its label (`案例类型：`); they join the prompt, unscored, so each option is scored
    where the answer format puts it.
    """
    import torch

    prefixes = list(answer_prefixes) if answer_prefixes is not None else [""] * len(questions)
    prompts, options = [], []
    for (messages, opts), prefix in zip(questions, prefixes):
        prefix_ids, option_ids = _prefix_and_options(tokenizer, prefix, opts)
        prompts.append(_trim_middle(tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False), max_prompt_tokens) + prefix_ids)
        options.append(option_ids)
    for opts, (_, texts) in zip(options, questions):
        empty = [text for text, ids in zip(texts, opts) if not ids]
        if empty:
            raise ValueError(f"options {empty!r} have no tokens")
    if not questions:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shared = _common_prefix_length(prompts)
            cache_argument = _cache_argument(model)
            prefix_cache = None
            if shared:
                prefix_cache = _returned_cache(model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1))
            # Items of similar length share a batch (less padding); order is restored at the end.
            order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
            results: dict[int, ChoiceResult] = {}
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                suffixes, batch_options = [prompts[i][shared:] for i in batch], [options[i] for i in batch]
                logprobs = _score_batch(model, cache_argument, suffixes, batch_options, shared, prefix_cache, device)
                for index, token_logprobs in zip(batch, logprobs):
                    scores = [normalised_score(values, text) for values, text in zip(token_logprobs, questions[index][1])]
                    results[index] = ChoiceResult(token_logprobs, scores, pick(scores))
                if progress:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(questions))]


def _score_batch(model: Any, cache_argument: str, suffixes: list[list[int]], options: list[list[list[int]]], shared: int, prefix_cache: Any, device: Any) -> list[list[list[float]]]:
    """Token log-probabilities of every option of every item: one pass over the batch's own
    prompt tokens, then one over all of its multi-token options."""
    import torch

    rows, width = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.zeros((rows, width), dtype=torch.long)
    own_mask = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.full((rows, width), shared, dtype=torch.long)
    for row, suffix in enumerate(suffixes):  # left padding: every row's last token is its prompt's end
        pad = width - len(suffix)
        ids[row, pad:] = torch.tensor(suffix)
        own_mask[row, pad:] = 1
        positions[row, pad:] = torch.arange(shared, shared + len(suffix))
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(rows)
    mask = torch.cat([torch.ones((rows, shared), dtype=torch.long), own_mask], dim=1)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1, **{cache_argument: cache})
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
    logprobs = [[[float(first[row, opt[0]])] for opt in item_options] for row, item_options in enumerate(options)]
    if any(len(opt) > 1 for item_options in options for opt in item_options):
        _score_option_tails(model, cache_argument, _returned_cache(out), mask, [len(s) for s in suffixes], shared, options, logprobs, device)
    return logprobs


def _score_option_tails(
    model: Any, cache_argument: str, cache: Any, mask: Any, lengths: list[int], shared: int, options: list[list[list[int]]],
    logprobs: list[list[list[float]]], device: Any,
) -> None:
    """Log-probabilities of the 2nd..last token of every multi-token option (all in one pass)."""
    import torch

    # One cache row per (item, option) pair that has a token after its first.
    pairs = [(row, index, opt) for row, item_options in enumerate(options) for index, opt in enumerate(item_options) if len(opt) > 1]
    cache.batch_select_indices(torch.tensor([row for row, _, _ in pairs], device=device))
    steps = max(len(opt) for _, _, opt in pairs) - 1  # the last token of an option is predicted, never fed
    ids = torch.zeros((len(pairs), steps), dtype=torch.long)
    tail_mask = torch.zeros((len(pairs), steps), dtype=torch.long)
    positions = torch.zeros((len(pairs), steps), dtype=torch.long)
    for pair, (row, _, opt) in enumerate(pairs):
        fed = opt[:-1]
        ids[pair, : len(fed)] = torch.tensor(fed, dtype=torch.long)
        tail_mask[pair, : len(fed)] = 1
        positions[pair] = torch.arange(shared + lengths[row], shared + lengths[row] + steps)
    full_mask = torch.cat([mask[torch.tensor([row for row, _, _ in pairs])], tail_mask], dim=1)
    logits = model(input_ids=ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
                   use_cache=False, **{cache_argument: cache}).logits.float()
    step_logprobs = torch.log_softmax(logits, dim=-1)
    for pair, (row, index, opt) in enumerate(pairs):
        logprobs[row][index].extend(float(step_logprobs[pair, t - 1, opt[t]]) for t in range(1, len(opt)))
