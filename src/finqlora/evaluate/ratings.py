"""Blind A/B rating rounds in the browser: storage and statistics.

A *round* is a fixed set of pairs (one prompt, the base model's answer, the fine-tuned
model's answer) taken from an evaluation folder, and a list of raters, each with a secret
token. Everything lives beside the evaluation:

    EVAL/ratings/ROUND/round.json         the pairs, the raters, their tokens and, per
                                          rater and pair, which model is shown as A
    EVAL/ratings/ROUND/rater-RATER.json   that rater's judgements (rewritten atomically
                                          after each one, so a rater resumes where they
                                          stopped and a crash loses nothing)

EVAL is the evaluation folder the pairs come from (`runs/NAME/eval` of a pipeline run, or the
`--output` of `finqlora eval`), so the rounds sit beside the answers they judge.

A judgement is the better answer (`A`, `B` or `tie`) and, for each answer, 专业性
(professionalism) and 准确性 (accuracy) from 1 to 5. The A/B order is drawn at random per
rater and per pair (seeded), so a rater cannot learn a position and two raters see different
orders. The statistics decode every judgement into win / tie / loss of the fine-tuned model:
the win rate with a Wilson 95% interval and the agreement between raters with the kappas of
`finqlora.evaluate.human_eval` (Cohen's per pair of raters, Fleiss' over all raters, on the
pairs every rater judged).
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, read_jsonl
from finqlora.evaluate.human_eval import LOSS, TIE, WIN, cohen_kappa, fleiss_kappa

RATINGS_DIR = "ratings"
ROUND_FILE = "round.json"
VARIANTS = ("base", "finetuned")
CHOICES = ("A", "B", "tie")
SCORE_FIELDS = ("professional", "accuracy")  # 专业性, 准确性
SCORE_RANGE = range(1, 6)
# Round and rater names become folder and file names: keep them plain so they are never a path.
# \Z, not $: `$` also matches before a final newline, and "r1\n" is not a plain name.
NAME = re.compile(r"^[A-Za-z0-9\u4e00-\u9fff][A-Za-z0-9\u4e00-\u9fff_-]{0,63}\Z")
MAX_RATERS = 100


class RatingFileError(FinqloraError):
    """A round's stored files cannot be read or written (as opposed to a bad judgement): the
    message names the file, which the owner may see and a rater may not."""


class _StoredPair(BaseModel):
    model_config = ConfigDict(strict=True)

    item: str
    question: str
    base: str
    finetuned: str


class _StoredRater(BaseModel):
    model_config = ConfigDict(strict=True)

    token: str = Field(min_length=1)
    a_is: dict[str, Literal["base", "finetuned"]]


class _StoredRound(BaseModel):
    """round.json as `create_round` writes it; what the pages and statistics rely on."""

    model_config = ConfigDict(strict=True)

    name: str
    created_at: str
    eval_dir: str
    seed: int
    pairs: list[_StoredPair]
    raters: dict[str, _StoredRater]


class _StoredScores(BaseModel):
    model_config = ConfigDict(strict=True)

    professional: int
    accuracy: int


class _StoredVariantScores(BaseModel):
    model_config = ConfigDict(strict=True)

    base: _StoredScores
    finetuned: _StoredScores


class _StoredRating(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    choice: Literal["A", "B", "tie"]
    a_is: Literal["base", "finetuned"]
    outcome: str
    scores: _StoredVariantScores


class _StoredRatings(BaseModel):
    """rater-RATER.json as `save_rating` writes it."""

    model_config = ConfigDict(strict=True, extra="allow")

    ratings: dict[str, _StoredRating]


def _check_name(kind: str, name: str) -> str:
    if not NAME.match(name):
        raise FinqloraError(
            f"{kind} name {name!r} is not allowed",
            hint="use letters, digits, Chinese characters, '_' or '-' (at most 64, no spaces or slashes)",
        )
    return name


@dataclass
class RatingRound:
    """One round as stored in round.json (`folder` is where it lives)."""

    folder: Path
    name: str
    created_at: str
    eval_dir: str
    seed: int
    pairs: list[dict[str, str]]  # {item, question, base, finetuned}
    raters: dict[str, dict[str, Any]]  # name -> {token, a_is: {item: "base" | "finetuned"}}
    _pairs_by_item: dict[str, dict[str, str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._pairs_by_item = {pair["item"]: pair for pair in self.pairs}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at, "eval_dir": self.eval_dir, "seed": self.seed,
                "pairs": self.pairs, "raters": self.raters}

    def pair(self, item: str) -> dict[str, str]:
        if item not in self._pairs_by_item:
            raise FinqloraError(f"round {self.name!r} has no pair {item!r}", hint="reload the rating page")
        return self._pairs_by_item[item]

    def rater_file(self, rater: str) -> Path:
        return self.folder / f"rater-{rater}.json"

    def rater_for_token(self, token: str) -> str | None:
        for rater, entry in self.raters.items():
            if secrets.compare_digest(str(entry["token"]).encode(), token.encode()):
                return rater
        return None

    def shown_pairs(self, rater: str) -> list[dict[str, str]]:
        """The pairs as this rater sees them: item, question, answer_A, answer_B (no model names)."""
        order = self.raters[rater]["a_is"]
        shown = []
        for pair in self.pairs:
            a = order[pair["item"]]
            b = "finetuned" if a == "base" else "base"
            shown.append({"item": pair["item"], "question": pair["question"], "answer_A": pair[a], "answer_B": pair[b]})
        return shown


def eval_pairs(eval_dir: Path) -> list[dict[str, str]]:
    """{item, question, base, finetuned} for every item with both cached generations."""
    files = {name: eval_dir / name for name in ("items.jsonl", "generations_base.jsonl", "generations_finetuned.jsonl")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise FinqloraError(
            f"{eval_dir}: missing {', '.join(missing)}",
            hint="rate an evaluation folder written by `finqlora eval` (or `finqlora run`) with both models",
        )
    outputs = {
        variant: {row["id"]: row["output"] for row in read_jsonl(files[f"generations_{variant}.jsonl"], what="generations cache", torn_tail=True)}
        for variant in VARIANTS
    }
    pairs = []
    for item in read_jsonl(files["items.jsonl"], what="evaluation items"):
        if item["id"] in outputs["base"] and item["id"] in outputs["finetuned"]:
            question = "\n\n".join(m["content"] for m in item.get("messages", []) if m.get("role") != "system")
            pairs.append({"item": item["id"], "question": question, "base": outputs["base"][item["id"]],
                          "finetuned": outputs["finetuned"][item["id"]]})
    if not pairs:
        raise FinqloraError(f"{eval_dir}: no item has both a base and a fine-tuned answer", hint="run the evaluation of both models first")
    return pairs


def create_round(
    eval_dir: Path,
    raters: list[str],
    *,
    name: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> RatingRound:
    """Make a new round from an evaluation folder (stored in it); each rater gets a fresh secret token."""
    names = [_check_name("rater", rater.strip()) for rater in raters if rater.strip()]
    if not names:
        raise FinqloraError("a rating round needs at least one rater", hint="give one name per rater, e.g. 张三, 李四")
    if len(set(names)) != len(names):
        raise FinqloraError(f"rater names repeat: {', '.join(names)}", hint="give each rater a different name")
    if len(names) > MAX_RATERS:  # each rater stores an A/B order per pair: bound what one request can make us write
        raise FinqloraError(f"a rating round has at most {MAX_RATERS} raters, not {len(names)}", hint="split the raters over several rounds")
    name = _check_name("round", name or time.strftime("round-%Y%m%d-%H%M%S", time.gmtime()))
    folder = Path(eval_dir) / RATINGS_DIR / name
    if (folder / ROUND_FILE).exists():
        raise FinqloraError(f"rating round {name!r} already exists in {folder}", hint="choose another round name")
    rng = random.Random(seed)
    pairs = eval_pairs(Path(eval_dir))
    if limit is not None and 0 < limit < len(pairs):
        pairs = sorted(rng.sample(pairs, limit), key=lambda pair: pair["item"])
    entries = {
        rater: {"token": secrets.token_urlsafe(24), "a_is": {pair["item"]: rng.choice(VARIANTS) for pair in pairs}}
        for rater in names
    }
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    created = RatingRound(folder, name, stamp, str(Path(eval_dir).resolve()), seed, pairs, entries)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / ROUND_FILE, created.to_json())
    return created


def _read_stored(path: Path, model: type[BaseModel], what: str, hint: str) -> Any:
    """`path` parsed and checked against `model`, or a RatingFileError saying what is wrong."""
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        reason = f"at {where}: {first['msg']}"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except (ValueError, RecursionError) as exc:  # not JSON, nested too deep, a number too long
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    raise RatingFileError(f"{path}: not a readable {what} ({reason})", hint=hint)


def load_round(folder: Path) -> RatingRound:
    """A stored round, checked whole (every field, and an A/B order for every rater and pair),
    so that nothing later fails on a missing key; a RatingFileError otherwise."""
    path = folder / ROUND_FILE
    hint = "round.json is written by finqlora; restore it or delete the round folder"
    data = _read_stored(path, _StoredRound, "rating round", hint)
    for rater in data.raters:  # a rater's name becomes a file name (rater-NAME.json): never a path
        if not NAME.match(rater):
            raise RatingFileError(f"{path}: rater name {rater!r} is not a plain name", hint=hint)
    items = [pair.item for pair in data.pairs]
    for rater, entry in data.raters.items():
        missing = [item for item in items if item not in entry.a_is]
        if missing:
            raise RatingFileError(f"{path}: rater {rater!r} has no A/B order for pair {missing[0]!r} ({len(missing)} pairs)", hint=hint)
    return RatingRound(folder, data.name, data.created_at, data.eval_dir, data.seed, [pair.model_dump() for pair in data.pairs],
                       {rater: entry.model_dump() for rater, entry in data.raters.items()})


def list_rounds(folder: Path, *, on_error: Callable[[RatingFileError], None] | None = None) -> list[RatingRound]:
    """The rounds of an evaluation folder, or of a pipeline run folder (in its `eval/`).

    A round that cannot be read raises, or, with `on_error`, is passed to it and left out (so
    one damaged round does not stop the others from being listed and rated)."""
    rounds = []
    for root in (Path(folder) / RATINGS_DIR, Path(folder) / "eval" / RATINGS_DIR):
        if root.is_dir():
            for sub in sorted(root.iterdir()):
                if not (sub / ROUND_FILE).is_file():
                    continue
                try:
                    rounds.append(load_round(sub))
                except RatingFileError as exc:
                    if on_error is None:
                        raise
                    on_error(exc)
    return rounds


def load_ratings(rating_round: RatingRound, rater: str) -> dict[str, dict[str, Any]]:
    """This rater's judgements by item (empty before the first one)."""
    path = rating_round.rater_file(rater)
    if not path.exists():
        return {}
    stored = _read_stored(path, _StoredRatings, "ratings file", "it is written atomically by finqlora; restore it from a backup")
    return {item: record.model_dump() for item, record in stored.ratings.items()}


def _score(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in SCORE_RANGE:
        raise FinqloraError(f"{where} must be an integer from 1 to 5, got {value!r}", hint="pick a score from 1 (poor) to 5 (excellent)")
    return value


def save_rating(rating_round: RatingRound, rater: str, item: str, choice: str, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Record (or replace) one judgement; `scores` is {"A"|"B": {"professional": 1-5, "accuracy": 1-5}}."""
    if rater not in rating_round.raters:
        raise FinqloraError(f"{rater!r} is not a rater of round {rating_round.name!r}")
    rating_round.pair(item)
    if choice not in CHOICES:
        raise FinqloraError(f"choice {choice!r} is not A, B or tie", hint="pick the better answer, or tie")
    a = rating_round.raters[rater]["a_is"][item]
    models = {"A": a, "B": "finetuned" if a == "base" else "base"}
    decoded: dict[str, dict[str, int]] = {}
    for side in ("A", "B"):
        given = (scores or {}).get(side) or {}
        decoded[models[side]] = {f: _score(given.get(f), f"answer {side}: {f}") for f in SCORE_FIELDS}
    preferred = TIE if choice == "tie" else (WIN if models[choice] == "finetuned" else LOSS)
    record = {"choice": choice, "a_is": a, "outcome": preferred, "scores": decoded, "rated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ratings = load_ratings(rating_round, rater)
    ratings[item] = record
    try:
        atomic_write_json(rating_round.rater_file(rater), {"round": rating_round.name, "rater": rater, "ratings": ratings})
    except OSError as exc:
        raise RatingFileError(f"cannot save the rating in {rating_round.rater_file(rater)}: {exc.strerror or exc}",
                              hint="free some disk space or make the folder writable; the earlier ratings are kept") from None
    return record


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sensible for small n and rates near 0 or 1):
    scipy's `binomtest(...).proportion_ci(method="wilson")`; NaN with no trials."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def summarize_round(rating_round: RatingRound) -> dict[str, Any]:
    """Counts, the fine-tuned model's win rate with its 95% CI, mean scores and the kappas."""
    outcomes: dict[str, dict[str, str]] = {}
    scores: dict[str, dict[str, list[int]]] = {v: {f: [] for f in SCORE_FIELDS} for v in VARIANTS}
    for rater in rating_round.raters:
        judged = load_ratings(rating_round, rater)
        outcomes[rater] = {item: record["outcome"] for item, record in judged.items()}
        for record in judged.values():
            for variant in VARIANTS:
                for f in SCORE_FIELDS:
                    scores[variant][f].append(int(record["scores"][variant][f]))
    pooled = Counter(outcome for by_item in outcomes.values() for outcome in by_item.values())
    n = sum(pooled.values())
    low, high = wilson_interval(pooled[WIN], n)
    active = [rater for rater in rating_round.raters if outcomes[rater]]
    common = sorted(set.intersection(*(set(outcomes[r]) for r in active))) if len(active) > 1 else []
    cohen = {}
    for first, second in combinations(active, 2):
        shared = sorted(set(outcomes[first]) & set(outcomes[second]))
        if shared:
            cohen[f"{first} vs {second}"] = round(cohen_kappa([outcomes[first][i] for i in shared], [outcomes[second][i] for i in shared]), 4)
    fleiss = round(fleiss_kappa([[outcomes[r][item] for r in active] for item in common]), 4) if common else None
    return {
        "round": rating_round.name,
        "created_at": rating_round.created_at,
        "eval_dir": rating_round.eval_dir,
        "raters": len(rating_round.raters),
        "rater_names": list(rating_round.raters),
        "pairs": len(rating_round.pairs),
        "ratings": n,
        "progress": {rater: len(outcomes[rater]) for rater in rating_round.raters},
        "wins": pooled[WIN],
        "ties": pooled[TIE],
        "losses": pooled[LOSS],
        "win_rate": round(pooled[WIN] / n, 4) if n else None,
        "win_ci_low": round(low, 4) if n else None,
        "win_ci_high": round(high, 4) if n else None,
        "mean_scores": {v: {f: _mean(scores[v][f]) for f in SCORE_FIELDS} for v in VARIANTS},
        "cohen_kappa": round(sum(cohen.values()) / len(cohen), 4) if cohen else None,
        "fleiss_kappa": None if fleiss is None or math.isnan(fleiss) else fleiss,
        "cohen_by_pair": cohen,
        "agreement_items": len(common),
    }


def summarize_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """`summarize_round` for every round of a run or evaluation folder, by name (empty if none).

    Keys: round, created_at, eval_dir, raters (count), rater_names, pairs, ratings (judgements
    made), progress (per rater), wins, ties, losses, win_rate (fine-tuned preferred / ratings;
    ties count as not won) with win_ci_low / win_ci_high (Wilson 95%, judgements treated as
    independent), mean_scores {base|finetuned: {professional, accuracy}} on 1-5, the kappas
    (numbers or None; only these keys contain "kappa"): cohen_kappa (the mean of Cohen's kappa
    over pairs of raters) and fleiss_kappa (over all raters, on the common pairs), then
    cohen_by_pair {"r1 vs r2": kappa} and agreement_items (pairs judged by every rater who
    judged any). Kappas need at least two raters with a pair in common.
    """
    return [summarize_round(rating_round) for rating_round in list_rounds(Path(run_dir))]
