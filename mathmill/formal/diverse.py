"""Diverse subsets of formal documents: greedy farthest-point selection over BM25.

A document is a Coq lemma statement with its proof. :func:`select_diverse` picks ``k``
of them so that each new pick is the one least similar to everything picked so far,
where the similarity of document ``j`` to a picked document ``s`` is the BM25 score of
``j`` for the query made of ``s``'s tokens (``rank_bm25.BM25Okapi``'s definition, with
its defaults ``k1=1.5, b=0.75, epsilon=0.25``). The first pick is
``random.Random(seed).randrange(n)``.

The BM25 weights of every (document, term) pair are computed once into a sparse matrix;
each pick then costs one sparse matrix-vector product. :func:`select_diverse_reference`
is the same procedure written directly on ``rank_bm25`` (a development dependency, for
tests and benchmarks); the two return the same indices because both round similarities
to 9 decimals before comparing them, which hides float summation order.

>>> docs = [
...     "Lemma addn0 n : n + 0 = n. Proof. by elim: n. Qed.",
...     "Lemma add0n n : 0 + n = n. Proof. by []. Qed.",
...     "Lemma addn0' n : n + 0 = n. Proof. by elim: n. Qed.",
...     "Lemma mulnC m n : m * n = n * m. Proof. by rewrite mulnC. Qed.",
...     "Lemma leq_trans n m p : m <= n -> n <= p -> m <= p. Proof. move=> /leq_trans. Qed.",
...     "Lemma cats0 s : s ++ [::] = s. Proof. by elim: s => //= x s ->. Qed.",
... ]
>>> tokenize(docs[3])[:8]
['lemma', 'mulnc', 'm', 'n', ':', 'm', '*', 'n']
>>> select_diverse(docs, 3, seed=2)
[0, 5, 3]
>>> select_diverse(docs, 10, seed=2)  # all of them; the near-duplicate 2 of 0 comes late
[0, 5, 3, 1, 2, 4]
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp  # type: ignore[import-untyped]

__all__ = ["BM25Index", "select_diverse", "select_diverse_reference", "tokenize"]

K1 = 1.5
B = 0.75
EPSILON = 0.25
DECIMALS = 9
"""Similarities are rounded to this many decimals before they are compared."""

# identifiers and numbers (Unicode letters and digits, ``_``, ``'``: ``addn0``, ``x'``,
# ``'I_n``); a sentence-ending ``.`` (followed by a space or the end); runs of other
# non-space characters except brackets and quotes, which stop before such a ``.``
# (operators and ssreflect punctuation: ``+``, ``->``, ``=>``, ``//=``, ``:=``, ``.+1``).
_TOKEN = re.compile(r"[\w']+|(?:[^\w\s()\[\]{}\".]+|\.(?!\s|\Z))+|\.")

FloatArray = npt.NDArray[np.float64]


def tokenize(text: str) -> list[str]:
    """Split Coq text into lowercase tokens.

    A token is either a run of word characters and ``'`` (identifiers, numbers:
    ``addnC``, ``x'``, ``'I_n``, ``42``) or a run of other non-space characters
    (operators and tactic punctuation: ``+``, ``->``, ``=>``, ``//=``, ``:=``,
    ``/andP`` gives ``/`` and ``andp``), except that a ``.`` ending a sentence (followed
    by a space or the end of the text) is a token of its own (``->.`` gives ``->``,
    ``.``). Brackets ``()[]{}`` and ``"`` separate tokens and are dropped; comments are
    not stripped (``(* c *)`` gives ``*``, ``c``, ``*``).

    >>> tokenize("Lemma leq_add2l p m n : (p + m <= p + n) = (m <= n).")
    ['lemma', 'leq_add2l', 'p', 'm', 'n', ':', 'p', '+', 'm', '<=', 'p', '+', 'n', '=', 'm', '<=', 'n', '.']
    >>> tokenize("by move=> /andP[-> //=]; case: n => [|n] -> .+1 ->.")
    ['by', 'move', '=>', '/', 'andp', '->', '//=', ';', 'case', ':', 'n', '=>', '|', 'n', '->', '.+', '1', '->', '.']
    """  # noqa: E501
    return _TOKEN.findall(text.lower())


class BM25Index:
    """BM25Okapi weights of a tokenized corpus as a sparse (documents x terms) matrix.

    ``weights[j, t] = idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len_j / avgdl))``
    with ``tf`` the count of term ``t`` in document ``j``, and ``idf`` as in
    ``rank_bm25.BM25Okapi``: ``log(N - n_t + 0.5) - log(n_t + 0.5)``, where negative
    values are replaced by ``epsilon`` times the mean of all idfs (summed in the order in
    which terms first occur, like rank_bm25, so the idfs are bit-identical to its own).
    The score of document ``j`` for a query is the sum over the query's tokens, each
    occurrence counting once, of ``weights[j, t]``; tokens not in the corpus score 0.
    """

    def __init__(
        self,
        tokenized: Sequence[Sequence[str]],
        k1: float = K1,
        b: float = B,
        epsilon: float = EPSILON,
    ) -> None:
        # term ids in order of first occurrence, the order of rank_bm25's idf dict
        self.vocab: dict[str, int] = {}
        vocab, assign = self.vocab, self.vocab.setdefault
        doc_len = np.array([len(doc) for doc in tokenized], np.int64)
        n = len(doc_len)
        cols = np.fromiter(
            [assign(t, len(vocab)) for doc in tokenized for t in doc], np.int64, int(doc_len.sum())
        )
        n_terms = len(vocab)
        rows = np.repeat(np.arange(n, dtype=np.int64), doc_len)
        counts = sp.csr_matrix((np.ones(len(cols), np.float64), (rows, cols)), shape=(n, n_terms))
        counts.sum_duplicates()
        counts.sort_indices()
        self.counts = counts
        """Term counts, CSR float64 (documents x terms)."""
        self.doc_len = doc_len
        total = int(doc_len.sum())
        self.avgdl = total / n if n else 0.0

        doc_freq = np.bincount(counts.indices, minlength=n_terms)
        idf = [math.log(n - int(f) + 0.5) - math.log(int(f) + 0.5) for f in doc_freq]
        idf_sum = 0.0
        for value in idf:
            idf_sum += value
        self.average_idf = idf_sum / n_terms if n_terms else 0.0
        eps = epsilon * self.average_idf
        self.idf: FloatArray = np.array([eps if v < 0 else v for v in idf], np.float64)
        """idf per term id (``vocab`` maps tokens to term ids)."""

        tf = counts.data
        row_of = np.repeat(np.arange(n), np.diff(counts.indptr))
        if len(tf):
            norm = k1 * (1 - b + b * doc_len[row_of] / self.avgdl)
            data = self.idf[counts.indices] * (tf * (k1 + 1) / (tf + norm))
        else:
            data = np.zeros(0, np.float64)
        self.weights = sp.csr_matrix(
            (data, counts.indices.copy(), counts.indptr.copy()), shape=(n, n_terms)
        )
        """BM25 weights, CSR float64 (documents x terms)."""

    @property
    def n_docs(self) -> int:
        """Number of documents."""
        return int(self.weights.shape[0])

    def scores(self, query: Sequence[str]) -> FloatArray:
        """BM25 score of every document for ``query`` (``BM25Okapi.get_scores``)."""
        q = np.zeros(len(self.vocab), np.float64)
        for token in query:
            t = self.vocab.get(token)
            if t is not None:
                q[t] += 1.0
        return np.asarray(self.weights @ q, np.float64)

    def similarities(self, i: int) -> FloatArray:
        """``sim(i -> j)`` for every ``j``: the scores for document ``i``'s tokens."""
        start, end = self.counts.indptr[i], self.counts.indptr[i + 1]
        q = np.zeros(len(self.vocab), np.float64)
        q[self.counts.indices[start:end]] = self.counts.data[start:end]
        return np.asarray(self.weights @ q, np.float64)


def select_diverse(docs: Sequence[str], k: int, seed: int = 0) -> list[int]:
    """Indices of ``k`` mutually dissimilar documents of ``docs``, in pick order.

    Greedy farthest-point selection: the first pick is
    ``random.Random(seed).randrange(len(docs))``; every later pick is the unselected
    document ``j`` with the smallest ``closest[j] = max over picked s of sim(s -> j)``
    (ties go to the lowest index), where ``sim(s -> j)`` is document ``j``'s BM25 score
    for the query of ``s``'s tokens (see :class:`BM25Index`), rounded to 9 decimals.

    ``k >= len(docs)`` orders all documents; ``k <= 0`` or no documents gives ``[]``.
    Documents without tokens are allowed (they score 0 and give 0 as queries).
    The index is built once; each pick costs one sparse matrix-vector product.
    """
    n = len(docs)
    if k <= 0 or n == 0:
        return []
    index = BM25Index([tokenize(d) for d in docs])
    first = random.Random(seed).randrange(n)
    picks = [first]
    closest = np.full(n, -np.inf)
    closest[first] = np.inf
    q = np.zeros(len(index.vocab), np.float64)
    indptr, indices, data = index.counts.indptr, index.counts.indices, index.counts.data
    weights = index.weights
    for _ in range(min(k, n) - 1):
        last = picks[-1]
        cols = indices[indptr[last] : indptr[last + 1]]
        q[cols] = data[indptr[last] : indptr[last + 1]]
        sims = np.round(weights @ q, DECIMALS)
        q[cols] = 0.0
        np.maximum(closest, sims, out=closest)
        nxt = int(np.argmin(closest))
        closest[nxt] = np.inf
        picks.append(nxt)
    return picks


def select_diverse_reference(docs: Sequence[str], k: int, seed: int = 0) -> list[int]:
    """:func:`select_diverse` written directly on ``rank_bm25.BM25Okapi.get_scores``.

    One ``get_scores`` call per pick and a plain loop for the minimum; for tests and
    benchmarks (``rank-bm25`` is a development dependency, imported here).
    """
    from rank_bm25 import BM25Okapi  # type: ignore[import-untyped]

    n = len(docs)
    if k <= 0 or n == 0:
        return []
    tokenized = [tokenize(d) for d in docs]
    # BM25Okapi divides by the vocabulary size: a corpus without tokens scores all 0
    bm25 = BM25Okapi(tokenized) if any(tokenized) else None
    picks = [random.Random(seed).randrange(n)]
    selected = [False] * n
    selected[picks[0]] = True
    closest = [-math.inf] * n
    while len(picks) < min(k, n):
        query = tokenized[picks[-1]]
        scores = np.zeros(n) if bm25 is None else bm25.get_scores(query)
        rounded = np.round(scores, DECIMALS)
        for j in range(n):
            closest[j] = max(closest[j], float(rounded[j]))
        best = -1
        for j in range(n):
            if not selected[j] and (best < 0 or closest[j] < closest[best]):
                best = j
        selected[best] = True
        picks.append(best)
    return picks
