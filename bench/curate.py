"""Curation text library: near-duplicate clustering and decontamination speed and quality.

The corpus is the bundled benchmarks (mathmill/data/benchmarks: MATH-500, GSM8K test,
AMC 2023, AIME 1983-2024; 2,792 problems) plus planted variants of each problem: one
number changed, two sentences swapped, LaTeX respaced (tests/test_curate_text.py makes
them). Everything runs in this one process, so every rate is per core. Sections:

(a) near-duplicate throughput (problems/s) of ``cluster`` at two corpus sizes, against a
    plain datasketch loop in the same run (word 5-gram strings, SHA-1 hashing,
    ``update_batch``, default LSH parameters, estimated Jaccard);
(b) recall and false positives against exact pairwise Jaccard of the same shingles on a
    sample (all pairs), at Jaccard >= 0.8, for the default (exact verification) and for
    verification by the MinHash estimate;
(c) planted near-duplicate recall per kind of variant, originals merged with each other;
    planted benchmark-item recall of decontamination per variant, and false positives on
    held-out real problems (the second half of GSM8K test against an index of the first
    half; GSM8K test against an index of the three competition sets);
(d) decontamination throughput (problems/s) on 100k mutated benchmark problems against
    the four bundled benchmarks, against a plain dict-of-n-gram-strings index;
(e) the whole curate pipeline's rows/s on 1,000 GSM8K problems against the fake OpenAI
    server with instant answers (every program runs in the sandbox).

Targets: >= 2,000 problems/s per core for clustering; recall >= 0.95 at Jaccard >= 0.8.

    .venv/bin/python bench/curate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasketch import MinHash, MinHashLSH  # type: ignore[import-untyped]

from mathmill.curate.contamination import BenchmarkIndex, BenchmarkItem
from mathmill.curate.neardup import _shingles, cluster
from mathmill.curate.text import content_hash, match_key
from tests.test_curate_text import change_number, reorder_sentences, respace

BENCHMARKS = Path(__file__).resolve().parents[1] / "mathmill" / "data" / "benchmarks"
FILES = {"math500": "math500.jsonl", "gsm8k": "gsm8k_test.jsonl", "amc23": "amc23.jsonl"}
FILES["aime"] = "aime.jsonl"
THRESHOLD = 0.8


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    origin: str  # the original's id (itself for an original)
    how: str  # "original", "number", "reorder", "respace"


def benchmark_rows() -> list[tuple[str, dict[str, str]]]:
    rows = []
    for name, file in FILES.items():
        lines = (BENCHMARKS / file).read_text().splitlines()
        rows += [(name, json.loads(line)) for line in lines if line.strip()]
    return rows


def planted_corpus(originals: Sequence[dict[str, str]], rounds: int, seed: int) -> list[Row]:
    """The originals, then ``rounds`` x 3 planted variants of each."""
    rng = random.Random(seed)
    rows = [Row(r["id"], r["problem"], r["id"], "original") for r in originals]
    for k in range(rounds):
        for r in originals:
            text = r["problem"]
            number = change_number(text, rng) or text + " Give the answer as a number."
            reorder = reorder_sentences(text, rng) or respace(text) + " Show your work."
            for how, variant in [("number", number), ("reorder", reorder)]:
                rows.append(Row(f"{r['id']}/{how}{k}", variant, r["id"], how))
            rows.append(Row(f"{r['id']}/respace{k}", respace(text), r["id"], "respace"))
    return rows


# --- (a) throughput -----------------------------------------------------------------


def plain_datasketch(texts: Sequence[str]) -> int:
    """The plain loop: datasketch's defaults on word 5-gram strings."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    clusters = 0
    sketches = []
    for i, text in enumerate(texts):
        words = " ".join(text.lower().split()).split()
        grams = {" ".join(words[j : j + 5]).encode() for j in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=128)
        m.update_batch(grams)
        sketches.append(m)
        found = [c for c in lsh.query(m) if m.jaccard(sketches[c]) >= THRESHOLD]
        clusters += not found
        lsh.insert(i, m)
    return clusters


def rate(fn: Callable[[], object], n: int) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - start), out


def section_throughput(originals: Sequence[dict[str, str]], sizes: Sequence[int]) -> None:
    print("(a) near-duplicate clustering throughput (one process = per core)")
    for rounds in sizes:
        rows = planted_corpus(originals, rounds, seed=rounds)
        ids, texts = [r.id for r in rows], [r.text for r in rows]
        ours, result = rate(lambda ids=ids, texts=texts: cluster(ids, texts), len(rows))
        plain, _ = rate(lambda texts=texts: plain_datasketch(texts), len(rows))
        clusters = getattr(result, "num_clusters", 0)
        keys, _ = rate(lambda texts=texts: [match_key(t) for t in texts], len(rows))
        print(
            f"  {len(rows):7,d} problems: cluster {ours:7,.0f}/s ({clusters:,} clusters)   "
            f"plain datasketch {plain:7,.0f}/s   ratio {ours / plain:4.2f}   "
            f"(match_key alone {keys:7,.0f}/s)"
        )
    print("  target: >= 2,000 problems/s per core")


# --- (b) recall against exact Jaccard -----------------------------------------------


def pairwise_jaccard(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Exact Jaccard of every pair of shingle sets (upper triangle, dense)."""
    indptr = np.cumsum([0] + [len(s) for s in sets])
    _, col = np.unique(np.concatenate(sets), return_inverse=True)
    x = sp.csr_matrix(
        (np.ones(len(col), dtype=np.int32), col, indptr), shape=(len(sets), col.max() + 1)
    )
    inter = (x @ x.T).toarray()
    size = np.array([len(s) for s in sets])
    union = size[:, None] + size[None, :] - inter
    return np.triu(np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0), 1)


def section_recall(originals: Sequence[dict[str, str]], sample: int, seed: int) -> None:
    rng = random.Random(seed)
    picked = rng.sample(list(originals), sample // 4)
    rows = planted_corpus(picked, 1, seed)
    ids, texts = [r.id for r in rows], [r.text for r in rows]
    print(f"(b) recall vs exact pairwise Jaccard, {len(rows):,} rows, all pairs, J >= 0.8")
    for label, kwargs in [
        ("char 5-grams, exact verify (default)", {}),
        ("char 5-grams, MinHash-estimate verify", {"verify": "estimate"}),
        ("word 5-grams, exact verify", {"unit": "word"}),
    ]:
        unit = str(kwargs.get("unit", "char"))
        sets = [_shingles(match_key(t), unit, 5, 1) for t in texts]  # type: ignore[arg-type]
        jac = pairwise_jaccard(sets)
        upper = np.triu(np.ones(jac.shape, dtype=bool), 1)
        found = cluster(ids, texts, **kwargs)  # type: ignore[arg-type]
        _, label_of = np.unique(np.array(found.cluster_id), return_inverse=True)
        same = (label_of[:, None] == label_of[None, :]) & upper
        positive = (jac >= THRESHOLD) & upper
        negative = upper & ~positive
        recall = (same & positive).sum() / max(1, positive.sum())
        false_pos = (same & negative).sum()
        print(
            f"  {label:<40} pairs >= 0.8: {positive.sum():6,d}   recall {recall:.4f}   "
            f"pairs < 0.8 co-clustered: {false_pos:,} "
            f"({false_pos / max(1, (same).sum()):.2%} of co-clustered, "
            f"FP rate {false_pos / max(1, negative.sum()):.1e} of {negative.sum():,})"
        )
    print("  target: recall >= 0.95")


# --- (c) planted recall -------------------------------------------------------------


def section_planted(
    named: Sequence[tuple[str, dict[str, str]]],
    every: Sequence[tuple[str, dict[str, str]]],
    seed: int,
) -> None:
    originals = [r for _, r in named]
    rows = planted_corpus(originals, 1, seed)
    found = cluster([r.id for r in rows], [r.text for r in rows])
    cluster_of = dict(zip(found.ids, found.cluster_id, strict=True))
    print("(c1) planted near duplicates (benchmark problems, 1 variant of each kind)")
    words = {r["id"]: len(r["problem"].split()) for r in originals}
    for how in ("number", "reorder", "respace"):
        planted = [r for r in rows if r.how == how]
        joined = sum(cluster_of[r.id] == cluster_of[r.origin] for r in planted)
        long = [r for r in planted if words[r.origin] >= 40]
        joined_long = sum(cluster_of[r.id] == cluster_of[r.origin] for r in long)
        exact = sum(k == "exact" for r, k in zip(rows, found.kind, strict=True) if r.how == how)
        print(
            f"  {how:<8} {joined:5,d}/{len(planted):,} with their original "
            f"= {joined / len(planted):.2%}; of problems >= 40 words "
            f"{joined_long:,}/{len(long):,} = {joined_long / max(1, len(long)):.2%}"
            f"  ({exact:,} as exact)"
        )
    by_cluster: dict[str, list[str]] = {}
    for r in rows:
        if r.how == "original":
            by_cluster.setdefault(cluster_of[r.id], []).append(r.id)
    merged = [ids for ids in by_cluster.values() if len(ids) > 1]
    print(
        f"  originals merged with another original: {sum(len(m) for m in merged)} rows in "
        f"{len(merged)} clusters, e.g. {merged[:3]} (MATH-500 holds some AIME problems)"
    )
    section_decontamination_quality(named, every, seed)


def section_decontamination_quality(
    named: Sequence[tuple[str, dict[str, str]]],
    every: Sequence[tuple[str, dict[str, str]]],
    seed: int,
) -> None:
    rng = random.Random(seed)
    index = BenchmarkIndex.load()
    twins: dict[str, set[tuple[str, str]]] = {}  # items with the same text, any benchmark
    for name, r in every:
        twins.setdefault(content_hash(r["problem"]), set()).add((name, r["id"]))
    variants: dict[str, Callable[[str], str | None]] = {
        "copy": lambda t: t,
        "respaced": respace,
        "whitespace": lambda t: "\n\n".join("  ".join(line.split()) for line in t.split(". ")),
        "sentence added": lambda t: "Solve carefully. " + t + " Explain each step.",
        "number changed": lambda t: change_number(t, rng),
        "reordered": lambda t: reorder_sentences(t, rng),
    }
    print("(c2) decontamination recall on planted benchmark items (right benchmark and item)")
    for label, make in variants.items():
        hits = total = 0
        for name, r in named:
            text = make(r["problem"])
            if text is None:
                continue
            total += 1
            m = index.match(text)
            ok = {(name, r["id"])} | twins[content_hash(r["problem"])]
            hits += m is not None and (m.benchmark, m.item_id) in ok
        print(f"  {label:<15} {hits:5,d}/{total:,} = {hits / total:.2%}")
    gsm = [r for name, r in every if name == "gsm8k"]
    half = len(gsm) // 2
    held = BenchmarkIndex(BenchmarkItem("gsm8k-a", r["id"], r["problem"]) for r in gsm[:half])
    fp1 = sum(m is not None for m in held.match_many(r["problem"] for r in gsm[half:]))
    comp = BenchmarkIndex.load(["math500", "amc23", "aime"])
    fp2 = sum(m is not None for m in comp.match_many(r["problem"] for r in gsm))
    print(
        f"  false positives: held-out GSM8K half {fp1}/{len(gsm) - half}, "
        f"GSM8K vs MATH-500+AMC+AIME {fp2}/{len(gsm)}"
    )


# --- (d) decontamination throughput -------------------------------------------------


_NUMBER = re.compile(r"\d+")


def mutated(named: Sequence[tuple[str, dict[str, str]]], n: int, seed: int) -> list[str]:
    """``n`` texts, each a benchmark problem with a number changed and a sentence added
    (so each goes through the n-gram lookup, not the exact hash)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(named)[1]["problem"]
        text = change_number(text, rng) or text
        out.append(text + rng.choice([" Show your work.", " Explain.", " Answer briefly."]))
    return out


class PlainIndex:
    """The plain way: a dict from each item's word 6-gram strings to the items."""

    def __init__(self, items: Sequence[str], n: int = 6) -> None:
        self.n = n
        self.grams: dict[str, list[int]] = {}
        self.sizes: list[int] = []
        for i, text in enumerate(items):
            grams = self._grams(text)
            self.sizes.append(len(grams))
            for g in grams:
                self.grams.setdefault(g, []).append(i)

    def _grams(self, text: str) -> set[str]:
        words = re.findall(r"\w+", text.lower())
        n = min(self.n, len(words))
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}

    def match(self, text: str) -> int | None:
        counts: dict[int, int] = {}
        for g in self._grams(text):
            for i in self.grams.get(g, ()):
                counts[i] = counts.get(i, 0) + 1
        best = max(counts, key=lambda i: counts[i] / self.sizes[i], default=None)
        return best if best is not None and counts[best] / self.sizes[best] >= 0.5 else None


def section_decontamination_speed(named: Sequence[tuple[str, dict[str, str]]], n: int) -> None:
    texts = mutated(named, n, seed=n)
    start = time.perf_counter()
    index = BenchmarkIndex.load()
    built = time.perf_counter() - start
    ours, matches = rate(lambda: index.match_many(texts), len(texts))
    flagged = sum(m is not None for m in matches)  # type: ignore[union-attr]
    plain_index = PlainIndex([r["problem"] for _, r in named])
    sub = texts[: max(1, n // 5)]
    plain, _ = rate(lambda: [plain_index.match(t) for t in sub], len(sub))
    print(f"(d) decontamination throughput, {len(texts):,} problems x {len(index):,} items")
    print(
        f"  index built in {built:.2f} s; match_many {ours:,.0f}/s "
        f"({len(texts) / ours:.1f} s in all, {flagged:,} flagged); plain dict-of-strings "
        f"{plain:,.0f}/s (on {len(sub):,}, no normalization); ratio {ours / plain:.2f}"
    )


def pipeline_rows_per_s(n: int) -> None:
    """(e) The whole curate pipeline (load → normalize → dedup → decontaminate → solve
    in the sandbox → leak check) on ``n`` GSM8K problems against the fake OpenAI server
    with instant answers (a right program at once), the kit's stages as plain calls
    (no Prefect server); rows/s and each stage's busy seconds.
    """
    import asyncio
    import tempfile

    from mathmill.flows.curate import PIPELINE, CurateParams
    from mathmill.llm.fake_server import FakeOpenAIServer
    from mathmill.pipeline.dag import run_pipeline
    from tests.curate_world import CurateWorld, gsm8k, key, write_jsonl

    rows = gsm8k(n)
    world = CurateWorld(
        {key(str(r["problem"])): ("ok", int(str(r["answer"]).replace(",", ""))) for r in rows}
    )
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(world) as fake:
        data = write_jsonl(Path(tmp) / "in.jsonl", list(rows))
        params = CurateParams(
            input=str(data),
            out=f"{tmp}/run",
            benchmarks=["math500", "amc23", "aime"],
            chunk_size=100,
            concurrency=16,
            solver={"base_url": fake.base_url, "model": "fake"},  # type: ignore[arg-type]
        )
        start = time.perf_counter()
        result = asyncio.run(run_pipeline(PIPELINE, params, prefect=False))
        wall = time.perf_counter() - start
    busy = ", ".join(f"{k} {v['busy_s']:.1f}s" for k, v in result.stages.items())
    print(f"(e) whole pipeline, {n:,} GSM8K problems, fake server with instant answers")
    print(
        f"  {result.curated:,} curated in {wall:.1f} s: {n / wall:,.1f} rows/s "
        f"({world.answered:,} LLM calls, {result.curated:,} sandbox runs); busy: {busy}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small corpus, for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    named = benchmark_rows()
    originals = [r for _, r in named]
    if args.quick:
        rng = random.Random(args.seed)
        small = rng.sample(originals, 600)
        section_throughput(small, sizes=[1])
        section_recall(originals, sample=800, seed=args.seed)
        section_planted(rng.sample(named, 600), named, args.seed)
        section_decontamination_speed(named, 10_000)
        pipeline_rows_per_s(100)
    else:
        section_throughput(originals, sizes=[1, 5])
        section_recall(originals, sample=2000, seed=args.seed)
        section_planted(named, named, args.seed)
        section_decontamination_speed(named, 100_000)
        pipeline_rows_per_s(1000)


if __name__ == "__main__":
    main()
