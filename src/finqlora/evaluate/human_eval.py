"""Blind A/B human evaluation: export a sheet, read filled sheets back, score and agree.

`make_sheet` writes two CSV files from an evaluation run's cached generations:

* the sheet (give one copy to each rater): `item, question, answer_A, answer_B, preference,
  comment`; which model is A is drawn at random *per row* (seeded), so a rater cannot learn
  a position;
* the key (keep it away from raters): `item, A, B` naming `base` / `finetuned`.

Raters write `A`, `B` or `tie` (also accepted: `a`/`b`, `平`, `相同`, `=`, `same`, `equal`)
in `preference`. `score_sheets` decodes every sheet with the key into fine-tuned
win / tie / loss and measures agreement: Cohen's kappa for each pair of raters and Fleiss'
kappa over all raters, on the items every rater filled in. The CSVs are UTF-8 with a BOM so
that Excel shows Chinese text correctly.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_text
from finqlora.core.safe_input import csv_rows

SHEET_COLUMNS = ["item", "question", "answer_A", "answer_B", "preference", "comment"]
KEY_COLUMNS = ["item", "A", "B"]
WIN, TIE, LOSS = "win", "tie", "loss"  # from the fine-tuned model's point of view
_TIE_WORDS = {"tie", "平", "相同", "=", "same", "equal", "平局", "一样"}


def _csv_text(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return "\ufeff" + buffer.getvalue()


def make_sheet(
    items: Sequence[dict[str, str]],
    sheet_path: str | Path,
    key_path: str | Path,
    *,
    seed: int = 0,
    limit: int | None = None,
) -> int:
    """Write the blind sheet and its key from items `{id, question, base, finetuned}`."""
    if Path(sheet_path).resolve() == Path(key_path).resolve():
        raise FinqloraError("the sheet and the key must be different files (raters must not see the key)")
    rng = random.Random(seed)
    chosen = list(items)
    if limit is not None and limit < len(chosen):
        chosen = sorted(rng.sample(chosen, limit), key=lambda item: str(item["id"]))
    sheet_rows, key_rows = [], []
    for item in chosen:
        base_first = rng.random() < 0.5
        a, b = ("base", "finetuned") if base_first else ("finetuned", "base")
        sheet_rows.append([item["id"], item["question"], item[a], item[b], "", ""])
        key_rows.append([item["id"], a, b])
    atomic_write_text(sheet_path, _csv_text(SHEET_COLUMNS, sheet_rows))
    atomic_write_text(key_path, _csv_text(KEY_COLUMNS, key_rows))
    return len(sheet_rows)


def _read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.exists():
        raise FinqloraError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Spreadsheet programs may save a sheet in the locale's encoding (GBK on Chinese Windows).
        line = data[: exc.start].count(b"\n") + 1
        raise FinqloraError(f"{path}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x})",
                            hint="save the sheet as 'CSV UTF-8' (or convert it with `iconv -f GB18030 -t UTF-8`)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [row for _line, row in csv_rows(reader, path, hint="fix that line of the sheet")]
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise FinqloraError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(reader.fieldnames or [])})",
            hint="use the sheet written by `finqlora eval human-sheet` without renaming its columns",
        )
    return rows


def _decode(preference: str, key_row: dict[str, str], where: str) -> str | None:
    value = preference.strip()
    if not value:
        return None
    if value.lower() in _TIE_WORDS:
        return TIE
    if value.upper() in ("A", "B"):
        return WIN if key_row[value.upper()] == "finetuned" else LOSS
    raise FinqloraError(f"{where}: preference {value!r} is not A, B or tie", hint="write A, B or tie in the preference column")


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Cohen's kappa of two raters on the same items: scikit-learn's `cohen_kappa_score`. NaN
    with no items; 1 when both raters gave every item the same one category (kappa is 0 / 0
    there, and the raters agree on everything)."""
    from sklearn.metrics import cohen_kappa_score

    if not first:
        return float("nan")
    if len(set(first) | set(second)) == 1:
        return 1.0
    return float(cohen_kappa_score(list(first), list(second)))


def fleiss_kappa(ratings: Sequence[Sequence[str]], categories: Sequence[str] = (WIN, TIE, LOSS)) -> float:
    """Fleiss' kappa; `ratings[i]` holds every rater's category for item i (same count each).

    Fleiss (1971), as statsmodels' `inter_rater.fleiss_kappa` (statsmodels is not a runtime
    dependency for these ten lines; tests/core/test_statistics.py compares the two on random
    tables). 1 where every rating is the same category (statsmodels: 0 / 0)."""
    if not ratings:
        return float("nan")
    raters = len(ratings[0])
    if raters < 2 or any(len(row) != raters for row in ratings):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    n_items = len(ratings)
    table = [[row.count(c) for c in categories] for row in ratings]
    p_items = [(sum(x * x for x in counts) - raters) / (raters * (raters - 1)) for counts in table]
    p_bar = sum(p_items) / n_items
    shares = [sum(counts[j] for counts in table) / (n_items * raters) for j in range(len(categories))]
    p_e = sum(s * s for s in shares)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


@dataclass
class HumanScore:
    raters: list[str]
    per_rater: dict[str, dict[str, float]]
    pooled: dict[str, float]
    judgements: int
    unfilled: dict[str, int]
    cohen: dict[str, float] = field(default_factory=dict)
    fleiss: float | None = None
    items_rated_by_all: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _rates(decisions: Sequence[str]) -> dict[str, float]:
    counts = Counter(decisions)
    n = len(decisions)
    return {
        "n": n,
        **{outcome: counts[outcome] for outcome in (WIN, TIE, LOSS)},
        **{f"{outcome}_rate": (counts[outcome] / n if n else float("nan")) for outcome in (WIN, TIE, LOSS)},
    }


def score_sheets(sheet_paths: Sequence[str | Path], key_path: str | Path) -> HumanScore:
    """Decode filled sheets (one per rater) with the key; rates + agreement."""
    if not sheet_paths:
        raise FinqloraError("no filled sheets given", hint="pass one filled CSV per rater")
    key = {row["item"]: row for row in _read_csv(Path(key_path), KEY_COLUMNS)}
    raters: list[str] = []
    decisions: dict[str, dict[str, str]] = {}
    unfilled: dict[str, int] = {}
    for path in map(Path, sheet_paths):
        rater = path.stem
        if rater in decisions:
            rater = str(path)
        raters.append(rater)
        decisions[rater] = {}
        unfilled[rater] = 0
        for number, row in enumerate(_read_csv(path, ["item", "preference"]), start=2):
            if row["item"] not in key:
                raise FinqloraError(
                    f"{path}: line {number}: item {row['item']!r} is not in the key {key_path}",
                    hint="score a sheet with the key that was written with it",
                )
            decision = _decode(row.get("preference") or "", key[row["item"]], f"{path}: line {number}")
            if decision is None:
                unfilled[rater] += 1
            else:
                decisions[rater][row["item"]] = decision
    if not any(decisions.values()):
        raise FinqloraError("no sheet has any preference filled in", hint="raters write A, B or tie in the preference column")
    per_rater = {rater: _rates(list(decisions[rater].values())) for rater in raters}
    pooled = _rates([d for rater in raters for d in decisions[rater].values()])
    common = sorted(set.intersection(*(set(decisions[r]) for r in raters))) if len(raters) > 1 else []
    score = HumanScore(raters, per_rater, pooled, pooled["n"], unfilled, items_rated_by_all=len(common))
    if len(raters) > 1 and common:
        for first, second in combinations(raters, 2):
            shared = sorted(set(decisions[first]) & set(decisions[second]))
            score.cohen[f"{first} vs {second}"] = cohen_kappa([decisions[first][i] for i in shared], [decisions[second][i] for i in shared])
        score.fleiss = fleiss_kappa([[decisions[r][item] for r in raters] for item in common])
    return score
