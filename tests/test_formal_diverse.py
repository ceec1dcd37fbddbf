"""Diverse subset selection over BM25 (mathmill.formal.diverse) against rank-bm25."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from mathmill.formal.diverse import (
    BM25Index,
    select_diverse,
    select_diverse_reference,
    tokenize,
)

pytest.importorskip("rank_bm25")
from rank_bm25 import BM25Okapi


def _words(text: str) -> list[str]:
    return text.split()


MATHCOMP = Path("/usr/lib/ocaml/coq/user-contrib/mathcomp/ssreflect")

_HEADS = _words(
    "addn subn muln expn divn modn leq ltn eqn dvdn gcdn lcmn maxn minn odd double half "
    "fact bin card big sum prod mem size nth take drop rev cat map filter count has all "
    "perm sort iota mkseq tuple ffun set orb andb negb implyb eqb poly mx det rank ord inj "
    "comp lift bump rcons head last zip flatten subseq uniq undup index mask pmap sumn "
    "foldr foldl tnth enum pick image preim imset cover partition trivIset coprime prime "
    "logn totient chinese"
)
_TAILS = _words(
    "_ C A CA AC 0 0n n0 1 1n n1 S Sn nS K Kl Kr P E r l Dl Dr _eq0 _gt0 _le _lt _mono "
    "_inj _cat _rev _map _nil _cons _rcons Pn W I _leq _ltn _sym _trans _refl b _subset "
    "_id _def _spec _eq _neq _pred _sub"
)
_VARS = _words("m n p q x y z s t i j k a b c d e f g h r u v w")
_TYPES = ["nat", "bool", "(seq T)", "T", "eqType", "finType", "'I_n", "{set T}", "nat"]
_OPS = _words("+ - * %/ %% <= < == != && || -> = ^ ++ :: .+1 .-1 %| `|")
_TACTICS = _words(
    "rewrite rewrite rewrite move move apply case elim have by by exact split congr "
    "apply/eqP case/orP move/andP case/andP apply/idP rewrite -!  first last suff wlog do "
    "try intros induction simpl reflexivity auto lia ring"
)
_PUNCT = _words("// /= //= => -> <- ; . : [] [|] {} // // ? !")
_LEMMAS = [h + ("" if t == "_" else t) for h in _HEADS for t in _TAILS]
_ZIPF = np.cumsum(1.0 / np.arange(1, len(_LEMMAS) + 1) ** 1.05).tolist()


def coq_document(rng: random.Random, n_tokens: int) -> str:
    """A Coq-like lemma, statement then ssreflect proof, of about ``n_tokens`` tokens.

    Lemma names follow a Zipf law over head x tail names (``addnC``, ``leq_trans``);
    statements mix variables, operators and applied names; proofs mix tactics, rewrite
    chains of lemma names and ssreflect punctuation.
    """
    lemma = lambda: rng.choices(_LEMMAS, cum_weights=_ZIPF)[0]  # noqa: E731
    binders = " ".join(
        f"({' '.join(rng.sample(_VARS, rng.randint(1, 3)))} : {rng.choice(_TYPES)})"
        for _ in range(rng.randint(1, 2))
    )
    statement = [rng.choice(["Lemma", "Lemma", "Lemma", "Theorem", "Fact"]), lemma(), binders]
    statement.append(":")
    for _ in range(rng.randint(3, max(4, n_tokens // 4))):
        r = rng.random()
        if r < 0.45:
            statement.append(rng.choice(_VARS))
        elif r < 0.75:
            statement.append(rng.choice(_OPS))
        else:
            statement.append(lemma())
    statement.append(".")
    proof = ["Proof."]
    used = sum(len(tokenize(w)) for w in statement) + 2
    while used < n_tokens:
        r = rng.random()
        if r < 0.35:
            step = [rng.choice(_TACTICS)] + [lemma() for _ in range(rng.randint(1, 4))]
        elif r < 0.6:
            step = [rng.choice(_TACTICS), rng.choice(_VARS), rng.choice(_PUNCT)]
        elif r < 0.8:
            step = [rng.choice(_PUNCT), rng.choice(_VARS)]
        else:
            step = [rng.choice(_TACTICS), rng.choice(_OPS), rng.choice(_VARS), "."]
        proof.extend(step)
        used += sum(len(tokenize(w)) for w in step)
    proof.append("Qed.")
    return " ".join(statement) + "\n" + " ".join(proof)


def coq_corpus(
    n: int, seed: int, min_tokens: int = 30, max_tokens: int = 150, near_dup: float = 0.05
) -> list[str]:
    """``n`` synthetic Coq documents, seeded; a fraction ``near_dup`` are near-duplicates
    of an earlier document (the lemma renamed and one word replaced), some exact copies.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n):
        if docs and rng.random() < near_dup:
            words = rng.choice(docs).split(" ")
            if rng.random() < 0.7:
                words[1] = rng.choice(_LEMMAS) + "'"
                words[rng.randrange(2, len(words))] = rng.choice(_VARS)
            docs.append(" ".join(words))
        else:
            docs.append(coq_document(rng, rng.randint(min_tokens, max_tokens)))
    return docs


def mathcomp_lemmas(limit: int) -> list[str]:
    """The first ``limit`` ``Lemma`` chunks of mathcomp's ssreflect sources."""
    chunks: list[str] = []
    for path in sorted(MATHCOMP.glob("*.v")):
        text = path.read_text(errors="replace")
        chunks += [c for c in re.split(r"(?m)^(?=Lemma )", text) if c.startswith("Lemma ")]
    return chunks[:limit]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return coq_corpus(400, seed=7)


def test_tokenize_coq() -> None:
    text = "Lemma addnCA' (m n : nat) : m + (n + p) = n + (m + p).\nProof. by rewrite !addnA. Qed."
    assert tokenize(text) == [
        *["lemma", "addnca'", "m", "n", ":", "nat", ":", "m", "+", "n", "+", "p", "="],
        *["n", "+", "m", "+", "p", ".", "proof", ".", "by", "rewrite", "!", "addna", "."],
        *["qed", "."],
    ]
    assert tokenize("move=> /andP[H1 H2]; apply/eqP; case: ifP => // _ ->.") == [
        *["move", "=>", "/", "andp", "h1", "h2", ";", "apply", "/", "eqp", ";", "case"],
        *[":", "ifp", "=>", "//", "_", "->", "."],
    ]
    assert tokenize("") == []
    assert tokenize("x\u2080 \u2200 n, n \u2264 n") == [
        "x\u2080",
        "\u2200",
        "n",
        ",",
        "n",
        "\u2264",
        "n",
    ]


def test_synthetic_corpus_shape(corpus: list[str]) -> None:
    lengths = [len(tokenize(d)) for d in corpus]
    assert min(lengths) >= 28 and max(lengths) <= 175
    assert len(set(corpus)) < len(corpus)  # some exact copies


def test_scores_match_rank_bm25(corpus: list[str]) -> None:
    tokenized = [tokenize(d) for d in corpus] + [[]]  # an empty document too
    index = BM25Index(tokenized)
    bm25 = BM25Okapi(tokenized)
    assert index.average_idf == bm25.average_idf
    assert all(index.idf[t] == bm25.idf[w] for w, t in index.vocab.items())
    assert (index.idf == 0.25 * bm25.average_idf).sum() > 3  # floored to epsilon * average
    for i in [0, 1, 57, 200, 399, 400]:
        expected = bm25.get_scores(tokenized[i])
        np.testing.assert_allclose(index.similarities(i), expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(index.scores(tokenized[i]), expected, rtol=0, atol=1e-9)
    query = ["rewrite", "rewrite", "addnc", "addnc", "addnc", "no_such_token", "."]
    np.testing.assert_allclose(index.scores(query), bm25.get_scores(query), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("seed", "k"), [(0, 50), (1, 120), (2, 400), (3, 1000), (11, 2)])
def test_same_selection_as_reference(corpus: list[str], seed: int, k: int) -> None:
    fast = select_diverse(corpus, k, seed=seed)
    assert fast == select_diverse_reference(corpus, k, seed=seed)
    assert len(fast) == min(k, len(corpus))


def test_same_selection_as_reference_other_corpora() -> None:
    short = coq_corpus(300, seed=3, min_tokens=5, max_tokens=40, near_dup=0.2)
    assert select_diverse(short, 300, seed=5) == select_diverse_reference(short, 300, seed=5)
    long = coq_corpus(120, seed=4, min_tokens=100, max_tokens=400)
    assert select_diverse(long, 80, seed=6) == select_diverse_reference(long, 80, seed=6)


@pytest.mark.skipif(not MATHCOMP.is_dir(), reason=f"no mathcomp sources at {MATHCOMP}")
def test_same_selection_as_reference_mathcomp() -> None:
    docs = mathcomp_lemmas(500)
    assert len(docs) == 500
    for seed, k in [(0, 150), (9, 500)]:
        assert select_diverse(docs, k, seed=seed) == select_diverse_reference(docs, k, seed)


def test_selection_properties(corpus: list[str]) -> None:
    n = len(corpus)
    picks = select_diverse(corpus, n + 5, seed=4)
    assert sorted(picks) == list(range(n))
    assert picks[0] == random.Random(4).randrange(n)
    assert select_diverse(corpus, 37, seed=4) == picks[:37]  # a prefix of the full order
    firsts = {select_diverse(corpus, 1, seed=s)[0] for s in range(10)}
    assert len(firsts) > 1
    assert select_diverse(corpus, 1, seed=4) == [picks[0]]


def test_edge_cases() -> None:
    assert select_diverse([], 5) == []
    assert select_diverse(["Lemma a : True."], 0) == []
    assert select_diverse(["Lemma a : True."], -3) == []
    assert select_diverse(["Lemma a : True."], 3) == [0]
    assert select_diverse_reference([], 5) == []
    assert select_diverse_reference(["Lemma a : True."], 0) == []
    assert select_diverse_reference(["Lemma a : True."], 3) == [0]
    # documents without tokens: similarity 0 as queries and as documents
    assert random.Random(5).randrange(3) == 2
    assert select_diverse(["", "  ", "()"], 3, seed=5) == [2, 0, 1]
    assert select_diverse_reference(["", "  ", "()"], 3, seed=5) == [2, 0, 1]
    docs = ["", "Lemma addnC m n : m + n = n + m.", "", "Lemma cats0 s : s ++ [::] = s."]
    for seed in range(4):
        assert select_diverse(docs, 4, seed) == select_diverse_reference(docs, 4, seed)


def test_duplicates_of_a_pick_come_last() -> None:
    rng = random.Random(0)
    # 40 documents on disjoint vocabularies: every cross similarity is 0
    base = [" ".join(f"w{i}_{rng.randrange(6)}" for _ in range(12)) for i in range(40)]
    dups = [base[3], base[3], base[17]]
    docs = [*base[:10], dups[0], *base[10:25], dups[1], *base[25:], dups[2]]
    dup_positions = {i for i, d in enumerate(docs) if d in (base[3], base[17])}
    for seed in range(5):
        picks = select_diverse(docs, len(docs), seed=seed)
        # once one copy is picked, the other copies score its self-similarity > 0
        assert set(picks[-3:]) <= dup_positions
        assert picks == select_diverse_reference(docs, len(docs), seed=seed)
