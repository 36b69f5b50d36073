"""Financial-report Q&A on simulated statements, with every answer's arithmetic checked.

A statement is generated with consistent numbers (gross profit = revenue - cost, operating
profit = gross profit - operating expenses, net profit = operating profit - income tax,
equity = assets - liabilities) for a fictional company, rendered as Chinese text, and asked
one question (growth, margins, ROE, EPS, leverage, cash conversion, P/E).

The answer is computed from the statement, and then *checked*: `check_record` parses the
numbers back out of the rendered input text, verifies the statement's identities, recomputes
the metric independently of the generator and compares it with the label and with the
output's final line. The builder runs this check on every record it writes.

Conventions: amounts in 万元 (integers), share count in 万股, share price in 元; answers are
rounded half-up to 2 decimals; `tolerance` is absolute, in the answer's unit (0.01).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from finqlora.core.errors import FinqloraError

TAX_RATE = 0.25
TOLERANCE = 0.01

# Field key -> the label used in the rendered statement (the parser reads these back).
FIELD_LABELS: dict[str, str] = {
    "revenue": "营业收入",
    "revenue_prev": "上年营业收入",
    "cost_of_revenue": "营业成本",
    "operating_expenses": "期间费用（销售、管理、研发、财务费用合计）",
    "operating_profit": "营业利润",
    "income_tax": "所得税费用",
    "net_profit": "净利润",
    "net_profit_prev": "上年净利润",
    "total_assets": "期末总资产",
    "total_liabilities": "期末总负债",
    "equity": "期末股东权益",
    "equity_prev": "期初股东权益",
    "operating_cash_flow": "经营活动产生的现金流量净额",
    "shares": "期末总股本",
    "price": "年末收盘价",
}
FIELD_UNITS = {"shares": "万股", "price": "元"}


@dataclass(frozen=True)
class Statement:
    company: str
    year: int
    industry: str
    revenue: int
    revenue_prev: int
    cost_of_revenue: int
    operating_expenses: int
    operating_profit: int
    income_tax: int
    net_profit: int
    net_profit_prev: int
    total_assets: int
    total_liabilities: int
    equity: int
    equity_prev: int
    operating_cash_flow: int
    shares: int
    price: float


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    unit: str
    formula: str
    compute: Callable[[Mapping[str, float]], float]
    substituted: Callable[[Mapping[str, float]], str]
    questions: tuple[str, ...]
    fields: tuple[str, ...]


def _pct(x: float) -> float:
    return x * 100.0


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric(
            "revenue_growth", "营业收入同比增长率", "%",
            "(本期营业收入 − 上年营业收入) ÷ 上年营业收入 × 100%",
            lambda f: _pct((f["revenue"] - f["revenue_prev"]) / f["revenue_prev"]),
            lambda f: f"({f['revenue']:.0f} − {f['revenue_prev']:.0f}) ÷ {f['revenue_prev']:.0f} × 100%",
            ("根据以下模拟财务数据，计算{company}{year}年营业收入的同比增长率（保留两位小数）。",
             "{company}今年的收入比去年增长了多少？请根据下面的报表给出百分比并写出计算过程。",
             "请计算该公司的营收增速，并简要说明其含义。"),
            ("revenue", "revenue_prev"),
        ),
        Metric(
            "net_profit_growth", "净利润同比增长率", "%",
            "(本期净利润 − 上年净利润) ÷ 上年净利润 × 100%",
            lambda f: _pct((f["net_profit"] - f["net_profit_prev"]) / f["net_profit_prev"]),
            lambda f: f"({f['net_profit']:.0f} − {f['net_profit_prev']:.0f}) ÷ {f['net_profit_prev']:.0f} × 100%",
            ("根据以下财务数据，计算{company}{year}年净利润同比增长率。",
             "该公司净利润较上年变化了多少（百分比）？请列出算式。",
             "请基于下列报表，测算归母净利润的同比增速（假设净利润全部归属于母公司股东）。"),
            ("net_profit", "net_profit_prev"),
        ),
        Metric(
            "gross_margin", "毛利率", "%",
            "(营业收入 − 营业成本) ÷ 营业收入 × 100%",
            lambda f: _pct((f["revenue"] - f["cost_of_revenue"]) / f["revenue"]),
            lambda f: f"({f['revenue']:.0f} − {f['cost_of_revenue']:.0f}) ÷ {f['revenue']:.0f} × 100%",
            ("请根据下面的利润表数据计算{company}的毛利率。",
             "这家公司的毛利率是多少？保留两位小数并写出计算步骤。",
             "阅读以下模拟年报摘要，求{year}年销售毛利率。"),
            ("revenue", "cost_of_revenue"),
        ),
        Metric(
            "operating_margin", "营业利润率", "%",
            "营业利润 ÷ 营业收入 × 100%",
            lambda f: _pct(f["operating_profit"] / f["revenue"]),
            lambda f: f"{f['operating_profit']:.0f} ÷ {f['revenue']:.0f} × 100%",
            ("计算{company}{year}年的营业利润率。",
             "根据下列数据，该公司每100元收入能转化为多少营业利润？请以营业利润率表示。"),
            ("operating_profit", "revenue"),
        ),
        Metric(
            "net_margin", "净利率", "%",
            "净利润 ÷ 营业收入 × 100%",
            lambda f: _pct(f["net_profit"] / f["revenue"]),
            lambda f: f"{f['net_profit']:.0f} ÷ {f['revenue']:.0f} × 100%",
            ("请计算{company}的销售净利率。",
             "根据以下模拟财务报表，求该公司{year}年净利率（保留两位小数）。"),
            ("net_profit", "revenue"),
        ),
        Metric(
            "roe", "净资产收益率（ROE，按平均股东权益）", "%",
            "净利润 ÷ [(期初股东权益 + 期末股东权益) ÷ 2] × 100%",
            lambda f: _pct(f["net_profit"] / ((f["equity_prev"] + f["equity"]) / 2)),
            lambda f: f"{f['net_profit']:.0f} ÷ [({f['equity_prev']:.0f} + {f['equity']:.0f}) ÷ 2] × 100%",
            ("请用平均股东权益计算{company}{year}年的ROE。",
             "该公司的净资产收益率是多少？请按期初、期末股东权益的平均值计算。",
             "根据下表，计算净资产收益率（ROE），并说明股东资本的回报水平。"),
            ("net_profit", "equity_prev", "equity"),
        ),
        Metric(
            "eps", "基本每股收益（EPS，按期末股本）", "元",
            "净利润 ÷ 期末总股本",
            lambda f: f["net_profit"] / f["shares"],
            lambda f: f"{f['net_profit']:.0f}万元 ÷ {f['shares']:.0f}万股",
            ("请计算{company}{year}年的每股收益（按期末总股本，单位：元）。",
             "根据以下数据，该公司EPS是多少元？"),
            ("net_profit", "shares"),
        ),
        Metric(
            "debt_ratio", "资产负债率", "%",
            "期末总负债 ÷ 期末总资产 × 100%",
            lambda f: _pct(f["total_liabilities"] / f["total_assets"]),
            lambda f: f"{f['total_liabilities']:.0f} ÷ {f['total_assets']:.0f} × 100%",
            ("计算{company}期末的资产负债率，并判断其杠杆水平。",
             "根据下列资产负债数据，该公司的资产负债率是多少？"),
            ("total_liabilities", "total_assets"),
        ),
        Metric(
            "equity_multiplier", "权益乘数", "倍",
            "期末总资产 ÷ 期末股东权益",
            lambda f: f["total_assets"] / f["equity"],
            lambda f: f"{f['total_assets']:.0f} ÷ {f['equity']:.0f}",
            ("请计算{company}的权益乘数（期末总资产/期末股东权益）。",
             "杜邦分析中的权益乘数是多少？请根据下表计算。"),
            ("total_assets", "equity"),
        ),
        Metric(
            "cash_conversion", "净利润现金含量（经营现金流/净利润）", "倍",
            "经营活动产生的现金流量净额 ÷ 净利润",
            lambda f: f["operating_cash_flow"] / f["net_profit"],
            lambda f: f"{f['operating_cash_flow']:.0f} ÷ {f['net_profit']:.0f}",
            ("计算{company}{year}年的净利润现金含量，判断利润的含金量。",
             "该公司经营现金流是净利润的多少倍？请给出计算过程。"),
            ("operating_cash_flow", "net_profit"),
        ),
        Metric(
            "pe", "市盈率（PE，按年末收盘价与基本每股收益）", "倍",
            "年末收盘价 ÷ (净利润 ÷ 期末总股本)",
            lambda f: f["price"] / (f["net_profit"] / f["shares"]),
            lambda f: f"{f['price']:.2f} ÷ ({f['net_profit']:.0f} ÷ {f['shares']:.0f})",
            ("按年末收盘价计算{company}的静态市盈率。",
             "根据以下数据，该股票的市盈率（PE）是多少倍？"),
            ("price", "net_profit", "shares"),
        ),
    )
}

_NAME_HEAD = ("华", "中", "东", "新", "瑞", "恒", "宏", "泰", "鼎", "嘉", "海", "金", "安", "永", "天", "远", "博", "信", "鸿", "盛")
_NAME_MID = ("丰", "达", "源", "通", "润", "辰", "科", "成", "联", "昌", "宇", "锦", "川", "岳", "晟", "茂", "德", "拓", "越", "明")
_INDUSTRIES = {
    "精密制造": "制造", "新能源材料": "材料", "医疗器械": "医疗", "食品饮料": "食品", "软件服务": "科技",
    "物流运输": "物流", "家用电器": "电器", "化工新材料": "化学", "消费电子": "电子", "建筑装饰": "建设",
}


def _round2(value: float) -> float:
    return float(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def generate_statement(rng: random.Random, year: int | None = None) -> Statement:
    """One fictional company's consistent annual figures (万元)."""
    industry = rng.choice(sorted(_INDUSTRIES))
    company = f"{rng.choice(_NAME_HEAD)}{rng.choice(_NAME_MID)}{_INDUSTRIES[industry]}股份有限公司"
    year = year or rng.randint(2019, 2025)
    revenue_prev = rng.randint(8_000, 3_000_000)
    revenue = round(revenue_prev * (1 + rng.uniform(-0.25, 0.55)))
    gross_margin = rng.uniform(0.15, 0.65)
    cost = round(revenue * (1 - gross_margin))
    opex = round(revenue * rng.uniform(0.04, gross_margin - 0.05))
    operating_profit = revenue - cost - opex
    income_tax = round(operating_profit * TAX_RATE)
    net_profit = operating_profit - income_tax
    net_profit_prev = max(1, round(net_profit / (1 + rng.uniform(-0.4, 0.8))))
    total_assets = round(revenue * rng.uniform(0.8, 3.0))
    liabilities = round(total_assets * rng.uniform(0.2, 0.8))
    equity = total_assets - liabilities
    equity_prev = max(1, round((equity - net_profit * rng.uniform(0.3, 0.7))))
    operating_cash_flow = round(net_profit * rng.uniform(0.3, 1.8))
    shares = rng.randint(5_000, 500_000)
    eps = net_profit / shares
    price = _round2(max(eps * rng.uniform(8, 45), 1.0))
    return Statement(
        company, year, industry, revenue, revenue_prev, cost, opex, operating_profit, income_tax,
        net_profit, net_profit_prev, total_assets, liabilities, equity, equity_prev, operating_cash_flow, shares, price,
    )


def render_statement(st: Statement, only: Sequence[str] | None = None) -> str:
    """The statement as the model sees it (Chinese, one figure a line).

    `only` keeps just those figures: the compact form used when the full statement would not
    fit the training max length for a tokenizer that spends many tokens per Chinese character.
    """
    lines = [
        f"公司：{st.company}（模拟数据，仅供练习）",
        f"行业：{st.industry}",
        f"报告期：{st.year}年年度报告（金额单位：万元）",
    ]
    values = asdict(st)
    for key, label in FIELD_LABELS.items():
        if only is not None and key not in only:
            continue
        value = values[key]
        text = f"{value:.2f}" if key == "price" else f"{value}"
        lines.append(f"{label}：{text}{FIELD_UNITS.get(key, '万元')}")
    return "\n".join(lines)


_LINE = re.compile(r"^(?P<label>[^：]+)：(?P<value>-?\d+(?:\.\d+)?)(?P<unit>万元|万股|元)$")


def parse_statement(text: str) -> dict[str, float]:
    """Read the figures back out of a rendered statement (the checker's independent path)."""
    by_label = {label: key for key, label in FIELD_LABELS.items()}
    fields: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match and match.group("label") in by_label:
            fields[by_label[match.group("label")]] = float(match.group("value"))
    if not fields:
        raise FinqloraError("the text holds no financial statement figures (lines such as '营业收入：123万元')")
    return fields


def check_statement(fields: Mapping[str, float]) -> list[str]:
    """The identities a statement must satisfy; returns the violated ones (empty = consistent).

    Identities whose figures are not all present (a compact statement) are not checked.
    """
    problems = []
    identities = (
        ("operating_profit", ("revenue", "cost_of_revenue", "operating_expenses"),
         lambda f: f["revenue"] - f["cost_of_revenue"] - f["operating_expenses"], "营业利润 ≠ 营业收入 − 营业成本 − 期间费用"),
        ("net_profit", ("operating_profit", "income_tax"),
         lambda f: f["operating_profit"] - f["income_tax"], "净利润 ≠ 营业利润 − 所得税费用"),
        ("equity", ("total_assets", "total_liabilities"),
         lambda f: f["total_assets"] - f["total_liabilities"], "期末股东权益 ≠ 期末总资产 − 期末总负债"),
    )
    for result, inputs, compute, message in identities:
        if result in fields and all(k in fields for k in inputs) and fields[result] != compute(fields):
            problems.append(message)
    for key in ("revenue", "revenue_prev", "net_profit", "net_profit_prev", "equity", "equity_prev", "shares", "total_assets"):
        if key in fields and fields[key] <= 0:
            problems.append(f"{FIELD_LABELS[key]} must be positive")
    return problems


def _interpretation(metric: str, value: float) -> str:
    if metric in ("revenue_growth", "net_profit_growth"):
        if value >= 30:
            return "增速较快，需结合行业景气度判断其可持续性。"
        if value >= 0:
            return "保持正增长，但增速温和。"
        return "同比下滑，需关注需求或竞争格局的变化。"
    if metric == "gross_margin":
        return "毛利率较高，产品议价能力较强。" if value >= 40 else "毛利率处于中低水平，成本控制是关键。"
    if metric in ("operating_margin", "net_margin"):
        return "盈利能力较强。" if value >= 15 else "盈利空间相对有限。"
    if metric == "roe":
        return "ROE高于15%，股东回报较好。" if value >= 15 else "ROE低于15%，股东回报一般。"
    if metric == "eps":
        return "每股收益需结合股价（市盈率）与历史增速一起看。"
    if metric == "debt_ratio":
        if value >= 70:
            return "负债率偏高，财务风险需警惕。"
        return "负债水平适中。" if value >= 40 else "负债率较低，财务结构稳健。"
    if metric == "equity_multiplier":
        return "权益乘数越高，财务杠杆越大，ROE对经营波动越敏感。"
    if metric == "cash_conversion":
        return "经营现金流充足，利润含金量较高。" if value >= 1 else "现金流低于净利润，需关注应收账款与存货占用。"
    return "市盈率需与同行业公司及自身历史区间比较后再判断估值高低。"


def make_record(st: Statement, metric_key: str, rng: random.Random) -> dict[str, Any]:
    """instruction/input/output/label (per contract) and compact_input for one question on one statement."""
    metric = METRICS[metric_key]
    fields = {k: float(v) for k, v in asdict(st).items() if k in FIELD_LABELS}
    answer = _round2(metric.compute(fields))
    question = rng.choice(metric.questions).format(company=st.company, year=st.year)
    output = "\n".join(
        [
            f"{metric.name}的计算公式：{metric.name} = {metric.formula}",
            f"代入数据：{metric.substituted(fields)}",
            f"计算结果：{answer:.2f}{metric.unit}",
            f"解读：{_interpretation(metric_key, answer)}",
            f"答案：{answer:.2f}{metric.unit}",
        ]
    )
    return {
        "instruction": question,
        "input": render_statement(st),
        "compact_input": render_statement(st, only=metric.fields),
        "output": output,
        "label": {"metric": metric_key, "answer": answer, "unit": metric.unit, "tolerance": TOLERANCE},
    }


def check_record(record: Mapping[str, Any]) -> None:
    """Recompute a report-QA record's answer from its input text; raise if anything disagrees."""
    label = record["label"]
    fields = parse_statement(record["input"])
    problems = check_statement(fields)
    if problems:
        raise FinqloraError(f"report_qa record {record.get('id')}: inconsistent statement: {'; '.join(problems)}")
    metric = METRICS.get(label["metric"])
    if metric is None:
        raise FinqloraError(f"report_qa record {record.get('id')}: unknown metric {label['metric']!r}")
    missing = [FIELD_LABELS[k] for k in metric.fields if k not in fields]
    if missing:
        raise FinqloraError(f"report_qa record {record.get('id')}: the statement lacks {', '.join(missing)} needed for {metric.name}")
    expected = _round2(metric.compute(fields))
    if abs(expected - label["answer"]) > 1e-9 or label["unit"] != metric.unit:
        raise FinqloraError(
            f"report_qa record {record.get('id')}: label says {label['answer']}{label['unit']}, "
            f"recomputed {expected}{metric.unit}"
        )
    if not record["output"].rstrip().endswith(f"答案：{expected:.2f}{metric.unit}"):
        raise FinqloraError(f"report_qa record {record.get('id')}: output does not end with the checked answer")


def generate_records(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` checked records, cycling through the metrics so every one is covered."""
    keys = sorted(METRICS)
    records = []
    for i in range(count):
        statement = generate_statement(rng)
        record = make_record(statement, keys[i % len(keys)] if i < len(keys) else rng.choice(keys), rng)
        check_record(record)
        records.append(record)
    return records
