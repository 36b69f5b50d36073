"""Metrics for before/after evaluation: the field's libraries where one does the job.

Conventions (also in docs/evaluation.md):

* Classification: a prediction of `None` (answer not parseable) counts as wrong. Per-class
  scores and macro-F1 are scikit-learn's (`precision_recall_fscore_support`, `f1_score`,
  `zero_division=0`): macro-F1 averages the per-class F1 over the classes given (default: the
  classes in the reference labels); a class never predicted has precision 0 (not undefined).
* MCC: scikit-learn's multiclass Matthews correlation (`matthews_corrcoef`), for news
  directions, where accuracy rewards guessing the majority class and MCC gives it 0.
* Baselines: *majority* always predicts the most frequent class of the reference labels of a
  training split when one is given, else of the test labels (an optimistic baseline);
  *random* is the expected score of guessing uniformly among the classes.
* Numbers: a numeric answer is correct when `|pred - answer| <= tolerance` in the reference
  unit (the builder writes each question's tolerance into its label).
* Text overlap: ROUGE-L tokenizes with `overlap_tokens`: each CJK character is one token
  (Chinese has no spaces and word segmenters disagree; character level is what sacreBLEU's
  `zh` tokenizer and most Chinese ROUGE reports use), runs of Latin letters are words,
  numbers (with decimals) are one token, and each punctuation mark is a token. ROUGE-L is
  the LCS F1 (beta = 1) averaged over samples. Repetition rate: the share of an answer's
  4-grams of those tokens that repeat an earlier 4-gram, averaged over answers. BLEU is sacreBLEU's corpus BLEU-4
  (`tokenize="zh"`, "exp" smoothing, 0-100), cited in the report by its signature.
* Perplexity: exp(total negative log-likelihood / total answer tokens), over the answer
  tokens only (the prompt is context), with the same prompt format as training.
* Uncertainty: `finqlora.core.statistics` (the project's one bootstrap): percentile bootstrap
  (1,000 resamples of test items, fixed seed) for every metric, paired for the difference
  fine-tuned - base (the same resamples for both). McNemar's test compares paired correctness:
  scipy's exact binomial test on the discordant pairs, and the chi-squared version with
  continuity correction (scipy's chi-squared survival function).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from finqlora.core.statistics import class_codes

# ---------------------------------------------------------------------------------------------
# Classification


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        return float("nan")
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def per_class_f1(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> dict[Any, dict[str, float]]:
    """Precision, recall, F1 and support per class (zero when undefined): scikit-learn's
    `precision_recall_fscore_support(zero_division=0)`."""
    from sklearn.metrics import precision_recall_fscore_support

    if not labels:
        return {}
    true_codes, pred_codes, _ = class_codes(y_true, y_pred, labels)
    precision, recall, f1, support = precision_recall_fscore_support(true_codes, pred_codes, labels=range(len(labels)), zero_division=0)
    return {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)}


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """scikit-learn's `f1_score(average="macro", zero_division=0)` over `labels` (default: the
    reference classes); NaN with no items."""
    from sklearn.metrics import f1_score

    if not y_true:
        return float("nan")
    labels = list(labels) if labels is not None else sorted(set(y_true), key=str)
    true_codes, pred_codes, _ = class_codes(y_true, y_pred, labels)
    return float(f1_score(true_codes, pred_codes, labels=range(len(labels)), average="macro", zero_division=0))


def mcc(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Matthews correlation coefficient, multiclass: scikit-learn's `matthews_corrcoef` (0 when
    either side is constant, 1 for perfect agreement); NaN with no items. An unparsed
    prediction (`None`) is a class of its own, so it can never agree with a label."""
    from sklearn.metrics import matthews_corrcoef

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        return float("nan")
    true_codes, pred_codes, n_codes = class_codes(y_true, y_pred)
    if n_codes == 1:
        return 0.0  # both sides one and the same constant (scikit-learn says 0 too, with a warning)
    return float(matthews_corrcoef(true_codes, pred_codes))


UNPARSED = "(unparsed)"


def confusion_matrix(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Rows = reference class, columns = predicted class plus an "(unparsed)" column."""
    columns = list(labels) + [UNPARSED]
    matrix = [[0] * len(columns) for _ in labels]
    index = {label: i for i, label in enumerate(labels)}
    for t, p in zip(y_true, y_pred):
        if t not in index:
            continue
        column = index[p] if p in index else len(labels)
        matrix[index[t]][column] += 1
    return {"labels": list(labels), "columns": columns, "matrix": matrix}


def majority_baseline(y_true: Sequence[Any], labels: Sequence[Any], train_labels: Sequence[Any] | None = None) -> dict[str, Any]:
    source = list(train_labels) if train_labels else list(y_true)
    counts = Counter(source)
    # Ties broken by the order of `labels` so the baseline is deterministic.
    majority = max(labels, key=lambda label: (counts.get(label, 0), -list(labels).index(label)))
    predictions = [majority] * len(y_true)
    return {
        "class": majority,
        "from": "train" if train_labels else "test",
        "accuracy": accuracy(y_true, predictions),
        "macro_f1": macro_f1(y_true, predictions, labels),
        "mcc": mcc(y_true, predictions),  # 0: a constant guess carries no information
    }


def random_baseline(y_true: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Expected accuracy and macro-F1 of guessing uniformly among `labels`.

    For class c with test share p_c and k classes: expected precision p_c, recall 1/k,
    F1 = 2 p_c / (k p_c + 1); accuracy = 1/k.
    """
    k = len(labels)
    n = len(y_true)
    shares = [sum(t == label for t in y_true) / n if n else 0.0 for label in labels]
    f1s = [2 * p / (k * p + 1) if p else 0.0 for p in shares]
    return {"accuracy": 1 / k, "macro_f1": sum(f1s) / k}


# ---------------------------------------------------------------------------------------------
# Numbers


def numeric_correct(predicted: float | None, answer: float, tolerance: float) -> bool:
    return predicted is not None and math.isfinite(predicted) and abs(predicted - answer) <= tolerance + 1e-12


# ---------------------------------------------------------------------------------------------
# Text overlap

_TOKEN = re.compile(
    r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]"  # one CJK character
    r"|[A-Za-z]+(?:'[A-Za-z]+)?"  # a Latin word
    r"|\d+(?:[.,]\d+)*"  # a number
    r"|[^\s\w]",  # a punctuation mark
)


def overlap_tokens(text: str) -> list[str]:
    """Character-level for CJK, word-level for Latin script; see the module docstring."""
    return _TOKEN.findall(text or "")


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of one candidate against one reference (0-1)."""
    cand, ref = overlap_tokens(candidate), overlap_tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# Repetition: a looping answer ("解读：……解读：……") repeats its n-grams. Four tokens (four CJK
# characters) are short enough to catch a repeated phrase and long enough that ordinary Chinese
# rarely repeats one by chance.
REPETITION_NGRAM = 4


def repetition_rate(text: str, n: int = REPETITION_NGRAM) -> float:
    """Share of the text's n-grams (`overlap_tokens`) that repeat an earlier n-gram (0-1).

    0 = no n-gram occurs twice; "甲乙丙丁" * 3 (n = 4) has 9 n-grams, 4 distinct: 5/9. A text
    of fewer than n tokens has no n-grams and rate 0.
    """
    tokens = overlap_tokens(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# BLEU is sacreBLEU's (Post, 2018): its `zh` tokenizer (each CJK character a token, other text
# by the 13a rules), corpus BLEU-4 with "exp" smoothing. Per-sentence sufficient statistics
# come from sacreBLEU too, so the bootstrap resamples sentences without re-tokenizing.
BLEU_TOKENIZE = "zh"


def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=BLEU_TOKENIZE)


def bleu_signature() -> str:
    """sacreBLEU's signature of the BLEU the report shows (cite it with the number)."""
    bleu = _bleu()
    bleu.corpus_score(["-"], [["-"]])  # the signature names the reference count, known after a score
    return str(bleu.get_signature())


def bleu_statistics(candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """One row per sentence: [candidate length, reference length, matches 1-4, totals 1-4]."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return np.zeros((0, 10), dtype=np.int64)
    # sacreBLEU's own per-sentence statistics (the same ones its corpus_score sums).
    return np.array(_bleu()._extract_corpus_statistics(list(candidates), [list(references)]), dtype=np.int64)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) of the sentences whose statistics rows are given."""
    from sacrebleu.metrics import BLEU

    if len(stats) == 0:
        return float("nan")
    total = stats.sum(axis=0)
    order = (len(total) - 2) // 2
    return float(BLEU.compute_bleu(list(total[2 : 2 + order]), list(total[2 + order :]), int(total[0]), int(total[1]), smooth_method="exp").score)


def corpus_bleu(candidates: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU's corpus BLEU (0-100), one reference per candidate."""
    return float(_bleu().corpus_score(list(candidates), [list(references)]).score)


# ---------------------------------------------------------------------------------------------
# Perplexity


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(sum of negative log-likelihoods / sum of tokens)."""
    tokens = sum(token_counts)
    if tokens == 0:
        return float("nan")
    return math.exp(sum(nll_sums) / tokens)


# Upper bound on one forward's logits in token_nll (see there); about 3 rows of 512 tokens for Qwen.
NLL_LOGITS_BUDGET_BYTES = 1 << 30


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 1) or 1)


def token_nll(
    model: Any,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(negative log-likelihood sum, scored token count) of each `(input_ids, labels)` pair.

    Labels of -100 are context, not scored; every other label is predicted from the tokens
    before it (the usual one-position shift of causal language models).
    """
    import torch

    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (input_ids, row_labels) in enumerate(batch):  # right padding keeps positions 0..n-1
                n = len(input_ids)
                ids[row, :n] = torch.tensor(list(input_ids))
                labels[row, :n] = torch.tensor(list(row_labels))
                mask[row, :n] = 1
            shifted_labels = labels[:, 1:].to(device)
            losses = torch.zeros((len(batch), width - 1))
            # The logits of a 150k-token vocabulary are the largest tensor here (8 rows x 512 tokens
            # of Qwen = 2.5 GB in fp32, and the loss needs as much again): the forward runs in
            # slices of rows whose logits fit NLL_LOGITS_BUDGET_BYTES, each row's loss on its own.
            rows_per_pass = max(1, NLL_LOGITS_BUDGET_BYTES // (width * _vocab_size(model) * 4))
            for first in range(0, len(batch), rows_per_pass):
                part = slice(first, first + rows_per_pass)
                with torch.no_grad():
                    logits = model(input_ids=ids[part].to(device), attention_mask=mask[part].to(device)).logits
                for offset in range(logits.shape[0]):
                    losses[first + offset] = torch.nn.functional.cross_entropy(
                        logits[offset, :-1, :].float(), shifted_labels[first + offset], ignore_index=-100, reduction="none"
                    ).cpu()
                del logits
            counted = (shifted_labels != -100).sum(dim=1)
            results.extend((float(losses[row].sum()), int(counted[row])) for row in range(len(batch)))
            if progress:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results


def answer_nll(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], *, max_length: int = 1024, **kwargs: Any) -> list[tuple[float, int]]:
    """NLL of each record's reference answer given its prompt.

    Tokens and the -100 prompt mask come from `chat_format.encode_for_training`, so the
    model is scored on exactly the text fine-tuning taught it (answer + end-of-turn marker).
    """
    from finqlora.core.chat_format import encode_for_training

    encoded = [encode_for_training(tokenizer, record, max_length) for record in records]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_nll(model, [(e.input_ids, e.labels) for e in encoded], pad_id=pad_id, **kwargs)


def text_nll(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512, **kwargs: Any) -> list[tuple[float, int]]:
    """NLL of plain texts (language-model perplexity, no chat template): every token but the
    first is scored."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        examples.append((ids, ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_nll(model, examples, pad_id=pad_id, **kwargs)


# ---------------------------------------------------------------------------------------------
# Uncertainty


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of correctness: b = only base right, c = only fine-tuned right."""

    both_correct: int
    base_only: int
    finetuned_only: int
    both_wrong: int
    p_exact: float
    chi2_corrected: float
    p_corrected: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar(base_only: int, finetuned_only: int, both_correct: int = 0, both_wrong: int = 0) -> McNemarResult:
    """McNemar's test on the discordant counts b (base only) and c (fine-tuned only).

    Exact: scipy's two-sided binomial test of b against Binomial(b + c, 1/2). Corrected:
    chi2 = (|b - c| - 1)^2 / (b + c) with 1 degree of freedom (statsmodels' `mcnemar(exact=False)`).
    With no discordant pairs both p-values are 1.
    """
    from scipy.stats import binomtest, chi2

    b, c = base_only, finetuned_only
    n = b + c
    if n == 0:
        return McNemarResult(both_correct, b, c, both_wrong, 1.0, 0.0, 1.0)
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemarResult(both_correct, b, c, both_wrong, float(binomtest(b, n, 0.5).pvalue), statistic, float(chi2.sf(statistic, 1)))


def mcnemar_paired(base_correct: Sequence[bool], finetuned_correct: Sequence[bool]) -> McNemarResult:
    if len(base_correct) != len(finetuned_correct):
        raise ValueError("paired test needs the same items for both models")
    pairs = Counter(zip(map(bool, base_correct), map(bool, finetuned_correct)))
    return mcnemar(pairs[(True, False)], pairs[(False, True)], pairs[(True, True)], pairs[(False, False)])
