"""The words on the pages, in Chinese (the default) and English (`?lang=en`).

The pages get them as `t` (templates) and as a JSON block the scripts read, so one table
serves both; a key missing in English falls back to the Chinese text.
"""

from __future__ import annotations

# The first preset is the seed's own example question; the others are written for this project.
PRESETS = (
    "美联储宣布加息25个基点，对A股银行板块和黄金价格有何影响？",
    "央行宣布下调存款准备金率0.5个百分点，释放长期资金约1万亿元。请分析对股市和债市的影响。",
    "某新能源车企公布季度财报：营收同比增长35%，但毛利率下降4个百分点。投资者应如何解读？",
    "国际油价单日下跌8%，布伦特原油跌破每桶70美元。对航空和石化板块意味着什么？",
)

ZH = {
    "app": "finqlora 控制台",
    "nav_compare": "对比", "nav_runs": "运行", "nav_rating": "盲评",
    "compare_title": "基座模型 vs 微调模型",
    "presets": "示例问题", "prompt": "问题", "send": "发送", "stop": "停止",
    "settings": "生成设置（两个模型相同）", "temperature": "温度", "max_tokens": "最多生成 token 数",
    "top_p": "top_p", "seed": "随机种子",
    "base_model": "基座模型", "finetuned_model": "微调模型", "deepseek": "DeepSeek API",
    "no_model": "未加载模型：用 `finqlora ui --run runs/NAME` 或 `--model` 启动后才能对话。",
    "no_adapter": "没有微调适配器：用 `--run runs/NAME` 加载一个训练好的运行。",
    "first_token": "首个 token", "tokens_per_s": "token/秒", "waiting": "等待中…", "failed": "出错",
    "runs_title": "运行", "stage": "阶段", "status": "状态", "seconds": "用时（秒）",
    "status_done": "完成", "status_started": "进行中", "status_pending": "未开始",
    "start_run": "开始运行", "config": "配置文件", "jobs": "任务", "log": "日志",
    "open": "打开", "report": "报告 (report.html)", "no_runs": "还没有运行文件夹。",
    "progress": "进度", "step": "步", "eta": "预计剩余", "loss_chart": "损失曲线",
    "train_loss": "训练损失", "val_loss": "验证损失", "metrics": "评估指标（95% 置信区间）",
    "metric": "指标", "n": "样本数", "base": "基座", "finetuned": "微调后", "delta": "差值（率：百分点）",
    "test": "检验", "p": "p 值", "verdict": "结论", "dataset_card": "数据集说明", "no_metrics": "尚无评估结果。",
    "rating_title": "盲评（A/B 人工评估）", "new_round": "新建评估轮次", "run": "运行", "raters": "评审人（逗号分隔）",
    "pairs_limit": "题目数（留空 = 全部）", "round_name": "轮次名称（可留空）", "create": "创建",
    "links": "评审链接（每人一个，请分别发送）", "rounds": "评估轮次", "win_rate": "微调模型胜率",
    "ci95": "95% 置信区间", "ties": "平局", "wins": "胜", "losses": "负", "ratings": "评分数",
    "cohen": "Cohen's kappa（两两评审人）", "fleiss": "Fleiss' kappa（全体评审人）", "kappa_items": "共同评过的题数",
    "mean_scores": "平均分（1-5）", "professional": "专业性", "accuracy": "准确性", "rater_progress": "评审进度",
    "no_rounds": "还没有评估轮次。", "no_eval": "（没有同时含基座与微调生成结果的评估文件夹）",
    "rate_title": "请评估两个回答", "pair_of": "第 {i} / {n} 题", "answer_a": "回答 A", "answer_b": "回答 B",
    "which_better": "哪个回答更好？", "a_better": "A 更好", "tie": "差不多", "b_better": "B 更好",
    "submit_next": "保存并下一题", "previous": "上一题", "next": "下一题", "saved": "已保存",
    "all_done": "全部完成，谢谢您的评估！可以随时回来修改。", "need_all": "请选择更好的回答，并为两个回答的专业性和准确性打分。",
    "rater_hello": "评审人：", "forbidden": "需要所有者令牌：请使用 `finqlora ui` 启动时打印的链接打开。",
    "language": "English",
}

EN = {
    "app": "finqlora console",
    "nav_compare": "Compare", "nav_runs": "Runs", "nav_rating": "Blind rating",
    "compare_title": "Base model vs fine-tuned model",
    "presets": "Examples", "prompt": "Question", "send": "Send", "stop": "Stop",
    "settings": "Generation settings (the same for both)", "temperature": "Temperature", "max_tokens": "Max new tokens",
    "seed": "Seed", "base_model": "Base model", "finetuned_model": "Fine-tuned model",
    "no_model": "No model loaded: start with `finqlora ui --run runs/NAME` or `--model` to chat.",
    "no_adapter": "No fine-tuned adapter: load a trained run with `--run runs/NAME`.",
    "first_token": "first token", "tokens_per_s": "tokens/s", "waiting": "waiting…", "failed": "error",
    "runs_title": "Runs", "stage": "Stage", "status": "Status", "seconds": "Seconds",
    "status_done": "done", "status_started": "running", "status_pending": "pending",
    "start_run": "Start run", "config": "Config", "jobs": "Jobs", "log": "Log", "open": "Open",
    "report": "Report (report.html)", "no_runs": "No run folders yet.", "progress": "Progress", "step": "step",
    "eta": "ETA", "loss_chart": "Loss", "train_loss": "train loss", "val_loss": "val loss",
    "metrics": "Metrics (95% CI)", "metric": "Metric", "n": "n", "base": "base", "finetuned": "fine-tuned",
    "delta": "delta (rates: pp)", "test": "test", "p": "p", "verdict": "verdict", "dataset_card": "Dataset card",
    "no_metrics": "No evaluation yet.", "rating_title": "Blind A/B rating", "new_round": "New round", "run": "Run",
    "raters": "Raters (comma-separated)", "pairs_limit": "Pairs (empty = all)", "round_name": "Round name (optional)",
    "create": "Create", "links": "Rater links (send each rater their own)", "rounds": "Rounds",
    "win_rate": "Fine-tuned win rate", "ci95": "95% CI", "ties": "ties", "wins": "wins", "losses": "losses",
    "ratings": "ratings", "cohen": "Cohen's kappa (rater pairs)", "fleiss": "Fleiss' kappa (all raters)",
    "kappa_items": "pairs rated by all", "mean_scores": "Mean scores (1-5)", "professional": "professionalism",
    "accuracy": "accuracy", "rater_progress": "Rater progress", "no_rounds": "No rounds yet.",
    "no_eval": "(no evaluation folder with both base and fine-tuned generations)",
    "rate_title": "Please rate two answers", "pair_of": "Pair {i} of {n}", "answer_a": "Answer A", "answer_b": "Answer B",
    "which_better": "Which answer is better?", "a_better": "A is better", "tie": "Tie", "b_better": "B is better",
    "submit_next": "Save and next", "previous": "Previous", "next": "Next", "saved": "saved",
    "all_done": "All done, thank you! You can come back to change a rating.",
    "need_all": "Pick the better answer and score both answers' professionalism and accuracy.",
    "rater_hello": "Rater: ", "forbidden": "Owner token required: open the link `finqlora ui` printed at start.",
    "language": "中文",
}


def texts(lang: str) -> dict[str, str]:
    return {**ZH, **EN} if lang == "en" else dict(ZH)
