"""The heuristic domain classifier: accuracy on MATH-500's subject labels, and speed
against labelling by an LLM.

Prints, in one run:

* accuracy per domain and overall on tests/data/math500_labels.jsonl (MATH subjects
  mapped by ``MATH_SUBJECTS``; precalculus counts as algebra), the confusion matrix,
  accuracy per deciding rule and above confidence thresholds;
* the label distribution on the AIME and AMC rows of ../shared/data/problems (no
  subject labels there: a held-out look, not a score), when that folder is there;
* rows/s of the heuristic (one core, best of 3 rounds);
* the LLM labelling path on the same rows: ``LLMClient.structured`` asking for
  ``{"domain": ...}`` per problem, (a) against the fake server answering at once (a
  lower bound on any LLM's cost: HTTP, JSON, parsing), one request at a time and 64 in
  flight, and (b) against the embedded local model (SmolLM2-135M on llama.cpp) on a
  small sample, or ``--base-url`` / ``--model``: per-row latency, rows/s, the ratio
  heuristic/LLM (target: >= 100x), the LLM labels' accuracy and their agreement with
  the heuristic's.

    .venv/bin/python bench/classify.py [--quick] [--llm-rows 20] [--no-embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel

from mathmill.labels.domain import DEFAULT_DOMAINS, DomainLabel, classify, math_subject_domain
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.records import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "tests" / "data" / "math500_labels.jsonl"
HELD_OUT = ROOT.parent / "shared" / "data" / "problems"
SHORT = {"algebra": "alg", "number theory": "nt", "combinatorics": "comb", "geometry": "geo"}


class DomainChoice(BaseModel):
    """The LLM's answer."""

    domain: Literal["algebra", "number theory", "combinatorics", "geometry"]


SYSTEM = (
    "You label math problems with their domain: algebra, number theory, combinatorics "
    '(counting and probability) or geometry. Reply with JSON: {"domain": "..."}.'
)


def messages(problem: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Problem:\n{problem}\n\nWhich domain?"},
    ]


def load() -> list[dict[str, object]]:
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


def accuracy(rows: list[dict[str, object]]) -> list[DomainLabel]:
    labels = [classify(str(r["problem"])) for r in rows]
    gold = [math_subject_domain(str(r["subject"])) or "?" for r in rows]
    pairs = list(zip(gold, labels, strict=True))
    right = sum(g == x.domain for g, x in pairs)
    print(f"accuracy on {len(rows)} MATH-500 rows: {right}/{len(rows)} = {right / len(rows):.1%}")
    print(f"{'domain':<15} {'right':>6} {'rows':>5} {'recall':>7} {'precision':>9}")
    for d in DEFAULT_DOMAINS:
        n = sum(g == d for g in gold)
        ok = sum(g == d == x.domain for g, x in pairs)
        predicted = sum(x.domain == d for x in labels)
        precision = ok / predicted if predicted else 0.0
        print(f"{d:<15} {ok:>6} {n:>5} {ok / n:>7.1%} {precision:>9.1%}")
    print("confusion (rows: MATH subject's domain, columns: predicted):")
    print(f"{'':<15}" + "".join(f"{SHORT.get(d, d):>6}" for d in DEFAULT_DOMAINS))
    counts = Counter((g, x.domain) for g, x in pairs)
    for g in DEFAULT_DOMAINS:
        print(f"{g:<15}" + "".join(f"{counts[(g, p)]:>6}" for p in DEFAULT_DOMAINS))
    by_subject: dict[str, list[bool]] = {}
    for r, (g, x) in zip(rows, pairs, strict=True):
        by_subject.setdefault(str(r["subject"]), []).append(g == x.domain)
    print(
        "per MATH subject: "
        + ", ".join(f"{s} {sum(v)}/{len(v)}" for s, v in sorted(by_subject.items()))
    )
    by_rule: dict[str, list[bool]] = {}
    for g, x in pairs:
        by_rule.setdefault(x.rule, []).append(g == x.domain)
    print(
        "per deciding rule: "
        + ", ".join(
            f"{rule} {sum(v)}/{len(v)}"
            for rule, v in sorted(by_rule.items(), key=lambda i: -len(i[1]))
        )
    )
    for floor in (0.3, 0.5, 0.7):
        kept = [(g, x) for g, x in pairs if x.confidence >= floor]
        ok = sum(g == x.domain for g, x in kept)
        print(
            f"confidence >= {floor}: {len(kept)} rows ({len(kept) / len(rows):.0%}), "
            f"accuracy {ok / max(len(kept), 1):.1%}"
        )
    return labels


def held_out() -> None:
    files = sorted(HELD_OUT.glob("*.jsonl")) if HELD_OUT.is_dir() else []
    files = [f for f in files if f.stem.startswith(("aime", "amc"))]
    if not files:
        print(f"held-out distribution: skipped ({HELD_OUT} not found)")
        return
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        counts = Counter(classify(r["problem"]).domain for r in rows)
        share = ", ".join(f"{d} {counts[d] / len(rows):.0%}" for d in DEFAULT_DOMAINS)
        print(f"held-out {path.name} ({len(rows)} rows, no labels): {share}")


def heuristic_rate(problems: list[str], seconds: float) -> float:
    """Rows/s of :func:`classify` on ``problems``, best of 3 rounds of ~``seconds``."""
    for p in problems[:50]:
        classify(p)  # compiles the rules
    rounds = []
    for _ in range(3):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for p in problems:
                classify(p)
            n += len(problems)
        rounds.append(n / (time.perf_counter() - start))
    return max(rounds)


async def llm_labels(
    endpoint: EndpointConfig, problems: list[str], concurrency: int
) -> tuple[list[str | None], list[float], float]:
    """The LLM's label per problem (None: no valid answer), each call's latency, and
    the wall time.
    """
    sampling = SamplingParams(temperature=0.0, max_tokens=24)
    async with LLMPool() as pool:
        client = pool.client(endpoint)
        gate = asyncio.Semaphore(concurrency)

        async def one(problem: str) -> tuple[str | None, float]:
            async with gate:
                start = time.perf_counter()
                result = await client.structured(
                    messages(problem),
                    DomainChoice,
                    stage="domain",
                    sampling=sampling,
                    raise_on_error=False,
                )
                spent = time.perf_counter() - start
            return (result.value.domain if result.value else None), spent

        start = time.perf_counter()
        done = await asyncio.gather(*(one(p) for p in problems))
        wall = time.perf_counter() - start
    return [d for d, _ in done], [s for _, s in done], wall


def instant(request: RecordedRequest) -> Reply:
    return Reply(content='{"domain": "algebra"}', completion_tokens=6)


def report_llm(
    name: str,
    rows: list[dict[str, object]],
    heuristic: list[DomainLabel],
    got: list[str | None],
    latencies: list[float],
    wall: float,
    rate: float,
    *,
    scored: bool,
) -> None:
    n = len(rows)
    llm_rate = n / wall
    p50 = statistics.median(latencies)
    line = (
        f"{name}: {n} rows in {wall:.2f} s = {llm_rate:,.1f} rows/s, "
        f"latency p50 {p50 * 1e3:,.1f} ms; heuristic/LLM = {rate / llm_rate:,.0f}x"
    )
    print(line)
    if scored:
        gold = [math_subject_domain(str(r["subject"])) for r in rows]
        valid = sum(d is not None for d in got)
        right = sum(g == d for g, d in zip(gold, got, strict=True))
        agree = sum(h.domain == d for h, d in zip(heuristic, got, strict=True))
        hright = sum(g == h.domain for g, h in zip(gold, heuristic, strict=True))
        print(
            f"  LLM labels: {valid}/{n} valid, accuracy {right}/{n} = {right / n:.0%} "
            f"(heuristic on the same rows: {hright}/{n} = {hright / n:.0%}); "
            f"agreement with the heuristic {agree}/{n} = {agree / n:.0%}; "
            f"LLM labels {dict(Counter(d or 'invalid' for d in got))}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rows and shorter rounds")
    parser.add_argument("--llm-rows", type=int, default=None, help="rows for the real LLM")
    parser.add_argument("--no-embedded", action="store_true", help="skip the real LLM")
    parser.add_argument("--base-url", default=None, help="an endpoint instead of embedded")
    parser.add_argument("--model", default=None, help="its model name")
    args = parser.parse_args()
    rows = load()
    labels = accuracy(rows)
    held_out()
    problems = [str(r["problem"]) for r in rows]
    rate = heuristic_rate(problems, 0.3 if args.quick else 1.0)
    print(f"heuristic: {rate:,.0f} rows/s on one core ({1e6 / rate:.1f} us/row, MATH-500)")

    fake_n = 100 if args.quick else 500
    with FakeOpenAIServer(instant, record=False) as fake:
        for concurrency in (1, 64):
            endpoint = EndpointConfig(
                base_url=fake.base_url, model="fake", max_concurrency=concurrency
            )
            got, lat, wall = asyncio.run(llm_labels(endpoint, problems[:fake_n], concurrency))
            assert all(d == "algebra" for d in got), got[:5]
            report_llm(
                f"LLM path, fake server (instant answers; a lower bound), {concurrency} in flight",
                rows[:fake_n],
                labels[:fake_n],
                got,
                lat,
                wall,
                rate,
                scored=False,
            )

    if args.no_embedded:
        return
    n = args.llm_rows or (5 if args.quick else 20)
    # a spread sample: every k-th row, so each subject shows up
    step = max(1, len(rows) // n)
    sample = list(range(0, len(rows), step))[:n]
    sample_rows = [rows[i] for i in sample]
    sample_labels = [labels[i] for i in sample]
    sample_problems = [problems[i] for i in sample]
    if args.base_url:
        endpoint = EndpointConfig(base_url=args.base_url, model=args.model or "default")
        got, lat, wall = asyncio.run(llm_labels(endpoint, sample_problems, 1))
        report_llm(
            f"LLM path, {endpoint.label}",
            sample_rows,
            sample_labels,
            got,
            lat,
            wall,
            rate,
            scored=True,
        )
        return
    from mathmill.errors import EmbeddedModelError
    from mathmill.llm.embedded import EMBEDDED_MODEL, EmbeddedModel

    try:
        start = time.perf_counter()
        with EmbeddedModel() as endpoint:
            up = time.perf_counter() - start
            got, lat, wall = asyncio.run(llm_labels(endpoint, sample_problems, 1))
    except EmbeddedModelError as e:
        print(f"embedded model not available ({e}): only the fake server's lower bound above")
        return
    print(f"embedded model ({EMBEDDED_MODEL}, llama.cpp, 1 thread) up in {up:.1f} s")
    report_llm(
        "LLM path, embedded model, 1 in flight",
        sample_rows,
        sample_labels,
        got,
        lat,
        wall,
        rate,
        scored=True,
    )


if __name__ == "__main__":
    main()
