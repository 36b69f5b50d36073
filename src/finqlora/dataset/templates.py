"""Built-in Chinese finance instruction templates: the dataset when there is no database.

Two kinds, all written for this project:
- concept templates: a question about a finance concept with a reference answer (several
  phrasings of the question rotate);
- calculation templates: a small finance problem with random (seeded) numbers whose answer
  is computed here and ends with `答案：<value><unit>` like the report Q&A records.

`TEMPLATES` holds at least 120 of them; `generate_template_records(n, rng)` cycles through
them in a seeded order so a small dataset is already varied.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Template:
    template_id: str
    category: str
    build: Callable[[random.Random], tuple[str, str, str]]


_CONCEPT_PHRASINGS = (
    "请解释：{q}",
    "{q}",
    "用通俗的语言回答：{q}",
    "作为金融学习者，我想了解：{q}",
)

# (id, category, question, answer). Answers are short, factual and written for this project.
_CONCEPTS: tuple[tuple[str, str, str, str], ...] = (
    ("pe_ratio", "估值", "什么是市盈率？它有什么局限？", "市盈率（PE）= 股价 ÷ 每股收益，表示投资者为每1元利润愿意支付的价格。局限：亏损公司无法使用；周期股在景气高点PE反而偏低；一次性损益会扭曲利润，需结合扣非利润和行业比较使用。"),
    ("pb_ratio", "估值", "市净率适合评估哪些公司？", "市净率（PB）= 股价 ÷ 每股净资产，适合资产以金融资产或重资产为主、净资产较能反映价值的公司，如银行、保险、钢铁等；对轻资产的科技、服务类公司参考意义较弱。"),
    ("ps_ratio", "估值", "市销率在什么情况下比市盈率更有用？", "市销率（PS）= 市值 ÷ 营业收入。当公司处于亏损或利润波动很大（如成长期科技公司）时，收入比利润更稳定，PS能提供估值参考，但它忽略了盈利能力差异。"),
    ("peg", "估值", "PEG指标怎么计算和使用？", "PEG = 市盈率 ÷ 盈利增长率（百分数去掉百分号）。PEG约为1常被视为估值与成长匹配，小于1可能低估；但增长率是预测值，误差较大，需谨慎使用。"),
    ("ev_ebitda", "估值", "EV/EBITDA相比市盈率有什么优势？", "EV/EBITDA用企业价值（市值+净负债）除以息税折旧摊销前利润，剔除了资本结构、税率和折旧政策的差异，更适合比较负债水平不同的公司和资本密集型行业。"),
    ("dcf", "估值", "简述现金流折现（DCF）估值的基本步骤。", "步骤：1）预测未来若干年的自由现金流；2）确定折现率（通常为加权平均资本成本WACC）；3）估计永续增长率并计算终值；4）将各期现金流和终值折现求和得到企业价值，再减去净负债得到股权价值。结果对折现率和永续增长率非常敏感。"),
    ("dividend_yield", "估值", "什么是股息率？高股息一定好吗？", "股息率 = 每股分红 ÷ 股价。高股息能提供稳定现金回报，但也可能是股价大跌造成的，或公司缺乏再投资机会；需看分红的可持续性（派息率、现金流）。"),
    ("roe_dupont", "财务分析", "杜邦分析如何拆解ROE？", "ROE = 净利率 × 总资产周转率 × 权益乘数。它把股东回报拆成盈利能力、营运效率和财务杠杆三部分，便于判断高ROE来自经营优势还是高负债。"),
    ("gross_margin", "财务分析", "毛利率下降可能说明什么？", "可能原因：原材料等成本上涨、产品降价或竞争加剧、产品结构向低毛利产品倾斜、产能利用率下降导致单位成本上升。需结合行业数据和公司公告判断是短期还是长期因素。"),
    ("cash_flow_quality", "财务分析", "为什么说经营现金流比净利润更难“做假”？", "净利润按权责发生制确认，可通过收入确认时点、费用资本化等会计估计调节；经营现金流反映实际收付的现金，调节空间较小。长期净利润远高于经营现金流往往提示应收账款或存货积压等风险。"),
    ("working_capital", "财务分析", "什么是营运资本？", "营运资本 = 流动资产 − 流动负债，衡量企业短期偿债能力和日常经营所需的资金。营运资本增加会占用现金，使经营现金流低于利润。"),
    ("current_ratio", "财务分析", "流动比率和速动比率有什么区别？", "流动比率 = 流动资产 ÷ 流动负债；速动比率 = (流动资产 − 存货) ÷ 流动负债。速动比率剔除了变现能力较弱的存货，更严格地衡量短期偿债能力。"),
    ("goodwill", "财务分析", "商誉减值对公司有什么影响？", "商誉来自并购溢价。被收购资产业绩不达预期时需计提减值，直接减少当期利润和净资产，但不影响现金流。大额商誉是需要关注的潜在风险。"),
    ("receivables", "财务分析", "应收账款周转天数变长意味着什么？", "说明公司回款变慢，可能是放宽信用政策以促进销售，或下游客户付款能力变差。它会占用现金、增加坏账风险。"),
    ("inventory", "财务分析", "存货大幅增加一定是坏事吗？", "不一定。若是为旺季备货或订单增长而主动备货，可能是好信号；若是产品滞销导致积压，则可能面临跌价损失。需结合订单、存货结构和周转天数判断。"),
    ("non_recurring", "财务分析", "什么是扣除非经常性损益后的净利润？", "扣非净利润剔除了政府补助、资产处置收益、投资收益等与主营业务无关或偶发的损益，更能反映公司持续经营的盈利能力。"),
    ("capex", "财务分析", "自由现金流如何计算？", "常用口径：自由现金流 = 经营活动现金流净额 − 资本性支出。它代表公司在维持和扩张经营后可自由支配的现金，可用于分红、回购或偿债。"),
    ("leverage_risk", "财务分析", "高财务杠杆有哪些风险？", "高杠杆放大收益也放大亏损：利率上升会增加利息负担；经营下滑时可能无法偿债；融资环境收紧时面临再融资风险。应关注利息保障倍数和短期债务占比。"),
    ("cpi", "宏观经济", "CPI和PPI分别衡量什么？", "CPI（居民消费价格指数）衡量居民购买的消费品和服务价格变化；PPI（工业生产者出厂价格指数）衡量工业品出厂价格变化。PPI常被视为CPI的领先指标，两者剪刀差反映上下游利润分配。"),
    ("pmi", "宏观经济", "PMI指数50是什么含义？", "PMI（采购经理指数）以50为荣枯线：高于50表示制造业（或非制造业）总体扩张，低于50表示收缩。它是领先性较强的景气指标。"),
    ("gdp", "宏观经济", "名义GDP和实际GDP有什么区别？", "名义GDP按当期价格计算，包含价格变化；实际GDP剔除了价格因素，反映产出的真实增长。两者之比为GDP平减指数。"),
    ("m2", "宏观经济", "M1和M2增速的剪刀差说明什么？", "M1主要是现金和企业活期存款，M2还包括定期和储蓄存款。M1增速高于M2常表示企业资金活化、经营活跃；M1明显低于M2则说明资金沉淀为定期存款，经济活跃度较弱。"),
    ("social_financing", "宏观经济", "什么是社会融资规模？", "社会融资规模是实体经济从金融体系获得的资金总额，包括人民币贷款、企业债券、政府债券、股票融资等，比单看贷款更全面地反映信用扩张。"),
    ("rrr", "货币政策", "降准对市场有什么影响？", "降低存款准备金率会释放银行可贷资金，增加流动性、降低资金成本，通常利好债券和股票市场，也体现货币政策偏宽松的信号；实际效果取决于信贷需求。"),
    ("lpr", "货币政策", "什么是LPR？", "贷款市场报价利率（LPR）由报价行按公开市场操作利率加点报价形成，是银行贷款定价的主要参考基准。LPR下调会降低企业和居民的新增贷款利率。"),
    ("omo", "货币政策", "央行逆回购操作是什么意思？", "逆回购是央行向一级交易商买入有价证券并约定未来卖回，相当于向市场短期投放流动性；到期时资金回笼。逆回购利率是重要的短期政策利率。"),
    ("mlf", "货币政策", "MLF是什么工具？", "中期借贷便利（MLF）是央行向符合条件的金融机构提供中期基础货币的工具，期限多为1年，需提供合格抵押品，影响中期流动性和利率。"),
    ("fed_funds", "货币政策", "美联储加息为什么会影响全球市场？", "美元是主要储备和结算货币。加息提高美元资产收益率，吸引资金回流美国，推高美元、压制新兴市场资产和以美元计价的大宗商品，并提高全球融资成本。"),
    ("qe", "货币政策", "量化宽松（QE）如何起作用？", "央行通过购买国债等资产向市场注入流动性，压低长期利率，推高资产价格，鼓励借贷和投资；副作用包括资产泡沫和通胀压力。"),
    ("dot_plot", "货币政策", "美联储点阵图是什么？", "点阵图展示每位FOMC委员对未来几年末联邦基金利率的预期，用于观察政策路径的分布和共识，但它不是承诺，会随经济数据变化。"),
    ("gold_rates", "大宗商品", "为什么实际利率上升通常利空黄金？", "黄金不产生利息，持有黄金的机会成本是实际利率。实际利率上升意味着持有黄金的机会成本增加，资金倾向于流向有收益的资产，因此通常压制金价。"),
    ("gold_safe_haven", "大宗商品", "黄金为什么被视为避险资产？", "黄金没有发行人的信用风险，全球流动性好，在地缘冲突、金融危机或货币贬值担忧时需求上升。但避险效应常常短暂，长期走势仍受实际利率和美元影响。"),
    ("gold_dollar", "大宗商品", "美元指数和金价通常是什么关系？", "金价以美元计价，美元走强时以其他货币计价的黄金变贵、需求下降，因此两者通常负相关；但在避险情绪强烈时二者可能同涨。"),
    ("central_bank_gold", "大宗商品", "各国央行购金对金价有什么影响？", "央行购金属于长期、价格敏感度低的需求，能为金价提供支撑，也反映储备多元化、降低美元依赖的趋势。"),
    ("oil_opec", "大宗商品", "OPEC+减产为什么会推高油价？", "减产减少市场供给，在需求不变时供需趋紧、库存下降，推高油价；但若成员国执行率低或需求走弱，效果会打折扣。"),
    ("contango", "期货", "什么是期货升水和贴水？", "期货价格高于现货称为升水（contango），常见于库存充足时，反映仓储和资金成本；期货低于现货称为贴水（backwardation），常见于现货紧缺时。"),
    ("margin_futures", "期货", "期货保证金交易的风险在哪里？", "保证金制度带来杠杆，价格小幅波动就会造成保证金的大幅盈亏；亏损使保证金不足时需追加，否则会被强行平仓。"),
    ("basis", "期货", "什么是基差？", "基差 = 现货价格 − 期货价格。套期保值者关注基差变化，因为套保后承担的主要是基差风险；临近交割时基差趋于收敛。"),
    ("hedging", "期货", "企业如何用期货进行套期保值？", "企业在期货市场建立与现货头寸方向相反、数量相当的头寸：担心原料涨价的买入期货，担心产品跌价的卖出期货。现货和期货盈亏相互抵消，锁定成本或售价。"),
    ("option_call_put", "期权", "看涨期权和看跌期权有什么区别？", "看涨期权赋予买方在约定时间以行权价买入标的的权利，适合看涨；看跌期权赋予买方以行权价卖出的权利，适合看跌或对冲下跌。买方最大损失是权利金，卖方承担义务和较大风险。"),
    ("implied_vol", "期权", "什么是隐含波动率？", "隐含波动率是由期权市场价格反推出的标的未来波动率预期，数值越高期权越贵，常被视为市场恐慌或不确定性的温度计。"),
    ("vix", "期权", "VIX指数反映什么？", "VIX由标普500指数期权价格计算，反映市场对未来30天波动率的预期，俗称“恐慌指数”。VIX急升通常伴随股市下跌和避险情绪上升。"),
    ("greeks_delta", "期权", "期权的Delta是什么？", "Delta衡量标的价格变动1单位时期权价格的变化量。看涨期权Delta在0到1之间，看跌期权在−1到0之间，也可近似理解为到期时处于实值的概率。"),
    ("bond_price_yield", "债券", "为什么债券价格和收益率反向变动？", "债券未来现金流固定，收益率是使现金流现值等于价格的折现率。收益率上升意味着折现率更高、现值更低，所以价格下跌，反之亦然。"),
    ("duration", "债券", "久期的含义是什么？", "久期衡量债券价格对利率变化的敏感度：修正久期为D时，收益率变动1个百分点，价格约反向变动D%。期限越长、票息越低，久期越大。"),
    ("yield_curve", "债券", "收益率曲线倒挂意味着什么？", "短期利率高于长期利率称为倒挂，反映市场预期未来经济放缓、利率下降，历史上常被视为经济衰退的领先信号，但时滞不确定。"),
    ("credit_spread", "债券", "信用利差扩大说明什么？", "信用利差是信用债与同期限国债的收益率之差。利差扩大说明投资者要求更高的违约风险补偿，通常反映经济或行业信用风险上升、风险偏好下降。"),
    ("convertible", "债券", "可转债有什么特点？", "可转债是可按约定价格转换为股票的公司债，兼具债性和股性：股价下跌时有债底保护，股价上涨时可转股分享收益。需关注转股溢价率和条款（下修、赎回、回售）。"),
    ("ipo_registration", "股票市场", "注册制和核准制有什么区别？", "核准制下监管部门对发行人的投资价值进行实质审核；注册制以信息披露为核心，监管主要审核信息是否真实、准确、完整，把价值判断交给市场。"),
    ("limit_up", "股票市场", "A股涨跌停制度是怎样的？", "主板股票日涨跌幅一般为10%，ST股为5%，科创板和创业板为20%，北交所为30%；新股上市初期有特殊规定。涨跌停限制单日价格波动，但可能造成流动性问题。"),
    ("t_plus_one", "股票市场", "什么是T+1交易制度？", "A股实行T+1，当天买入的股票要到下一个交易日才能卖出，以抑制过度投机；资金方面，卖出股票所得资金当天可用于买入。"),
    ("northbound", "股票市场", "北向资金是什么？", "北向资金指通过沪股通、深股通从香港流入A股的资金，多为境外机构投资者，其流向常被视为外资对A股态度的参考。"),
    ("margin_trading", "股票市场", "融资融券余额变化有什么参考意义？", "融资余额上升说明投资者借钱买股增加，风险偏好上升；融券余额反映做空力量。两者变化可辅助判断市场情绪，但不是单独的买卖信号。"),
    ("buyback", "股票市场", "上市公司回购股份通常释放什么信号？", "回购减少流通股本、提升每股收益，常被视为管理层认为股价被低估的信号；但若用借款回购或回购后并不注销，效果有限。"),
    ("share_unlock", "股票市场", "限售股解禁为什么可能压制股价？", "解禁后原先不能卖出的股份可上市流通，若股东有减持意愿，会增加卖压；影响大小取决于解禁规模占流通股的比例和持有成本。"),
    ("index_rebalance", "股票市场", "指数成分股调整会怎样影响个股？", "被纳入指数的股票会获得指数基金的被动买入，被剔除的会被卖出，公告到生效期间常有价格效应，但市场往往会提前消化。"),
    ("etf", "基金", "ETF和普通开放式基金有什么区别？", "ETF在交易所上市，可像股票一样盘中买卖，费率通常较低、持仓透明；普通开放式基金按每日净值申购赎回。ETF多为被动跟踪指数。"),
    ("fund_drawdown", "基金", "为什么选基金要看最大回撤？", "最大回撤是净值从高点到随后低点的最大跌幅，反映持有体验和风险承受要求；收益相近时，回撤更小的基金风险控制更好。"),
    ("sharpe", "风险管理", "夏普比率怎么理解？", "夏普比率 =（组合收益率 − 无风险利率）÷ 收益率标准差，表示每承担一单位总风险获得的超额收益，越高越好。它假设收益近似正态，对尾部风险反映不足。"),
    ("var", "风险管理", "什么是VaR（在险价值）？", "VaR表示在给定置信水平和持有期内组合可能的最大损失，如“95%置信度下1日VaR为100万元”。它不能说明超出VaR时损失有多大，常配合压力测试和期望损失（ES）使用。"),
    ("diversification", "风险管理", "分散投资为什么能降低风险？", "不同资产的收益不完全相关，组合后部分波动相互抵消，从而在预期收益不变时降低整体波动。但系统性风险无法通过分散消除。"),
    ("beta", "风险管理", "股票的贝塔系数是什么？", "贝塔衡量股票收益对市场收益的敏感度：贝塔为1.2表示市场涨跌1%时该股平均涨跌1.2%。贝塔只衡量系统性风险。"),
    ("stop_loss", "风险管理", "为什么交易需要设置止损？", "止损把单笔亏损限制在可承受范围内，避免小亏拖成大亏，保护本金以便继续交易；止损位应基于波动和交易逻辑设定，而非随意的固定比例。"),
    ("position_sizing", "风险管理", "如何根据风险确定仓位？", "常见方法是固定风险比例：每笔交易愿意亏损的金额（如账户的1%）除以入场价到止损价的距离，得到可买入的数量。这样波动大的品种仓位自然更小。"),
    ("event_study", "事件研究", "什么是事件研究法？", "事件研究法比较事件发生前后资产的收益率（常用超额收益），判断事件是否引起显著的价格反应。关键是定义事件时点、估计窗口和事件窗口，并排除同期其他事件的干扰。"),
    ("priced_in", "事件研究", "“利好兑现即利空”是什么意思？", "如果市场在消息公布前已经充分预期并提前上涨，消息落地后缺少新的买盘，获利盘了结反而使价格下跌。因此判断消息影响要看它是否超出预期。"),
    ("expectation_gap", "事件研究", "为什么经济数据要和预期值比较？", "价格已经反映了市场的一致预期，真正驱动价格的是实际值与预期值的差（预期差）。数据好于预期通常推动价格朝利好方向变动，即使数据本身并不亮眼。"),
    ("news_reaction_window", "事件研究", "分析新闻对价格的影响时，为什么要看多个时间窗口？", "短窗口（几分钟）反映即时反应，可能被噪音和流动性影响；长窗口能看出反应是否持续，但会混入其他消息。多窗口对比可以区分持续影响、过度反应后回吐和无实质影响。"),
    ("information_leak", "事件研究", "消息发布前价格就已异动说明什么？", "可能是市场提前预期（如数据预测、传闻），也可能存在信息泄露。此时消息发布后的反应往往减弱，甚至出现反向走势。"),
    ("cny_fx", "外汇", "人民币汇率中间价是如何形成的？", "中间价由做市商参考上一交易日收盘汇率、一篮子货币汇率变化，并可能加入逆周期因子报价形成，是当日即期汇率波动的基准。"),
    ("carry_trade", "外汇", "什么是套息交易？", "借入低利率货币、投资高利率货币资产，赚取利差。若高息货币贬值，汇率损失可能吞噬利差收益，风险偏好下降时套息交易集中平仓会引发剧烈波动。"),
    ("inflation_assets", "资产配置", "高通胀环境下哪些资产相对抗通胀？", "通常包括大宗商品、抗通胀债券、具有定价权的公司股票和部分实物资产；现金和长期固定利率债券的实际购买力受损较大。"),
    ("asset_allocation", "资产配置", "股债配置比例应该怎样确定？", "主要依据投资期限、风险承受能力和收益目标：期限越长、承受力越强，股票比例可越高。定期再平衡能把组合拉回目标比例，控制风险。"),
    ("dca", "资产配置", "基金定投的优缺点是什么？", "优点：分批买入摊平成本，避免择时失误，培养纪律；缺点：在长期单边下跌的品种上仍会亏损，在持续上涨时收益不如一次性投入。"),
)


def _concept_template(entry: tuple[str, str, str, str]) -> Template:
    template_id, category, question, answer = entry

    def build(rng: random.Random) -> tuple[str, str, str]:
        return rng.choice(_CONCEPT_PHRASINGS).format(q=question), "", answer

    return Template(f"concept_{template_id}", category, build)


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _answer(value: float, unit: str) -> str:
    return f"答案：{value:.2f}{unit}"


# Calculation templates: each returns (instruction, input, output) with a computed answer.
def _compound(rng: random.Random) -> tuple[str, str, str]:
    p, r, n = rng.randint(1, 50) * 10_000, rng.choice([2.5, 3, 4, 5, 6, 8]), rng.randint(2, 20)
    fv = p * (1 + r / 100) ** n
    return ("计算复利终值。", f"本金{p}元，年利率{r}%，按年复利，期限{n}年。",
            f"终值 = 本金 × (1 + 年利率)^年数 = {p} × (1 + {r}%)^{n} = {_fmt(fv)}元\n{_answer(fv, '元')}")


def _simple_interest(rng: random.Random) -> tuple[str, str, str]:
    p, r, d = rng.randint(1, 100) * 1000, rng.choice([1.5, 1.75, 2.0, 2.25, 3.0]), rng.choice([90, 180, 270, 365])
    interest = p * r / 100 * d / 365
    return ("计算定期存款利息（按单利、一年365天）。", f"存款{p}元，年利率{r}%，存期{d}天。",
            f"利息 = 本金 × 年利率 × 天数 ÷ 365 = {p} × {r}% × {d} ÷ 365 = {_fmt(interest)}元\n{_answer(interest, '元')}")


def _annualized(rng: random.Random) -> tuple[str, str, str]:
    total, years = rng.choice([15, 25, 40, 60, 80, 120]), rng.randint(2, 10)
    ann = ((1 + total / 100) ** (1 / years) - 1) * 100
    return ("把累计收益率换算成年化收益率（复利口径）。", f"某基金{years}年累计收益{total}%。",
            f"年化收益率 = (1 + 累计收益率)^(1/年数) − 1 = (1 + {total}%)^(1/{years}) − 1 = {ann:.2f}%\n{_answer(ann, '%')}")


def _pct_change(rng: random.Random) -> tuple[str, str, str]:
    a = round(rng.uniform(5, 200), 2)
    b = round(a * rng.uniform(0.7, 1.3), 2)
    ch = (b - a) / a * 100
    return ("计算股票的涨跌幅。", f"前收盘价{a:.2f}元，今日收盘价{b:.2f}元。",
            f"涨跌幅 = (收盘价 − 前收盘价) ÷ 前收盘价 × 100% = ({b:.2f} − {a:.2f}) ÷ {a:.2f} × 100% = {ch:.2f}%\n{_answer(ch, '%')}")


def _limit_price(rng: random.Random) -> tuple[str, str, str]:
    board, pct = rng.choice([("主板", 10), ("创业板", 20), ("科创板", 20), ("北交所", 30)])
    close = round(rng.uniform(3, 150), 2)
    up = close * (1 + pct / 100)
    return ("计算涨停价（四舍五入到分）。", f"某{board}股票前收盘价{close:.2f}元，涨跌幅限制{pct}%。",
            f"涨停价 = 前收盘价 × (1 + {pct}%) = {close:.2f} × {1 + pct / 100:.2f} = {up:.4f}，四舍五入为{round(up + 1e-9, 2):.2f}元\n{_answer(round(up + 1e-9, 2), '元')}")


def _breakeven(rng: random.Random) -> tuple[str, str, str]:
    loss = rng.choice([10, 20, 25, 30, 40, 50, 60])
    need = (1 / (1 - loss / 100) - 1) * 100
    return ("亏损后需要涨多少才能回本？", f"一只股票下跌了{loss}%。",
            f"回本所需涨幅 = 1 ÷ (1 − 跌幅) − 1 = 1 ÷ (1 − {loss}%) − 1 = {need:.2f}%。跌得越多，回本越难。\n{_answer(need, '%')}")


def _pe_calc(rng: random.Random) -> tuple[str, str, str]:
    price, eps = round(rng.uniform(5, 300), 2), round(rng.uniform(0.1, 8), 2)
    pe = price / eps
    return ("计算市盈率。", f"股价{price:.2f}元，每股收益{eps:.2f}元。",
            f"市盈率 = 股价 ÷ 每股收益 = {price:.2f} ÷ {eps:.2f} = {pe:.2f}倍\n{_answer(pe, '倍')}")


def _pb_calc(rng: random.Random) -> tuple[str, str, str]:
    price, bvps = round(rng.uniform(2, 100), 2), round(rng.uniform(1, 30), 2)
    pb = price / bvps
    return ("计算市净率。", f"股价{price:.2f}元，每股净资产{bvps:.2f}元。",
            f"市净率 = 股价 ÷ 每股净资产 = {price:.2f} ÷ {bvps:.2f} = {pb:.2f}倍\n{_answer(pb, '倍')}")


def _div_yield(rng: random.Random) -> tuple[str, str, str]:
    price, div = round(rng.uniform(3, 80), 2), round(rng.uniform(0.05, 3), 2)
    y = div / price * 100
    return ("计算股息率。", f"每股现金分红{div:.2f}元（税前），当前股价{price:.2f}元。",
            f"股息率 = 每股分红 ÷ 股价 × 100% = {div:.2f} ÷ {price:.2f} × 100% = {y:.2f}%\n{_answer(y, '%')}")


def _peg_calc(rng: random.Random) -> tuple[str, str, str]:
    pe, g = round(rng.uniform(8, 80), 1), rng.randint(5, 60)
    peg = pe / g
    return ("计算PEG。", f"市盈率{pe}倍，预期净利润年增长率{g}%。",
            f"PEG = 市盈率 ÷ (增长率 × 100) = {pe} ÷ {g} = {peg:.2f}\n{_answer(peg, '')}")


def _market_cap(rng: random.Random) -> tuple[str, str, str]:
    shares, price = rng.randint(1, 500) * 1000, round(rng.uniform(2, 200), 2)
    cap = shares * price / 10_000
    return ("计算总市值（单位：亿元）。", f"总股本{shares}万股，股价{price:.2f}元。",
            f"总市值 = 总股本 × 股价 = {shares}万股 × {price:.2f}元 = {cap:.2f}亿元\n{_answer(cap, '亿元')}")


def _margin_call(rng: random.Random) -> tuple[str, str, str]:
    own, borrow = rng.randint(10, 100) * 10_000, rng.randint(5, 100) * 10_000
    ratio = (own + borrow) / borrow * 100
    return ("计算融资融券的维持担保比例。", f"自有资金{own}元，融资买入{borrow}元（全部买入股票，股价不变），暂不计利息。",
            f"维持担保比例 = 担保资产市值 ÷ 融资负债 × 100% = ({own} + {borrow}) ÷ {borrow} × 100% = {ratio:.2f}%\n{_answer(ratio, '%')}")


def _futures_margin(rng: random.Random) -> tuple[str, str, str]:
    price, mult, rate, lots = rng.randint(3000, 6000), rng.choice([5, 10, 20]), rng.choice([8, 10, 12, 15]), rng.randint(1, 20)
    margin = price * mult * lots * rate / 100
    return ("计算期货交易所需保证金。", f"期货价格{price}元/吨，合约乘数{mult}吨/手，保证金比例{rate}%，买入{lots}手。",
            f"保证金 = 价格 × 合约乘数 × 手数 × 保证金比例 = {price} × {mult} × {lots} × {rate}% = {_fmt(margin)}元\n{_answer(margin, '元')}")


def _futures_pnl(rng: random.Random) -> tuple[str, str, str]:
    entry, mult, lots = rng.randint(3000, 6000), rng.choice([5, 10, 20]), rng.randint(1, 10)
    exit_ = entry + rng.randint(-300, 300)
    side = rng.choice(["多头", "空头"])
    pnl = (exit_ - entry) * mult * lots * (1 if side == "多头" else -1)
    return ("计算期货平仓盈亏。", f"{side}开仓价{entry}元/吨，平仓价{exit_}元/吨，合约乘数{mult}吨/手，{lots}手，不计手续费。",
            f"盈亏 = (平仓价 − 开仓价) × 乘数 × 手数{'' if side == '多头' else ' × (−1)'} = ({exit_} − {entry}) × {mult} × {lots}{'' if side == '多头' else ' × (−1)'} = {pnl}元\n{_answer(pnl, '元')}")


def _basis_calc(rng: random.Random) -> tuple[str, str, str]:
    spot = rng.randint(3000, 6000)
    fut = spot + rng.randint(-200, 200)
    basis = spot - fut
    return ("计算基差并说明升贴水。", f"现货价格{spot}元/吨，期货价格{fut}元/吨。",
            f"基差 = 现货价格 − 期货价格 = {spot} − {fut} = {basis}元/吨，{'期货贴水' if basis > 0 else ('期货升水' if basis < 0 else '平水')}。\n{_answer(basis, '元/吨')}")


def _option_payoff(rng: random.Random) -> tuple[str, str, str]:
    k, prem, st = rng.randint(20, 60), round(rng.uniform(0.5, 5), 2), rng.randint(10, 80)
    kind = rng.choice(["看涨", "看跌"])
    intrinsic = max(st - k, 0) if kind == "看涨" else max(k - st, 0)
    pnl = intrinsic - prem
    return ("计算期权买方到期的每股盈亏。", f"买入{kind}期权，行权价{k}元，权利金{prem:.2f}元，到期标的价格{st}元。",
            f"到期内在价值 = {'max(标的价 − 行权价, 0)' if kind == '看涨' else 'max(行权价 − 标的价, 0)'} = {intrinsic}元；盈亏 = 内在价值 − 权利金 = {intrinsic} − {prem:.2f} = {pnl:.2f}元\n{_answer(pnl, '元')}")


def _option_breakeven(rng: random.Random) -> tuple[str, str, str]:
    k, prem = rng.randint(20, 100), round(rng.uniform(0.5, 8), 2)
    kind = rng.choice(["看涨", "看跌"])
    be = k + prem if kind == "看涨" else k - prem
    return ("计算期权买方的盈亏平衡点。", f"{kind}期权，行权价{k}元，权利金{prem:.2f}元。",
            f"盈亏平衡点 = 行权价 {'+' if kind == '看涨' else '−'} 权利金 = {k} {'+' if kind == '看涨' else '−'} {prem:.2f} = {be:.2f}元\n{_answer(be, '元')}")


def _bond_price(rng: random.Random) -> tuple[str, str, str]:
    face, c, y, n = 100, rng.choice([2, 3, 4, 5, 6]), rng.choice([2.5, 3, 3.5, 4, 5, 6]), rng.randint(2, 10)
    price = sum(face * c / 100 / (1 + y / 100) ** t for t in range(1, n + 1)) + face / (1 + y / 100) ** n
    return ("计算债券的理论价格。", f"面值{face}元，票面利率{c}%，每年付息一次，剩余期限{n}年，到期收益率{y}%。",
            f"价格 = Σ 票息/(1+y)^t + 面值/(1+y)^n，票息 = {face * c / 100:.2f}元，y = {y}%，n = {n}，计算得 {price:.2f}元\n{_answer(price, '元')}")


def _duration_approx(rng: random.Random) -> tuple[str, str, str]:
    d, dy = round(rng.uniform(1, 15), 1), rng.choice([-50, -25, 10, 25, 50, 100])
    change = -d * dy / 100
    return ("用修正久期估算债券价格变化。", f"修正久期{d}，收益率变动{dy}个基点。",
            f"价格变化 ≈ −修正久期 × 收益率变动 = −{d} × {dy / 100:.2f}% = {change:.2f}%\n{_answer(change, '%')}")


def _current_yield(rng: random.Random) -> tuple[str, str, str]:
    c, price = rng.choice([2, 3, 4, 5, 6, 7]), round(rng.uniform(85, 115), 2)
    cy = c / price * 100
    return ("计算债券的当期收益率。", f"面值100元，票面利率{c}%，当前价格{price:.2f}元。",
            f"当期收益率 = 年票息 ÷ 价格 × 100% = {c} ÷ {price:.2f} × 100% = {cy:.2f}%\n{_answer(cy, '%')}")


def _spread_bp(rng: random.Random) -> tuple[str, str, str]:
    corp, gov = round(rng.uniform(2.5, 7), 2), round(rng.uniform(1.5, 3), 2)
    bp = (corp - gov) * 100
    return ("计算信用利差（基点）。", f"某公司债收益率{corp:.2f}%，同期限国债收益率{gov:.2f}%。",
            f"信用利差 = {corp:.2f}% − {gov:.2f}% = {corp - gov:.2f}% = {bp:.0f}个基点\n{_answer(bp, 'bp')}")


def _sharpe_calc(rng: random.Random) -> tuple[str, str, str]:
    r, rf, s = round(rng.uniform(-5, 30), 1), round(rng.uniform(1, 3), 1), round(rng.uniform(5, 35), 1)
    sharpe = (r - rf) / s
    return ("计算夏普比率。", f"组合年化收益率{r}%，无风险利率{rf}%，年化波动率{s}%。",
            f"夏普比率 = (收益率 − 无风险利率) ÷ 波动率 = ({r}% − {rf}%) ÷ {s}% = {sharpe:.2f}\n{_answer(sharpe, '')}")


def _max_drawdown(rng: random.Random) -> tuple[str, str, str]:
    navs = [round(1 + rng.uniform(-0.3, 0.5), 3) for _ in range(6)]
    peak, mdd = navs[0], 0.0
    for v in navs:
        peak = max(peak, v)
        mdd = max(mdd, (peak - v) / peak)
    return ("计算这组净值序列的最大回撤。", "依次为：" + "、".join(f"{v:.3f}" for v in navs),
            f"逐日记录历史最高净值，回撤 = (最高净值 − 当前净值) ÷ 最高净值，取最大值：最大回撤 = {mdd * 100:.2f}%\n{_answer(mdd * 100, '%')}")


def _position_size(rng: random.Random) -> tuple[str, str, str]:
    equity, risk, entry = rng.randint(10, 200) * 10_000, rng.choice([0.5, 1, 2]), round(rng.uniform(10, 100), 2)
    stop = round(entry * rng.uniform(0.9, 0.98), 2)
    shares = math.floor(equity * risk / 100 / (entry - stop) / 100) * 100
    return ("按固定风险比例计算可买入股数（取整到100股）。", f"账户资金{equity}元，单笔风险{risk}%，买入价{entry:.2f}元，止损价{stop:.2f}元。",
            f"可承受亏损 = {equity} × {risk}% = {equity * risk / 100:.2f}元；每股风险 = {entry:.2f} − {stop:.2f} = {entry - stop:.2f}元；股数 = {equity * risk / 100:.2f} ÷ {entry - stop:.2f}，向下取整到100股 = {shares}股\n{_answer(shares, '股')}")


def _portfolio_return(rng: random.Random) -> tuple[str, str, str]:
    w = rng.randint(20, 80)
    ra, rb = round(rng.uniform(-10, 25), 1), round(rng.uniform(1, 6), 1)
    rp = w / 100 * ra + (100 - w) / 100 * rb
    return ("计算组合的预期收益率。", f"股票占{w}%，预期收益{ra}%；债券占{100 - w}%，预期收益{rb}%。",
            f"组合收益 = {w}% × {ra}% + {100 - w}% × {rb}% = {rp:.2f}%\n{_answer(rp, '%')}")


def _capm(rng: random.Random) -> tuple[str, str, str]:
    rf, beta, mrp = round(rng.uniform(1.5, 3.5), 1), round(rng.uniform(0.5, 1.8), 2), round(rng.uniform(4, 8), 1)
    er = rf + beta * mrp
    return ("用CAPM计算股票的期望收益率。", f"无风险利率{rf}%，贝塔{beta}，市场风险溢价{mrp}%。",
            f"期望收益 = 无风险利率 + 贝塔 × 市场风险溢价 = {rf}% + {beta} × {mrp}% = {er:.2f}%\n{_answer(er, '%')}")


def _gordon(rng: random.Random) -> tuple[str, str, str]:
    d1, r, g = round(rng.uniform(0.2, 3), 2), rng.choice([8, 9, 10, 12]), rng.choice([2, 3, 4, 5])
    v = d1 / ((r - g) / 100)
    return ("用戈登增长模型估算股票内在价值。", f"下一年每股股利{d1:.2f}元，要求回报率{r}%，股利永续增长率{g}%。",
            f"价值 = D1 ÷ (r − g) = {d1:.2f} ÷ ({r}% − {g}%) = {v:.2f}元\n{_answer(v, '元')}")


def _real_rate(rng: random.Random) -> tuple[str, str, str]:
    nominal, infl = round(rng.uniform(1, 6), 2), round(rng.uniform(-1, 5), 2)
    real = ((1 + nominal / 100) / (1 + infl / 100) - 1) * 100
    return ("计算实际利率（精确公式）。", f"名义利率{nominal:.2f}%，通胀率{infl:.2f}%。",
            f"实际利率 = (1 + 名义利率) ÷ (1 + 通胀率) − 1 = (1 + {nominal:.2f}%) ÷ (1 + {infl:.2f}%) − 1 = {real:.2f}%\n{_answer(real, '%')}")


def _fx_convert(rng: random.Random) -> tuple[str, str, str]:
    usd, rate = rng.randint(100, 50_000), round(rng.uniform(6.8, 7.4), 4)
    cny = usd * rate
    return ("按汇率换算金额。", f"{usd}美元，美元兑人民币汇率{rate}。",
            f"人民币金额 = {usd} × {rate} = {cny:.2f}元\n{_answer(cny, '元')}")


def _fx_change(rng: random.Random) -> tuple[str, str, str]:
    a = round(rng.uniform(6.8, 7.4), 4)
    b = round(a + rng.uniform(-0.2, 0.2), 4)
    ch = (a / b - 1) * 100
    return ("计算人民币对美元的升贬值幅度。", f"美元兑人民币汇率从{a}变为{b}。",
            f"人民币升值幅度 = 旧汇率 ÷ 新汇率 − 1 = {a} ÷ {b} − 1 = {ch:.2f}%（正数为升值，负数为贬值）\n{_answer(ch, '%')}")


def _loan_payment(rng: random.Random) -> tuple[str, str, str]:
    p, r, years = rng.randint(50, 300) * 10_000, rng.choice([3.0, 3.5, 3.95, 4.2, 4.9]), rng.choice([10, 20, 25, 30])
    i, n = r / 100 / 12, years * 12
    pay = p * i * (1 + i) ** n / ((1 + i) ** n - 1)
    return ("计算等额本息的月供。", f"贷款{p}元，年利率{r}%，期限{years}年。",
            f"月利率 i = {r}% ÷ 12，期数 n = {n}；月供 = 本金 × i × (1+i)^n ÷ [(1+i)^n − 1] = {pay:.2f}元\n{_answer(pay, '元')}")


def _rule_of_72(rng: random.Random) -> tuple[str, str, str]:
    r = rng.choice([3, 4, 6, 8, 9, 12])
    exact = math.log(2) / math.log(1 + r / 100)
    return ("资金翻倍需要多少年？请用精确公式并与72法则比较。", f"年化收益率{r}%，按年复利。",
            f"精确：n = ln2 ÷ ln(1 + {r}%) = {exact:.2f}年；72法则估算：72 ÷ {r} = {72 / r:.2f}年，两者接近。\n{_answer(exact, '年')}")


def _fund_fee(rng: random.Random) -> tuple[str, str, str]:
    amount, fee = rng.randint(1, 100) * 1000, rng.choice([0.12, 0.15, 1.2, 1.5])
    net = amount / (1 + fee / 100)
    return ("计算基金申购的净申购金额（外扣法）。", f"申购金额{amount}元，申购费率{fee}%。",
            f"净申购金额 = 申购金额 ÷ (1 + 费率) = {amount} ÷ (1 + {fee}%) = {net:.2f}元；申购费 = {amount - net:.2f}元\n{_answer(net, '元')}")


def _fund_shares(rng: random.Random) -> tuple[str, str, str]:
    net, nav = rng.randint(1, 100) * 1000, round(rng.uniform(0.8, 3.5), 4)
    shares = net / nav
    return ("计算申购得到的基金份额。", f"净申购金额{net}元，当日单位净值{nav}元。",
            f"份额 = 净申购金额 ÷ 单位净值 = {net} ÷ {nav} = {shares:.2f}份\n{_answer(shares, '份')}")


def _cost_average(rng: random.Random) -> tuple[str, str, str]:
    prices = [round(rng.uniform(0.8, 1.6), 3) for _ in range(4)]
    amount = rng.choice([500, 1000, 2000])
    units = sum(amount / p for p in prices)
    avg = amount * len(prices) / units
    return ("计算定投的平均成本。", f"每期定投{amount}元，四期净值依次为" + "、".join(f"{p:.3f}" for p in prices) + "，不计费用。",
            f"总份额 = Σ {amount} ÷ 净值 = {units:.2f}份；平均成本 = 总投入 {amount * 4} ÷ 总份额 = {avg:.4f}元（低于算术平均价，体现摊薄成本）\n{_answer(avg, '元')}")


def _inventory_days(rng: random.Random) -> tuple[str, str, str]:
    cogs, inv = rng.randint(1000, 100_000), rng.randint(100, 30_000)
    days = 365 / (cogs / inv)
    return ("计算存货周转天数。", f"年营业成本{cogs}万元，平均存货{inv}万元。",
            f"存货周转率 = 营业成本 ÷ 平均存货 = {cogs / inv:.2f}次；周转天数 = 365 ÷ 周转率 = {days:.2f}天\n{_answer(days, '天')}")


def _receivable_days(rng: random.Random) -> tuple[str, str, str]:
    rev, ar = rng.randint(1000, 100_000), rng.randint(100, 40_000)
    days = 365 * ar / rev
    return ("计算应收账款周转天数。", f"年营业收入{rev}万元，平均应收账款{ar}万元。",
            f"周转天数 = 365 × 平均应收账款 ÷ 营业收入 = 365 × {ar} ÷ {rev} = {days:.2f}天\n{_answer(days, '天')}")


def _current_ratio_calc(rng: random.Random) -> tuple[str, str, str]:
    ca, cl = rng.randint(1000, 50_000), rng.randint(500, 40_000)
    return ("计算流动比率。", f"流动资产{ca}万元，流动负债{cl}万元。",
            f"流动比率 = 流动资产 ÷ 流动负债 = {ca} ÷ {cl} = {ca / cl:.2f}\n{_answer(ca / cl, '')}")


def _quick_ratio(rng: random.Random) -> tuple[str, str, str]:
    ca, inv, cl = rng.randint(5000, 50_000), rng.randint(500, 4000), rng.randint(1000, 30_000)
    q = (ca - inv) / cl
    return ("计算速动比率。", f"流动资产{ca}万元，其中存货{inv}万元，流动负债{cl}万元。",
            f"速动比率 = (流动资产 − 存货) ÷ 流动负债 = ({ca} − {inv}) ÷ {cl} = {q:.2f}\n{_answer(q, '')}")


def _interest_cover(rng: random.Random) -> tuple[str, str, str]:
    ebit, interest = rng.randint(500, 50_000), rng.randint(50, 10_000)
    return ("计算利息保障倍数。", f"息税前利润{ebit}万元，利息费用{interest}万元。",
            f"利息保障倍数 = 息税前利润 ÷ 利息费用 = {ebit} ÷ {interest} = {ebit / interest:.2f}倍\n{_answer(ebit / interest, '倍')}")


def _dupont(rng: random.Random) -> tuple[str, str, str]:
    nm, turn, em = round(rng.uniform(2, 25), 1), round(rng.uniform(0.3, 1.8), 2), round(rng.uniform(1.2, 4), 2)
    roe = nm * turn * em
    return ("用杜邦公式计算ROE。", f"净利率{nm}%，总资产周转率{turn}次，权益乘数{em}倍。",
            f"ROE = 净利率 × 总资产周转率 × 权益乘数 = {nm}% × {turn} × {em} = {roe:.2f}%\n{_answer(roe, '%')}")


def _fcf(rng: random.Random) -> tuple[str, str, str]:
    ocf, capex = rng.randint(1000, 80_000), rng.randint(200, 60_000)
    return ("计算自由现金流。", f"经营活动现金流净额{ocf}万元，资本性支出{capex}万元。",
            f"自由现金流 = 经营现金流 − 资本性支出 = {ocf} − {capex} = {ocf - capex}万元\n{_answer(ocf - capex, '万元')}")


def _ev_calc(rng: random.Random) -> tuple[str, str, str]:
    cap, debt, cash = rng.randint(10, 1000), rng.randint(0, 500), rng.randint(0, 300)
    ev = cap + debt - cash
    return ("计算企业价值EV（单位：亿元）。", f"股权市值{cap}亿元，有息负债{debt}亿元，现金{cash}亿元。",
            f"EV = 市值 + 有息负债 − 现金 = {cap} + {debt} − {cash} = {ev}亿元\n{_answer(ev, '亿元')}")


def _payout(rng: random.Random) -> tuple[str, str, str]:
    np_, div = rng.randint(1000, 100_000), rng.randint(100, 60_000)
    r = div / np_ * 100
    return ("计算股利支付率。", f"净利润{np_}万元，现金分红总额{div}万元。",
            f"股利支付率 = 现金分红 ÷ 净利润 × 100% = {div} ÷ {np_} × 100% = {r:.2f}%\n{_answer(r, '%')}")


def _turnover_rate(rng: random.Random) -> tuple[str, str, str]:
    vol, flt = rng.randint(100, 50_000), rng.randint(10_000, 500_000)
    r = vol / flt * 100
    return ("计算换手率。", f"当日成交量{vol}万股，流通股本{flt}万股。",
            f"换手率 = 成交量 ÷ 流通股本 × 100% = {vol} ÷ {flt} × 100% = {r:.2f}%\n{_answer(r, '%')}")


def _amplitude(rng: random.Random) -> tuple[str, str, str]:
    pc = round(rng.uniform(5, 100), 2)
    hi, lo = round(pc * rng.uniform(1.0, 1.1), 2), round(pc * rng.uniform(0.9, 1.0), 2)
    amp = (hi - lo) / pc * 100
    return ("计算股票当日振幅。", f"前收盘价{pc:.2f}元，最高价{hi:.2f}元，最低价{lo:.2f}元。",
            f"振幅 = (最高价 − 最低价) ÷ 前收盘价 × 100% = ({hi:.2f} − {lo:.2f}) ÷ {pc:.2f} × 100% = {amp:.2f}%\n{_answer(amp, '%')}")


def _gold_oz_gram(rng: random.Random) -> tuple[str, str, str]:
    usd_oz, fx = rng.randint(1800, 4500), round(rng.uniform(6.8, 7.4), 4)
    cny_g = usd_oz * fx / 31.1035
    return ("把国际金价换算成人民币每克价格。", f"国际金价{usd_oz}美元/盎司，美元兑人民币{fx}，1金衡盎司 = 31.1035克。",
            f"人民币金价 = {usd_oz} × {fx} ÷ 31.1035 = {cny_g:.2f}元/克\n{_answer(cny_g, '元/克')}")


def _gold_move(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(1800, 4500)
    b = a + rng.randint(-120, 120)
    ch = (b - a) / a * 100
    return ("计算金价的涨跌幅。", f"现货黄金从{a}美元/盎司变为{b}美元/盎司。",
            f"涨跌幅 = ({b} − {a}) ÷ {a} × 100% = {ch:.2f}%\n{_answer(ch, '%')}")


def _oil_spread(rng: random.Random) -> tuple[str, str, str]:
    brent = round(rng.uniform(55, 110), 2)
    wti = round(brent - rng.uniform(1, 8), 2)
    return ("计算布伦特与WTI原油价差。", f"布伦特原油{brent:.2f}美元/桶，WTI原油{wti:.2f}美元/桶。",
            f"价差 = {brent:.2f} − {wti:.2f} = {brent - wti:.2f}美元/桶\n{_answer(brent - wti, '美元/桶')}")


def _cpi_yoy(rng: random.Random) -> tuple[str, str, str]:
    base = round(rng.uniform(100, 110), 1)
    now = round(base * rng.uniform(0.98, 1.05), 1)
    yoy = (now / base - 1) * 100
    return ("根据价格指数计算同比涨幅。", f"去年同月价格指数{base}，本月价格指数{now}。",
            f"同比 = 本月 ÷ 去年同月 − 1 = {now} ÷ {base} − 1 = {yoy:.2f}%\n{_answer(yoy, '%')}")


def _gdp_real(rng: random.Random) -> tuple[str, str, str]:
    nominal, deflator = round(rng.uniform(3, 10), 1), round(rng.uniform(-1.5, 4), 1)
    real = ((1 + nominal / 100) / (1 + deflator / 100) - 1) * 100
    return ("由名义GDP增速和平减指数计算实际GDP增速。", f"名义GDP增长{nominal}%，GDP平减指数上涨{deflator}%。",
            f"实际增速 = (1 + 名义增速) ÷ (1 + 平减指数涨幅) − 1 = (1 + {nominal}%) ÷ (1 + {deflator}%) − 1 = {real:.2f}%\n{_answer(real, '%')}")


def _rrr_release(rng: random.Random) -> tuple[str, str, str]:
    deposits, cut = rng.randint(200, 320), rng.choice([0.25, 0.5, 1.0])
    release = deposits * cut / 100 * 10_000
    return ("估算降准释放的长期资金（单位：亿元）。", f"需缴准备金的存款约{deposits}万亿元，降准{cut}个百分点。",
            f"释放资金 ≈ 存款 × 降准幅度 = {deposits}万亿元 × {cut}% = {release:.2f}亿元\n{_answer(release, '亿元')}")


def _bp_convert(rng: random.Random) -> tuple[str, str, str]:
    a = round(rng.uniform(1.5, 4.5), 2)
    b = round(a + rng.choice([-0.25, -0.1, -0.05, 0.05, 0.1, 0.25]), 2)
    bp = (b - a) * 100
    return ("利率变动是多少个基点？", f"利率从{a:.2f}%调整为{b:.2f}%。",
            f"变动 = {b:.2f}% − {a:.2f}% = {b - a:.2f}个百分点 = {bp:.0f}个基点（1个基点 = 0.01%）\n{_answer(bp, 'bp')}")


def _convertible_value(rng: random.Random) -> tuple[str, str, str]:
    conv_price, stock = round(rng.uniform(5, 40), 2), round(rng.uniform(3, 50), 2)
    value = 100 / conv_price * stock
    return ("计算可转债的转股价值。", f"面值100元，转股价{conv_price:.2f}元，正股价格{stock:.2f}元。",
            f"转股价值 = 100 ÷ 转股价 × 正股价 = 100 ÷ {conv_price:.2f} × {stock:.2f} = {value:.2f}元\n{_answer(value, '元')}")


def _conversion_premium(rng: random.Random) -> tuple[str, str, str]:
    cb, value = round(rng.uniform(95, 160), 2), round(rng.uniform(60, 150), 2)
    prem = (cb / value - 1) * 100
    return ("计算可转债的转股溢价率。", f"转债价格{cb:.2f}元，转股价值{value:.2f}元。",
            f"转股溢价率 = 转债价格 ÷ 转股价值 − 1 = {cb:.2f} ÷ {value:.2f} − 1 = {prem:.2f}%\n{_answer(prem, '%')}")


def _ipo_raise(rng: random.Random) -> tuple[str, str, str]:
    shares, price = rng.randint(1000, 50_000), round(rng.uniform(5, 80), 2)
    raised = shares * price / 10_000
    return ("计算IPO募资总额（单位：亿元）。", f"发行{shares}万股，发行价{price:.2f}元。",
            f"募资总额 = 发行股数 × 发行价 = {shares}万股 × {price:.2f}元 = {raised:.2f}亿元\n{_answer(raised, '亿元')}")


def _trading_cost(rng: random.Random) -> tuple[str, str, str]:
    amount, comm = rng.randint(10, 500) * 1000, rng.choice([0.02, 0.025, 0.03])
    commission = max(amount * comm / 100, 5)
    stamp = amount * 0.05 / 100
    total = commission + stamp
    return ("计算卖出股票的交易费用（佣金最低5元，印花税0.05%仅卖出收取，忽略过户费）。", f"卖出成交金额{amount}元，佣金费率{comm}%。",
            f"佣金 = max({amount} × {comm}%, 5) = {commission:.2f}元；印花税 = {amount} × 0.05% = {stamp:.2f}元；合计 {total:.2f}元\n{_answer(total, '元')}")


def _leverage_return(rng: random.Random) -> tuple[str, str, str]:
    lev, move = rng.choice([2, 3, 5, 10]), round(rng.uniform(-8, 8), 1)
    r = lev * move
    return ("计算杠杆交易的收益率（忽略融资成本）。", f"使用{lev}倍杠杆，标的价格变动{move}%。",
            f"收益率 ≈ 杠杆倍数 × 价格变动 = {lev} × {move}% = {r:.2f}%（亏损同样被放大）\n{_answer(r, '%')}")


def _tracking_diff(rng: random.Random) -> tuple[str, str, str]:
    fund, index = round(rng.uniform(-20, 30), 2), round(rng.uniform(-20, 30), 2)
    return ("计算指数基金的跟踪偏离。", f"基金收益率{fund:.2f}%，基准指数收益率{index:.2f}%。",
            f"跟踪偏离 = 基金收益率 − 指数收益率 = {fund:.2f}% − {index:.2f}% = {fund - index:.2f}%\n{_answer(fund - index, '%')}")


def _excess_return(rng: random.Random) -> tuple[str, str, str]:
    r, bench = round(rng.uniform(-15, 40), 1), round(rng.uniform(-15, 30), 1)
    return ("计算相对基准的超额收益。", f"组合收益率{r}%，业绩比较基准收益率{bench}%。",
            f"超额收益 = {r}% − {bench}% = {r - bench:.2f}%\n{_answer(r - bench, '%')}")


def _volatility_annualize(rng: random.Random) -> tuple[str, str, str]:
    daily = round(rng.uniform(0.5, 3), 2)
    annual = daily * math.sqrt(252)
    return ("把日波动率年化（按252个交易日）。", f"日收益率标准差{daily}%。",
            f"年化波动率 = 日波动率 × √252 = {daily}% × {math.sqrt(252):.4f} = {annual:.2f}%\n{_answer(annual, '%')}")


def _ev_ebitda_calc(rng: random.Random) -> tuple[str, str, str]:
    ev, ebitda = rng.randint(50, 2000), rng.randint(5, 300)
    return ("计算EV/EBITDA倍数。", f"企业价值{ev}亿元，EBITDA {ebitda}亿元。",
            f"EV/EBITDA = {ev} ÷ {ebitda} = {ev / ebitda:.2f}倍\n{_answer(ev / ebitda, '倍')}")


def _dividend_reinvest(rng: random.Random) -> tuple[str, str, str]:
    price_change, dy, years = round(rng.uniform(-2, 8), 1), round(rng.uniform(1, 6), 1), rng.randint(3, 10)
    total = ((1 + (price_change + dy) / 100) ** years - 1) * 100
    return ("估算红利再投资的累计总回报。", f"股价年均变动{price_change}%，年股息率{dy}%，分红全部再投资，持有{years}年。",
            f"年总回报 ≈ {price_change}% + {dy}% = {price_change + dy:.1f}%；累计 = (1 + {price_change + dy:.1f}%)^{years} − 1 = {total:.2f}%\n{_answer(total, '%')}")


_CALCULATIONS: tuple[tuple[str, str, Callable[[random.Random], tuple[str, str, str]]], ...] = (
    ("compound_interest", "理财计算", _compound), ("simple_interest", "理财计算", _simple_interest),
    ("annualized_return", "理财计算", _annualized), ("price_change", "股票计算", _pct_change),
    ("limit_up_price", "股票计算", _limit_price), ("breakeven_after_loss", "风险管理", _breakeven),
    ("pe_calc", "估值计算", _pe_calc), ("pb_calc", "估值计算", _pb_calc), ("dividend_yield_calc", "估值计算", _div_yield),
    ("peg_calc", "估值计算", _peg_calc), ("market_cap", "股票计算", _market_cap), ("margin_maintenance", "股票计算", _margin_call),
    ("futures_margin", "期货计算", _futures_margin), ("futures_pnl", "期货计算", _futures_pnl), ("basis_calc", "期货计算", _basis_calc),
    ("option_payoff", "期权计算", _option_payoff), ("option_breakeven", "期权计算", _option_breakeven),
    ("bond_price", "债券计算", _bond_price), ("duration_approx", "债券计算", _duration_approx),
    ("current_yield", "债券计算", _current_yield), ("credit_spread_bp", "债券计算", _spread_bp),
    ("sharpe_calc", "风险管理", _sharpe_calc), ("max_drawdown", "风险管理", _max_drawdown),
    ("position_size", "风险管理", _position_size), ("portfolio_return", "资产配置", _portfolio_return),
    ("capm", "估值计算", _capm), ("gordon_growth", "估值计算", _gordon), ("real_rate", "宏观计算", _real_rate),
    ("fx_convert", "外汇计算", _fx_convert), ("fx_change", "外汇计算", _fx_change), ("loan_payment", "理财计算", _loan_payment),
    ("doubling_time", "理财计算", _rule_of_72), ("fund_fee", "基金计算", _fund_fee), ("fund_shares", "基金计算", _fund_shares),
    ("cost_average", "基金计算", _cost_average), ("inventory_days", "财务计算", _inventory_days),
    ("receivable_days", "财务计算", _receivable_days), ("current_ratio_calc", "财务计算", _current_ratio_calc),
    ("quick_ratio", "财务计算", _quick_ratio), ("interest_cover", "财务计算", _interest_cover), ("dupont_roe", "财务计算", _dupont),
    ("free_cash_flow", "财务计算", _fcf), ("enterprise_value", "估值计算", _ev_calc), ("payout_ratio", "财务计算", _payout),
    ("turnover_rate", "股票计算", _turnover_rate), ("amplitude", "股票计算", _amplitude),
    ("gold_per_gram", "大宗商品计算", _gold_oz_gram), ("gold_move", "大宗商品计算", _gold_move),
    ("oil_spread", "大宗商品计算", _oil_spread), ("cpi_yoy", "宏观计算", _cpi_yoy), ("real_gdp", "宏观计算", _gdp_real),
    ("rrr_release", "宏观计算", _rrr_release), ("bp_convert", "宏观计算", _bp_convert),
    ("convertible_value", "债券计算", _convertible_value), ("conversion_premium", "债券计算", _conversion_premium),
    ("ipo_raise", "股票计算", _ipo_raise), ("trading_cost", "股票计算", _trading_cost),
    ("leverage_return", "风险管理", _leverage_return), ("tracking_difference", "基金计算", _tracking_diff),
    ("excess_return", "基金计算", _excess_return), ("volatility_annualize", "风险管理", _volatility_annualize),
    ("ev_ebitda_calc", "估值计算", _ev_ebitda_calc), ("dividend_reinvest", "理财计算", _dividend_reinvest),
)

TEMPLATES: tuple[Template, ...] = tuple(_concept_template(c) for c in _CONCEPTS) + tuple(
    Template(f"calc_{tid}", category, build) for tid, category, build in _CALCULATIONS
)


def generate_template_records(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` distinct records cycling through all templates in a seeded order (every template
    once before any repeats, so 120 records already cover 120 different templates).

    A concept template has only a few phrasings; once they are used it is skipped, and the
    calculation templates (new numbers every time) fill the rest.
    """
    order = list(range(len(TEMPLATES)))
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    exhausted: set[int] = set()
    while len(records) < count:
        if len(exhausted) == len(TEMPLATES):
            raise RuntimeError(f"the templates cannot make {count} distinct records")
        rng.shuffle(order)
        for index in order:
            if len(records) == count:
                break
            if index in exhausted:
                continue
            template = TEMPLATES[index]
            for _attempt in range(8):
                instruction, input_text, output = template.build(rng)
                if (instruction, input_text, output) not in seen:
                    break
            else:
                exhausted.add(index)
                continue
            seen.add((instruction, input_text, output))
            records.append(
                {
                    "instruction": instruction,
                    "input": input_text,
                    "output": output,
                    "label": {"template_id": template.template_id, "category": template.category},
                }
            )
    return records
