"""Shares to counts (finqlora.dataset.drafts.allocate), which sizes every split and record type."""

from __future__ import annotations

import random

from finqlora.dataset.drafts import allocate


def test_allocate_gives_largest_remainders_the_leftover_and_ties_to_the_earlier_part() -> None:
    assert allocate(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert allocate(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5 / 1.75 / 1.75: the two .75 remainders win
    assert allocate(2, [1, 1, 1]) == [1, 1, 0]  # equal remainders: the earlier parts first
    assert allocate(5, [3, 1]) == [4, 1]  # shares need not sum to 1
    assert allocate(0, [0.7, 0.3]) == [0, 0]


def test_allocate_always_sums_to_the_total_and_stays_within_one_of_the_exact_share() -> None:
    rng = random.Random(0)
    for _ in range(500):
        shares = [rng.random() + 1e-9 for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, 10_000)
        counts = allocate(total, shares)
        assert sum(counts) == total
        exact = [total * s / sum(shares) for s in shares]
        assert all(abs(c - e) < 1 for c, e in zip(counts, exact, strict=True))

