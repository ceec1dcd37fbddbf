"""Exact and near-duplicate clustering of problem statements.

Rows whose :func:`~mathmill.curate.text.normalize_statement` texts are equal are exact
duplicates (grouped with polars on the text's hash; case and brackets count: ``x`` and
``X`` differ). One row per distinct text then goes through MinHash LSH (datasketch): the
shingles of its :func:`~mathmill.curate.text.match_key` (character n-grams by default, or
word n-grams) are hashed, sketched with ``num_perm``
permutations and banded so that a pair of Jaccard similarity ``threshold`` becomes a candidate with
probability >= 0.995 (:func:`lsh_bands`). A candidate pair is confirmed when the Jaccard
similarity of the two shingle sets is >= ``threshold`` (computed exactly from the kept
sets by default, or estimated from the sketches), and confirmed pairs are merged by
union-find. A cluster's representative is its first row in input order.

>>> texts = [
...     "Tom has 3 apples and buys 5 more at the store on Monday. How many apples does he have?",
...     "Tom has 3 apples and buys 5 more at the store on Monday.  How many apples does he have?",
...     "Tom has 3 apples and buys 6 more at the store on Monday. How many apples does he have?",
...     "A train leaves at noon at 60 miles per hour. When does it arrive 180 miles away?",
... ]
>>> c = cluster(["a", "b", "c", "d"], texts)
>>> c.cluster_id, c.kind
(('a', 'a', 'a', 'd'), ('unique', 'exact', 'near', 'unique'))
>>> c.similarity, c.kept()
((None, 1.0, 0.876543, None), ['a', 'd'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import xxhash
from datasketch import MinHash, MinHashLSH  # type: ignore[import-untyped]

from mathmill.curate.text import key_hash, normalize_statement, normalized_match_key

__all__ = ["Clusters", "Kind", "Unit", "cluster", "lsh_bands", "ngram_hashes", "unit_hashes"]

Kind = Literal["unique", "exact", "near"]
Unit = Literal["word", "char"]
Verify = Literal["exact", "estimate"]

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial n-gram hash's base
_EMPTY = np.zeros(0, dtype=np.uint64)
_CANDIDATE_RECALL = 0.995


@dataclass(frozen=True)
class Clusters:
    """Per-row result of :func:`cluster`, in input order.

    Attributes:
        ids: the input ids.
        cluster_id: the id of the row's cluster representative (itself for one).
        representative: whether the row is its cluster's representative (the row kept).
        kind: ``"unique"`` for a representative; for any other row ``"exact"`` when its
            match key equals the representative's, else ``"near"``.
        similarity: None for a representative; 1.0 for ``"exact"``; for ``"near"`` the
            Jaccard similarity of its shingles to the representative's (exact, or the
            MinHash estimate with ``verify="estimate"``). Union-find is transitive, so
            a row reached through another member can be below the threshold here.
        representative_id: None for a representative, else ``cluster_id``.
        size: the number of rows in the row's cluster.
    """

    ids: tuple[str, ...]
    cluster_id: tuple[str, ...]
    representative: tuple[bool, ...]
    kind: tuple[Kind, ...]
    similarity: tuple[float | None, ...]
    representative_id: tuple[str | None, ...]
    size: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_clusters(self) -> int:
        """How many clusters (rows kept after deduplication)."""
        return sum(self.representative)

    def kept(self) -> list[str]:
        """The representatives' ids, in input order."""
        return [i for i, rep in zip(self.ids, self.representative, strict=True) if rep]

    def to_polars(self) -> pl.DataFrame:
        """One row per input row, with the attributes as columns."""
        return pl.DataFrame(
            {
                "id": list(self.ids),
                "cluster_id": list(self.cluster_id),
                "representative": list(self.representative),
                "kind": list(self.kind),
                "similarity": list(self.similarity),
                "representative_id": list(self.representative_id),
                "size": list(self.size),
            },
            schema={
                "id": pl.String,
                "cluster_id": pl.String,
                "representative": pl.Boolean,
                "kind": pl.String,
                "similarity": pl.Float64,
                "representative_id": pl.String,
                "size": pl.Int64,
            },
        )


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """LSH bands ``(b, r)`` with ``b * r <= num_perm``: the largest band size ``r`` (the
    fewest dissimilar candidates) for which a pair of Jaccard similarity ``threshold``
    still shares a band with probability ``1 - (1 - threshold**r)**b >= 0.995``.

    >>> lsh_bands(0.8, 128)
    (21, 6)
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    best = (num_perm // 2, 2)
    for r in range(2, num_perm // 2 + 1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold**r) ** b < _CANDIDATE_RECALL:
            break
        best = (b, r)
    return best


def _mix64(x: U64) -> U64:
    """The splitmix64 finalizer, element-wise (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_hashes(key: str, unit: Unit = "word", seed: int = 1) -> U64:
    """A 64-bit hash per unit of a match key: per word (its xxh3_64) or per character.

    >>> unit_hashes("a b a").tolist()[0] == unit_hashes("a b a").tolist()[2]
    True
    """
    if unit == "word":
        words = key.split()
        return np.fromiter(
            (xxhash.xxh3_64_intdigest(w.encode("utf-8"), seed) for w in words),
            dtype=np.uint64,
            count=len(words),
        )
    if unit == "char":
        points = np.frombuffer(key.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return _mix64(points + np.uint64(seed * int(_BASE) % 2**64))
    raise ValueError(f"unit must be 'word' or 'char', not {unit!r}")


def ngram_hashes(units: U64, n: int) -> U64:
    """A 64-bit hash of every run of ``n`` consecutive units (a polynomial in the unit
    hashes, then mixed); one hash of all the units when there are fewer than ``n``;
    none for none.

    >>> h = unit_hashes("x y z x y")
    >>> g = ngram_hashes(h, 2)
    >>> len(g), bool(g[0] == g[3]), len(ngram_hashes(h, 9))
    (4, True, 1)
    """
    m = len(units)
    if m == 0:
        return _EMPTY
    n = min(n, m)
    count = m - n + 1
    h = units[:count].copy()
    for k in range(1, n):
        h = h * _BASE + units[k : k + count]
    return _mix64(h)


def _shingles(key: str, unit: Unit, shingle: int, seed: int) -> U32:
    grams = ngram_hashes(unit_hashes(key, unit, seed), shingle)
    return np.unique((grams >> np.uint64(32)).astype(np.uint32))


def _jaccard(a: U32, b: U32) -> float:
    if a.size == 0 or b.size == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def cluster(
    ids: Sequence[str],
    texts: Sequence[str],
    *,
    threshold: float = 0.8,
    shingle: int = 5,
    num_perm: int = 128,
    seed: int = 1,
    unit: Unit = "char",
    verify: Verify = "exact",
    near: bool = True,
) -> Clusters:
    """Cluster ``texts`` (one per id; ids unique) into exact and near duplicates.

    Args:
        threshold: Jaccard similarity of shingle sets at or above which two rows are
            near duplicates.
        shingle: n-gram length, in characters of the match key (``unit="char"``, the
            default) or in its words (``unit="word"``). A key shorter than that is one
            shingle. Character 5-grams keep a long problem with one number changed at
            Jaccard ~0.96 and one with two sentences swapped at ~0.95 (word 5-grams: ~0.85
            and ~0.74, under the 0.8 threshold for most reorderings and short problems),
            while the closest two distinct GSM8K test problems are at 0.74.
        num_perm: MinHash permutations.
        seed: seeds the shingle hashes and the MinHash permutations. The result is a
            function of the inputs, their order and these arguments.
        verify: how a candidate pair is confirmed: ``"exact"`` Jaccard of the shingle
            sets (the default: no false negatives beyond the LSH's), or the MinHash
            ``"estimate"`` (standard error about 0.035 at 0.8 with 128 permutations: a
            pair right at the threshold is kept or split by chance; recall 0.99 instead
            of 1.0 on bench/curate.py's sample).
        near: False clusters exact duplicates only (no shingles, no LSH).

    Single process; several thousand problems/s on MATH/GSM8K-length texts (see
    ``bench/curate.py``).
    """
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    if shingle < 1:
        raise ValueError(f"shingle must be >= 1, not {shingle}")
    normalized = [normalize_statement(t) for t in texts]
    first = _first_with_same_key(normalized)  # exact: the same normalized text
    keys = [normalized_match_key(t) for t in normalized]
    distinct = [row for row, f in enumerate(first) if f == row]
    if not near:
        sets: list[U32] = [np.zeros(0, dtype=np.uint32)] * len(distinct)
        return _assemble(ids, first, distinct, list(range(len(distinct))), sets, [], verify)
    sets = [_shingles(keys[row], unit, shingle, seed) for row in distinct]
    sketches = _sketches(sets, num_perm, seed)
    parent = _link(sets, sketches, threshold, num_perm, verify)
    return _assemble(ids, first, distinct, parent, sets, sketches, verify)


def _first_with_same_key(keys: Sequence[str]) -> list[int]:
    """For each row, the first row whose key hashes the same (polars group-by)."""
    frame = pl.DataFrame({"hash": [key_hash(k) for k in keys]}, schema={"hash": pl.String})
    firsts = frame.with_row_index("row").select(pl.col("row").min().over("hash"))
    return [int(v) for v in firsts.to_series().to_list()]


def _sketches(sets: Sequence[U32], num_perm: int, seed: int) -> list[MinHash]:
    """The MinHash of each shingle set (the shingle hashes are already uniform, so
    datasketch's own hash function is the identity)."""
    return list(
        MinHash.generator((s.tolist() for s in sets), num_perm=num_perm, seed=seed, hashfunc=int)
    )


def _link(
    sets: Sequence[U32],
    sketches: Sequence[MinHash],
    threshold: float,
    num_perm: int,
    verify: Verify,
) -> list[int]:
    """Union-find roots over the distinct keys; a root is its cluster's first row."""
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    for pos, (shingles, sketch) in enumerate(zip(sets, sketches, strict=True)):
        if shingles.size == 0:  # an empty key: only exact duplicates
            continue
        for cand in sorted(lsh.query(sketch)):
            a, b = find(cand), find(pos)
            if a != b and _similarity(sets, sketches, cand, pos, verify) >= threshold:
                parent[max(a, b)] = min(a, b)
        lsh.insert(pos, sketch, check_duplication=False)
    return [find(i) for i in range(len(sets))]


def _similarity(
    sets: Sequence[U32], sketches: Sequence[MinHash], a: int, b: int, verify: Verify
) -> float:
    if verify == "exact":
        return _jaccard(sets[a], sets[b])
    return float(sketches[a].jaccard(sketches[b]))


def _assemble(
    ids: Sequence[str],
    first: Sequence[int],
    distinct: Sequence[int],
    parent: Sequence[int],
    sets: Sequence[U32],
    sketches: Sequence[MinHash],
    verify: Verify,
) -> Clusters:
    position = {row: pos for pos, row in enumerate(distinct)}
    rep_rows = [distinct[parent[position[first[row]]]] for row in range(len(ids))]
    sizes: dict[int, int] = {}
    for rep in rep_rows:
        sizes[rep] = sizes.get(rep, 0) + 1
    kinds: list[Kind] = []
    sims: list[float | None] = []
    for row, rep in enumerate(rep_rows):
        if row == rep:
            kinds.append("unique")
            sims.append(None)
        elif first[row] == rep:
            kinds.append("exact")
            sims.append(1.0)
        else:
            kinds.append("near")
            a, b = position[first[row]], position[rep]
            sims.append(round(_similarity(sets, sketches, a, b, verify), 6))
    return Clusters(
        ids=tuple(ids),
        cluster_id=tuple(ids[rep] for rep in rep_rows),
        representative=tuple(row == rep for row, rep in enumerate(rep_rows)),
        kind=tuple(kinds),
        similarity=tuple(sims),
        representative_id=tuple(
            None if row == rep else ids[rep] for row, rep in enumerate(rep_rows)
        ),
        size=tuple(sizes[rep] for rep in rep_rows),
    )
