"""Cross-split near-duplicates (finqlora.dataset.leakage): the later split loses the record,
never the earlier one, and a repeat within one split is no leak."""

from __future__ import annotations

from typing import Any

from finqlora.dataset.drafts import Draft
from finqlora.dataset.leakage import drop_cross_split_duplicates

STORY = "央行宣布下调存款准备金率0.5个百分点，释放长期资金约1万亿元，以支持实体经济发展"
OTHER = "某新能源车企公布季度交付量同比增长四成，海外订单占比首次超过三成，股价盘中走高"


def _draft(split: str, record_id: str, news: str = "") -> Draft:
    return Draft(type="news_impact" if news else "report_qa", split=split, record_id=record_id,
                 instruction="", output="", label={}, news=news)


def test_a_story_repeated_in_a_later_split_is_dropped_there() -> None:
    drafts = [_draft("train", "t1", STORY), _draft("train", "t2", OTHER),
              _draft("val", "v1", STORY + "（央视新闻）"),  # a repost with a credit: near, not equal
              _draft("test", "x1", STORY), _draft("test", "x2", "另一则与上文无关的消息：港口吞吐量创出年内新高")]
    notices: list[str] = []
    stats: dict[str, Any] = {}
    kept = drop_cross_split_duplicates(drafts, 0.7, notices, stats)
    assert sorted(d.record_id for d in kept) == ["t1", "t2", "x2"]
    assert stats == {"cross_split_near_duplicates_removed": 2}
    assert notices == ["2 record(s) near-duplicated a record of an earlier split and were left out"]


def test_repeats_within_a_split_and_records_without_news_are_kept() -> None:
    drafts = [_draft("train", "t1", STORY), _draft("train", "t2", STORY),
              _draft("test", "q1"), _draft("test", "q2")]  # report_qa records carry no news
    notices: list[str] = []
    stats: dict[str, Any] = {}
    kept = drop_cross_split_duplicates(drafts, 0.7, notices, stats)
    assert [d.record_id for d in kept] == ["t1", "t2", "q1", "q2"]
    assert stats == {"cross_split_near_duplicates_removed": 0} and notices == []
