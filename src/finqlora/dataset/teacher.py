"""A stronger model as a teacher: richer analyses for the news-impact records.

`finqlora build --teacher deepseek --teacher-model deepseek-chat` (or `kimi`, `openai`,
`local`, or any OpenAI-compatible URL) asks the teacher, for each news-impact record, to
rewrite the builder's rule-based ex-ante answer the way a good analyst would -- told the
label's direction and the event's channel, never the realized numbers, so the answer stays
knowable at publication (docs/dataset.md, "Knowable targets").

Every answer is checked before it replaces the builder's answer:

- the direction it states for the record's primary ticker, read with
  `finqlora.dataset.answer_parser.parse_direction` (the same parser the evaluation uses), must equal
  the label; a different direction is `rejected_direction`, none at all `rejected_unparseable`;
- a direction it states for any other labelled ticker must match that ticker's label too;
- it may not contain a number that is absent from the record's input and matches a realized
  return (`rationales.realized_numbers`): `rejected_realized_numbers`;
- its length must lie within `MIN_ANSWER_CHARS`..`MAX_ANSWER_CHARS`: `rejected_length`.

Rejected records keep the builder's answer (the rule text) and are counted by status. Each
candidate record gets a `teacher` field: `{"model", "provider", "status", "parsed_direction",
"cached"}`. Answers are cached in a JSONL file keyed by the teacher's
URL, model and prompt (one line appended and fsynced per answer), so an interrupted or
repeated build never pays for the same answer twice.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from finqlora.dataset.answer_parser import parse_direction
from finqlora.dataset.rationales import realized_numbers
from finqlora.core.config import DataConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text

PROMPT_VERSION = 2
SYSTEM_PROMPT = (
    "你是一名资深的宏观与大宗商品分析师，为金融专业的学生撰写示范性的新闻影响分析。"
    "分析只能使用快讯发布时已知的信息，不编造快讯之外的事实，也不写发布后的涨跌幅。"
)
MIN_ANSWER_CHARS = 40
MAX_ANSWER_CHARS = 1200


@dataclass
class TeacherStats:
    candidates: int = 0  # news-impact records with a direction label
    asked: int = 0  # answers fetched from the teacher in this run
    cache_hits: int = 0
    accepted: int = 0
    rejected_direction: int = 0
    rejected_unparseable: int = 0
    rejected_realized_numbers: int = 0
    rejected_length: int = 0
    other_records: int = 0  # other record types, left as they are

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.candidates if self.candidates else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": round(self.acceptance_rate, 4)}


def ticker_name(label: Mapping[str, Any]) -> str:
    return str(label.get("ticker") or "主要标的")


def record_prompt_parts(record: Mapping[str, Any]) -> tuple[str, str]:
    """(task, news input) of an Alpaca or messages record."""
    if "messages" in record:
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        return "", users[-1] if users else ""
    return str(record.get("instruction") or ""), str(record.get("input") or "")


def teacher_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    label = record["label"]
    task, news = record_prompt_parts(record)
    ticker = ticker_name(label)
    directions = "；".join(f"{t}：{d}" for t, d in (label.get("directions") or {}).items())
    channels = "；".join(f"{t}：{info.get('channel')}" for t, info in (label.get("relevance") or {}).items())
    rule_answer = str(record.get("output") or "")
    user = (
        "下面是一条财经快讯、它对相关品种的方向判定和一份按规则写成的分析。请改写成一段专业、简洁的中文分析"
        f"（{MIN_ANSWER_CHARS}-{MAX_ANSWER_CHARS // 2}字），它将作为训练数据中的标准答案：\n"
        "1. 对每个品种写明方向（利好、利空或中性），必须与给定的方向一致；\n"
        "2. 说明传导路径（例如 鹰派表态 → 实际利率/美元上行 → 金价承压）和类似的历史情形；\n"
        "3. 写出什么情况会改变这个判断，并给出一个置信度（较高/中等/较低）；\n"
        f"4. 最后单独一行写“结论：{ticker} 方向：{label['direction']}”。\n"
        "只能使用快讯发布时已知的信息：不要写发布后的涨跌幅或任何行情数字，不要编造快讯中没有的事实，不要使用 Markdown 标题。\n\n"
        + (f"【任务】{task}\n" if task else "")
        + f"【快讯】\n{news}\n\n【方向】{directions}\n【传导渠道】{channels or '未标注'}\n\n【规则分析】\n{rule_answer}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def check_answer(answer: str, label: Mapping[str, Any], known_text: str = "") -> tuple[str, str | None]:
    """(status, parsed primary direction) of a teacher answer against the label.

    `known_text` is the record's instruction + input: numbers in it may be quoted.
    """
    status, parsed = _check_direction(answer, label)
    if status != "accepted":
        return status, parsed
    if realized_numbers(answer, known_text, label):
        return "rejected_realized_numbers", parsed
    if not MIN_ANSWER_CHARS <= len(answer.strip()) <= MAX_ANSWER_CHARS:
        return "rejected_length", parsed
    return "accepted", parsed


def _check_direction(answer: str, label: Mapping[str, Any]) -> tuple[str, str | None]:
    parsed = parse_direction(answer, ticker=label.get("ticker")).direction
    if parsed is None:
        return "rejected_unparseable", None
    if parsed != label["direction"]:
        return "rejected_direction", parsed
    for ticker, expected in (label.get("directions") or {}).items():
        if ticker == label.get("ticker") or ticker.lower() not in answer.lower():
            continue
        stated = parse_direction(answer, ticker=ticker)
        if stated.method == "ticker" and stated.direction != expected:
            return "rejected_direction", parsed
    return "accepted", parsed


class AnswerCache:
    """Teacher answers by key, persisted as JSONL (append + fsync per answer, thread-safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        self._answers[row["key"]] = row["answer"]
                    except (ValueError, KeyError, TypeError):
                        # A line cut by a crash mid-write: ignore it, the answer is asked again.
                        continue

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str, model: str) -> None:
        with self._lock:
            self._answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "model": model, "answer": answer}, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def __len__(self) -> int:
        return len(self._answers)


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """Keyed by the teacher model's name and the prompt (not the URL: the same model may be
    reached through another endpoint or a proxy)."""
    payload = json.dumps([PROMPT_VERSION, model, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _set_answer(record: dict[str, Any], answer: str) -> None:
    if "messages" in record:
        messages = record["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages[-1]["content"] = answer
        else:
            messages.append({"role": "assistant", "content": answer})
    else:
        record["output"] = answer


def enrich_records(
    records: Iterable[Mapping[str, Any]],
    client: Any,
    model: str | None,
    cache_path: str | os.PathLike[str],
    *,
    concurrency: int = 4,
    temperature: float = 0.3,
    max_tokens: int = 800,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], TeacherStats]:
    """Ask the teacher for every news-impact record; return new records and counts.

    `client` is a `finqlora.models.client.FinLLMClient`; `model` overrides its primary provider's
    model. Records are copied, never changed in place. Failures to reach the teacher (after
    the client's retries and fallback) stop the run; the cache keeps what was done.
    """
    out = [json.loads(json.dumps(record, ensure_ascii=False)) for record in records]
    stats = TeacherStats()
    cache = AnswerCache(cache_path)
    provider = client.providers[0]
    model_name = model or client.model_for(provider)
    candidates = []
    for record in out:
        label = record.get("label") or {}
        if record.get("type") == "news_impact" and label.get("direction") and label.get("ticker"):
            candidates.append(record)
        else:
            stats.other_records += 1
    stats.candidates = len(candidates)

    def ask(record: dict[str, Any]) -> tuple[dict[str, Any], str, bool, str]:
        messages = teacher_messages(record)
        key = cache_key(model_name, messages)
        cached = cache.get(key)
        if cached is not None:
            return record, cached, True, provider.name
        response, used = client.completion_with_provider(messages, model=model_name, temperature=temperature, max_tokens=max_tokens)
        answer = response.choices[0].message.content or ""
        cache.put(key, answer, model_name)
        return record, answer, False, used.name

    from rich.markup import escape
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar, concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        task = bar.add_task(escape(f"teacher {model_name}"), total=len(candidates))
        futures = [pool.submit(ask, record) for record in candidates]
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    record, answer, cached, used = future.result()
                except openai.APIStatusError as exc:
                    raise FinqloraError(
                        f"the teacher ({provider.base_url}, model {model_name}) refused a request: {exc}",
                        hint="check --teacher-model, the provider's API key and its context length; "
                        "answers received so far are cached and will not be asked again",
                    ) from exc
                stats.cache_hits += cached
                stats.asked += not cached
                instruction, news = record_prompt_parts(record)
                status, parsed = check_answer(answer, record["label"], f"{instruction}\n{news}")
                setattr(stats, status, getattr(stats, status) + 1)
                if status == "accepted":
                    _set_answer(record, answer.strip())
                record["teacher"] = {"model": model_name, "provider": used, "status": status, "parsed_direction": parsed, "cached": cached}
                bar.advance(task)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out, stats


def enrich_dataset_file(
    path: str | os.PathLike[str],
    teacher: str,
    model: str | None = None,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    concurrency: int = 4,
    max_tokens: int = 800,
    progress: bool = True,
) -> TeacherStats:
    """Enrich a built dataset file in place (atomically) and record the counts in its stats file."""
    from finqlora.models.client import FinLLMClient

    dataset = Path(path)
    try:
        records = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise FinqloraError(f"cannot read the dataset {dataset}: {exc}", hint="build it first with `finqlora build`") from exc
    # No fallback: the data must come from the teacher that was named (the cache is keyed by it).
    client = FinLLMClient.from_env(teacher, model=model, fallback="none")
    cache = Path(cache_path) if cache_path else dataset.with_name(dataset.stem + ".teacher_cache.jsonl")
    enriched, stats = enrich_records(records, client, model, cache, concurrency=concurrency, max_tokens=max_tokens, progress=progress)
    atomic_write_text(dataset, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in enriched))
    stats_path = dataset.with_name(dataset.stem + ".stats.json")
    if stats_path.exists():
        summary = json.loads(stats_path.read_text(encoding="utf-8"))
        summary["teacher"] = {"spec": teacher, "model": model or client.model_for(client.providers[0]), "cache": str(cache), **stats.as_dict()}
        atomic_write_json(stats_path, summary)
    return stats


def enrich_from_config(output: str | os.PathLike[str], data: DataConfig, *, progress: bool = True) -> TeacherStats | None:
    """Run the teacher of a run config's `data` section (`data.teacher`...) over a built dataset; None without one."""
    if data.teacher is None:
        return None
    from rich.console import Console

    stats = enrich_dataset_file(
        output, data.teacher, data.teacher_model, cache_path=data.teacher_cache, concurrency=data.teacher_concurrency,
        max_tokens=data.teacher_max_tokens, progress=progress,
    )
    Console(stderr=True).print(
        f"teacher: {stats.accepted} of {stats.candidates} news-impact answers accepted, "
        f"{stats.rejected_direction} rejected (other direction), {stats.rejected_unparseable} rejected (no direction), "
        f"{stats.rejected_realized_numbers} rejected (realized numbers), {stats.rejected_length} rejected (length); "
        f"{stats.cache_hits} from the cache",
        highlight=False,
    )
    return stats
