"""The report's words in Chinese (the default) and English: one table for report.html,
report.md, the charts and the web app (`finqlora.ui` shows metric names and verdicts from here).

Metric rows of metrics.json carry an English `name`; the report names them by their `key`
instead (`news_impact.choice_accuracy` -> task 新闻影响方向 + metric 准确率（选项打分）), so a
new metric key falls back to the English name rather than to nothing.
"""

from __future__ import annotations

from typing import Any

LANGS = ("zh", "en")
DEFAULT_LANG = "zh"

TASKS = {
    "news_impact": {"zh": "新闻影响方向", "en": "News direction"},
    "market_analysis": {"zh": "市场情形", "en": "Market case"},
    "market_importance": {"zh": "波动与常态对比", "en": "Move vs typical"},
    "report_qa": {"zh": "财报问答", "en": "Report Q&A"},
    "overlap": {"zh": "文本重合度", "en": "Text overlap"},
    "perplexity": {"zh": "困惑度", "en": "Perplexity"},
    "generation": {"zh": "生成质量", "en": "Generation"},
    "benchmark": {"zh": "外部基准", "en": "Benchmark"},
}

METRICS = {
    "accuracy": {"zh": "准确率", "en": "accuracy"},
    "macro_f1": {"zh": "宏平均 F1", "en": "macro-F1"},
    "parse_rate": {"zh": "可解析率（格式遵循）", "en": "parse rate (format adherence)"},
    "choice_accuracy": {"zh": "准确率（选项打分）", "en": "accuracy (choice)"},
    "choice_macro_f1": {"zh": "宏平均 F1（选项打分）", "en": "macro-F1 (choice)"},
    "mcc": {"zh": "马修斯相关系数 MCC", "en": "MCC"},
    "choice_mcc": {"zh": "马修斯相关系数 MCC（选项打分）", "en": "MCC (choice)"},
    "rouge_l": {"zh": "ROUGE-L F1（与参考答案）", "en": "ROUGE-L F1 vs reference"},
    "bleu": {"zh": "BLEU-4（sacreBLEU，0-100）", "en": "BLEU-4 vs reference (sacreBLEU, 0-100)"},
    "reference": {"zh": "参考答案困惑度", "en": "reference-answer perplexity"},
    "general_text": {"zh": "遗忘：通用文本困惑度", "en": "forgetting: general-text perplexity"},
    "repetition_rate": {"zh": "重复率（重复 n 元组占比，越低越好）", "en": "repetition rate (share of repeated n-grams, lower is better)"},
}

VERDICTS = {
    "significantly better": {"zh": "显著更好", "en": "significantly better"},
    "significantly worse": {"zh": "显著更差", "en": "significantly worse"},
    "no significant difference": {"zh": "无显著差异", "en": "no significant difference"},
    "not tested": {"zh": "未检验", "en": "not tested"},
}

TESTS = {
    "McNemar exact": {"zh": "McNemar 精确检验", "en": "McNemar exact"},
    "paired bootstrap": {"zh": "配对自助法", "en": "paired bootstrap"},
}

# Chart labels when no CJK font is installed: Chinese would be drawn as empty boxes.
ASCII_CLASSES = {
    "利好": "bullish", "利空": "bearish", "中性": "neutral", "预期兑现": "priced-in", "观望信号": "wait-and-see",
    "趋势延续": "continuation", "反应消退": "fading", "高于常态": "above normal", "接近常态": "near normal",
    "低于常态": "below normal", "(unparsed)": "(unparsed)",
}

TEXT: dict[str, dict[str, str]] = {
    "zh": {
        "title": "finqlora 评估报告：{model} 微调前后对比",
        "run_title": "finqlora 运行 {name}：{model} 微调前后对比",
        "generated": "生成于 {created}。显著性水平 {significance}；区间为 95% 百分位自助法区间（对测试样本重抽 {resamples} 次，差值为配对重抽）。",
        "summary": "结论摘要", "metrics": "评估指标", "metric": "指标", "n": "样本数", "base": "基座模型", "finetuned": "微调模型",
        "delta": "差值", "delta_pp": "差值（率的差以百分点计）", "test": "检验", "p": "p 值", "verdict": "结论",
        "baselines": "基线（每个封闭标签任务）", "task": "任务", "majority_acc": "多数类基线准确率", "majority_f1": "多数类基线宏 F1",
        "random_acc": "随机基线准确率", "random_f1": "随机基线宏 F1（期望值）", "always": "总是答“{label}”",
        "mcc": "马修斯相关系数 MCC [95% 置信区间]", "mcc_note": "MCC 在 -1 到 1 之间，0 = 与随机猜测无异；它不受类别不平衡影响。",
        "breakdown": "新闻方向：按标的与时间窗", "group": "标的 @ 时间窗",
        "choice_note": "标注“选项打分”的行：把每个选项作为助手的回答（套用聊天模板；市场情形题放在回答固定的开头“案例类型：”之后）计算{norm}，取最高者；其余行解析生成的回答。",
        "choice_norm": "选项文本按字符平均的对数概率（finqlora.evaluate.choice）",
        "ratings": "人工盲评", "training": "训练", "no_log": "未找到训练日志",
        "hyper": "关键超参数", "hyper_more": "其余超参数（展开）", "not_available": "无（未找到 training_info.json）",
        "card": "数据与评估设置", "dataset_card": "数据集说明（instructions.card.md）",
        "examples": "示例回答",
        "examples_rule": "规则：每个样本归为“胜”（微调对、基座错）、“负”（基座对、微调错）或“平”（同对或同错）；没有对错标签的任务按 ROUGE-L 差（大于 {margin} 为胜负，否则为平）。每组按随机种子 {seed} 抽取最多 {per_group} 个，不做人工挑选。标签若是从冗长回答中间找到的（非开头的结构化结论），会明确标出。",
        "counts": "胜 {win}，负 {loss}，平 {tie}", "win": "胜", "loss": "负", "tie": "平",
        "prompt": "问题", "returns": "实际收益", "reference": "参考答案",
        "not_generated": "（未生成：该题只用选项打分）",
        "parsed": "解析出：{value}", "choice": "选项打分选择：{value}",
        "buried": "标签取自冗长回答的中间，不是明确的结论", "repetitive": "回答有明显重复（重复率 {rate}）",
        "no_gain": "本次评估中，没有任何封闭标签能力指标（带标签任务的准确率，McNemar 精确检验）在微调后显著提高。文本重合度（ROUGE-L、BLEU）与参考答案困惑度衡量的是与训练答案措辞的接近程度，而非能力。",
        "sentence": "{task}（{scoring}，n={n}）：微调模型 {tuned}，基座模型 {base}，差 {delta}（McNemar 精确检验 p{p}，{verdict}）",
        "sentence_baseline": "；多数类基线 {majority}（总是答“{label}”），随机基线 {random}；微调比多数类基线{gap}（单侧二项检验 p{p2}，{verdict2}）",
        "sentence_numeric": "；数值题没有多数类基线",
        "sentence_mcc": "；MCC 基座 {base} → 微调 {tuned}",
        "higher_by": "高 {pp}", "lower_by": "低 {pp}",
        "beats": "显著高于基线", "not_beats": "未显著高于基线",
        "scoring_choice": "选项打分", "scoring_generate": "解析生成的回答",
        "pp": "{value} 个百分点", "pp_short": "{value} 百分点",
        "chart_metrics": "基座 vs 微调（误差线：95% 自助法区间；竖线：基线）", "chart_percent": "%",
        "chart_majority": "多数类基线", "chart_random": "随机基线",
        "chart_confusion": "{task}：混淆矩阵", "predicted": "预测", "realized": "实际",
        "chart_train_loss": "训练损失", "chart_val_loss": "验证损失", "chart_best": "最佳（第 {step} 步）", "chart_step": "优化步数",
        "chart_loss": "交叉熵损失（答案 token）", "chart_loss_title": "训练与验证损失",
        "font_missing": "本机没有可用的中文字体，图表改用英文标注（安装 fonts-noto-cjk 或 fonts-wqy-microhei 后重新运行 `finqlora report` 即可显示中文）。",
        "repetition": "重复率：把每个生成回答切成 {n} 元组（中文按字），重复出现的 n 元组占全部 n 元组的比例；两模型用相同的生成设置（{settings}）。",
        "val_points": "验证损失共 {n} 个点（每 {steps} 步验证一次）。",
        "hp_base_model": "基座模型", "hp_train_time": "训练时间（秒）", "hp_best_val": "最佳验证损失",
        "card_test_data": "测试数据", "card_sha": "测试数据 sha256", "card_split": "划分", "card_items": "评估样本数",
        "card_by_task": "各任务样本数", "card_scoring": "封闭选项任务的打分方式", "card_labels": "新闻方向标签分布",
        "card_training": "训练数据", "card_generation": "生成设置（两模型相同）", "card_model": "模型", "card_device": "设备",
        "card_cost": "生成开销（{variant}）", "cost_value": "{items} 条回答，{seconds} 秒，新生成 {tokens} 个 token（每秒 {rate} 个），{capped} 条达到 max_new_tokens 上限", "card_speed": "同一运行中的生成速度", "card_bleu": "BLEU（sacreBLEU 签名）",
        "merged": "（评估时已合并）", "unparsed": "（未解析）",
        "label_line": "标签：{direction}（{ticker} 发布后 {window} 分钟，阈值 {threshold}）",
        "na": "无",
        "suite_title": "金融评测套件 {name}",
        "suite_note": "各公开评测集上的准确率（%，选项打分），基座模型与微调模型作答相同的题目；差值以百分点计，附配对自助法 95% 置信区间；p 值来自 McNemar 精确检验；多数类基线 = 总是回答出现最多的答案。名称以 -cloze 结尾的行是同一批选择题的完形填空式打分：只给题目、不列选项，比较各选项文本本身的似然；平均只计各评测集的公开格式（选项字母）。",
        "suite_set": "评测集", "suite_delta": "差值（百分点）[95% 置信区间]", "suite_p": "McNemar 精确检验 p", "suite_majority": "多数类基线",
        "suite_missing": "未评测（未提供该评测集的副本）", "suite_average": "平均（{sets} 个评测集，等权）",
        "judge_title": "模型评审",
        "judge_note": "评审模型 {model}；沿用人工盲评的评分标准（专业性、准确性，以及哪个回答更好或平局）；每对回答评两次（先以基座模型为 A，再以微调模型为 A），以抵消位置偏好。胜率 = 可解析的评判中偏好微调回答的比例（平局不算胜），附 Wilson 95% 置信区间。",
        "judge_pairs": "回答对数", "judge_judgements": "评判次数（可解析 / 不可解析）", "judge_win": "微调胜率 [95% 置信区间]",
        "judge_ties": "平局", "judge_losses": "负", "judge_consistency": "位置一致性",
        "judge_round": "盲评轮次", "judge_rater": "评审人", "judge_items": "共同评判的回答对数", "judge_kappa": "模型评审与评审人的 Cohen's kappa",
    },
    "en": {
        "title": "finqlora evaluation: {model} before vs after fine-tuning",
        "run_title": "finqlora run {name}: {model} before vs after fine-tuning",
        "generated": "Generated {created}. Significance level {significance}; intervals are 95% percentile bootstrap ({resamples} resamples of test items, paired for deltas).",
        "summary": "Summary", "metrics": "Metrics", "metric": "metric", "n": "n", "base": "base", "finetuned": "fine-tuned",
        "delta": "delta", "delta_pp": "delta (rates in percentage points)", "test": "test", "p": "p", "verdict": "verdict",
        "baselines": "Baselines (every closed-label task)", "task": "task", "majority_acc": "majority accuracy", "majority_f1": "majority macro-F1",
        "random_acc": "random accuracy", "random_f1": "random macro-F1 (expected)", "always": "always {label}",
        "mcc": "Matthews correlation MCC [95% CI]", "mcc_note": "MCC lies in -1..1, 0 = no better than chance; class imbalance does not inflate it.",
        "breakdown": "News direction by ticker and window", "group": "ticker @ window",
        "choice_note": "Rows marked (choice) score each closed option as the assistant's answer under the chat template (market questions: after the answer's fixed opening 案例类型：) and pick the option with the highest {norm}; the other rows parse the generated answer.",
        "choice_norm": "log-probability per character of the option (finqlora.evaluate.choice)",
        "ratings": "Blind rating", "training": "Training", "no_log": "no training log found",
        "hyper": "Key hyperparameters", "hyper_more": "All other hyperparameters (expand)", "not_available": "not available (no training_info.json found)",
        "card": "Data and evaluation setup", "dataset_card": "Dataset card (instructions.card.md)",
        "examples": "Examples",
        "examples_rule": "Rule: each item is a win (fine-tuned right, base wrong), a loss (base right, fine-tuned wrong) or a tie (both right or both wrong); tasks without a right/wrong label use ROUGE-L (difference > {margin} either way, else tie). Up to {per_group} items per group are drawn at random (seed {seed}); nothing is picked by hand. A label found inside a rambling answer (not a stated conclusion at its start) is marked as such.",
        "counts": "wins {win}, losses {loss}, ties {tie}", "win": "win", "loss": "loss", "tie": "tie",
        "prompt": "prompt", "returns": "realized returns", "reference": "reference",
        "not_generated": "(not generated: choice scoring only)",
        "parsed": "parsed: {value}", "choice": "choice: {value}",
        "buried": "label found inside a rambling answer, not a stated conclusion", "repetitive": "repetitive answer (repetition rate {rate})",
        "no_gain": "No closed-label capability metric (accuracy on a labelled task, McNemar exact) is significantly better after fine-tuning in this evaluation. Overlap (ROUGE-L, BLEU) and reference perplexity measure closeness to the wording of the training answers, not capability.",
        "sentence": "{task} ({scoring}, n={n}): fine-tuned {tuned}, base {base}, difference {delta} (McNemar exact p{p}, {verdict})",
        "sentence_baseline": "; majority baseline {majority} (always {label}), random baseline {random}; the fine-tune is {gap} the majority baseline (one-sided binomial p{p2}, {verdict2})",
        "sentence_numeric": "; a numeric task has no majority baseline",
        "sentence_mcc": "; MCC base {base} -> fine-tuned {tuned}",
        "higher_by": "{pp} above", "lower_by": "{pp} below",
        "beats": "significantly above the baseline", "not_beats": "not significantly above the baseline",
        "scoring_choice": "choice scoring", "scoring_generate": "parsed generations",
        "pp": "{value} percentage points", "pp_short": "{value} pp",
        "chart_metrics": "Base vs fine-tuned (bars: 95% bootstrap interval; vertical marks: baselines)", "chart_percent": "%",
        "chart_majority": "majority baseline", "chart_random": "random baseline",
        "chart_confusion": "{task}: confusion matrices", "predicted": "predicted", "realized": "realized",
        "chart_train_loss": "train loss", "chart_val_loss": "val loss", "chart_best": "best (step {step})", "chart_step": "optimizer step",
        "chart_loss": "cross-entropy loss (answer tokens)", "chart_loss_title": "Training and validation loss",
        "font_missing": "No CJK font was found on this machine, so the charts use English labels (install fonts-noto-cjk or fonts-wqy-microhei and run `finqlora report` again for Chinese).",
        "repetition": "Repetition rate: each generated answer is cut into {n}-grams (one CJK character = one token); the share of n-grams that repeat an earlier one. Both models use the same generation settings ({settings}).",
        "val_points": "{n} validation points (every {steps} steps).",
        "hp_base_model": "base model", "hp_train_time": "train time (s)", "hp_best_val": "best val loss",
        "card_test_data": "test data", "card_sha": "test data sha256", "card_split": "split", "card_items": "items evaluated",
        "card_by_task": "items by task", "card_scoring": "scoring of closed-option tasks", "card_labels": "news direction labels",
        "card_training": "training data", "card_generation": "generation (both models)", "card_model": "model", "card_device": "device",
        "card_cost": "generation ({variant})", "cost_value": "{items} answers, {seconds} s, {tokens} new tokens ({rate} tokens/s), {capped} stopped at max_new_tokens", "card_speed": "generation speed, same run", "card_bleu": "BLEU (sacreBLEU signature)",
        "merged": " (merged for evaluation)", "unparsed": "(unparsed)",
        "label_line": "label: {direction} ({ticker} @ {window} min, threshold {threshold})",
        "na": "n/a",
        "suite_title": "Finance evaluation suite {name}",
        "suite_note": "Accuracy (%) by choice scoring on each public set, base vs fine-tuned on the same items; difference in percentage points with its paired 95% bootstrap interval; McNemar exact p; majority baseline = always the most frequent answer. A set named -cloze is the same multiple-choice items scored in the cloze formulation: the question alone, without its options, and the likelihood of each option's own text; the average counts each set once, in its published (letter) formulation.",
        "suite_set": "set", "suite_delta": "difference (pp) [95% CI]", "suite_p": "McNemar exact p", "suite_majority": "majority baseline",
        "suite_missing": "not evaluated (no copy given)", "suite_average": "average ({sets} sets, each weighs the same)",
        "judge_title": "LLM judge",
        "judge_note": "Judge {model}; the blind rating round's rubric (professionalism, accuracy, which answer is better or a tie); each pair is judged twice (base as A, then fine-tuned as A) to cancel position bias. Win rate = share of parsed judgements preferring the fine-tuned answer (a tie is not a win), Wilson 95% interval.",
        "judge_pairs": "pairs", "judge_judgements": "judgements (parsed / unparsed)", "judge_win": "fine-tuned win rate [95% CI]",
        "judge_ties": "ties", "judge_losses": "losses", "judge_consistency": "position consistency",
        "judge_round": "rating round", "judge_rater": "rater", "judge_items": "pairs in common", "judge_kappa": "Cohen's kappa, judge vs rater",
    },
}


def check_lang(lang: str) -> str:
    from finqlora.core.errors import FinqloraError

    if lang not in LANGS:
        raise FinqloraError(f"unknown report language {lang!r}", hint=f"use one of: {', '.join(LANGS)}")
    return lang


def text(lang: str, key: str, **values: Any) -> str:
    template = TEXT[lang].get(key, TEXT["en"][key])
    return template.format(**values) if values else template


def _pick(table: dict[str, dict[str, str]], key: str, lang: str, fallback: str) -> str:
    entry = table.get(key)
    return entry[lang] if entry else fallback


def verdict(value: str | None, lang: str) -> str:
    return _pick(VERDICTS, value or "", lang, value or "")


def test_name(value: str | None, lang: str) -> str:
    return _pick(TESTS, value or "", lang, value or "")


def task_name(task_key: str, lang: str) -> str:
    """`news_impact` -> 新闻影响方向; `benchmark.finfe` -> 外部基准 finfe."""
    if task_key.startswith("benchmark."):
        return f"{TASKS['benchmark'][lang]} {task_key.split('.', 1)[1]}"
    return _pick(TASKS, task_key, lang, task_key)


def split_key(key: str) -> tuple[str, str]:
    """`news_impact.choice_accuracy` -> (`news_impact`, `choice_accuracy`); benchmarks keep their name."""
    task, _, metric = key.rpartition(".")
    return task, metric


def metric_name(row: dict[str, Any], lang: str) -> str:
    """The row's name in `lang` from its key; the English name of metrics.json when the key is unknown."""
    task, metric = split_key(row["key"])
    if metric not in METRICS or not (task in TASKS or task.startswith("benchmark.")):
        return row["name"]
    separator = "：" if lang == "zh" else ": "
    return f"{task_name(task, lang)}{separator}{METRICS[metric][lang]}"
