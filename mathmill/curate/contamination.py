"""Decontamination: find training problems that are benchmark problems.

The rule, for a text and one benchmark item:

1. ``exact``: the text's :func:`~mathmill.curate.text.content_hash` equals the item's
   (equal after normalization, case, punctuation and math delimiters aside).
2. ``ngram``: otherwise, let the item's n-grams be the distinct runs of ``ngram`` (6)
   consecutive words of its :func:`~mathmill.curate.text.match_key` (the whole key when
   it has fewer words). The text matches when at least ``threshold`` (0.5) of the
   item's n-grams occur in the text's key. Measured against the item, so a benchmark
   problem with a sentence added, or half of one pasted into a longer text, still
   matches; 6 rather than the 13 of the GPT-3 recipe because a short problem has too
   few 13-grams (measured: n=6 finds 98% of benchmark items with two sentences swapped
   against 86% at n=8, with no false positives on GSM8K either way).

A text matching several items reports the one with the highest overlap (an exact match
first; ties go to the earlier benchmark, then the earlier item). The n-grams of all items
are hashed once into an inverted index (a dict from n-gram hash to items; about 100
bytes per distinct n-gram, ~15 MB for the bundled 2,792 items), so a text costs one
normalization, one vectorized hashing of its n-grams and a dict lookup per n-gram.

>>> index = BenchmarkIndex.load(["gsm8k"])
>>> m = index.match("Janet's ducks lay 16 eggs per day.  She eats three for breakfast every "
...     "morning and bakes muffins for her friends every day with four. She sells the "
...     "remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
...     "dollars does she make every day at the farmers' market?")
>>> m.benchmark, m.item_id, m.kind, m.overlap
('gsm8k', 'gsm8k-test-0', 'exact', 1.0)
>>> index.match("Janet has 16 ducks. How many legs do they have?") is None
True
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from mathmill.curate.neardup import _BASE, U64, _mix64, unit_hashes
from mathmill.curate.text import key_hash, match_key
from mathmill.errors import ConfigError
from mathmill.records import ErrorInfo, Problem
from mathmill.sources import FieldMap, read_problems

__all__ = [
    "BENCHMARKS",
    "DEFAULT_BENCHMARKS",
    "BenchmarkIndex",
    "BenchmarkItem",
    "Match",
]

BENCHMARKS: dict[str, str] = {
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "amc23": "amc23.jsonl",
    "aime": "aime.jsonl",
}
"""The bundled benchmarks (``mathmill/data/benchmarks``): name -> file."""

DEFAULT_BENCHMARKS: tuple[str, ...] = ("math500", "gsm8k", "amc23", "aime")

PROBLEM_CHARS = 300
"""A :class:`Match` carries the benchmark problem's first this many characters."""

_SEED = 1


@dataclass(frozen=True)
class Match:
    """A text found in a benchmark.

    Attributes:
        benchmark: the benchmark's name (``gsm8k``, or an extra file's stem).
        item_id: the item's id in the benchmark.
        kind: ``"exact"`` (same content hash) or ``"ngram"``.
        overlap: the fraction of the item's n-grams found in the text (1.0 for exact).
        problem: the benchmark problem, cut to :data:`PROBLEM_CHARS` characters.
    """

    benchmark: str
    item_id: str
    kind: Literal["exact", "ngram"]
    overlap: float
    problem: str

    def as_dict(self) -> dict[str, str | float]:
        """The fields as a JSON-ready dict."""
        return {
            "benchmark": self.benchmark,
            "item_id": self.item_id,
            "kind": self.kind,
            "overlap": self.overlap,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark problem."""

    benchmark: str
    id: str
    problem: str
    answer: str | None = None


class BenchmarkIndex:
    """Benchmark items indexed for :meth:`match`; build with :meth:`load`.

    Args:
        items: the benchmark problems, in priority order for ties.
        ngram: n-gram length in words of the match key.
        threshold: the fraction of an item's n-grams a text must contain to match it.
    """

    def __init__(
        self, items: Iterable[BenchmarkItem], *, ngram: int = 6, threshold: float = 0.5
    ) -> None:
        if ngram < 1:
            raise ConfigError(f"decontamination ngram must be >= 1, not {ngram}")
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"decontamination threshold must be in (0, 1], not {threshold}")
        self.items: tuple[BenchmarkItem, ...] = tuple(items)
        self.ngram = ngram
        self.threshold = threshold
        self._exact: dict[str, int] = {}
        self._gram_counts: list[int] = [0] * len(self.items)
        lengths: set[int] = {ngram}
        # The inverted index: n-gram hash -> the items holding it, in item order.
        self._postings: dict[int, list[int]] = {}
        for pos, item in enumerate(self.items):
            key = match_key(item.problem)
            self._exact.setdefault(key_hash(key), pos)
            units = unit_hashes(key, "word", _SEED)
            if len(units) == 0:
                continue
            length = min(ngram, len(units))
            lengths.add(length)
            grams = set(_grams(units, [length]).tolist())
            self._gram_counts[pos] = len(grams)
            for gram in grams:
                self._postings.setdefault(gram, []).append(pos)
        self._lengths = sorted(lengths)

    @classmethod
    def load(
        cls,
        names: Sequence[str] = DEFAULT_BENCHMARKS,
        extra: Sequence[str] = (),
        *,
        ngram: int = 6,
        threshold: float = 0.5,
        split: str = "test",
        fields: FieldMap | None = None,
    ) -> BenchmarkIndex:
        """An index of the bundled benchmarks ``names`` (:data:`BENCHMARKS`) and the
        ``extra`` sources: JSONL or Parquet files, or ``hf:NAME[:CONFIG]`` datasets
        (``split``), read by :func:`mathmill.sources.read_problems` with ``fields``
        (default: the problem in ``problem``, its id in ``id``, else its row number).
        An extra file's benchmark name is its stem; a dataset's is ``NAME``. Any bad row
        in a benchmark is a :class:`~mathmill.errors.ConfigError`: decontaminating
        against part of a benchmark would pass its other rows silently.
        """
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise ConfigError(
                f"unknown benchmark(s) {', '.join(map(repr, unknown))}; "
                f"bundled: {', '.join(BENCHMARKS)} (or pass a file or hf:NAME as extra)"
            )
        items: list[BenchmarkItem] = []
        folder = resources.files("mathmill") / "data" / "benchmarks"
        for name in names:
            with resources.as_file(folder / BENCHMARKS[name]) as path:
                items += _read(name, str(path), None, "test")
        for source in extra:
            items += _read(_source_name(source), source, fields, split)
        return cls(items, ngram=ngram, threshold=threshold)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def benchmarks(self) -> list[str]:
        """The benchmark names, in load order."""
        return list(dict.fromkeys(item.benchmark for item in self.items))

    def match(self, text: str, *, threshold: float | None = None) -> Match | None:
        """The benchmark item ``text`` is a copy of (see the module's rule), or None.
        ``threshold`` overrides the index's n-gram overlap threshold for this call."""
        threshold = self.threshold if threshold is None else threshold
        key = match_key(text)
        exact = self._exact.get(key_hash(key))
        if exact is not None:
            return self._match(exact, "exact", 1.0)
        units = unit_hashes(key, "word", _SEED)
        if len(units) == 0:
            return None
        counts: dict[int, int] = {}
        query = set(_grams(units, self._lengths).tolist())
        for gram in self._postings.keys() & query:  # C-level: iterates the smaller side
            for pos in self._postings[gram]:
                counts[pos] = counts.get(pos, 0) + 1
        best, best_overlap = -1, 0.0
        for pos in sorted(counts):  # the first (earliest item) of equal overlaps wins
            overlap = counts[pos] / self._gram_counts[pos]
            if overlap > best_overlap:
                best, best_overlap = pos, overlap
        if best < 0 or best_overlap < threshold:
            return None
        return self._match(best, "ngram", round(best_overlap, 6))

    def match_many(
        self, texts: Iterable[str], *, threshold: float | None = None
    ) -> list[Match | None]:
        """:meth:`match` for each text, in order."""
        return [self.match(text, threshold=threshold) for text in texts]

    def _match(self, pos: int, kind: Literal["exact", "ngram"], overlap: float) -> Match:
        item = self.items[pos]
        return Match(item.benchmark, item.id, kind, overlap, item.problem[:PROBLEM_CHARS])


def _grams(units: U64, lengths: Sequence[int]) -> U64:
    """The n-gram hashes of ``units`` for every n in ``lengths`` (ascending) that fits,
    in one array: the same values as :func:`~mathmill.curate.neardup.ngram_hashes`,
    built in one pass and mixed in one call."""
    polys: list[U64] = []
    poly = units
    for n in range(1, min(lengths[-1], len(units)) + 1):
        if n > 1:
            poly = poly[:-1] * _BASE + units[n - 1 :]
        if n in lengths:
            polys.append(poly)
    return _mix64(np.concatenate(polys)) if polys else np.zeros(0, dtype=np.uint64)


def _source_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:].partition(":")[0]
    return Path(source).stem


def _read(name: str, source: str, fields: FieldMap | None, split: str) -> list[BenchmarkItem]:
    items: list[BenchmarkItem] = []
    errors: list[ErrorInfo] = []
    for row, problem in enumerate(read_problems(source, fields, split=split)):
        if isinstance(problem, Problem):
            pid = problem.source_id or f"{name}#{row}"
            items.append(BenchmarkItem(name, pid, problem.statement, problem.answer))
        else:
            errors.append(problem)
    if errors:
        raise ConfigError(
            f"benchmark {source}: {len(errors)} bad row(s), first: {errors[0].message}"
        )
    if not items:
        raise ConfigError(f"benchmark {source} has no problems")
    return items


@functools.cache
def cached_index(
    names: tuple[str, ...], extra: tuple[str, ...], ngram: int, identity: str
) -> BenchmarkIndex:
    """:meth:`BenchmarkIndex.load`, built once per process for each ``identity`` (the
    benchmark files' content: a changed file builds a new index).
    """
    return BenchmarkIndex.load(names, extra, ngram=ngram)
