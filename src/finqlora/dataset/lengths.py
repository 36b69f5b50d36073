"""Token-aware lengths: count a record as training sees it and trim over-long news to fit.

`trim_drafts` keeps every output whole and cuts the news text from its end (marking the cut
with `TRIM_MARK`); a report_qa draft switches to its compact statement instead."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from finqlora.core.chat_format import assistant_turn_suffix, render_prompt
from finqlora.core.records import user_content
from finqlora.dataset.drafts import Draft

# Rough length estimate when no tokenizer is given: 1 token per CJK character (true to within
# ~30% for Qwen-style vocabularies, an underestimate for English-only vocabularies) and one
# per 3.5 other characters, plus the chat template's overhead.
CJK_TOKENS_PER_CHAR = 1.0
OTHER_CHARS_PER_TOKEN = 3.5
ESTIMATED_TEMPLATE_OVERHEAD = 16
TRIM_MARK = "……（原文过长，已截断）"


class LengthCounter:
    """Tokens of a record as training sees it: prompt (chat template) + answer + end marker.

    With a tokenizer, prompt and answer are tokenized separately (batched) and the template's
    fixed overhead is measured once, which matches `chat_format.encode_for_training` to within
    a token or two at the seams; records near the limit are re-checked exactly when trimmed.
    Without one, `CJK_TOKENS_PER_CHAR`/`OTHER_CHARS_PER_TOKEN` estimate the count.
    """

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.overhead = ESTIMATED_TEMPLATE_OVERHEAD
            self.name = f"estimate ({CJK_TOKENS_PER_CHAR:g} token per CJK character, {OTHER_CHARS_PER_TOKEN:g} other characters per token)"
            return
        probe = "FINQLORA_LENGTH_PROBE"
        prompt = tokenizer.encode(render_prompt(tokenizer, [{"role": "user", "content": probe}]), add_special_tokens=False)
        self.suffix = assistant_turn_suffix(tokenizer)
        self.overhead = len(prompt) - len(tokenizer.encode(probe, add_special_tokens=False)) + len(
            tokenizer.encode(self.suffix, add_special_tokens=False)
        )
        self.name = getattr(tokenizer, "name_or_path", "tokenizer")

    def _estimate(self, text: str) -> int:
        cjk = len(re.findall(r"[\u3000-\u9fff\uff00-\uffef]", text))
        return math.ceil(cjk * CJK_TOKENS_PER_CHAR + (len(text) - cjk) / OTHER_CHARS_PER_TOKEN)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:  # fast tokenizers fail on an empty batch
            return []
        if self.tokenizer is None:
            return [self._estimate(t) for t in texts]
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def record_lengths(self, drafts: Sequence[Draft]) -> list[tuple[int, int]]:
        """(prompt tokens incl. template, answer tokens incl. end marker) per draft."""
        prompts = self.count_many([user_content(d.instruction, d.input) for d in drafts])
        answers = self.count_many([d.output for d in drafts])
        return [(p + self.overhead, a) for p, a in zip(prompts, answers)]

    def exact_total(self, draft: Draft) -> int:
        if self.tokenizer is None:
            prompt, answer = self.record_lengths([draft])[0]
            return prompt + answer
        prompt = render_prompt(self.tokenizer, [{"role": "user", "content": user_content(draft.instruction, draft.input)}])
        return len(self.tokenizer.encode(prompt, add_special_tokens=False)) + len(
            self.tokenizer.encode(draft.output + self.suffix, add_special_tokens=False)
        )


def load_length_counter(spec: str | None) -> LengthCounter:
    if spec is None:
        return LengthCounter(None)
    from finqlora.models.loading import load_tokenizer

    return LengthCounter(load_tokenizer(spec))


def trim_drafts(drafts: list[Draft], counter: LengthCounter, max_length: int) -> tuple[list[Draft], int, int]:
    """Fit every draft into max_length tokens by cutting its news text from the end (output kept).

    report_qa drafts switch to their compact statement instead. Returns (kept drafts,
    number trimmed, number dropped because even a minimal input does not fit).
    """
    lengths = counter.record_lengths(drafts)
    kept: list[Draft] = []
    trimmed = dropped = 0
    for draft, (prompt, answer) in zip(drafts, lengths):
        if prompt + answer <= max_length:
            kept.append(draft)
            continue
        fitted = _fit(draft, counter, max_length)
        if fitted is None:
            dropped += 1
        else:
            trimmed += 1
            kept.append(fitted)
    return kept, trimmed, dropped


def _fit(draft: Draft, counter: LengthCounter, max_length: int) -> Draft | None:
    if draft.compact_input is not None:
        compact = replace(draft, input_prefix=draft.compact_input, news="", input_suffix="", compact_input=None)
        return compact if counter.exact_total(compact) <= max_length else None
    if not draft.news:
        return None
    low, high, best = 0, len(draft.news) - 1, None
    while low <= high:  # the longest prefix of the news that fits
        mid = (low + high) // 2
        candidate = replace(draft, news=draft.news[:mid] + TRIM_MARK)
        if counter.exact_total(candidate) <= max_length:
            best, low = candidate, mid + 1
        else:
            high = mid - 1
    # Keep at least a little of the news: an input of only the mark is not a sample.
    return best if best is not None and len(best.news) > len(TRIM_MARK) + 8 else None
