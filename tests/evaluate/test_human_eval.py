"""Blind A/B sheets: per-row random order, separate key, decoding, kappa on known tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.evaluate.human_eval import LOSS, TIE, WIN, cohen_kappa, fleiss_kappa, make_sheet, score_sheets


def _items(n: int) -> list[dict[str, str]]:
    return [{"id": f"item-{i:03d}", "question": f"问题{i}", "base": f"基座回答{i}", "finetuned": f"微调回答{i}"} for i in range(n)]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _fill(sheet: Path, out: Path, choose) -> Path:
    rows = _read(sheet)
    for row in rows:
        row["preference"] = choose(row)
    with out.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_sheet_is_blind_and_randomized_per_row(tmp_path: Path) -> None:
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.csv"
    assert make_sheet(_items(40), sheet, key, seed=1) == 40
    assert sheet.read_bytes().startswith("\ufeff".encode("utf-8"))  # Excel reads the Chinese correctly
    rows, keys = _read(sheet), {row["item"]: row for row in _read(key)}
    assert list(rows[0]) == ["item", "question", "answer_A", "answer_B", "preference", "comment"]
    sheet_text = sheet.read_text(encoding="utf-8-sig")
    assert "finetuned" not in sheet_text and "base," not in sheet_text
    a_is_finetuned = [keys[row["item"]]["A"] == "finetuned" for row in rows]
    assert 5 < sum(a_is_finetuned) < 35  # both orders occur
    for row in rows:
        expected_a = "微调" if keys[row["item"]]["A"] == "finetuned" else "基座"
        assert row["answer_A"].startswith(expected_a)
    with pytest.raises(FinqloraError, match="different files"):
        make_sheet(_items(2), key, key)


def test_scores_decode_the_key(tmp_path: Path) -> None:
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.csv"
    make_sheet(_items(10), sheet, key, seed=0)
    keys = {row["item"]: row for row in _read(key)}

    def prefers_finetuned(row: dict[str, str]) -> str:
        index = int(row["item"].split("-")[1])
        if index < 6:
            return "A" if keys[row["item"]]["A"] == "finetuned" else "b"  # lower case accepted
        return "tie" if index < 8 else ("A" if keys[row["item"]]["A"] == "base" else "B")

    alice = _fill(sheet, tmp_path / "alice.csv", prefers_finetuned)
    score = score_sheets([alice], key)
    assert score.per_rater["alice"]["win"] == 6 and score.per_rater["alice"]["tie"] == 2 and score.per_rater["alice"]["loss"] == 2
    assert score.pooled["win_rate"] == pytest.approx(0.6)
    assert score.fleiss is None


def test_two_raters_agreement_and_unfilled_rows(tmp_path: Path) -> None:
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.csv"
    make_sheet(_items(4), sheet, key, seed=0)
    first = _fill(sheet, tmp_path / "r1.csv", lambda row: "A")
    second = _fill(sheet, tmp_path / "r2.csv", lambda row: "" if row["item"] == "item-003" else "A")
    score = score_sheets([first, second], key)
    assert score.unfilled == {"r1": 0, "r2": 1}
    assert score.items_rated_by_all == 3
    assert score.cohen["r1 vs r2"] == pytest.approx(1.0)
    assert score.fleiss == pytest.approx(1.0)


def test_bad_preference_names_file_and_line(tmp_path: Path) -> None:
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.csv"
    make_sheet(_items(3), sheet, key)
    filled = _fill(sheet, tmp_path / "r.csv", lambda row: "maybe" if row["item"] == "item-001" else "A")
    with pytest.raises(FinqloraError, match=r"r.csv: line 3: preference 'maybe'"):
        score_sheets([filled], key)
    empty = _fill(sheet, tmp_path / "empty.csv", lambda row: "")
    with pytest.raises(FinqloraError, match="no sheet has any preference"):
        score_sheets([empty], key)
    (tmp_path / "cols.csv").write_text("id,choice\nitem-000,A\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="missing column"):
        score_sheets([tmp_path / "cols.csv"], key)


def test_cohen_kappa_known_table() -> None:
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)


def test_fleiss_kappa_known_table() -> None:
    # Fleiss (1971) worked example as on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    counts = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    categories = ["1", "2", "3", "4", "5"]
    ratings = [[c for c, n in zip(categories, row) for _ in range(n)] for row in counts]
    assert fleiss_kappa(ratings, categories) == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa([[WIN, WIN], [TIE, TIE], [LOSS, LOSS]]) == pytest.approx(1.0)
