"""An LLM judge: base vs fine-tuned answers compared pairwise through any OpenAI-compatible
endpoint (the DeepSeek API, or our own `finqlora serve`).

Each pair of an evaluation folder is judged twice, once with the base answer as A and once
with the fine-tuned answer as A, so a judge that prefers a position gains nothing: one that
always answers "A" wins exactly half of its judgements for each model. The rubric is the blind
rating round's (`finqlora.evaluate.ratings`): for each answer 专业性 and 准确性 from 1 to 5, then
the better answer, A, B or tie. The judge is asked for one JSON object; an answer that names no
choice is counted as unparsed and left out of the rates.

Results, in `EVAL/judge/` beside the answers: `judgements.jsonl` (every call, its raw answer,
cached so a rerun asks only what is missing) and `judge.json`: the fine-tuned model's win rate
over all parsed judgements (a tie is not a win) with its Wilson 95% interval, the ties and
losses, the share of pairs whose two orders agree (position consistency), mean scores, and,
when a rating round of the same folder exists, Cohen's kappa between the judge's per-pair
verdict (the two orders' verdict when they agree, else tie) and each rater
(`finqlora.evaluate.human_eval.cohen_kappa`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finqlora.core.config import MAX_NEW_TOKENS
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_jsonl, read_jsonl
from finqlora.evaluate.human_eval import LOSS, TIE, WIN, cohen_kappa
from finqlora.evaluate.ratings import SCORE_FIELDS, eval_pairs, list_rounds, load_ratings, wilson_interval

JUDGE_DIR = "judge"
ORDERS = ("base", "finetuned")  # which model's answer is shown as A
SCORE_NAMES = {"professional": "专业性", "accuracy": "准确性"}
MAX_ANSWER_CHARS = 4000  # per answer in the prompt: bounded requests, whatever the generations hold

RUBRIC = """你是一位资深金融分析师，正在评审两个模型对同一个问题的回答。请按以下标准评分：
- 专业性（1-5）：术语、逻辑与分析框架是否符合金融专业水准；
- 准确性（1-5）：事实、数字与结论是否正确，有无编造或与问题不符之处。
然后判断哪个回答更好（A、B 或 tie 表示不相上下）。回答的先后顺序与质量无关；不要因长度偏好某个回答。
只输出一个 JSON 对象，不要输出其他内容，格式如下：
{"A": {"专业性": 1-5, "准确性": 1-5}, "B": {"专业性": 1-5, "准确性": 1-5}, "better": "A" | "B" | "tie"}"""

PROMPT = """【问题】
{question}

【回答 A】
{answer_a}

【回答 B】
{answer_b}"""


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    clip = lambda text: text if len(text) <= MAX_ANSWER_CHARS else text[:MAX_ANSWER_CHARS] + "……"  # noqa: E731
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": PROMPT.format(question=clip(question), answer_a=clip(answer_a), answer_b=clip(answer_b))}]


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_BETTER = re.compile(r"(?:better|更好)[\"'\s:：]*\"?(A|B|tie|平局|相当)", re.IGNORECASE)


def parse_verdict(text: str) -> dict[str, Any]:
    """{"better": "A"|"B"|"tie"|None, "scores": {"A": {...}, "B": {...}}} from a judge's answer."""
    better, scores = None, {}
    match = _JSON_OBJECT.search(text or "")
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            value = str(data.get("better", "")).strip()
            better = value.upper() if value.upper() in ("A", "B") else ("tie" if value.lower() in ("tie", "平局", "相当") else None)
            for side in ("A", "B"):
                given = data.get(side) if isinstance(data.get(side), dict) else {}
                side_scores = {field: given.get(name) for field, name in SCORE_NAMES.items()}
                if all(isinstance(v, int) and 1 <= v <= 5 for v in side_scores.values()):
                    scores[side] = side_scores
    if better is None:
        found = _BETTER.search(text or "")
        if found:
            word = found.group(1)
            better = word.upper() if word.upper() in ("A", "B") else "tie"
    return {"better": better, "scores": scores}


def outcome(better: str | None, a_is: str) -> str | None:
    """The fine-tuned model's win / tie / loss from a judgement of one order."""
    if better is None:
        return None
    if better == "tie":
        return TIE
    shown = a_is if better == "A" else ("finetuned" if a_is == "base" else "base")
    return WIN if shown == "finetuned" else LOSS


def _key(model: str, item: str, a_is: str, messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps([model, item, a_is, messages], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def run_judge(eval_dir: Path, client: Any, *, model: str | None = None, limit: int | None = None, seed: int = 0,
              max_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Judge every pair (or a seeded sample of `limit`) in both orders; write and return judge.json.

    `client` is a `finqlora.models.client.FinLLMClient`; `model` overrides its model.
    """
    eval_dir = Path(eval_dir)
    pairs = eval_pairs(eval_dir)
    if limit is not None and 0 < limit < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, limit), key=lambda pair: pair["item"])
    folder = eval_dir / JUDGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    cache_path = folder / "judgements.jsonl"
    cached = {row["key"]: row for row in (read_jsonl(cache_path, what="judge cache", torn_tail=True) if cache_path.exists() else [])}
    judge_model = model or client.model_for(client.providers[0])
    rows = []
    with cache_path.open("a", encoding="utf-8") as handle:
        for pair in pairs:
            for a_is in ORDERS:
                b_is = "finetuned" if a_is == "base" else "base"
                messages = judge_messages(pair["question"], pair[a_is], pair[b_is])
                key = _key(judge_model, pair["item"], a_is, messages)
                if key not in cached:
                    # temperature 0: the same pair in the same order gets the same verdict
                    raw = client.chat(messages, model=judge_model, temperature=0.0, max_tokens=max_tokens)
                    cached[key] = {"key": key, "item": pair["item"], "a_is": a_is, "judge_model": judge_model, "raw": raw}
                    handle.write(json.dumps(cached[key], ensure_ascii=False) + "\n")
                    handle.flush()
                row = dict(cached[key])
                verdict = parse_verdict(row["raw"])
                row.update(better=verdict["better"], scores=verdict["scores"], outcome=outcome(verdict["better"], a_is))
                rows.append(row)
    atomic_write_jsonl(cache_path, [cached[row["key"]] for row in rows])
    summary = summarize(rows, judge_model, eval_dir)
    atomic_write_json(folder / "judge.json", summary)
    return summary


def _outcomes_by_item(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The two parsed outcomes of every pair judged in both orders."""
    by_item: dict[str, list[str | None]] = {}
    for row in rows:
        by_item.setdefault(row["item"], []).append(row["outcome"])
    return {item: outcomes for item, outcomes in by_item.items() if len(outcomes) == 2 and None not in outcomes}  # type: ignore[misc]


def item_verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One verdict per pair: the two orders' outcome when they agree, else tie (position bias)."""
    return {item: first if first == second else TIE for item, (first, second) in _outcomes_by_item(rows).items()}


def summarize(rows: Sequence[dict[str, Any]], judge_model: str, eval_dir: Path) -> dict[str, Any]:
    parsed = [row for row in rows if row["outcome"] is not None]
    counts = Counter(row["outcome"] for row in parsed)
    n = len(parsed)
    low, high = wilson_interval(counts[WIN], n)
    both_orders = _outcomes_by_item(rows)
    consistent = sum(first == second for first, second in both_orders.values())
    position_a = sum(1 for row in parsed if row["better"] == "A")
    scores: dict[str, dict[str, list[int]]] = {v: {f: [] for f in SCORE_FIELDS} for v in ORDERS}
    for row in parsed:
        for side, model in (("A", row["a_is"]), ("B", "finetuned" if row["a_is"] == "base" else "base")):
            for f in SCORE_FIELDS:
                if side in row["scores"]:
                    scores[model][f].append(row["scores"][side][f])
    return {
        "judge_model": judge_model, "pairs": len({row["item"] for row in rows}), "judgements": len(rows), "parsed": n,
        "unparsed": len(rows) - n, "orders": "each pair judged twice: base as A, then fine-tuned as A",
        "wins": counts[WIN], "ties": counts[TIE], "losses": counts[LOSS],
        "win_rate": counts[WIN] / n if n else None, "win_ci_low": low if n else None, "win_ci_high": high if n else None,
        "tie_rate": counts[TIE] / n if n else None, "loss_rate": counts[LOSS] / n if n else None,
        "chose_position_a": position_a / n if n else None,
        "position_consistency": consistent / len(both_orders) if both_orders else None,
        "mean_scores": {v: {f: round(sum(s) / len(s), 3) if s else None for f, s in fields.items()} for v, fields in scores.items()},
        "agreement_with_raters": agreement_with_raters(item_verdicts(rows), eval_dir),
    }


def agreement_with_raters(verdicts: dict[str, str], eval_dir: Path) -> list[dict[str, Any]]:
    """Cohen's kappa of the judge's per-pair verdicts against each rater of each rating round."""
    rounds = []
    for rating_round in list_rounds(eval_dir):
        per_rater = {}
        for rater in rating_round.raters:
            judged = {item: record["outcome"] for item, record in load_ratings(rating_round, rater).items()}
            shared = sorted(set(judged) & set(verdicts))
            if shared:
                kappa = cohen_kappa([verdicts[i] for i in shared], [judged[i] for i in shared])
                per_rater[rater] = {"items": len(shared), "cohen_kappa": round(kappa, 4)}
        if per_rater:
            kappas = [entry["cohen_kappa"] for entry in per_rater.values()]
            rounds.append({"round": rating_round.name, "raters": per_rater, "mean_cohen_kappa": round(sum(kappas) / len(kappas), 4)})
    return rounds


def read_judge(eval_dir: Path) -> dict[str, Any] | None:
    """judge.json of an evaluation folder (None when no judge ran)."""
    path = Path(eval_dir) / JUDGE_DIR / "judge.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinqloraError(f"{path}: not valid JSON ({exc.msg})", hint="delete it and run `finqlora eval --judge ...` again") from exc
