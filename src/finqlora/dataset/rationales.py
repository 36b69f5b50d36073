"""Ex-ante news-impact answers: direction, transmission channel, precedents, risks, confidence.

The answer to "what does this flash mean for gold?" may use only what was known when it was
published. So it never quotes the realized move (that is the record's `label`); it explains
the direction the label gives through the event's channel (`finqlora.dataset.relevance`):

    方向判断 per relevant ticker -> 传导路径 (channel x direction) -> 历史参照 (channel)
    -> 可能改变判断的因素 (channel x direction) -> 置信度 (magnitude of the labelled move)
    -> 结论 line that `answer_parser.parse_direction` reads.

Every part has several phrasings chosen by the builder's seeded RNG, so the model learns
the reasoning rather than one sentence. The texts contain no digits except years of
precedents, which can never be confused with a realized return.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

from finqlora.dataset import labels as lab

POS, NEG, NEU = lab.POSITIVE, lab.NEGATIVE, lab.NEUTRAL
CONFIDENCE = {"较大": "较高", "中等": "中等", "较小": "较低"}

# channel -> direction -> phrasings of the transmission path (for gold unless noted).
CHANNEL_PATHS: dict[str, dict[str, tuple[str, ...]]] = {
    "货币政策": {
        POS: ("消息被市场解读为偏鸽：降息预期升温 → 实际利率与美元回落 → 持有黄金的机会成本下降 → 金价获得支撑。",
              "表态或决议弱于市场担心的鹰派程度，利率路径预期下移，美元走弱，无息资产黄金的相对吸引力上升。"),
        NEG: ("消息被市场解读为偏鹰：降息推迟或加息预期升温 → 实际利率与美元上行 → 持有黄金的机会成本上升 → 金价承压。",
              "政策信号比预期更紧，短端利率与美元同步走强，黄金作为不生息资产吸引力下降。"),
        NEU: ("表态基本符合市场既有定价，利率路径预期变化不大，对金价的边际影响有限。",
              "鹰鸽信号互相抵消（如强调数据依赖），利率预期没有明显重定价，黄金缺少方向性驱动。"),
    },
    "美元与美债": {
        POS: ("美元或美债收益率回落 → 以美元计价的黄金对非美买家更便宜、机会成本下降 → 金价获支撑。",
              "收益率下行压低实际利率，美元同步走弱，两条渠道共同利多黄金。"),
        NEG: ("美元走强或美债收益率上行 → 实际利率抬升、非美买家成本上升 → 金价承压。",
              "美债收益率上行提高了持有黄金的机会成本，强势美元又压制以美元计价的金价。"),
        NEU: ("美元与利率的变化幅度有限或方向不一，对金价的净影响不明显。",
              "汇率与利率信号相互抵消，黄金定价的两个核心变量都没有明显变化。"),
    },
    "通胀与就业数据": {
        POS: ("数据偏弱（就业降温或通胀回落）→ 市场提高降息预期 → 美元与收益率回落 → 金价受支撑。",
              "数据强化了宽松预期，或通胀超预期引发抗通胀配置需求，两种情形都偏利多黄金。"),
        NEG: ("数据偏强 → 降息预期推后 → 美元与实际利率上行 → 金价承压。",
              "经济韧性超预期，市场下调宽松押注，利率上行压制黄金。"),
        NEU: ("数据大致符合预期，利率预期没有被明显改写，金价反应有限。",
              "分项数据强弱互现，市场难以据此调整政策预期，黄金缺少方向。"),
    },
    "地缘政治与制裁": {
        POS: ("局势升级或不确定性上升 → 避险需求升温 → 资金流入黄金。",
              "冲突、制裁风险抬升，投资者增加避险资产配置，黄金的避险属性得到体现。"),
        NEG: ("局势缓和（停火、谈判进展）→ 避险溢价回吐 → 金价承压。",
              "紧张情绪降温，此前计入金价的地缘风险溢价被部分挤出。"),
        NEU: ("消息没有改变市场对局势走向的判断，避险需求变化不大。",
              "这类表态在冲突期间反复出现，边际信息有限，避险资金按兵不动。"),
    },
    "关税与贸易": {
        POS: ("贸易摩擦升级 → 增长担忧与不确定性上升 → 避险需求支撑黄金。",
              "关税加码可能推高通胀并拖累增长，滞胀担忧利多黄金。"),
        NEG: ("贸易紧张缓和 → 风险偏好回升 → 避险需求降温，金价承压。",
              "协议或谈判进展降低了不确定性，资金从避险资产转向风险资产。"),
        NEU: ("措施规模有限或早已被预期，对增长与风险偏好的影响不大。",
              "贸易消息多空交织（加码与豁免并存），黄金缺少明确驱动。"),
    },
    "原油": {
        POS: ("油价上行推高通胀预期，且供应冲击常伴随地缘风险 → 抗通胀与避险需求支撑黄金。",
              "能源价格上涨抬升通胀预期，实际利率承压，黄金受益。"),
        NEG: ("油价回落缓解通胀压力 → 通胀预期降温、实际利率上行压力增加 → 金价承压。",
              "供应担忧缓解，能源与避险溢价一同回落，黄金随之走弱。"),
        NEU: ("原油消息对通胀预期和风险情绪的传导有限，黄金反应不明显。",
              "油价相关消息对黄金只是间接影响，本次传导链条较弱。"),
    },
    "风险情绪": {
        POS: ("风险资产承压、避险情绪升温 → 资金转向黄金。",
              "市场恐慌推动避险配置，黄金作为传统避险资产受青睐。"),
        NEG: ("风险偏好回升，资金流出避险资产；或在流动性冲击中黄金被抛售以补充保证金。",
              "风险情绪改善削弱了避险需求，金价承压。"),
        NEU: ("情绪变化尚未达到引发资产再配置的程度，黄金反应平淡。",
              "风险信号不够明确，避险资金持观望态度。"),
    },
    "央行购金": {
        POS: ("官方部门持续增持黄金 → 长期需求得到确认 → 对金价形成支撑。",
              "央行购金体现储备多元化趋势，市场将其视为金价的中长期底部支撑。"),
        NEG: ("购金放缓或暂停 → 市场下调官方需求预期 → 金价承压。",
              "官方需求这一重要支撑减弱，多头信心受挫。"),
        NEU: ("购金节奏与此前一致，属于市场已知信息，短期影响有限。",
              "官方储备数据变化不大，对短期供需没有新的冲击。"),
    },
    "贵金属供需": {
        POS: ("消息直接涉及贵金属的供需或资金流向（如ETF流入、实物需求增加），多头情绪增强。",
              "贵金属本身的利多信息直接作用于价格，短线资金顺势跟进。"),
        NEG: ("消息显示需求走弱或获利了结增加（如ETF流出），贵金属价格承压。",
              "贵金属直接相关的利空信息引发多头减仓。"),
        NEU: ("消息更多是对价格的描述或行业动态，没有改变供需判断。",
              "贵金属相关的信息增量有限，价格缺少新的驱动。"),
    },
    "个股消息": {
        POS: ("消息直接涉及公司基本面（业绩、订单、政策支持），市场上调盈利预期，股价受支撑。",),
        NEG: ("消息直接涉及公司基本面的不利变化（业绩下滑、监管处罚、减持），市场下调预期。",),
        NEU: ("消息与公司相关但影响有限或早已被预期，股价缺少方向。",),
    },
}

PRECEDENTS: dict[str, tuple[str, ...]] = {
    "货币政策": ("2022年美联储快速加息期间，实际利率上行，金价阶段性承压；2019年和2024年转向降息前后，金价明显走强。",
             "历史上议息会议前后，黄金对利率预期的变化往往在数分钟内作出反应。"),
    "美元与美债": ("黄金与美国实际利率长期负相关，2020年实际利率转负时金价创出当时新高。",
              "美元指数的大幅波动通常伴随金价的反向变动，但两者并非每次同步。"),
    "通胀与就业数据": ("非农和CPI公布时是黄金日内波动最大的时段之一，方向取决于数据相对预期的偏差。",
                "2023年多次就业数据超预期后，市场推迟降息押注，金价随之回落。"),
    "地缘政治与制裁": ("2022年俄乌冲突爆发初期，避险需求推动金价急升，随后在局势僵持中回吐部分涨幅。",
                "中东局势紧张时黄金常有避险溢价，但溢价往往在局势未进一步升级时消退。"),
    "关税与贸易": ("2018至2019年贸易摩擦反复期间，关税升级的消息通常伴随避险资产走强。",
              "关税消息对黄金的影响常经由增长预期和美元两条路径，方向有时相互抵消。"),
    "原油": ("2022年油价飙升时通胀预期上行，黄金获得抗通胀买盘支撑。",
           "油价与金价的联动并不稳定，供给冲击型上涨对黄金的利多更明显。"),
    "风险情绪": ("2020年3月流动性危机中，黄金一度与股票同跌，随后在宽松政策下大幅走强。",
             "2023年美国地区银行风波期间，避险需求推动金价快速上行。"),
    "央行购金": ("2022年以来全球央行购金量处于历史高位，被视为金价的重要支撑。",
             "央行购金数据通常按月公布，对金价的影响偏中长期而非日内。"),
    "贵金属供需": ("黄金ETF持仓的持续流入或流出，常与金价的中期趋势方向一致。",
              "贵金属价格突破关键价位时，技术性买盘或止损盘会放大短线波动。"),
    "个股消息": ("公司公告对股价的影响取决于信息是否超出市场预期，超预期程度越大反应越明显。",),
}

RISKS: dict[str, dict[str, tuple[str, ...]]] = {
    "货币政策": {POS: ("若随后公布的数据偏强或其他官员发表鹰派言论，宽松预期可能被修正。",),
             NEG: ("若后续数据走弱或会议纪要释放鸽派信号，利空可能被逆转。",),
             NEU: ("若市场重新解读措辞中的政策信号，金价可能出现滞后反应。",)},
    "美元与美债": {POS: ("美元若因欧洲或日本的利空而被动走强，对金价的支撑会减弱。",),
              NEG: ("若收益率上行源于避险资金撤出，金价的跌幅可能有限。",),
              NEU: ("利率或汇率一旦出现趋势性突破，黄金会随之选择方向。",)},
    "通胀与就业数据": {POS: ("数据的后续修正或其他分项偏强，可能削弱降息预期。",),
                NEG: ("若市场更关注通胀的长期风险，黄金的抗通胀需求可能抵消利率压力。",),
                NEU: ("下一份关键数据或官员的解读可能改变市场对这份数据的看法。",)},
    "地缘政治与制裁": {POS: ("若局势迅速降温或谈判取得突破，避险溢价会很快回吐。",),
                NEG: ("若缓和被证明只是暂时的，避险需求可能卷土重来。",),
                NEU: ("一旦出现实质性升级（如直接冲突或关键航道受阻），避险需求可能迅速上升。",)},
    "关税与贸易": {POS: ("若措施被推迟、豁免或谈判重启，利多可能消退。",),
              NEG: ("若缓和只停留在表态层面，市场可能重新定价风险。",),
              NEU: ("具体税率和执行时间一旦明确，影响可能放大。",)},
    "原油": {POS: ("若油价上涨源于需求强劲而推高利率预期，对黄金可能转为利空。",),
           NEG: ("若油价下跌伴随增长担忧，黄金的避险需求可能上升。",),
           NEU: ("若供应中断升级，油价与黄金可能同步走强。",)},
    "风险情绪": {POS: ("若恐慌演变为流动性危机，黄金可能被抛售换取现金。",),
             NEG: ("若风险偏好改善缺乏基本面支撑，避险需求可能回归。",),
             NEU: ("风险事件一旦扩散，黄金的避险属性可能迅速显现。",)},
    "央行购金": {POS: ("购金属于中长期因素，短期价格仍可能被利率和美元主导。",),
             NEG: ("若其他央行继续增持，单一央行的放缓影响有限。",),
             NEU: ("购金趋势若出现拐点，市场会重新评估长期支撑。",)},
    "贵金属供需": {POS: ("若美元或利率出现不利变化，贵金属自身的利多可能被宏观因素压过。",),
              NEG: ("若宏观层面出现避险或宽松信号，短线利空可能很快被消化。",),
              NEU: ("价格突破关键区间后，短线资金可能放大波动。",)},
    "个股消息": {POS: ("大盘系统性调整或后续公告不及预期，可能抵消利好。",),
             NEG: ("公司若及时澄清或出台应对措施，利空影响可能减弱。",),
             NEU: ("后续公告若提供更多细节，市场可能重新定价。",)},
}

_OPENERS = ("方向判断：", "影响判断：", "结论先行：")


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def _ticker_path(channel: str, ticker: str, direction: str, rng: random.Random) -> str:
    path = _pick(rng, CHANNEL_PATHS[channel][direction])
    if ticker.upper() == "XAGUSD":
        # Silver follows gold's macro channels, with a larger beta and industrial demand on top.
        path = path.replace("黄金", "白银").replace("金价", "银价") + "白银兼具工业属性，波动通常大于黄金。"
    return path


def ex_ante_answer(label: Mapping[str, object], channels: Mapping[str, str], names: Mapping[str, str], rng: random.Random) -> str:
    """The answer of one news-impact record: no realized number, only what was knowable.

    `label` is the builder's news-impact label (directions per ticker, primary ticker,
    magnitude); `channels` the relevance channel per ticker; `names` display names.
    """
    directions: Mapping[str, str] = label["directions"]  # type: ignore[assignment]
    primary = str(label["ticker"])
    lines = [_pick(rng, _OPENERS)]
    for ticker, direction in directions.items():
        lines.append(f"- {names[ticker]}：{direction}（传导渠道：{channels[ticker]}）")
    channel = channels[primary]
    direction = directions[primary]
    lines.append("传导路径：" + _ticker_path(channel, primary, direction, rng))
    lines.append("历史参照：" + _pick(rng, PRECEDENTS[channel]))
    lines.append("可能改变判断的因素：" + _pick(rng, RISKS[channel][direction]))
    confidence = CONFIDENCE[str(label["magnitude"])] if direction != NEU else "中等"
    lines.append(f"置信度：{confidence}")
    lines.append(f"结论：{names[primary]} 方向：{direction}")
    return "\n".join(lines)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def realized_numbers(answer: str, known_text: str, label: Mapping[str, object]) -> set[str]:
    """Numbers in `answer` that are not in `known_text` (instruction + input) and match a
    realized return of the label (as a percentage with 1-4 decimals, or as a fraction)."""
    realized: set[str] = set()
    for by_window in (label.get("returns") or {}).values():  # type: ignore[union-attr]
        for ret in by_window.values():
            if isinstance(ret, (int, float)):
                realized.update(f"{abs(ret) * 100:.{d}f}" for d in (1, 2, 3, 4))
                realized.add(f"{abs(ret):.4f}")
    known = set(_NUMBER.findall(known_text))
    return {n for n in _NUMBER.findall(answer) if n not in known and n in realized}
