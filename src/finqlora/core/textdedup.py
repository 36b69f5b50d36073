"""Near-duplicate detection for news text (reposts, the same flash told twice, template news).

Used by the dataset builder twice: to drop near-duplicates before sampling (so one story is
learnt once) and to check that no text in one split has a near-duplicate in another. The
store's cross-source linking (`store.ingest.link_duplicates`) compares flashes with the same
normaliser through `normalize_flash`.

Method (documented in docs/dataset.md):
- normalise (`normalize`): Unicode NFKC, lower case, drop a 【title】's dateline ("财联社6月1日电，"),
  keep only letters and digits (no whitespace or punctuation); `normalize_flash` also drops the
  【title】 and a trailing credit ("（央视新闻）"), which differ between sources, and keeps the
  first LINK_CHARS characters;
- shingles: overlapping character 3-grams, each hashed to 32 bits with fixed multipliers
  (never Python's `hash`, which changes between runs), computed for all texts at once with numpy;
- MinHash (64 permutations) + LSH (16 bands of 4 rows) finds candidate pairs; every candidate
  is then verified with the exact Jaccard similarity of the two shingle sets, so a reported
  duplicate is a real one (>= `threshold`, default 0.7). LSH may miss a pair: one at
  Jaccard 0.7 is found with probability 0.988, one at 0.8 with 0.9998.

A text shorter than 3 characters after normalising is one shingle (its whole text).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NUM_PERM = 64
BANDS = 16
ROWS = NUM_PERM // BANDS
DEFAULT_THRESHOLD = 0.7

# "财联社6月1日电，" / "新华社北京6月1日电 " / "6月1日讯：": who and when, different in every source.
_DATELINE = re.compile(r"^(?:[\u4e00-\u9fff]{1,8})?\d{1,2}月\d{1,2}日(?:电|讯)[，,:：]?")
_TITLE_BRACKET = re.compile(r"^【([^】]*)】")
# "（央视新闻）" at the end: the credit one source adds and another leaves out.
_TRAILING_CREDIT = re.compile(r"[（(][^（）()]{1,20}[）)]\s*$")
_NOT_WORD = re.compile(r"[\W_]+")
_SEPARATOR = "\x00"
# Cross-source linking compares the opening of two flashes: it identifies a flash, and whole
# long articles only cost time. A body shorter than SHORT_BODY_CHARS is compared with its title.
LINK_CHARS = 160
SHORT_BODY_CHARS = 12


def split_title(text: str) -> tuple[str, str]:
    """(title in a leading 【】 or '', the rest without its dateline)."""
    text = (text or "").strip()
    match = _TITLE_BRACKET.match(text)
    title, body = (match.group(1), text[match.end() :]) if match else ("", text)
    return title, _DATELINE.sub("", body.lstrip())


def letters_and_digits(text: str) -> str:
    """NFKC, lower case, letters and digits only: what every comparison in finqlora sees."""
    text = _NOT_WORD.sub("", text)
    # Punctuation is gone already, so most Chinese text is NFKC as it stands and the
    # (cheap) check saves the (costly) normalisation; full-width letters and digits remain.
    if not unicodedata.is_normalized("NFKC", text):
        text = _NOT_WORD.sub("", unicodedata.normalize("NFKC", text))
    return text.lower()


def normalize(text: str) -> str:
    """The text as compared: NFKC, lower case, no dateline, letters and digits only."""
    # A flash often starts with its title in 【】 and then a dateline; drop the dateline
    # (it only says who and when) so two sources' copies compare by their substance.
    title, body = split_title(text)
    return letters_and_digits(title + body)


def normalize_flash(title: str | None, content: str) -> str:
    """A flash as cross-source linking compares it: `normalize` without the 【title】 and the
    trailing credit (sources word and credit them differently), its first LINK_CHARS characters.
    """
    _, body = split_title(content)
    text = letters_and_digits(_TRAILING_CREDIT.sub("", body))
    if len(text) < SHORT_BODY_CHARS and title:
        text = letters_and_digits(title) + text
    return text[:LINK_CHARS]


@dataclass(frozen=True)
class Shingled:
    """All texts' shingle hashes in one flat array; text i owns flat[offsets[i]:offsets[i+1]]."""

    flat: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def set_of(self, i: int) -> frozenset[int]:
        return frozenset(self.flat[self.offsets[i] : self.offsets[i + 1]].tolist())


def shingle_all(texts: Sequence[str]) -> Shingled:
    """Character 3-gram hashes of every normalised text, vectorised over all texts at once."""
    norms = [normalize(t) for t in texts]
    for i, norm in enumerate(norms):
        if len(norm) < 3:
            # Pad a very short text so it still has one shingle (itself).
            norms[i] = norm.ljust(3, "\x01")
    codes = np.frombuffer((_SEPARATOR.join(norms) + _SEPARATOR).encode("utf-32-le"), dtype=np.uint32)
    with np.errstate(over="ignore"):
        # A 3-gram's hash: a random-odd-multiplier combination of its code points mod 2^32
        # (two given 3-grams collide with probability ~2^-32; fixed constants, so stable).
        hashed = codes[:-2] * np.uint32(0x9E3779B1) + codes[1:-1] * np.uint32(0x85EBCA77) + codes[2:] * np.uint32(0xC2B2AE3D)
    is_sep = codes == 0
    valid = ~(is_sep[:-2] | is_sep[1:-1] | is_sep[2:])
    lengths = np.fromiter((len(n) - 2 for n in norms), dtype=np.int64, count=len(norms))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Shingled(hashed[valid], offsets)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def text_similarity(a: str, b: str) -> float:
    """Exact Jaccard similarity of two texts' 3-gram shingle sets (after normalising)."""
    shingled = shingle_all([a, b])
    return jaccard(shingled.set_of(0), shingled.set_of(1))


def _band_keys(shingled: Shingled) -> np.ndarray:
    """LSH band keys, shape (texts, BANDS): MinHash signature (64 values) folded into 16 hashes."""
    n = len(shingled)
    if n == 0:
        return np.zeros((0, BANDS), dtype=np.uint64)
    rng = np.random.default_rng(20240601)
    mult = (rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
    add = rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint64).astype(np.uint32)
    starts = shingled.offsets[:-1]
    signatures = np.empty((n, NUM_PERM), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for p in range(NUM_PERM):
            # a*x + b mod 2^32 with odd a: a bijection on 32-bit values, i.e. a permutation.
            signatures[:, p] = np.minimum.reduceat(shingled.flat * mult[p] + add[p], starts)
        rows = signatures.reshape(n, BANDS, ROWS).astype(np.uint64)
        keys = rows[:, :, 0]
        for r in range(1, ROWS):
            keys = keys * np.uint64(0x100000001B3) + rows[:, :, r]
    return keys


class _Candidates:
    """Texts that share an LSH bucket with another text (most texts share none)."""

    def __init__(self, texts: Sequence[str], threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingled = shingle_all(texts)
        keys = _band_keys(self.shingled)
        self.groups_of: dict[int, list[int]] = {}
        self.members: list[list[int]] = []
        for band in range(BANDS):
            _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
            shared = np.flatnonzero(counts[inverse] > 1)
            by_bucket: dict[int, list[int]] = {}
            for i in shared.tolist():
                by_bucket.setdefault(int(inverse[i]), []).append(i)
            for bucket_members in by_bucket.values():
                group = len(self.members)
                self.members.append(bucket_members)  # ascending: np.flatnonzero is sorted
                for i in bucket_members:
                    self.groups_of.setdefault(i, []).append(group)
        self._sets: dict[int, frozenset[int]] = {}

    def _set(self, i: int) -> frozenset[int]:
        found = self._sets.get(i)
        if found is None:
            found = self._sets[i] = self.shingled.set_of(i)
        return found

    def earlier_matches(self, i: int, allowed: Callable[[int], bool]) -> list[tuple[int, float]]:
        """Texts j < i (with allowed(j)) that are verified near-duplicates of i, with similarity."""
        candidates = {j for group in self.groups_of.get(i, ()) for j in self.members[group] if j < i and allowed(j)}
        found = []
        for j in sorted(candidates):
            sim = jaccard(self._set(i), self._set(j))
            if sim >= self.threshold:
                found.append((j, sim))
        return found


@dataclass(frozen=True)
class DedupResult:
    """Which texts to keep, and for each dropped one the kept text it duplicates."""

    keep: list[int]
    duplicate_of: dict[int, int]


def deduplicate(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> DedupResult:
    """Keep the first text of every group of near-duplicates (pass texts in time order).

    A text is dropped when it is a near-duplicate of a text already kept (the most similar
    one is recorded); it is compared with kept texts only, so a chain of small edits cannot
    merge unrelated texts.
    """
    candidates = _Candidates(texts, threshold)
    kept = bytearray(len(texts))
    keep: list[int] = []
    duplicate_of: dict[int, int] = {}
    for i in range(len(texts)):
        found = candidates.earlier_matches(i, kept.__getitem__) if i in candidates.groups_of else []
        if found:
            duplicate_of[i] = max(found, key=lambda pair: (pair[1], -pair[0]))[0]
        else:
            kept[i] = 1
            keep.append(i)
    return DedupResult(keep=keep, duplicate_of=duplicate_of)


def cross_group_duplicates(
    groups: Sequence[Sequence[str]], threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[int, int, int, int]]:
    """Near-duplicate pairs whose texts lie in different groups (e.g. train vs test).

    Returns (group_a, index_a, group_b, index_b) with group_a < group_b; empty means clean.
    """
    flat = [(g, i) for g, texts in enumerate(groups) for i in range(len(texts))]
    candidates = _Candidates([groups[g][i] for g, i in flat], threshold)
    pairs: list[tuple[int, int, int, int]] = []
    for key in candidates.groups_of:
        g = flat[key][0]
        for other, _ in candidates.earlier_matches(key, lambda j: flat[j][0] != g):
            a, b = sorted((flat[other], flat[key]))
            pairs.append((*a, *b))
    return sorted(pairs)
