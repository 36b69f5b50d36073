"""Micro-batches: samples packed up to a token budget, and the collator of each speed profile.

A packing profile groups whole samples into micro-batches of at most `tokens_per_micro_batch`
tokens (`packed`, made once with the run's seed) and lays each out in padding-free rows
(`PackedCollator`); every other profile pads (`make_data_collator`). The collator follows the
attention the patched model runs (finqlora.train.patches.attention_implementation): varlen and
flash attention take one packed row with the samples' boundaries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.profiles import SpeedProfile
from finqlora.train.data import EncodedDataset
from finqlora.train.patches import VARLEN_ATTENTION


def tokens_per_micro_batch(profile: SpeedProfile, batch_size: int, max_length: int) -> int:
    """Token budget of one packed micro-batch (same worst case as batch_size x max_length at scale 1)."""
    return int(profile.budget_scale) * int(batch_size) * int(max_length)


def pack_by_token_budget(lengths: Sequence[int], token_budget: int, *, seed: int = 0) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `token_budget` tokens.

    Samples are shuffled with `seed` (so the model sees a random mix, as with a plain random
    sampler) and then placed first-fit into open micro-batches, which fills them to ~95%+ when
    samples are short compared to the budget. The result depends only on (lengths, budget,
    seed): a resumed run gets the same micro-batches. Call it once per epoch with seed+epoch.
    """
    if token_budget < 1:
        raise FinqloraError(f"token budget must be positive, got {token_budget}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        index, length = too_long[0]
        raise FinqloraError(
            f"sample {index} has {length} tokens, more than the micro-batch token budget of {token_budget}",
            hint="samples are trimmed to max_length when tokenized; raise batch_size or max_length so that "
            "batch_size x max_length >= max_length, or trim the dataset",
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        need = int(lengths[index])
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(index)
                room[b] -= need
                break
        else:
            bins.append([index])
            room.append(token_budget - need)
    return bins


def packed(data: EncodedDataset, token_budget: int, seed: int) -> EncodedDataset:
    """Micro-batches of whole samples up to `token_budget` tokens (made once, seeded, so a resumed run sees the same)."""
    packs = pack_by_token_budget([len(e["input_ids"]) for e in data.examples], token_budget, seed=seed)
    return EncodedDataset([{"pack": [data.examples[i] for i in pack]} for pack in packs])


class PackedCollator:
    """Lays samples (or packs of samples) out in padding-free rows with per-sample positions.

    A feature is a sample `{"input_ids": [...], "labels": [...]}` or a pack `{"pack": [sample,
    ...]}` from `pack_by_token_budget`. With `rows=1` every sample of the micro-batch goes into
    one row; with `rows=k` they are spread over k rows of similar length (longest first into the
    shortest row), and shorter rows are topped up with a padding segment that is its own
    sequence and carries no labels. The flattening itself is transformers'
    `DataCollatorWithFlattening`: `position_ids` restart at 0 for each sample and the first label
    of each sample is -100, so no sample predicts the next one's first token. The batch also
    carries `use_cache=False`, without which the attention would not be confined to each sample.
    """

    def __init__(self, rows: int = 1, return_flash_attn_kwargs: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.rows = max(int(rows), 1)
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, return_flash_attn_kwargs=return_flash_attn_kwargs and self.rows == 1
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        for feature in features:
            for sample in feature["pack"] if "pack" in feature else [feature]:
                samples.append({"input_ids": list(sample["input_ids"]), "labels": list(sample["labels"])})
        if not samples:
            raise FinqloraError("empty micro-batch", hint="the dataset has no samples for this step")
        if self.rows == 1 or len(samples) == 1:
            batch = self._flatten(samples, return_tensors="pt")
        else:
            batch = self._stack_rows([self._flatten(row, return_tensors="pt") for row in self._balance(samples)])
        # transformers detects packed samples from restarting position ids only when no KV cache
        # exists; a model that builds one (use_cache=True, the default of most configs outside
        # gradient checkpointing) would silently let samples attend to each other.
        batch["use_cache"] = False
        return batch

    def _balance(self, samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        rows: list[list[dict[str, Any]]] = [[] for _ in range(min(self.rows, len(samples)))]
        sizes = [0] * len(rows)
        for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
            target = sizes.index(min(sizes))
            rows[target].append(sample)
            sizes[target] += len(sample["input_ids"])
        return rows

    @staticmethod
    def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(row["input_ids"].shape[1] for row in rows)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = width - row["input_ids"].shape[1]
            out["input_ids"].append(torch.nn.functional.pad(row["input_ids"], (0, pad), value=0))
            out["labels"].append(torch.nn.functional.pad(row["labels"], (0, pad), value=-100))
            # The padding is a sequence of its own (positions restart at 0), so no sample sees it.
            positions = torch.arange(pad, dtype=row["position_ids"].dtype).unsqueeze(0)
            out["position_ids"].append(torch.cat([row["position_ids"], positions], dim=1))
        return {key: torch.cat(value, dim=0) for key, value in out.items()}


def make_data_collator(tokenizer: Any, profile: SpeedProfile, *, attn_implementation: str | None = None) -> Callable:
    """The collator for `profile`: padding-free packing, or dynamic padding with -100 labels.

    Pass the model's `attention_implementation(model)`: varlen and flash attention take one
    packed row with sample boundaries (`cu_seq_lens_*`) instead of several masked rows.
    """
    if profile.packing:
        if attn_implementation == VARLEN_ATTENTION or "flash" in (attn_implementation or ""):
            return PackedCollator(rows=1, return_flash_attn_kwargs=True)
        return PackedCollator(rows=profile.pack_rows)
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise FinqloraError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token, so batches cannot be padded",
            hint="set tokenizer.pad_token = tokenizer.eos_token before building the collator, or use a packing profile",
        )
    collate = DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=-100,
        pad_to_multiple_of=profile.pad_to_multiple_of,
        return_tensors="pt",
    )
    return RightPaddingWithoutMask(collate) if profile.drop_right_padding_mask else collate


class RightPaddingWithoutMask:
    """Drops the attention mask of batches whose padding is all on the right, with unlabelled pads.

    A causal model's real tokens then see exactly what they saw with the mask (every pad comes
    after them), positions are the same (0, 1, ... per row either way), and the pads' own outputs
    carry no label. Without a mask, sdpa runs flash attention (causal) where the GPU has it, and
    transformers builds no 4-D mask. Any other batch keeps its mask.
    """

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        if right_padded_without_labels(batch.get("attention_mask"), batch.get("labels")):
            del batch["attention_mask"]
        return batch


def right_padded_without_labels(mask: Any, labels: Any) -> bool:
    """Every row is real tokens then pads (mask 1...1 0...0) and no pad has a label."""
    if mask is None or labels is None or mask.dim() != 2 or labels.shape != mask.shape:
        return False
    starts_real = bool((mask[:, 0] == 1).all())
    never_returns = bool((mask[:, 1:] <= mask[:, :-1]).all())
    return starts_real and never_returns and bool((labels[mask == 0] == -100).all())
