"""Read a model's free-text answer back into something a metric can score.

Two kinds of answers are parsed:

* **Direction** (news impact, sentiment benchmarks): one of the canonical classes
  `利好` (bullish / positive), `利空` (bearish / negative) or `中性` (neutral), or `None` when
  the text does not commit to one. The rules, in order:

  1. *Structured answer*: a key such as `方向` / `判断` / `结论` / `影响` / `情绪` / `Direction` /
     `Sentiment` / `Answer` followed by `:`/`：`/`为`/`是` and a direction term (the format the
     fine-tuned model is trained to produce). When a ticker is given, a line or clause naming
     that ticker with a direction term is preferred over a generic key.
  2. *Free wording*: every strong direction term in the text (利好, 看涨, 偏多, 积极, bullish,
     positive, ... and their negative/neutral counterparts). If they all point the same way,
     that is the answer; if they disagree (e.g. "短期利好，长期利空") the answer is ambiguous and
     parsed as `None`. Weak terms (上涨, 下跌, rise, fall) are only used when no strong term
     occurs, because answers also *describe* realized moves.
  3. *Negation*: a negated term is not evidence for its own class. "不利好" / "not bullish"
     reads as `利空` ("不利" itself means unfavourable); "并非利空" / "not bearish" reads as
     `中性` (ruling out a fall does not assert a rise). A non-negated term elsewhere wins
     over a negated one.

* **Numbers** (financial-report Q&A): the value and unit of the answer, with Chinese
  magnitude words converted (`3.2亿元` -> 320000000 元, `1.5万` -> 15000). The answer is the
  number after an explicit key (`答案`, `结果`, `Answer`, `=`), else the last number in the
  text (worked answers end with their result).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POSITIVE = "利好"
NEGATIVE = "利空"
NEUTRAL = "中性"
DIRECTIONS = (POSITIVE, NEGATIVE, NEUTRAL)

# Strong terms state a verdict. Longer alternatives first so "中性偏多" is not read as "中性".
_STRONG_TERMS: dict[str, tuple[str, ...]] = {
    POSITIVE: (
        "中性偏多", "中性偏利好", "利好", "看涨", "看多", "偏多", "偏利好", "正面", "积极", "乐观", "利多",
        "bullish", "positive", "upside", "favorable", "favourable",
    ),
    NEGATIVE: (
        "中性偏空", "中性偏利空", "利空", "看跌", "看空", "偏空", "偏利空", "负面", "消极", "悲观", "不利",
        "bearish", "negative", "downside", "unfavorable", "unfavourable",
    ),
    NEUTRAL: (
        "中性", "中立", "影响有限", "影响不大", "无明显影响", "没有明显影响", "影响较小", "不确定", "震荡",
        "neutral", "mixed", "limited impact", "no significant", "no clear", "flat", "sideways",
    ),
}
_WEAK_TERMS: dict[str, tuple[str, ...]] = {
    POSITIVE: ("上涨", "走高", "上行", "走强", "上升", "涨", "rise", "rises", "rally", "gain", "higher", "up"),
    NEGATIVE: ("下跌", "走低", "下行", "走弱", "下降", "跌", "fall", "falls", "drop", "decline", "lower", "down"),
    NEUTRAL: ("持平", "横盘", "unchanged"),
}
# Negation words directly before a term (a few characters may sit between: "并不构成利空").
_NEGATION = r"(?:不是|并非|并不|不会|不构成|非|无|没有|未|不|not|isn't|is not|no|never|hardly)"
_NEGATED_READING = {POSITIVE: NEGATIVE, NEGATIVE: NEUTRAL, NEUTRAL: None}

_KEYS = (
    r"方向|判断|结论|影响方向|影响|情绪|倾向|观点|评级|答案|回答|标签|"
    r"direction|sentiment|verdict|answer|label|conclusion|impact|outlook"
)


def _term_regex(terms: tuple[str, ...]) -> str:
    parts = []
    for term in sorted(terms, key=len, reverse=True):
        escaped = re.escape(term)
        # Latin words need word boundaries ("up" must not match "support").
        parts.append(rf"\b{escaped}\b" if term[0].isascii() else escaped)
    return "|".join(parts)


def _compile_terms(table: dict[str, tuple[str, ...]]) -> list[tuple[str, re.Pattern[str]]]:
    return [(label, re.compile(_term_regex(terms), re.IGNORECASE)) for label, terms in table.items()]


_STRONG = _compile_terms(_STRONG_TERMS)
_WEAK = _compile_terms(_WEAK_TERMS)
_ALL_STRONG = re.compile("|".join(_term_regex(t) for t in _STRONG_TERMS.values()), re.IGNORECASE)
_KEYED = re.compile(rf"(?:{_KEYS})[*\s】\]]*(?:[:：=]|为|是|判断为|属于)\s*[*\"'“「【\[(（]*\s*(?P<rest>[^\n。；;]*)", re.IGNORECASE)
_NEGATION_BEFORE = re.compile(rf"{_NEGATION}\s*(?:\S{{0,2}}\s*)?$", re.IGNORECASE)


@dataclass(frozen=True)
class DirectionParse:
    """The parsed class (None if unparseable) and how it was found."""

    direction: str | None
    method: str  # "structured" | "ticker" | "keyword" | "weak_keyword" | "ambiguous" | "none"


def _mentions(text: str, table: list[tuple[str, re.Pattern[str]]]) -> list[tuple[int, str, bool]]:
    """(position, class, negated) for each direction term, longest match wins on overlaps."""
    found: list[tuple[int, int, str]] = []
    for label, pattern in table:
        for match in pattern.finditer(text):
            found.append((match.start(), match.end(), label))
    found.sort(key=lambda item: (item[0], -(item[1] - item[0])))
    mentions: list[tuple[int, str, bool]] = []
    covered_until = -1
    for start, end, label in found:
        if start < covered_until:
            continue  # inside a longer term already taken (e.g. "利好" inside "中性偏利好")
        covered_until = end
        window = text[max(0, start - 8) : start]
        negated = bool(_NEGATION_BEFORE.search(window))
        if label == NEGATIVE and text[start : end] == "不利" and text[end : end + 1] == "好":
            # "不利好" matches the negative word "不利"; it means "not favourable", i.e. 利空.
            negated = False
        mentions.append((start, label, negated))
    return mentions


def _resolve(mentions: list[tuple[int, str, bool]]) -> str | None | bool:
    """One class if the mentions agree, False if they conflict, None if there are none."""
    plain = {label for _, label, negated in mentions if not negated}
    if plain:
        return plain.pop() if len(plain) == 1 else False
    negated_readings = {_NEGATED_READING[label] for _, label, negated in mentions if negated} - {None}
    if negated_readings:
        return negated_readings.pop() if len(negated_readings) == 1 else False
    return None


def _first_class(fragment: str) -> str | None:
    """The class of the first direction term in a short fragment (after a key)."""
    mentions = _mentions(fragment, _STRONG) or _mentions(fragment, _WEAK)
    if not mentions:
        return None
    _, label, negated = mentions[0]
    return _NEGATED_READING[label] if negated else label


def parse_direction(text: str | None, ticker: str | None = None) -> DirectionParse:
    """Parse a direction answer; see the module docstring for the rules."""
    if not text or not text.strip():
        return DirectionParse(None, "none")
    if ticker:
        for clause in re.split(r"[\n。；;]", text):
            if ticker.lower() in clause.lower() and _ALL_STRONG.search(clause):
                after = clause[clause.lower().index(ticker.lower()) + len(ticker) :]
                label = _first_class(after) or _first_class(clause)
                if label:
                    return DirectionParse(label, "ticker")
    for match in _KEYED.finditer(text):
        label = _first_class(match.group("rest")[:40])
        if label:
            return DirectionParse(label, "structured")
    for table, method in ((_STRONG, "keyword"), (_WEAK, "weak_keyword")):
        mentions = _mentions(text, table)
        if not mentions:
            continue
        resolved = _resolve(mentions)
        if resolved is False:
            return DirectionParse(None, "ambiguous")
        if resolved:
            return DirectionParse(resolved, method)
    return DirectionParse(None, "none")


# ---------------------------------------------------------------------------------------------
# Numbers

_MAGNITUDE = {"万亿": 1e12, "亿": 1e8, "千万": 1e7, "百万": 1e6, "万": 1e4, "千": 1e3}
_NUMBER = re.compile(
    r"(?P<sign>[-−–+]?)\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s*"
    r"(?P<mag>万亿|千万|百万|亿|万|千)?\s*(?P<unit>%|％|个百分点|元|倍|x\b|times\b|percent\b)?",
    re.IGNORECASE,
)
_ANSWER_KEY = re.compile(r"(?:答案|结果|最终|answer|result)\s*(?:是|为|约为|约|[:：=])?|[=≈]|约为|为", re.IGNORECASE)


@dataclass(frozen=True)
class NumberParse:
    value: float
    unit: str | None  # "%", "元", "倍", or None when the text gave no unit


def _normalize_unit(raw: str | None) -> str | None:
    if not raw:
        return None
    raw = raw.lower()
    if raw in ("%", "％", "percent", "个百分点"):
        return "%"
    if raw in ("倍", "x", "times"):
        return "倍"
    return raw


def _to_number(match: re.Match[str]) -> NumberParse:
    value = float(match.group("num").replace(",", ""))
    if match.group("sign") in ("-", "−", "–"):
        value = -value
    if match.group("mag"):
        value *= _MAGNITUDE[match.group("mag")]
    return NumberParse(value, _normalize_unit(match.group("unit")))


def parse_number(text: str | None, expected_unit: str | None = None) -> NumberParse | None:
    """The numeric answer in `text`, or None when there is none.

    With `expected_unit`, numbers carrying that unit are preferred (a worked answer often
    mentions inputs in other units before the result).
    """
    if not text:
        return None
    candidates: list[tuple[int, NumberParse]] = []
    for match in _NUMBER.finditer(text):
        # Skip digits that are part of a date or a label such as "2024年" or "Q3".
        has_unit = bool(match.group("unit") or match.group("mag"))
        following = text[match.end() : match.end() + 1]
        preceding = text[max(0, match.start() - 1) : match.start()]
        if not has_unit and (following and following in "年月日季" or preceding.isascii() and preceding.isalpha()):
            continue
        candidates.append((match.start(), _to_number(match)))
    if not candidates:
        return None
    if expected_unit:
        wanted = _normalize_unit(expected_unit)
        with_unit = [c for c in candidates if c[1].unit == wanted]
        if with_unit:
            candidates = with_unit
    keyed_positions = [m.end() for m in _ANSWER_KEY.finditer(text)]
    if keyed_positions:
        last_key = keyed_positions[-1]
        after_key = [c for c in candidates if c[0] >= last_key]
        if after_key:
            return after_key[0][1]
    return candidates[-1][1]
