"""The instruction dataset builder: event store -> leakage-safe, labelled JSONL dataset.

Pipeline (each step documented in docs/dataset.md):
1. read the store's primary events (cross-source duplicates linked by ingest are skipped) and
   their stored returns;
2. drop near-duplicate texts (`finqlora.core.textdedup`), keeping the earliest of each group;
3. split the remaining events with a primary-window return by time into train/val/test
   (default 80/10/10 of the events); events within `embargo_min` after a split boundary are
   left out, so a train event's return windows never reach into the next split;
4. estimate each (ticker, window) volatility on the train period only and label with
   `finqlora.dataset.labels` (z = r / sigma, neutral band, direction held at the adjacent
   windows), only the tickers `finqlora.dataset.relevance` allows for the event;
5. sample per split: news_impact (one ex-ante record per relevant event: the answer is
   `finqlora.dataset.rationales`, never the realized move), market_analysis (ex-post, balanced over the
   case types, preferring events not used by news_impact), report_qa (simulated, checked)
   and, where a part cannot be built from the store, built-in templates (`finqlora.dataset.templates`)
   grouped by template so no template appears in two splits;
   then public data sets (`--add-dataset`, `finqlora.dataset.mixture`), each split on its own;
6. trim over-long inputs token-aware so the output and its end are kept; drop records that
   duplicate an evaluation item (`--decontaminate`);
7. write the JSONL (Alpaca fields or OpenAI messages), a dataset card and stats JSON.

Every random choice comes from `random.Random` seeded with the seed and a fixed tag, and all
collections are sorted before sampling, so the same seed and database give byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finqlora.store import db as store
from finqlora.dataset import labels as lab
from finqlora.dataset import mixture, predictability, rationales, report_qa, templates
from finqlora.dataset import relevance as rel
from finqlora.core import textdedup
from finqlora.core.config import MIN_MAX_LENGTH, RunConfig
from finqlora.core.chat_format import assistant_turn_suffix, render_prompt
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text, sha256_file
from finqlora.core.lock import lock_enclosing_run
from finqlora.core.safe_input import InputError, json_loads
from finqlora.core.records import RECORD_FORMATS, user_content, write_dataset_info

TYPES = ("news_impact", "market_analysis", "report_qa")
PUBLIC = "public_data"  # records from --add-dataset sources
RECORD_ORDER = (*TYPES, PUBLIC, "template")
SPLITS = ("train", "val", "test")
# Rough length estimate when no tokenizer is given: 1 token per CJK character (true to within
# ~30% for Qwen-style vocabularies, an underestimate for English-only vocabularies) and one
# per 3.5 other characters, plus the chat template's overhead.
CJK_TOKENS_PER_CHAR = 1.0
OTHER_CHARS_PER_TOKEN = 3.5
ESTIMATED_TEMPLATE_OVERHEAD = 16
TRIM_MARK = "……（原文过长，已截断）"
DEFAULT_PRIMARY_TICKER = "XAUUSD"
MARKET_GROUPS = (*lab.MARKET_CASES, lab.IMPORTANCE)

TICKER_NAMES = {
    "XAUUSD": "现货黄金", "XAGUSD": "现货白银", "USDCNH": "离岸人民币", "USDCNY": "在岸人民币", "DXY": "美元指数",
    "WTI": "WTI原油", "BRENT": "布伦特原油", "SPX": "标普500指数", "NDX": "纳斯达克100指数", "HSI": "恒生指数",
}

# Ex-ante questions: what a reader can judge at publication (direction, channel, risks).
_NEWS_INSTRUCTIONS = (
    "分析以下财经快讯对{names}的影响。",
    "请判断这条快讯对{names}的影响方向（利好/利空/中性），并说明传导路径和置信度。",
    "阅读下面的新闻，给出对{names}的结构化影响分析：方向、传导渠道、可能改变判断的因素。",
    "作为金融分析师，这条快讯发布时你会如何判断{names}的走向？",
    "这条消息对{names}意味着什么？请给出方向、依据和风险提示。",
)
_CASE_INSTRUCTIONS = (
    "结合下面的快讯与行情数据，判断市场反应属于哪种情形（预期兑现、观望信号、趋势延续、反应消退），并说明理由。",
    "根据快讯发布前后的价格变化，分析市场对这条消息的反应模式。",
    "下面给出一条快讯和{name}在发布前后的收益率，请判断这是预期兑现、观望、趋势延续还是反应消退。",
)
_IMPORTANCE_INSTRUCTIONS = (
    "这条快讯的重要性与其引发的价格波动是否匹配？请结合数据说明。",
    "结合重要性评级和行情数据，评价这条消息引起的{name}波动是否超出常态。",
)
# One short caveat for the ex-post cases (a long repeated disclaimer teaches the model to loop on it).
_CAVEAT = "同期其他消息与流动性也会影响价格，历史反应不代表未来表现。"


@dataclass(frozen=True)
class BuildConfig:
    output: Path
    db: Path | None = None
    num_samples: int = 300
    mix: tuple[float, float, float] = (60.0, 20.0, 20.0)  # news_impact, market_analysis, report_qa
    split: tuple[float, float, float] = (80.0, 10.0, 10.0)
    seed: int = 0
    format: str = "alpaca"  # or "messages" or "sharegpt"
    templates_only: bool = False
    tokenizer: str | None = None
    max_length: int = 512
    rules: lab.LabelRules = field(default_factory=lab.LabelRules)
    primary_ticker: str | None = None
    dedup_threshold: float = textdedup.DEFAULT_THRESHOLD
    embargo_min: int = 120
    naive_tz: str | None = None
    progress: bool = True
    add: tuple[mixture.AddSource, ...] = ()  # public data mixed in, on top of num_samples
    decontaminate: tuple[Path, ...] = ()  # evaluation files no record may duplicate

    @classmethod
    def from_run(cls, cfg: RunConfig, *, db: Path | None, output: Path) -> BuildConfig:
        """The one mapping from a run config's `data` section (and the train settings it needs).

        Every field has the key's name, except where the builder's object says more: `rules`
        holds the label keys, `naive_tz` is `data.tz`. Lengths are counted with the tokenizer
        that will train (`data.tokenizer`, else `train.model`; 'chars' = a character estimate)
        against `train.max_length`, so trimming matches what training sees.
        """
        data = cfg.data
        return cls(
            output=Path(output),
            db=Path(db) if db is not None else None,
            num_samples=data.num_samples,
            mix=data.mix,
            split=data.split,
            seed=data.seed,
            format=data.format,
            templates_only=data.templates_only,
            tokenizer=None if data.tokenizer == "chars" else data.tokenizer or cfg.train.model,
            max_length=cfg.train.max_length,
            rules=lab.LabelRules(primary_window=data.primary_window, threshold_k=data.threshold_k),
            primary_ticker=data.primary_ticker,
            dedup_threshold=data.dedup_threshold,
            embargo_min=data.embargo_min,
            naive_tz=data.tz,
            add=tuple(mixture.AddSource(Path(a.path), a.format, a.samples) for a in data.add),
            decontaminate=tuple(Path(p) for p in (*data.decontaminate, *_benchmark_paths(cfg))),
        )

    def validate(self) -> None:
        if self.num_samples < 1:
            raise FinqloraError(f"--num-samples must be at least 1, got {self.num_samples}")
        for name, parts in (("--mix", self.mix), ("--split", self.split)):
            if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
                raise FinqloraError(f"{name} needs three non-negative numbers with a positive sum, got {parts}",
                                    hint=f"e.g. {name} 60,20,20")
        if self.split[0] <= 0:
            raise FinqloraError("the train share of --split must be positive", hint="e.g. --split 80,10,10")
        if self.format not in RECORD_FORMATS:
            raise FinqloraError(f"unknown --format {self.format!r}", hint=f"use one of {', '.join(RECORD_FORMATS)}")
        if self.max_length < MIN_MAX_LENGTH:  # the bound of train.max_length, so a config training accepts builds
            raise FinqloraError(f"--max-length {self.max_length} is too small for any record", hint="use 256 or more (default 512)")
        if not 0 < self.dedup_threshold <= 1:
            raise FinqloraError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        for source in self.add:
            source.validate()
        for path in self.decontaminate:
            if not Path(path).exists():
                raise FinqloraError(f"--decontaminate {path} does not exist", hint="pass the evaluation files the model will be scored on")


def _benchmark_paths(cfg: RunConfig) -> list[str]:
    """The files of `eval.benchmarks` (plain paths, or entries with a `path`) and the local sets
    of `eval.suite`, for decontamination."""
    paths = []
    for entry in cfg.eval.benchmarks:
        path = entry if isinstance(entry, str) else getattr(entry, "path", None)
        if path:
            paths.append(str(path))
    if cfg.eval.suite is not None:
        paths += [location for location in cfg.eval.suite.sets.values() if not location.startswith("hf:")]
    return paths


@dataclass
class Draft:
    """A record before trimming: its input is prefix + news + suffix so the news can be cut."""

    type: str
    split: str
    record_id: str
    instruction: str
    output: str
    label: dict[str, Any]
    input_prefix: str = ""
    news: str = ""
    input_suffix: str = ""
    event_id: str | None = None
    event_time: str | None = None
    ts: int = 0
    compact_input: str | None = None  # report_qa: the statement with only the figures asked about

    @property
    def input(self) -> str:
        return self.input_prefix + self.news + self.input_suffix


@dataclass
class BuildResult:
    output: Path
    card: Path
    stats_path: Path
    records: list[dict[str, Any]]
    stats: dict[str, Any]
    notices: list[str]


# ---------------------------------------------------------------------------------------
# Small helpers


def _allocate(total: int, shares: Sequence[float]) -> list[int]:
    """Split an integer total by shares (largest remainder; ties to the earlier part)."""
    weights = [s / sum(shares) for s in shares]
    raw = [total * w for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _rng(seed: int, tag: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs/platforms.
    return random.Random(f"finqlora-{seed}-{tag}")


def _pct(ret: float) -> str:
    return f"{ret * 100:+.2f}%"


def _ticker_label(ticker: str) -> str:
    name = TICKER_NAMES.get(ticker.upper())
    return f"{ticker}（{name}）" if name else ticker


def _window_label(window: int) -> str:
    return f"发布前{-window}分钟" if window < 0 else f"发布后{window}分钟"


def _stars(star: int | None) -> str:
    if star is None:
        return "未标注"
    return "★" * star + "☆" * (5 - star) + f"（{star}/5）"


def news_text(event: store.Event) -> str:
    content = (event.content or "").strip()
    title = (event.title or "").strip()
    if title and title not in content:
        content = f"【{title}】{content}"
    return content


def _news_prefix(event: store.Event) -> str:
    importance = _stars(event.star)
    if event.importance:
        importance += f"，来源评级{event.importance}"
    return f"重要性：{importance}\n发布时间（UTC）：{event.published_at}\n快讯："


# ---------------------------------------------------------------------------------------
# Token-aware lengths


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


# ---------------------------------------------------------------------------------------
# Reading the store


@dataclass
class StoreData:
    events: list[store.Event]  # primaries with a time and text, sorted by (ts, event_id)
    impacts: dict[str, dict[tuple[str, int], float]]
    without_time: int
    linked_duplicates: int
    price_tickers: list[str]
    fingerprint: dict[str, Any]


def read_store(path: Path, naive_tz: str | None) -> StoreData:
    if not path.exists():
        raise FinqloraError(
            f"database {path} does not exist",
            hint="check the path (data.db, `finqlora build --db`); data.db: sample uses the built-in synthetic store, "
            "data.templates_only: true (--templates-only) the built-in templates",
        )
    conn = store.connect(path, readonly=True)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "events" not in tables:
            raise FinqloraError(
                f"{path} has no events table, so there is no news to build from",
                hint=f"run `finqlora db check --db {path}`; ingest news with `finqlora db ingest-news`",
            )
        all_events = store.read_events(conn, naive_tz=naive_tz)
        impacts = store.read_impacts(conn) if "event_impacts" in tables else {}
        price_tickers = (
            [row[0] for row in conn.execute("SELECT DISTINCT ticker FROM prices ORDER BY ticker")] if "prices" in tables else []
        )
    finally:
        conn.close()
    linked = sum(1 for e in all_events if e.primary_event_id)
    usable = [e for e in all_events if not e.primary_event_id and (e.content or "").strip()]
    timed = sorted((e for e in usable if e.ts_utc is not None), key=lambda e: (e.ts_utc, e.event_id))
    fingerprint = {
        "path": str(path),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "events": len(all_events),
        "events_with_returns": len(impacts),
    }
    return StoreData(timed, impacts, len(usable) - len(timed), linked, price_tickers, fingerprint)


# ---------------------------------------------------------------------------------------
# Splitting and labelling


@dataclass
class SplitPlan:
    pools: dict[str, list[store.Event]]
    boundaries: dict[str, str | None]  # last event time of train / val
    embargoed: int


def split_by_time(events: Sequence[store.Event], shares: Sequence[float], embargo_min: int) -> SplitPlan:
    """Cut time-sorted events into train/val/test by count, never splitting one timestamp.

    Events within `embargo_min` minutes after the previous split's last event are dropped.
    """
    counts = _allocate(len(events), shares)
    pools: dict[str, list[store.Event]] = {s: [] for s in SPLITS}
    boundaries: dict[str, str | None] = {"train_end": None, "val_end": None}
    cut_ts: list[int] = []
    start = 0
    for count in counts[:-1]:
        end = min(start + count, len(events))
        if end > start:
            # Events sharing the boundary's timestamp stay with it (a strict time order).
            while end < len(events) and events[end].ts_utc == events[end - 1].ts_utc:
                end += 1
            cut_ts.append(events[end - 1].ts_utc)
        else:
            cut_ts.append(cut_ts[-1] if cut_ts else events[0].ts_utc - 1 if events else -1)
        start = end
    embargoed = 0
    for event in events:
        ts = event.ts_utc
        if ts <= cut_ts[0]:
            pools["train"].append(event)
        elif ts <= cut_ts[1]:
            if ts - cut_ts[0] < embargo_min * 60:
                embargoed += 1
            else:
                pools["val"].append(event)
        elif ts - cut_ts[1] < embargo_min * 60:
            embargoed += 1
        else:
            pools["test"].append(event)
    for key, split in (("train_end", "train"), ("val_end", "val")):
        if pools[split]:
            boundaries[key] = pools[split][-1].published_at
    return SplitPlan(pools, boundaries, embargoed)


@dataclass
class LabelContext:
    rules: lab.LabelRules
    sigmas: dict[tuple[str, int], float]
    primary_ticker: str | None
    typical_abs: dict[str, float]  # "all" and str(star) -> median |r_p| of the primary ticker

    def threshold(self, ticker: str, window: int) -> float:
        return lab.threshold_for(self.sigmas[(ticker, window)], self.rules)


def _labelled_tickers(impact: dict[tuple[str, int], float], ctx: LabelContext) -> list[str]:
    p = ctx.rules.primary_window
    return sorted(t for (t, w) in impact if w == p and (t, p) in ctx.sigmas)


def _primary_for(tickers: list[str], ctx: LabelContext) -> str:
    return ctx.primary_ticker if ctx.primary_ticker in tickers else tickers[0]


def _ticker_returns(impact: dict[tuple[str, int], float], ticker: str) -> dict[int, float]:
    return {w: r for (t, w), r in sorted(impact.items()) if t == ticker}


def _adjacent_windows(impact: dict[tuple[str, int], float], ticker: str, p: int) -> list[int]:
    """The stored post-event windows right before and after the primary one (e.g. 10 and 30 around 15)."""
    post = sorted(w for (t, w) in impact if t == ticker and w > 0)
    if p not in post:
        return []
    i = post.index(p)
    return [w for w in (post[i - 1] if i > 0 else None, post[i + 1] if i + 1 < len(post) else None) if w is not None]


def ticker_direction(impact: dict[tuple[str, int], float], ticker: str, ctx: LabelContext) -> tuple[str, float, bool]:
    """(direction, z, held) of one ticker: z = r_p / sigma; outside the neutral band the sign
    must hold at the adjacent windows too (`LabelRules.hold_adjacent`), else 中性 with held False."""
    p = ctx.rules.primary_window
    ret = impact[(ticker, p)]
    z = ret / ctx.sigmas[(ticker, p)]
    found = lab.direction(ret, ctx.threshold(ticker, p))
    if found == lab.NEUTRAL or not ctx.rules.hold_adjacent:
        return found, z, True
    sign = 1 if ret > 0 else -1
    held = all(impact[(ticker, w)] * sign > 0 for w in _adjacent_windows(impact, ticker, p))
    return (found if held else lab.NEUTRAL), z, held


def news_impact_label(impact: dict[tuple[str, int], float], ctx: LabelContext,
                      decisions: dict[str, rel.Decision] | None = None) -> dict[str, Any] | None:
    """The label of one event: only tickers the relevance rule allows (None when there is none).

    `decisions` maps ticker -> relevance decision; None means every labelled ticker counts
    (used by tests of the direction rule alone).
    """
    tickers = _labelled_tickers(impact, ctx)
    if decisions is not None:
        tickers = [t for t in tickers if t in decisions and decisions[t].relevant]
    if not tickers:
        return None
    p = ctx.rules.primary_window
    primary = _primary_for(tickers, ctx)
    found = {t: ticker_direction(impact, t, ctx) for t in tickers}
    returns = {t: {str(w): r for w, r in _ticker_returns(impact, t).items()} for t in tickers}
    label = {
        "direction": found[primary][0],
        "ticker": primary,
        "window_min": p,
        "directions": {t: v[0] for t, v in found.items()},
        "z": round(found[primary][1], 4),
        "zs": {t: round(v[1], 4) for t, v in found.items()},
        "held_adjacent": {t: v[2] for t, v in found.items()},
        "magnitude": lab.magnitude(impact[(primary, p)], ctx.sigmas[(primary, p)]),
        "returns": returns,
        "threshold": ctx.threshold(primary, p),
        "thresholds": {t: ctx.threshold(t, p) for t in tickers},
    }
    if decisions is not None:
        label["relevance"] = {t: decisions[t].as_dict() for t in tickers}
    return label


def news_impact_output(label: dict[str, Any], rng: random.Random) -> str:
    """The ex-ante answer (no realized number: the move is the label, see `rationales`)."""
    channels = {t: info["channel"] for t, info in label["relevance"].items()}
    names = {t: _ticker_label(t) for t in label["directions"]}
    return rationales.ex_ante_answer(label, channels, names, rng)


def _case_explanation(case: str, name: str, pre: tuple[int, float, float] | None, post: tuple[int, float, float], longest: tuple[int, float, float]) -> str:
    pre_text = f"发布前{-pre[0]}分钟{name}变动 {_pct(pre[1])}（{pre[2]:+.1f}σ）" if pre else "发布前走势数据缺失"
    post_text = f"发布后{post[0]}分钟 {_pct(post[1])}（{post[2]:+.1f}σ）"
    long_text = f"发布后{longest[0]}分钟 {_pct(longest[1])}（{longest[2]:+.1f}σ）"
    if case == lab.EXPECTATION_REALIZED:
        return (f"依据：{pre_text}，已提前出现明显波动；{post_text}，{long_text}，消息落地后没有沿事前方向继续，"
                "说明市场在消息发布前已经计入了预期。\n解读：消息内容本身可能并不差，但预期已被交易，落地后缺少新的增量资金，"
                "容易出现“买预期、卖事实”。")
    if case == lab.CONTINUATION:
        return (f"依据：{pre_text}；{post_text}，并在{long_text}仍保持同一方向且幅度显著。\n"
                "解读：消息带来的信息被市场逐步消化，价格沿反应方向持续运行，说明消息超出了原有预期或改变了中期判断。")
    if case == lab.FADING:
        return (f"依据：{pre_text}；{post_text}出现了明显反应，但到{long_text}时已明显回吐或转向。\n"
                "解读：初始反应更多是情绪或程序化交易驱动，随后被市场修正，消息的持续影响弱于第一反应。")
    return (f"依据：{pre_text}；{post_text}，波动不到该窗口典型波动的一半，{long_text}。\n"
            "解读：消息发布后市场没有形成明显反应，资金以观望为主，往往在等待更多数据或后续消息确认。")


def _z(impact: dict[tuple[str, int], float], ticker: str, window: int, ctx: LabelContext) -> tuple[int, float, float]:
    ret = impact[(ticker, window)]
    return window, ret, ret / ctx.sigmas[(ticker, window)]


def _case_inputs(impact: dict[tuple[str, int], float], ctx: LabelContext) -> tuple[str, dict[int, float], dict[int, float]] | None:
    tickers = _labelled_tickers(impact, ctx)
    if not tickers:
        return None
    ticker = _primary_for(tickers, ctx)
    returns = {w: r for w, r in _ticker_returns(impact, ticker).items() if (ticker, w) in ctx.sigmas}
    return ticker, returns, {w: ctx.sigmas[(ticker, w)] for w in returns}


def classify_market(impact: dict[tuple[str, int], float], ctx: LabelContext) -> str | None:
    """The market-analysis case of an event's primary ticker (None when not applicable)."""
    inputs = _case_inputs(impact, ctx)
    return lab.market_case(inputs[1], inputs[2], ctx.rules) if inputs else None


def market_case_record(impact: dict[tuple[str, int], float], ctx: LabelContext, windows: Sequence[int], rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    """(instruction, input suffix, output, label) of a case question for a classifiable event."""
    ticker, returns, sigmas = _case_inputs(impact, ctx)
    case = lab.market_case(returns, sigmas, ctx.rules)
    name = _ticker_label(ticker)
    pre_windows = sorted(w for w in returns if w < 0)
    post_windows = sorted(w for w in returns if w > 0)
    table = "\n".join(
        f"- {_window_label(w)}：{_pct(returns[w])}（该窗口典型波动 σ={sigmas[w] * 100:.3f}%）" for w in pre_windows + post_windows
    )
    suffix = f"\n\n{name}行情：\n{table}"
    pre = _z(impact, ticker, pre_windows[0], ctx) if pre_windows else None
    explanation = _case_explanation(case, name, pre, _z(impact, ticker, ctx.rules.primary_window, ctx), _z(impact, ticker, post_windows[-1], ctx))
    output = f"案例类型：{case}\n{explanation}\n提示：{_CAVEAT}"
    instruction = rng.choice(_CASE_INSTRUCTIONS).format(name=name)
    return instruction, suffix, output, {"case": case, "ticker": ticker, "window_min": ctx.rules.primary_window}


def importance_applies(impact: dict[tuple[str, int], float], ctx: LabelContext) -> bool:
    """The importance question needs the primary ticker's primary-window return and its typical size."""
    return "all" in ctx.typical_abs and (ctx.primary_ticker, ctx.rules.primary_window) in impact


def importance_record(event: store.Event, impact: dict[tuple[str, int], float], ctx: LabelContext, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    """(instruction, input suffix, output, label) of an importance-vs-reaction question."""
    ticker, p = ctx.primary_ticker, ctx.rules.primary_window
    ret = impact[(ticker, p)]
    typical = ctx.typical_abs["all"]
    relation = lab.importance_relation(abs(ret), typical, ctx.rules)
    name = _ticker_label(ticker)
    by_star = "；".join(f"{s}星 {ctx.typical_abs[s] * 100:.3f}%" for s in sorted(k for k in ctx.typical_abs if k != "all"))
    suffix = (f"\n\n{name}发布后{p}分钟收益：{_pct(ret)}\n"
              f"训练期全部快讯发布后{p}分钟波动幅度（|收益|）中位数：{typical * 100:.3f}%"
              + (f"\n按重要性分组的中位数：{by_star}" if by_star else ""))
    ratio = abs(ret) / typical if typical > 0 else float("inf")
    star_note = ""
    if event.star is not None and str(event.star) in ctx.typical_abs:
        peer = ctx.typical_abs[str(event.star)]
        star_note = f"与同为{event.star}星的快讯相比（中位数 {peer * 100:.3f}%），本次波动是其 {abs(ret) / peer:.1f} 倍。" if peer > 0 else ""
    high = "重要性较高" if (event.star or 0) >= 4 else "重要性一般"
    output = (
        f"案例类型：{lab.IMPORTANCE}\n结论：{relation}（本次 |收益| {abs(ret) * 100:.3f}%，约为全部快讯中位数的 {ratio:.1f} 倍）。\n"
        f"依据：这条快讯{high}（{_stars(event.star)}）。{star_note}\n"
        f"解读：重要性评级反映的是编辑对消息的重视程度，而价格波动取决于消息是否超出预期和当时的流动性；"
        f"两者{'一致' if (relation == lab.ABOVE_NORMAL) == ((event.star or 0) >= 4) else '并不一致'}，"
        "分析时应同时参考二者，而不是只看评级。\n"
        f"提示：{_CAVEAT}"
    )
    instruction = rng.choice(_IMPORTANCE_INSTRUCTIONS).format(name=name)
    label = {"case": lab.IMPORTANCE, "relation": relation, "star": event.star, "ticker": ticker, "window_min": p}
    return instruction, suffix, output, label


def relevance_decisions(pool: Sequence[store.Event], impacts: dict[str, dict[tuple[str, int], float]],
                        ctx: LabelContext) -> dict[str, dict[str, rel.Decision]]:
    """event_id -> ticker -> relevance decision, for the tickers each event could be labelled by."""
    return {e.event_id: rel.event_decisions(e, _labelled_tickers(impacts.get(e.event_id, {}), ctx)) for e in pool}


def relevance_stats(pool: Sequence[store.Event], decisions: dict[str, dict[str, rel.Decision]],
                    impacts: dict[str, dict[tuple[str, int], float]], ctx: LabelContext, seed: int) -> dict[str, Any]:
    """What the relevance rule kept, per ticker and rule, with 10 examples of each decision, and
    how the labelled move differs between relevant and irrelevant events (the signal the rule buys)."""
    by_ticker: dict[str, Counter[str]] = {}
    by_channel: dict[str, Counter[str]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    moves: dict[str, list[tuple[float, bool]]] = {"relevant": [], "irrelevant": []}
    order = list(pool)
    _rng(seed, "relevance-examples").shuffle(order)
    for event in order:
        for ticker, decision in decisions[event.event_id].items():
            by_ticker.setdefault(ticker, Counter())[decision.rule] += 1
            if decision.channel:
                by_channel.setdefault(ticker, Counter())[decision.channel] += 1
            key = f"kept_by_{decision.rule}" if decision.relevant else "left_out"
            if ticker == ctx.primary_ticker and len(examples.setdefault(key, [])) < 10:
                examples[key].append({"event_id": event.event_id, "published_at": event.published_at,
                                      "text": news_text(event)[:80], "channel": decision.channel, "evidence": decision.evidence})
            if ticker == ctx.primary_ticker:
                direction, z, _ = ticker_direction(impacts[event.event_id], ticker, ctx)
                moves["relevant" if decision.relevant else "irrelevant"].append((abs(z), direction != lab.NEUTRAL))
    signal = {
        group: {"events": len(values),
                "median_abs_z": round(statistics.median(v for v, _ in values), 3) if values else None,
                "directional_share": round(sum(d for _, d in values) / len(values), 3) if values else None}
        for group, values in moves.items()
    }
    return {
        "rule": rel.describe(),
        "by_ticker": {t: dict(sorted(c.items())) for t, c in sorted(by_ticker.items())},
        "by_channel": {t: dict(sorted(c.items(), key=lambda kv: -kv[1])) for t, c in sorted(by_channel.items())},
        "primary_ticker_signal": signal,
        "examples": {k: examples[k] for k in sorted(examples)},
    }


def build_label_context(train_events: Sequence[store.Event], impacts: dict[str, dict[tuple[str, int], float]], rules: lab.LabelRules, primary_ticker: str | None) -> LabelContext:
    ids = [e.event_id for e in train_events]
    sigmas = {k: v for k, v in lab.volatility_table(impacts, ids, rules).items() if v > 0}
    p = rules.primary_window
    tickers = Counter(t for (t, w) in sigmas if w == p)
    if primary_ticker is None and tickers:
        # Gold is what finqlora's guide studies; otherwise the ticker with the most returns.
        counts = Counter(t for e in ids for (t, w) in impacts.get(e, {}) if w == p)
        primary_ticker = DEFAULT_PRIMARY_TICKER if DEFAULT_PRIMARY_TICKER in tickers else sorted(counts, key=lambda t: (-counts[t], t))[0]
    typical: dict[str, float] = {}
    if primary_ticker and (primary_ticker, p) in sigmas:
        groups: dict[str, list[float]] = {"all": []}
        for event in train_events:
            ret = impacts.get(event.event_id, {}).get((primary_ticker, p))
            if ret is not None:
                groups["all"].append(abs(ret))
                if event.star is not None:
                    groups.setdefault(str(event.star), []).append(abs(ret))
        typical = {k: statistics.median(v) for k, v in groups.items() if len(v) >= rules.min_estimation_samples}
    return LabelContext(rules, sigmas, primary_ticker, typical)


# ---------------------------------------------------------------------------------------
# Building


def _take_balanced(groups: dict[str, list[store.Event]], count: int) -> list[tuple[str, store.Event]]:
    """Round-robin over groups (sorted by name) so every case type is represented equally."""
    taken: list[tuple[str, store.Event]] = []
    used: set[str] = set()
    cursors = {name: 0 for name in groups}
    while len(taken) < count:
        progressed = False
        for name in sorted(groups):
            events = groups[name]
            while cursors[name] < len(events) and events[cursors[name]].event_id in used:
                cursors[name] += 1
            if cursors[name] < len(events) and len(taken) < count:
                event = events[cursors[name]]
                cursors[name] += 1
                used.add(event.event_id)
                taken.append((name, event))
                progressed = True
        if not progressed:
            break
    return taken


def _event_time(event: store.Event) -> str | None:
    return event.published_at


def _template_drafts(count: int, shares: Sequence[float], seed: int, reason: str) -> list[Draft]:
    """Template records, each template wholly inside one split (no cross-split near-duplicates)."""
    records = templates.generate_template_records(count, _rng(seed, f"templates-{reason}"))
    by_template: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_template.setdefault(record["label"]["template_id"], []).append(record)
    targets = dict(zip(SPLITS, _allocate(count, shares)))
    filled = {s: 0 for s in SPLITS}
    order = sorted(by_template)
    _rng(seed, f"template-split-{reason}").shuffle(order)
    drafts = []
    for template_id in order:
        group = by_template[template_id]
        # The split furthest below its target (relative) takes the next template.
        split = max(SPLITS, key=lambda s: ((targets[s] - filled[s]) / max(targets[s], 1), -SPLITS.index(s)))
        filled[split] += len(group)
        for record in group:
            drafts.append(Draft("template", split, "", record["instruction"], record["output"], record["label"], input_prefix=record["input"]))
    return drafts


def _report_drafts(count: int, shares: Sequence[float], seed: int) -> list[Draft]:
    rng = _rng(seed, "report_qa")
    records = report_qa.generate_records(count, rng)
    splits = [s for s, n in zip(SPLITS, _allocate(count, shares)) for _ in range(n)]
    drafts = []
    for record, split in zip(records, splits):
        drafts.append(
            Draft("report_qa", split, "", record["instruction"], record["output"], record["label"],
                  input_prefix=record["input"], compact_input=record["compact_input"])
        )
    return drafts


@contextmanager
def _stages(enabled: bool) -> Iterator[Any]:
    """A spinner on stderr naming the current stage (reading, deduplicating, ...)."""
    if not enabled:
        yield lambda _text: None
        return
    from rich.console import Console
    from rich.text import Text

    with Console(stderr=True).status("building the dataset") as status:
        yield lambda text: status.update(Text(text))  # Text: stage names quote paths, never markup


def build_dataset(config: BuildConfig) -> BuildResult:
    """Build the dataset described by `config` and write JSONL, card and stats.

    Refused while another process holds the run folder the output lies in (finqlora.core.lock).
    """
    config.validate()
    with lock_enclosing_run(Path(config.output).parent), _stages(config.progress) as stage:
        return _build(config, stage)


def _build(config: BuildConfig, stage: Any) -> BuildResult:
    notices: list[str] = []
    counts_wanted = dict(zip(TYPES, _allocate(config.num_samples, config.mix)))
    if config.tokenizer:
        stage(f"loading the tokenizer {config.tokenizer}")
    counter = load_length_counter(config.tokenizer)
    stats: dict[str, Any] = {}
    drafts: list[Draft] = []

    if config.db is None or config.templates_only:
        why = "--templates-only was given" if config.templates_only else "no --db was given"
        notices.append(
            f"{why}: the dataset is built ONLY from the {len(templates.TEMPLATES)} built-in Chinese finance "
            f"instruction templates ({config.num_samples} records); no news, labels or market data are used"
        )
        drafts = _template_drafts(config.num_samples, config.split, config.seed, "fallback")
        source_info: dict[str, Any] = {"database": None}
    else:
        stage(f"reading {config.db}")
        data = read_store(Path(config.db), config.naive_tz)
        drafts, source_info = _store_drafts(config, data, counts_wanted, notices, stats, stage)

    if config.add:
        stage(f"reading {len(config.add)} public data set(s)")
        drafts += _public_drafts(config, stats)
    stage(f"measuring {len(drafts)} records in tokens ({counter.name})")
    drafts, trimmed, dropped = trim_drafts(drafts, counter, config.max_length)
    if trimmed:
        notices.append(f"{trimmed} record(s) were longer than --max-length {config.max_length} tokens and had their input trimmed (outputs kept whole)")
    if dropped:
        notices.append(f"{dropped} record(s) could not fit in {config.max_length} tokens even with a minimal input and were left out")

    stage("checking for near-duplicates across splits")
    drafts = _check_cross_split(drafts, config.dedup_threshold, notices, stats)
    drafts = _decontaminate(drafts, config, notices, stats)
    drafts.sort(key=lambda d: (SPLITS.index(d.split), RECORD_ORDER.index(d.type), d.ts, d.record_id, d.instruction))
    prefix = {"news_impact": "ni", "market_analysis": "ma", "report_qa": "rq", "template": "tp", PUBLIC: "pd"}
    numbers: Counter[str] = Counter()
    for draft in drafts:
        if not draft.record_id:
            numbers[draft.type] += 1
            draft.record_id = f"{prefix[draft.type]}-{config.seed}-{numbers[draft.type]:06d}"
    for draft in drafts:
        if draft.type == "report_qa":
            report_qa.check_record({"id": draft.record_id, "input": draft.input, "output": draft.output, "label": draft.label})

    if not drafts:
        raise FinqloraError(
            f"no record could be built: {'; '.join(notices) or 'nothing to sample from'}",
            hint=f"raise train.max_length (now {config.max_length}; `finqlora build --max-length`) or check the database with `finqlora db check`",
        )
    records = [_to_record(d, config.format) for d in drafts]
    if len(records) < config.num_samples:
        notices.append(f"asked for {config.num_samples} samples, made {len(records)}")
    lengths = counter.record_lengths(drafts)
    stats = _stats(config, drafts, lengths, counter, trimmed, dropped, counts_wanted, source_info, notices, stats)
    stage(f"writing {config.output}")
    output = Path(config.output)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(output, text)
    write_dataset_info(output, records, config.format)
    stats_path = output.with_name(output.stem + ".stats.json")
    card_path = output.with_name(output.stem + ".card.md")
    atomic_write_json(stats_path, stats)
    atomic_write_text(card_path, render_card(stats, output.name))
    return BuildResult(output, card_path, stats_path, records, stats, notices)


def _missing_store_parts(config: BuildConfig, data: StoreData, candidates: list[store.Event]) -> tuple[str, str] | None:
    """(what is missing, how to add it) when the store cannot give news/market records."""
    p = config.rules.primary_window
    if not data.impacts:
        if not data.price_tickers:
            return ("the database has no price bars and no event impacts (market reactions)",
                    f"run `finqlora db ingest-prices --db {config.db} --ticker T FILE` and then `finqlora db impacts --db {config.db}`")
        return (f"the database has price bars ({', '.join(data.price_tickers)}) but no event impacts",
                f"run `finqlora db impacts --db {config.db}`")
    if not candidates:
        return (f"no event has a stored return at the primary window ({p} min)",
                f"compute it with `finqlora db impacts --db {config.db} --windows 5,10,15,30,120`, or choose --primary-window from the stored windows")
    return None


def _dedup_pool(config: BuildConfig, data: StoreData, candidates: list[store.Event], stats: dict[str, Any]) -> list[store.Event]:
    dedup = textdedup.deduplicate([news_text(e) for e in candidates], config.dedup_threshold)
    stats["dedup"] = {
        "events_read": len(data.events) + data.without_time + data.linked_duplicates,
        "linked_cross_source_duplicates_skipped": data.linked_duplicates,
        "without_time_skipped": data.without_time,
        "with_primary_window_return": len(candidates),
        "near_duplicates_dropped": len(dedup.duplicate_of),
        "threshold": config.dedup_threshold,
        "events_after_dedup": len(pool := [candidates[i] for i in dedup.keep]),
    }
    return pool


def _label_setup(config: BuildConfig, data: StoreData, pool: list[store.Event], stats: dict[str, Any]) -> tuple[SplitPlan, LabelContext]:
    """Split the pool by time and estimate the label scales on the train part (into stats)."""
    rules, p = config.rules, config.rules.primary_window
    plan = split_by_time(pool, config.split, config.embargo_min)
    ctx = build_label_context(plan.pools["train"], data.impacts, rules, config.primary_ticker)
    if (ctx.primary_ticker, p) not in ctx.sigmas:
        raise FinqloraError(
            f"too few training-period returns to estimate the volatility of {ctx.primary_ticker or 'any ticker'} at {p} min "
            f"(need {rules.min_estimation_samples})",
            hint="use a database with more events, or set data.primary_ticker (--primary-ticker) to a ticker that has impacts",
        )
    stats["split_plan"] = {
        "events_in_pool": len(pool),
        "by_split": {s: len(plan.pools[s]) for s in SPLITS},
        "train_end": plan.boundaries["train_end"],
        "val_end": plan.boundaries["val_end"],
        "embargo_min": config.embargo_min,
        "embargoed_events": plan.embargoed,
    }
    stats["thresholds"] = {
        f"{t}@{w}": {"sigma": s, "threshold": lab.threshold_for(s, rules)} for (t, w), s in sorted(ctx.sigmas.items())
    }
    stats["primary_ticker"] = ctx.primary_ticker
    stats["typical_abs_return_primary_window"] = ctx.typical_abs
    return plan, ctx


def _news_drafts(split: str, order: list[store.Event], want: int, data: StoreData, ctx: LabelContext,
                 decisions: dict[str, dict[str, rel.Decision]], rng: random.Random) -> list[Draft]:
    """Up to `want` ex-ante news-impact drafts from the shuffled events of one split.

    Labelled lazily in shuffled order, so a small build does not pay for labelling every event.
    """
    drafts: list[Draft] = []
    for event in order:
        if len(drafts) == want:
            break
        label = news_impact_label(data.impacts[event.event_id], ctx, decisions[event.event_id])
        if label is None:
            continue
        names = "、".join(TICKER_NAMES.get(t, t) for t in label["directions"])
        drafts.append(Draft(
            "news_impact", split, f"ni-{event.event_id}", rng.choice(_NEWS_INSTRUCTIONS).format(names=names),
            news_impact_output(label, rng), label, input_prefix=_news_prefix(event), news=news_text(event),
            event_id=event.event_id, event_time=_event_time(event), ts=event.ts_utc,
        ))
    return drafts


def _market_drafts(split: str, candidates: list[store.Event], want: int, data: StoreData, ctx: LabelContext,
                   windows: Sequence[int], rng: random.Random) -> list[Draft]:
    """Ex-post market-analysis drafts, balanced over the case types (classified until every
    case type has enough events for the quota)."""
    groups: dict[str, list[store.Event]] = {}
    for event in candidates:
        if len(groups) == len(MARKET_GROUPS) and all(len(g) >= want for g in groups.values()):
            break
        impact = data.impacts[event.event_id]
        case = classify_market(impact, ctx)
        if case is not None:
            groups.setdefault(case, []).append(event)
        if importance_applies(impact, ctx):
            groups.setdefault(lab.IMPORTANCE, []).append(event)
    drafts = []
    for case_name, event in _take_balanced(groups, want):
        impact = data.impacts[event.event_id]
        if case_name == lab.IMPORTANCE:
            instruction, suffix, output, label = importance_record(event, impact, ctx, rng)
        else:
            instruction, suffix, output, label = market_case_record(impact, ctx, windows, rng)
        drafts.append(Draft(
            "market_analysis", split, f"ma-{event.event_id}", instruction, output, label,
            input_prefix=_news_prefix(event), news=news_text(event), input_suffix=suffix,
            event_id=event.event_id, event_time=_event_time(event), ts=event.ts_utc,
        ))
    return drafts


def _label_predictability(plan: SplitPlan, data: StoreData, ctx: LabelContext, decisions: dict[str, dict[str, rel.Decision]], seed: int) -> dict[str, Any]:
    """dataset/predictability.py on every labelled event of the train, validation and test pools
    (not only the sampled records: the check needs numbers), each capped at MAX_EVENTS by a seeded sample."""
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for split in SPLITS:
        events = list(plan.pools[split])
        if len(events) > predictability.MAX_EVENTS:
            events = _rng(seed, f"predictability-{split}").sample(events, predictability.MAX_EVENTS)
        texts[split], labels[split] = [], []
        for event in events:
            label = news_impact_label(data.impacts[event.event_id], ctx, decisions[event.event_id])
            if label is not None:
                texts[split].append(news_text(event))
                labels[split].append(label["direction"])
    return predictability.check(texts["train"], labels["train"], texts["val"], labels["val"], texts["test"], labels["test"], seed=seed)


def _store_drafts(config: BuildConfig, data: StoreData, counts_wanted: dict[str, int], notices: list[str], stats: dict[str, Any], stage: Any) -> tuple[list[Draft], dict[str, Any]]:
    p = config.rules.primary_window
    source_info = {"database": data.fingerprint}
    if counts_wanted["news_impact"] + counts_wanted["market_analysis"] == 0:
        # --mix 0,0,N: nothing is taken from the store's events.
        return _report_drafts(counts_wanted["report_qa"], config.split, config.seed), source_info
    if data.without_time:
        notices.append(f"{data.without_time} event(s) have no readable publication time and were left out (a time-based split needs one)")
    if not data.events:
        raise FinqloraError(
            f"{config.db} has no usable events (primary events with text and a publication time)",
            hint=f"check it with `finqlora db check --db {config.db}` and `finqlora db stats --db {config.db}`",
        )
    # Only events with a primary-window return can be sampled, so only they are deduplicated.
    candidates = [e for e in data.events if any(w == p for (_, w) in data.impacts.get(e.event_id, {}))]
    missing = _missing_store_parts(config, data, candidates)
    if missing:
        missing_count = counts_wanted["news_impact"] + counts_wanted["market_analysis"]
        notices.append(f"{missing[0]}: news_impact and market_analysis records need them, so "
                       f"{missing_count} built-in template records were built in their place ({missing[1]})")
        drafts = _report_drafts(counts_wanted["report_qa"], config.split, config.seed)
        drafts += _template_drafts(missing_count, config.split, config.seed, "missing-store-parts")
        return drafts, source_info

    stage(f"removing near-duplicates among {len(candidates)} events")
    pool = _dedup_pool(config, data, candidates, stats)
    stage(f"splitting {len(pool)} events by time and labelling")
    plan, ctx = _label_setup(config, data, pool, stats)
    decisions = relevance_decisions(pool, data.impacts, ctx)
    stats["relevance"] = relevance_stats(pool, decisions, data.impacts, ctx, config.seed)
    stage("checking whether the direction labels are predictable from the news")
    stats["predictability"] = {**_label_predictability(plan, data, ctx, decisions, config.seed), "news_share": config.mix[0] / sum(config.mix)}
    windows = sorted({w for imp in data.impacts.values() for (_, w) in imp}, key=lambda w: (w > 0, w))
    rng = _rng(config.seed, "store")
    news_split_counts = dict(zip(SPLITS, _allocate(counts_wanted["news_impact"], config.split)))
    market_split_counts = dict(zip(SPLITS, _allocate(counts_wanted["market_analysis"], config.split)))
    drafts: list[Draft] = []
    shortfalls = []
    for split in SPLITS:
        order = list(plan.pools[split])
        rng.shuffle(order)
        news = _news_drafts(split, order, news_split_counts[split], data, ctx, decisions, rng)
        if len(news) < news_split_counts[split]:
            shortfalls.append(f"news_impact/{split}: asked for {news_split_counts[split]}, only {len(news)} relevant events qualify")
        used = {d.event_id for d in news}
        # Events unused by news_impact come first, relevant ones before the others.
        ranked = sorted(order, key=lambda e: (e.event_id in used, not any(d.relevant for d in decisions[e.event_id].values())))
        market = _market_drafts(split, ranked, market_split_counts[split], data, ctx, windows, rng)
        if len(market) < market_split_counts[split]:
            shortfalls.append(f"market_analysis/{split}: asked for {market_split_counts[split]}, only {len(market)} events qualify")
        drafts += news + market
    if shortfalls:
        notices.append("the database has fewer qualifying events than asked for (each event is used at most once per type, "
                       "and never in two splits): " + "; ".join(shortfalls))
    drafts += _report_drafts(counts_wanted["report_qa"], config.split, config.seed)
    return drafts, source_info


def _public_drafts(config: BuildConfig, stats: dict[str, Any]) -> list[Draft]:
    """Records of every --add-dataset source, each source split by the split shares on its own."""
    drafts: list[Draft] = []
    sources = []
    for number, source in enumerate(config.add):
        items = mixture.load_source(source, config.seed)
        order = list(range(len(items)))
        _rng(config.seed, f"add-split-{number}-{source.path.name}").shuffle(order)
        splits = [s for s, n in zip(SPLITS, _allocate(len(items), config.split)) for _ in range(n)]
        name = source.path.name
        for index, split in zip(order, splits):
            item = items[index]
            label = {"source": name, "format": source.format, **item.label}
            drafts.append(Draft(PUBLIC, split, "", item.instruction, item.output, label, news=item.input, ts=index))
        sources.append({"name": name, "path": str(source.path), "format": source.format, "licence": mixture.LICENCE_NOTES[source.format],
                        "rows_taken": len(items), "by_split": dict(Counter(splits))})
    stats["public_data"] = sources
    return drafts


def _decontaminate(drafts: list[Draft], config: BuildConfig, notices: list[str], stats: dict[str, Any]) -> list[Draft]:
    """Drop every record whose main text duplicates (exactly or nearly) an evaluation item."""
    if not config.decontaminate:
        return drafts
    eval_sets = {str(path): mixture.eval_texts(Path(path)) for path in config.decontaminate}
    hits = mixture.contaminated([d.news or d.input for d in drafts], eval_sets, config.dedup_threshold)
    # A mixed-in instruction row (DISC-Fin-SFT, Alpaca) often holds its question in the instruction, its input empty.
    public = [i for i, d in enumerate(drafts) if d.type == PUBLIC]
    for index, name in mixture.contaminated([drafts[i].instruction for i in public], eval_sets, config.dedup_threshold).items():
        hits.setdefault(public[index], name)
    by_type = Counter(drafts[i].type for i in hits)
    stats["decontamination"] = {"eval_sets": {k: len(v) for k, v in eval_sets.items()}, "threshold": config.dedup_threshold,
                                "dropped": len(hits), "dropped_by_type": dict(sorted(by_type.items())),
                                "dropped_by_eval_set": dict(sorted(Counter(hits.values()).items()))}
    if hits:
        notices.append(f"{len(hits)} record(s) duplicated an evaluation item and were left out (decontamination)")
    return [d for i, d in enumerate(drafts) if i not in hits]


def _check_cross_split(drafts: list[Draft], threshold: float, notices: list[str], stats: dict[str, Any]) -> list[Draft]:
    """Drop any news-based record whose news text near-duplicates one in an earlier split.

    report_qa statements are random (pairwise 3-gram Jaccard about 0.3, at most 0.48 over
    79,800 measured pairs) and templates are split by template, so only records that carry
    news are compared.
    """
    groups = [[d for d in drafts if d.split == s and d.news] for s in SPLITS]
    others = [d for d in drafts if not d.news]
    texts = [[d.news for d in group] for group in groups]
    pairs = textdedup.cross_group_duplicates(texts, threshold)
    drop = {(gb, ib) for _, _, gb, ib in pairs}
    # Two records of the same event in one split are not a leak; only the later split loses.
    stats["cross_split_near_duplicates_removed"] = len(drop)
    if drop:
        notices.append(f"{len(drop)} record(s) near-duplicated a record of an earlier split and were left out")
    return [d for g, group in enumerate(groups) for i, d in enumerate(group) if (g, i) not in drop] + others


def _to_record(draft: Draft, record_format: str) -> dict[str, Any]:
    meta = {
        "id": draft.record_id,
        "type": draft.type,
        "split": draft.split,
        "event_id": draft.event_id,
        "event_time": draft.event_time,
        "label": draft.label,
    }
    if record_format == "messages":
        messages = [
            {"role": "user", "content": user_content(draft.instruction, draft.input)},
            {"role": "assistant", "content": draft.output},
        ]
        return {"messages": messages, **meta}
    if record_format == "sharegpt":
        turns = [{"from": "human", "value": user_content(draft.instruction, draft.input)}, {"from": "gpt", "value": draft.output}]
        return {"conversations": turns, **meta}
    return {"id": draft.record_id, "type": draft.type, "instruction": draft.instruction, "input": draft.input,
            "output": draft.output, **{k: v for k, v in meta.items() if k not in ("id", "type")}}


def _distribution(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


def _stats(config: BuildConfig, drafts: Sequence[Draft], lengths: Sequence[tuple[int, int]], counter: LengthCounter, trimmed: int, dropped: int,
           counts_wanted: dict[str, int], source_info: dict[str, Any], notices: list[str], partial: dict[str, Any]) -> dict[str, Any]:
    by_label: dict[str, Counter[str]] = {}
    by_ticker: Counter[str] = Counter()
    for d in drafts:
        if d.type == "news_impact":
            by_label.setdefault("news_impact.direction", Counter())[d.label["direction"]] += 1
            for ticker, direction in d.label["directions"].items():
                by_ticker[ticker] += 1
                by_label.setdefault(f"news_impact.direction.{ticker}", Counter())[direction] += 1
        elif d.type == "market_analysis":
            by_label.setdefault("market_analysis.case", Counter())[d.label["case"]] += 1
            by_ticker[d.label["ticker"]] += 1
        elif d.type == "report_qa":
            by_label.setdefault("report_qa.metric", Counter())[d.label["metric"]] += 1
        elif d.type == PUBLIC:
            by_label.setdefault(f"public_data.{d.label['source']}", Counter())[d.label.get("class", "instruction")] += 1
        else:
            by_label.setdefault("template.category", Counter())[d.label["category"]] += 1
    by_split_type: dict[str, dict[str, int]] = {}
    for d in drafts:
        by_split_type.setdefault(d.split, {}).setdefault(d.type, 0)
        by_split_type[d.split][d.type] += 1
    event_times: dict[str, list[str]] = {}
    for d in drafts:
        if d.event_time:
            event_times.setdefault(d.split, []).append(d.event_time)
    totals = [p + a for p, a in lengths]
    return {
        "records": len(drafts),
        "requested": {"num_samples": config.num_samples, "by_type": counts_wanted},
        "by_type": dict(sorted(Counter(d.type for d in drafts).items())),
        "by_split": {s: sum(1 for d in drafts if d.split == s) for s in SPLITS},
        "by_split_and_type": {s: dict(sorted(by_split_type.get(s, {}).items())) for s in SPLITS},
        "by_label": {k: dict(sorted(v.items())) for k, v in sorted(by_label.items())},
        "by_ticker": dict(sorted(by_ticker.items())),
        "event_time_range_by_split": {s: [min(v), max(v)] for s, v in ((s, event_times.get(s)) for s in SPLITS) if v},
        "length_tokens": {
            "counted_with": counter.name,
            "max_length": config.max_length,
            "prompt": _distribution([p for p, _ in lengths]),
            "answer": _distribution([a for _, a in lengths]),
            "total": _distribution(totals),
            "trimmed": trimmed,
            "dropped_too_long": dropped,
        },
        "rules": config.rules.describe() | {
            "split": "by event time: the first share of the time-ordered events is train, then val, then test; "
                     "ties stay together; events within embargo_min after a boundary are dropped",
            "dedup": "3-gram MinHash/LSH candidates verified by exact Jaccard >= threshold, earliest kept",
        },
        **partial,
        "source": source_info,
        "config": {
            "seed": config.seed,
            "mix": list(config.mix),
            "split": list(config.split),
            "format": config.format,
            "tokenizer": config.tokenizer,
            "max_length": config.max_length,
            "templates_only": config.templates_only,
            "primary_ticker": config.primary_ticker,
            "add": [{"path": str(a.path), "format": a.format, "samples": a.samples} for a in config.add],
            "decontaminate": [str(p) for p in config.decontaminate],
        },
        "notices": list(notices),
    }


def render_card(stats: dict[str, Any], dataset_name: str) -> str:
    """A markdown dataset card from the stats (what is in the file and how it was made)."""
    lines = [f"# Dataset card: {dataset_name}", ""]
    source = stats["source"].get("database")
    if source:
        lines += [f"Built by `finqlora build` from `{source['path']}` (sha256 `{source['sha256'][:16]}…`, "
                  f"{source['events']} events, {source['events_with_returns']} with stored returns).", ""]
    else:
        lines += ["Built by `finqlora build` from the built-in instruction templates only (no database).", ""]
    lines += ["## Contents", "", "| type | train | val | test | total |", "| --- | --- | --- | --- | --- |"]
    for record_type in sorted(stats["by_type"]):
        row = [str(stats["by_split_and_type"][s].get(record_type, 0)) for s in SPLITS]
        lines.append(f"| {record_type} | {' | '.join(row)} | {stats['by_type'][record_type]} |")
    lines.append(f"| all | {' | '.join(str(stats['by_split'][s]) for s in SPLITS)} | {stats['records']} |")
    lines += ["", "## Labels", ""]
    for key, counts in stats["by_label"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if stats.get("split_plan"):
        plan = stats["split_plan"]
        lines += ["", "## Split (by event time)", "",
                  f"- train ends {plan['train_end']}, val ends {plan['val_end']}; every later split's events are later.",
                  f"- {plan['embargoed_events']} events within {plan['embargo_min']} min after a boundary were left out (embargo).",
                  f"- near-duplicates dropped before sampling: {stats['dedup']['near_duplicates_dropped']} "
                  f"(threshold {stats['dedup']['threshold']}); linked cross-source duplicates skipped: "
                  f"{stats['dedup']['linked_cross_source_duplicates_skipped']}."]
    lines.append(f"- cross-split near-duplicates removed after building: {stats['cross_split_near_duplicates_removed']}.")
    if stats.get("thresholds"):
        lines += ["", "## Direction thresholds (estimated on the train period)", "", "| ticker@window | sigma | threshold |", "| --- | --- | --- |"]
        for key, value in stats["thresholds"].items():
            lines.append(f"| {key} | {value['sigma'] * 100:.4f}% | {value['threshold'] * 100:.4f}% |")
    rules = stats["rules"]
    lines += ["", "## Rules", "", f"- direction: {rules['direction']}", f"- sigma: {rules['sigma']}", f"- magnitude: {rules['magnitude']}"]
    lines += [f"- {key}: {rules[key]}" for key in ("z", "hold_adjacent") if key in rules]
    lines.append("- news_impact answers are ex-ante: direction per relevant ticker, channel, precedent, what would change the view "
                 "and a confidence word, never the realized move (that is the record's label); market_analysis cases are ex-post "
                 "and carry the realized returns in their input.")
    lines += [f"- {case}: {rule}" for case, rule in rules["cases"].items()]
    lines += _card_relevance(stats) + predictability.card_lines(stats.get("predictability")) + _card_public(stats)
    lengths = stats["length_tokens"]
    lines += ["", "## Lengths (tokens)", "", f"Counted with {lengths['counted_with']}; max length {lengths['max_length']}; "
              f"trimmed {lengths['trimmed']}, dropped {lengths['dropped_too_long']}.", ""]
    for part in ("prompt", "answer", "total"):
        dist = lengths[part]
        if dist:
            lines.append(f"- {part}: min {dist['min']}, median {dist['p50']}, p90 {dist['p90']}, p99 {dist['p99']}, max {dist['max']}")
    if stats["notices"]:
        lines += ["", "## Notices", ""] + [f"- {n}" for n in stats["notices"]]
    lines += ["", "## Caveats", "",
              "- Labels describe the realized price reaction after publication (event study), not a forecast; other news in the same window also moves prices.",
              "- report_qa statements are simulated (fictional companies); every answer was recomputed from the statement text by the builder.",
              "- News text belongs to its publishers; use the dataset for research and education.", ""]
    return "\n".join(lines)


def _card_relevance(stats: dict[str, Any]) -> list[str]:
    relevance = stats.get("relevance")
    if not relevance:
        return []
    lines = ["", "## Relevance (which tickers an event may be labelled by)", "",
             "Rule: `finqlora.dataset.relevance` (CLS subjects tags and keyword lists per channel for gold/silver, "
             "`stocks` links for equities). Events relevant to no labelled ticker are left out of news_impact.", "",
             "| ticker | " + " | ".join(("subject", "keyword", "stocks", "none")) + " |", "| --- | --- | --- | --- | --- |"]
    for ticker, counts in relevance["by_ticker"].items():
        lines.append(f"| {ticker} | " + " | ".join(str(counts.get(k, 0)) for k in ("subject", "keyword", "stocks", "none")) + " |")
    for ticker, channels in relevance["by_channel"].items():
        lines.append(f"- {ticker} channels: " + ", ".join(f"{k} {v}" for k, v in channels.items()))
    for group, value in relevance["primary_ticker_signal"].items():
        lines.append(f"- {group} events: {value['events']}, median |z| {value['median_abs_z']}, "
                     f"share labelled 利好/利空 {value['directional_share']}")
    for decision, examples in relevance["examples"].items():
        lines += ["", f"Examples, {decision}:", ""]
        lines += [f"- `{e['event_id']}` {e['channel'] or '-'} ({e['evidence'] or 'no match'}): {e['text'][:60]}" for e in examples]
    return lines


def _card_public(stats: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if stats.get("public_data"):
        lines += ["", "## Public data mixed in", "", "| source | format | rows | train/val/test | licence |", "| --- | --- | --- | --- | --- |"]
        for src in stats["public_data"]:
            parts = "/".join(str(src["by_split"].get(s, 0)) for s in SPLITS)
            lines.append(f"| {src['name']} | {src['format']} | {src['rows_taken']} | {parts} | {src['licence']} |")
    decon = stats.get("decontamination")
    if decon:
        lines += ["", "## Decontamination", "",
                  f"Records whose text equals or near-duplicates (3-gram Jaccard >= {decon['threshold']}) an evaluation item "
                  f"were dropped: {decon['dropped']} ({', '.join(f'{k} {v}' for k, v in decon['dropped_by_type'].items()) or 'none'})."]
        lines += [f"- {name}: {count} items" for name, count in decon["eval_sets"].items()]
    return lines


def preview_records(path: Path, n: int = 3) -> list[dict[str, Any]]:
    """The first n records of a dataset file, with clear errors for unreadable lines."""
    if not path.exists():
        raise FinqloraError(f"{path} does not exist", hint="build a dataset with `finqlora build --output PATH`")
    records = []
    hint = "each line must be one JSON object; rebuild the file with `finqlora build`"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if len(records) >= n:
                break
            if not raw.strip():
                continue
            try:
                record = json_loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise FinqloraError(f"{path}, line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", hint=hint) from None
            except InputError as exc:
                raise FinqloraError(f"{path}, line {number}: not valid JSON ({exc})", hint=hint) from None
            if not isinstance(record, dict):
                raise FinqloraError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}", hint=hint)
            records.append(record)
    return records

