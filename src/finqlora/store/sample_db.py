"""A small, deterministic, SYNTHETIC sample database with the full store structure.

Everything in it is made up here, from templates: Chinese finance flash news in the style of
the 7x24 telegraphs (central-bank speakers, US data releases, geopolitics, gold reserves and
ETF holdings, fictional listed companies' results, PBOC policy, oil and the dollar), told by
a main feed (`sample_a`, CLS-style A/B/C levels) and re-told by a second feed (`sample_b`)
a few minutes later in other words, so cross-source linking has work to do. The officials are
named by role only and every company name is fictional.

Prices are synthetic 1-minute bars for XAUUSD and XAGUSD that react to the news: an event
marked bullish (bearish) for gold moves the price up (down) over the next minutes, so the
stored returns and the labels derived from them agree with the text. The market is closed at
weekends (Fri 21:00 - Sun 22:00 UTC), has a daily break 21:00 - 22:00 UTC, one feed outage and
a holiday close, so some events fall before or inside a gap and get no return. Price flashes
("现货黄金日内涨0.8%，报...") quote the synthetic bars themselves.

Impacts are computed by the real `finqlora.store.impacts` code. The database says it is synthetic
in `finqlora_meta` (`synthetic` = `true`, plus a description and the seed).
"""

from __future__ import annotations

import calendar
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finqlora.store.db import init_db, open_store, set_meta, transaction
from finqlora.core.errors import FinqloraError
from finqlora.store.impacts import compute_impacts
from finqlora.store.ingest import Bars, NewsRecord, star_for, store_bars, store_news

SAMPLE_START = "2026-03-02T00:00:00Z"  # a Monday
SAMPLE_DAYS = 28
DEFAULT_EVENT_COUNT = 420
SAMPLE_TICKERS = ("XAUUSD", "XAGUSD")
BEIJING_OFFSET_MIN = 480

_ROLES = ["美联储主席", "美联储副主席", "纽约联储主席", "亚特兰大联储主席", "明尼阿波利斯联储主席", "旧金山联储主席", "克利夫兰联储主席", "美联储理事"]
_COMPANIES = [
    ("澜屿科技", "半导体设备"), ("岚峰新材", "锂电材料"), ("禾岫电子", "消费电子"), ("昕湃能源", "光伏组件"),
    ("蔚衡医药", "创新药"), ("舜翎智能", "工业机器人"), ("珩岳重工", "工程机械"), ("沐岑食品", "休闲食品"),
    ("锴元证券", "券商"), ("霁川银行", "城商行"), ("鸥澜汽车", "新能源整车"), ("岑屿矿业", "黄金开采"),
    ("曜澄通信", "光模块"), ("栎泰化工", "精细化工"), ("汀航物流", "跨境物流"), ("稷禾农业", "种业"),
]
_REGIONS = [("中东", "以色列", "伊朗"), ("红海", "胡塞武装", "商船"), ("东欧", "俄罗斯", "乌克兰"), ("南亚", "印度", "巴基斯坦")]
_OPINION_BANKS = ["高盛", "摩根大通", "瑞银", "花旗", "美国银行", "德意志银行", "中金公司", "中信证券"]


@dataclass
class _Draft:
    """An event before it is turned into records: text plus its (synthetic) market effect."""

    ts: int
    title: str
    body: str
    level: str
    subjects: list[str]
    gold_effect: float  # signed log-return the event adds to gold over the next minutes
    retell: bool = False
    price_flash: bool = False


def _beijing(ts: int) -> time.struct_time:
    return time.gmtime(ts + BEIJING_OFFSET_MIN * 60)


def _dateline(ts: int) -> str:
    local = _beijing(ts)
    return f"{local.tm_mon}月{local.tm_mday}日电，"


def _month_cn(ts: int, back: int = 1) -> int:
    month = _beijing(ts).tm_mon - back
    return month + 12 if month <= 0 else month


def _pct(x: float) -> str:
    return f"{x:.1f}%"


# Unscheduled news, weighted like a telegraph day; data releases and policy decisions are
# placed at their real release times by `_scheduled`.
_RANDOM_KINDS = {"fed": 12, "geo": 9, "etf": 5, "earnings": 18, "oil": 5, "dollar": 5, "yield": 5, "bank_view": 6}


# (title, body, gold_effect, subjects, level) of one synthetic event.
_Drafted = tuple[str, str, float, list[str], str]


def _fed_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    hawkish = rng.random() < 0.5
    if hawkish:
        phrase = rng.choice(["通胀回落进程停滞 不急于降息", "可能需要更长时间维持高利率", "不排除进一步加息的可能", "劳动力市场依然强劲 降息应保持耐心"])
        detail = rng.choice(["近期通胀数据令人失望，政策需要保持限制性", "目前没有理由调整利率路径，需要看到更多通胀降温的证据", "服务业价格粘性较强，过早放松政策的风险更大"])
    else:
        phrase = rng.choice(["年内降息仍是合适的", "劳动力市场降温 支持逐步放松政策", "通胀正朝着2%的目标迈进", "政策已具有足够限制性"])
        detail = rng.choice(["若数据继续改善，今年晚些时候开始降息是合适的", "就业增长放缓，通胀压力已明显缓解", "当前利率水平足以压制需求，不需要进一步收紧"])
    title = f"{role}：{phrase}"
    body = f"{role}表示，{detail}。"
    effect = (-1 if hawkish else 1) * rng.uniform(0.0010, 0.0030)
    subjects = ["美联储动向", "环球市场情报"]
    level = "B" if rng.random() < 0.35 else level
    return title, body, effect, subjects, level


def _cpi_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    expected = round(rng.uniform(2.3, 3.4), 1)
    actual = round(expected + rng.choice([-0.2, -0.1, 0.0, 0.1, 0.2]), 1)
    core = round(actual + rng.uniform(0.1, 0.6), 1)
    title = f"美国{month}月CPI同比上涨{_pct(actual)} 预期{_pct(expected)}"
    body = f"美国{month}月CPI同比上涨{_pct(actual)}，预期{_pct(expected)}，前值{_pct(expected + rng.choice([-0.1, 0.1]))}；核心CPI同比上涨{_pct(core)}。"
    effect = -(actual - expected) * 0.03 + rng.uniform(-0.0005, 0.0005)
    subjects = ["美国经济数据", "环球市场情报"]
    level = rng.choice(["A", "B"])
    return title, body, effect, subjects, level


def _nfp_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    expected = rng.randint(10, 25)
    actual = expected + rng.randint(-12, 12)
    rate = round(rng.uniform(3.9, 4.5), 1)
    title = f"美国{month}月非农就业人口增加{actual}万人 预期增加{expected}万人"
    body = f"美国{month}月季调后非农就业人口增加{actual}万人，预期增加{expected}万人；失业率为{_pct(rate)}，预期{_pct(rate + rng.choice([-0.1, 0.0, 0.1]))}。"
    effect = -(actual - expected) * 0.0004 + rng.uniform(-0.0005, 0.0005)
    subjects = ["美国经济数据", "环球市场情报"]
    level = rng.choice(["A", "B"])
    return title, body, effect, subjects, level


def _claims_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    expected = rng.randint(210, 240)
    actual = expected + rng.randint(-15, 15)
    title = f"美国上周初请失业金人数为{actual / 10:.1f}万人 预期{expected / 10:.1f}万人"
    body = f"美国上周初请失业金人数为{actual / 10:.1f}万人，预期{expected / 10:.1f}万人，前值{(expected + rng.randint(-6, 6)) / 10:.1f}万人。"
    effect = (actual - expected) * 0.00008
    subjects = ["美国经济数据"]
    return title, body, effect, subjects, level


def _geo_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    region, side_a, side_b = rng.choice(_REGIONS)
    escalation = rng.random() < 0.6
    if escalation:
        title = f"{region}局势升级：{side_a}称将对{side_b}采取进一步行动"
        body = f"据媒体报道，{side_a}方面表示将对{side_b}采取进一步行动，地区紧张局势再度升温，市场避险情绪升温。"
        effect = rng.uniform(0.0015, 0.0050)
    else:
        title = f"{side_a}与{side_b}同意举行新一轮谈判 {region}局势有所缓和"
        body = f"据媒体报道，{side_a}与{side_b}同意于近日举行新一轮谈判，讨论停火及后续安排，{region}紧张局势有所缓和。"
        effect = -rng.uniform(0.0010, 0.0035)
    subjects = ["地缘政治", "环球市场情报"]
    level = "B" if rng.random() < 0.4 else level
    return title, body, effect, subjects, level


def _reserves_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    reserve = rng.randint(7300, 7500)
    added = rng.randint(3, 16)
    streak = rng.randint(6, 18)
    title = f"中国央行{month}月末黄金储备报{reserve}万盎司 为连续第{streak}个月增持"
    body = f"中国人民银行公布数据显示，{month}月末黄金储备报{reserve}万盎司，环比增加{added}万盎司，为连续第{streak}个月增持黄金。"
    effect = rng.uniform(0.0008, 0.0020)
    subjects = ["黄金", "央行动态"]
    return title, body, effect, subjects, level


def _etf_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    delta = round(rng.uniform(-6.0, 8.0), 2)
    holding = round(rng.uniform(880, 960), 2)
    verb = "增加" if delta >= 0 else "减少"
    title = f"全球最大黄金ETF持仓较上日{verb}{abs(delta):.2f}吨"
    body = f"全球最大黄金ETF持仓较上日{verb}{abs(delta):.2f}吨，当前持仓量为{holding:.2f}吨。"
    effect = delta * 0.0002
    subjects = ["黄金", "ETF动态"]
    return title, body, effect, subjects, level


def _earnings_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    company, industry = rng.choice(_COMPANIES)
    revenue = round(rng.uniform(8, 380), 2)
    revenue_growth = round(rng.uniform(-25, 60), 2)
    profit = round(revenue * rng.uniform(0.03, 0.22), 2)
    profit_growth = round(rng.uniform(-40, 90), 2)
    eps = round(profit / rng.uniform(5, 60), 2)  # profit (亿元) / shares (亿股)
    period = "2025年"  # annual reports come out in March and April
    direction = "增长" if profit_growth >= 0 else "下降"
    title = f"{company}：{period}净利润{profit}亿元 同比{direction}{abs(profit_growth):.2f}%"
    body = (
        f"{company}（{industry}）公告，公司{period}实现营业收入{revenue}亿元，同比{'增长' if revenue_growth >= 0 else '下降'}"
        f"{abs(revenue_growth):.2f}%；归属于上市公司股东的净利润{profit}亿元，同比{direction}{abs(profit_growth):.2f}%；基本每股收益{eps}元。"
    )
    effect = 0.0
    subjects = ["公司公告", "A股"]
    level = "C"
    return title, body, effect, subjects, level


def _pboc_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    cut = rng.choice([0.25, 0.5])
    freed = rng.randint(5000, 12000)
    title = f"中国人民银行：下调金融机构存款准备金率{cut}个百分点"
    body = f"中国人民银行决定下调金融机构存款准备金率{cut}个百分点，此次下调后将释放长期流动性约{freed}亿元。"
    effect = rng.uniform(0.0, 0.0008)
    subjects = ["央行动态", "宏观经济"]
    level = "A" if rng.random() < 0.3 else "B"
    return title, body, effect, subjects, level


def _omo_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    amount = rng.randrange(500, 6000, 5)
    maturing = rng.randrange(500, 6000, 5)
    net = amount - maturing
    title = f"央行今日开展{amount}亿元7天期逆回购操作"
    body = (
        f"人民银行公开市场今日进行{amount}亿元7天期逆回购，利率1.40%，较上次不变。"
        f"今日有{maturing}亿元逆回购到期，实现净{'投放' if net >= 0 else '回笼'}{abs(net)}亿元。"
    )
    effect = 0.0
    subjects = ["央行动态", "债市"]
    level = "C"
    return title, body, effect, subjects, level


def _oil_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    change = round(rng.uniform(0.8, 4.5), 2)
    price = round(rng.uniform(62, 88), 2)
    up = rng.random() < 0.5
    title = f"WTI原油日内{'涨' if up else '跌'}{change}% 现报{price}美元/桶"
    body = f"WTI原油期货日内{'涨' if up else '跌'}{change}%，现报{price}美元/桶；布伦特原油现报{price + rng.uniform(2, 5):.2f}美元/桶。"
    effect = (1 if up else -1) * rng.uniform(0.0, 0.0006)
    subjects = ["能源", "期货市场情报"]
    return title, body, effect, subjects, level


def _dollar_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    change = round(rng.uniform(0.2, 0.9), 1)
    index = round(rng.uniform(98, 106), 2)
    up = rng.random() < 0.5
    title = f"美元指数日内{'涨' if up else '跌'}{change}% 现报{index}"
    body = f"美元指数日内{'涨' if up else '跌'}{change}%，现报{index}，非美货币普遍{'承压' if up else '走强'}。"
    effect = (-1 if up else 1) * change * 0.002
    subjects = ["外汇", "环球市场情报"]
    return title, body, effect, subjects, level


def _yield_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    level_pct = round(rng.uniform(3.9, 4.8), 2)
    bp = rng.randint(3, 14)
    up = rng.random() < 0.5
    title = f"美国10年期国债收益率日内{'上行' if up else '下行'}{bp}个基点 报{level_pct}%"
    body = f"美国10年期国债收益率日内{'上行' if up else '下行'}{bp}个基点，报{level_pct}%；2年期国债收益率报{level_pct - rng.uniform(0.1, 0.5):.2f}%。"
    effect = (-1 if up else 1) * bp * 0.00012
    subjects = ["美债", "环球市场情报"]
    return title, body, effect, subjects, level


def _cn_macro_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    cpi = round(rng.uniform(-0.5, 1.2), 1)
    ppi = round(rng.uniform(-3.0, 0.5), 1)
    title = f"国家统计局：{month}月CPI同比{'上涨' if cpi >= 0 else '下降'}{abs(cpi)}% PPI同比{'上涨' if ppi >= 0 else '下降'}{abs(ppi)}%"
    body = f"国家统计局数据显示，{month}月份全国居民消费价格同比{'上涨' if cpi >= 0 else '下降'}{abs(cpi)}%；全国工业生产者出厂价格同比{'上涨' if ppi >= 0 else '下降'}{abs(ppi)}%。"
    effect = 0.0
    subjects = ["宏观经济", "中国经济数据"]
    return title, body, effect, subjects, level


def _bank_view_event(rng: random.Random, month: int, role: str, level: str) -> _Drafted:
    bank = rng.choice(_OPINION_BANKS)
    target = rng.randrange(4200, 5600, 50)
    bullish = rng.random() < 0.65
    title = f"{bank}{'上调' if bullish else '下调'}黄金目标价至{target}美元/盎司"
    body = (
        f"{bank}发布报告，将未来12个月黄金目标价{'上调' if bullish else '下调'}至{target}美元/盎司，"
        f"理由是{'央行购金需求强劲、降息预期升温' if bullish else '实际利率维持高位、避险需求降温'}。"
    )
    effect = (1 if bullish else -1) * rng.uniform(0.0003, 0.0012)
    subjects = ["黄金", "机构观点"]
    return title, body, effect, subjects, level


_EVENT_WRITERS = {
    "fed": _fed_event,
    "cpi": _cpi_event,
    "nfp": _nfp_event,
    "claims": _claims_event,
    "geo": _geo_event,
    "reserves": _reserves_event,
    "etf": _etf_event,
    "earnings": _earnings_event,
    "pboc": _pboc_event,
    "omo": _omo_event,
    "oil": _oil_event,
    "dollar": _dollar_event,
    "yield": _yield_event,
    "cn_macro": _cn_macro_event,
    "bank_view": _bank_view_event,
}


def _templates(rng: random.Random, ts: int, kind: str | None = None) -> _Draft:
    """One event of `kind` (random if None) published at `ts`."""
    if kind is None:
        kind = rng.choices(list(_RANDOM_KINDS), weights=list(_RANDOM_KINDS.values()))[0]
    # Drawn for every kind, in this order, so a seed gives the same database as before.
    role = rng.choice(_ROLES)
    level = rng.choices(["A", "B", "C"], weights=[1, 14, 85])[0]
    month = _month_cn(ts)
    title, body, effect, subjects, level = _EVENT_WRITERS.get(kind, _bank_view_event)(rng, month, role, level)
    return _Draft(ts=ts, title=title, body=body, level=level, subjects=subjects, gold_effect=effect)


def _scheduled(rng: random.Random, start: int) -> list[_Draft]:
    """Releases at their real times (UTC) in the sample's four weeks.

    US data at 08:30 New York time (13:30 UTC until daylight saving starts on 2026-03-08,
    12:30 UTC after), China data at 09:30 Beijing time, PBOC reserves on the 7th (a Saturday:
    market closed), a reserve-requirement cut on a Friday evening Beijing time, open-market
    operations every weekday morning.
    """
    day = 86400
    plan = [
        (start + 3 * day + 13 * 3600 + 1800, "claims"),  # Thu 03-05
        (start + 4 * day + 13 * 3600 + 1800, "nfp"),  # Fri 03-06
        (start + 5 * day + 3600, "reserves"),  # Sat 03-07
        (start + 7 * day + 3600 + 1800, "cn_macro"),  # Mon 03-09
        (start + 9 * day + 12 * 3600 + 1800, "cpi"),  # Wed 03-11
        (start + 10 * day + 12 * 3600 + 1800, "claims"),  # Thu 03-12
        (start + 11 * day + 11 * 3600, "pboc"),  # Fri 03-13, 19:00 Beijing
        (start + 17 * day + 12 * 3600 + 1800, "claims"),  # Thu 03-19
        (start + 24 * day + 12 * 3600 + 1800, "claims"),  # Thu 03-26
    ]
    # Open-market operations every weekday at 09:20 Beijing time (01:20 UTC).
    plan += [(start + d * day + 4800, "omo") for d in range(SAMPLE_DAYS) if (d % 7) < 5]
    return [_templates(rng, ts + rng.randrange(0, 40), kind) for ts, kind in plan]


def _event_times(rng: random.Random, start: int, count: int) -> list[int]:
    """Publication times: busier in Beijing daytime and the US session, quieter at weekends."""
    times: list[int] = []
    while len(times) < count:
        ts = start + rng.randrange(SAMPLE_DAYS * 86400)
        local = _beijing(ts)
        weight = 1.0 if 7 <= local.tm_hour <= 23 else 0.25
        if local.tm_wday >= 5:
            weight *= 0.3
        if rng.random() < weight:
            times.append(ts)
    return sorted(times)


def _trading_mask(minutes: np.ndarray, outage: tuple[int, int], holiday: tuple[int, int]) -> np.ndarray:
    """Open minutes: Sun 22:00 - Fri 21:00 UTC, minus the daily 21:00 - 22:00 break, an outage and a holiday."""
    weekday = ((minutes // 86400) + 3) % 7  # 1970-01-01 was a Thursday (3)
    hour = (minutes % 86400) // 3600
    open_ = np.ones(len(minutes), dtype=bool)
    open_ &= ~((weekday == 4) & (hour >= 21))  # Friday evening
    open_ &= weekday != 5  # Saturday
    open_ &= ~((weekday == 6) & (hour < 22))  # Sunday before 22:00
    open_ &= hour != 21  # daily break
    for lo, hi in (outage, holiday):
        open_ &= ~((minutes >= lo) & (minutes < hi))
    return open_


def _make_bars(np_rng: np.random.Generator, start: int, drafts: list[_Draft]) -> dict[str, Bars]:
    minutes = np.arange(start, start + SAMPLE_DAYS * 86400, 60, dtype=np.int64)
    outage = (start + 8 * 86400 + 3 * 3600 + 13 * 60, start + 8 * 86400 + 3 * 3600 + 50 * 60)  # 37-minute feed gap
    holiday = (start + 18 * 86400, start + 18 * 86400 + 14 * 3600)  # a Friday closed until 14:00 UTC
    open_ = _trading_mask(minutes, outage, holiday)
    # A few single missing minutes, as in real feeds.
    open_ &= np_rng.random(len(minutes)) > 0.002
    log_ret = np_rng.normal(0.0, 0.00035, len(minutes))
    for draft in drafts:
        if draft.gold_effect == 0.0:
            continue
        first = int(np.searchsorted(minutes, draft.ts, side="right"))
        spread = int(np_rng.integers(3, 16))
        stop = min(first + spread, len(minutes))
        if first < stop:
            log_ret[first:stop] += draft.gold_effect / (stop - first)
    gold_close = 4310.0 * np.exp(np.cumsum(log_ret))
    silver_ret = 1.35 * log_ret + np_rng.normal(0.0, 0.0003, len(minutes))
    silver_close = 33.8 * np.exp(np.cumsum(silver_ret))
    result = {}
    for ticker, close, volume_scale in (("XAUUSD", gold_close, 1800), ("XAGUSD", silver_close, 900)):
        opens = np.concatenate([[close[0]], close[:-1]])
        wiggle = np.abs(np_rng.normal(0.0, 0.00015, len(minutes)))
        high = np.maximum(opens, close) * (1 + wiggle)
        low = np.minimum(opens, close) * (1 - np.abs(np_rng.normal(0.0, 0.00015, len(minutes))))
        volume = np_rng.integers(volume_scale // 3, volume_scale * 2, len(minutes)).astype(np.float64)
        decimals = 3 if ticker == "XAUUSD" else 4
        result[ticker] = Bars(
            minutes[open_],
            np.round(opens[open_], decimals),
            np.round(high[open_], decimals),
            np.round(low[open_], decimals),
            np.round(close[open_], decimals),
            volume[open_],
        )
    return result


def _price_flashes(rng: random.Random, gold: Bars, start: int, count: int) -> list[_Draft]:
    """Flashes that quote the synthetic gold price itself (open market minutes only)."""
    drafts = []
    day_open: dict[int, float] = {}
    for ts, close in zip(gold.ts.tolist(), gold.close.tolist()):
        day_open.setdefault((ts - start) // 86400, close)
    picks = sorted(rng.sample(range(len(gold.ts)), count))
    for index in picks:
        ts = int(gold.ts[index]) + rng.randrange(5, 55)
        price = float(gold.close[index])
        base = day_open[(int(gold.ts[index]) - start) // 86400]
        change = (price / base - 1) * 100
        verb = "涨" if change >= 0 else "跌"
        title = f"现货黄金日内{verb}{abs(change):.2f}% 现报{price:.2f}美元/盎司"
        body = f"现货黄金日内{verb}{abs(change):.2f}%，现报{price:.2f}美元/盎司。"
        drafts.append(_Draft(ts=ts, title=title, body=body, level="C", subjects=["黄金", "期货市场情报"], gold_effect=0.0, price_flash=True))
    return drafts


def _retell(rng: random.Random, draft: _Draft) -> tuple[int, str, str]:
    """The second feed's version: later, no title brackets, another lead-in and a credit."""
    delay = rng.randrange(40, 360)
    lead = rng.choice(["据报道，", "消息称，", "", "快讯："])
    credit = rng.choice(["（综合报道）", "（来源：公开信息）", ""])
    return draft.ts + delay, draft.title, f"{lead}{draft.body}{credit}"


def build_sample_db(path: str | Path, seed: int = 0, *, events: int = DEFAULT_EVENT_COUNT, overwrite: bool = False) -> Path:
    """Write the synthetic sample store to `path` (atomically) and return the path.

    Deterministic: the same seed gives the same events, bars and impacts.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FinqloraError(f"{target} already exists", hint="choose another --db path, or pass --overwrite to replace it")
    if events < 50:
        raise FinqloraError("the sample needs at least 50 events", hint="pass --events 50 or more")
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    start = calendar.timegm(time.strptime(SAMPLE_START, "%Y-%m-%dT%H:%M:%SZ"))
    price_flash_count = max(events // 12, 4)
    drafts = _scheduled(rng, start)
    drafts += [_templates(rng, ts) for ts in _event_times(rng, start, events - price_flash_count - len(drafts))]
    drafts.sort(key=lambda d: d.ts)
    bars = _make_bars(np_rng, start, drafts)
    drafts += _price_flashes(rng, bars["XAUUSD"], start, price_flash_count)
    drafts.sort(key=lambda d: d.ts)

    records: list[NewsRecord] = []
    for number, draft in enumerate(drafts, 1):
        content = f"【{draft.title}】{_dateline(draft.ts)}{draft.body}"
        flags = {"bold": 1 if draft.level == "C" and abs(draft.gold_effect) > 0.002 else 0}
        records.append(
            NewsRecord(
                source="sample_a",
                source_id=f"{number:05d}",
                ts_utc=draft.ts,
                tz_offset_min=BEIJING_OFFSET_MIN,
                content=content,
                title=draft.title,
                importance=draft.level,
                star=star_for("sample_a", draft.level, flags),
                subjects=list(draft.subjects),
            )
        )
        if not draft.price_flash and rng.random() < 0.15:
            ts, title, body = _retell(rng, draft)
            records.append(
                NewsRecord(
                    source="sample_b",
                    source_id=f"b{number:05d}",
                    ts_utc=ts,
                    tz_offset_min=BEIJING_OFFSET_MIN,
                    content=body,
                    title=title,
                    importance=None,
                    star=star_for("sample_b", None),
                    subjects=list(draft.subjects),
                )
            )

    # Built next to the target and renamed over it: an interrupted build leaves no half store.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    leftovers = (tmp, tmp.with_name(tmp.name + "-journal"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    try:
        init_db(tmp)
        conn = open_store(tmp)
        try:
            with transaction(conn):
                set_meta(conn, "synthetic", "true")
                set_meta(conn, "description", "finqlora sample database: SYNTHETIC news and prices generated from templates; not real market data")
                set_meta(conn, "sample_seed", str(seed))
                set_meta(conn, "sample_tickers", ",".join(SAMPLE_TICKERS))
                store_news(conn, records)
                for ticker, ticker_bars in bars.items():
                    store_bars(conn, ticker, ticker_bars)
            compute_impacts(conn=conn)
        finally:
            conn.close()
        os.replace(tmp, target)
    finally:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
    return target
