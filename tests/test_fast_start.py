"""Fast start: commands import only what they use; runs without PREFECT_API_URL share
one local Prefect server (started once, in the background) or use Prefect's temporary
one; a resume after the endpoint moved replays every finished call.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mathmill.llm.cache import CallCache
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"
# Never needed to start, grade or run on an endpoint: optional backends and storage.
OPTIONAL = {"vllm", "torch", "transformers", "datasets", "prefect_aws", "moto", "s3fs", "boto3"}
OPTIONAL |= {"docker", "llama_cpp", "matplotlib"}


def _env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without mathmill's and OpenAI's settings and without a
    Prefect API; with ``home``, a Prefect home of its own (no profile naming a server).
    """
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MATHMILL_", "OPENAI_"))}
    keep.pop("PREFECT_API_URL", None)
    if home is not None:
        keep["PREFECT_HOME"] = str(home)
    return keep | extra


def imported(*args: str, env: dict[str, str] | None = None, depth: int = 1) -> tuple[set[str], str]:
    """The packages ``mathmill ARGS`` imports (``-X importtime``; their first ``depth``
    dotted parts, top-level by default), its stdout.
    """
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mathmill", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=300,
    )
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", done.stderr, re.MULTILINE)
    assert names, done.stderr[-2000:]
    return {".".join(n.split(".")[:depth]) for n in names}, done.stdout


def test_help_and_grade_import_no_flow_machinery() -> None:
    heavy = OPTIONAL | {"prefect", "openai", "pyarrow", "fsspec", "polars", "mathmill.flows"}
    help_mods, out = imported("--help")
    assert "run" in out and "grade" in out
    assert not help_mods & (heavy | {"pydantic", "sympy", "math_verify", "numpy"})
    grade_mods, out = imported("grade", r"\frac{1}{2}", "0.5")
    assert out.startswith("equivalent")
    assert not grade_mods & heavy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(request: RecordedRequest) -> Reply:
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])


def sample_args(base_url: str, out: Path, *extra: str) -> list[str]:
    return [
        *("run", "sample", "--input", str(PROBLEMS), "--samples", "2"),
        *("--base-url", base_url, "--model", "m", "--out", str(out), *extra),
    ]


def test_a_run_imports_no_optional_backend(prefect_api: dict[str, str], tmp_path: Path) -> None:
    with FakeOpenAIServer(_answer) as fake:
        args = sample_args(fake.base_url, tmp_path / "run")
        mods, out = imported(*args, env=_env(**prefect_api), depth=2)
    assert "5 problems, 10 samples" in out
    top = {m.split(".")[0] for m in mods}
    # matplotlib: a run's end draws its dataset report's charts (report.html)
    assert not top & (OPTIONAL - {"matplotlib"}), top & OPTIONAL
    assert "fastapi" not in top  # the flow run's parameters are stored without it
    # pyarrow's probe for pandas objects is spared (0.4 s): pandas is tried, not loaded
    assert "pandas.core" not in mods


def test_flow_parameters_are_stored_as_prefect_stores_them() -> None:
    from fastapi.encoders import jsonable_encoder

    from mathmill.flows.sample import SampleParams, sample

    params = SampleParams(input="p.jsonl", model={"base_url": "http://h/v1", "model": "m"})
    assert sample.serialize_parameters({"params": params}) == {"params": jsonable_encoder(params)}
    # anything else is Prefect's to serialize
    assert sample.serialize_parameters({"params": object()}) == {"params": "<object>"}
    # the parameters' schema, made on first use, is Prefect's
    from prefect.utilities.callables import parameter_schema

    assert sample.parameters == parameter_schema(sample.fn)


def test_pandas_still_works_after_the_probe_is_spared() -> None:
    code = (
        "import sys\n"
        "from mathmill.flows.cli import skip_pyarrow_pandas_probe\n"
        "skip_pyarrow_pandas_probe()\n"
        "import pyarrow as pa\n"
        "t = pa.Table.from_pylist([{'a': 1}, {'a': 2}])\n"
        "assert 'pandas' not in sys.modules\n"
        "import pandas as pd\n"
        "from mathmill.sources import pyarrow_knows_pandas\n"
        "pyarrow_knows_pandas()  # what reading an HF dataset does first\n"
        "nullable = pa.array(pd.Series([1, None], dtype='Int64')).type\n"
        "back = pa.Table.from_pandas(pd.DataFrame({'x': [3]}))\n"
        "print(t.to_pandas()['a'].tolist(), back.num_rows, nullable)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 2] 1 int64"


def _flow_runs(api: str) -> list[dict[str, object]]:
    reply = httpx.post(f"{api}/flow_runs/filter", json={"limit": 50}, timeout=30)
    reply.raise_for_status()
    runs: list[dict[str, object]] = reply.json()
    return runs


def _mathmill(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mathmill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_runs_share_one_local_server_started_once(tmp_path: Path) -> None:
    home, port = tmp_path / "server", free_port()
    env = _env(tmp_path / "prefect", MATHMILL_SERVER_HOME=str(home), MATHMILL_SERVER_PORT=str(port))
    api = f"http://127.0.0.1:{port}/api"
    try:
        with FakeOpenAIServer(_answer) as fake:
            # Two runs start at once on a machine with no server: one server starts.
            with ThreadPoolExecutor(2) as pool:
                first = list(
                    pool.map(
                        lambda i: _mathmill(sample_args(fake.base_url, tmp_path / f"r{i}"), env),
                        range(2),
                    )
                )
            for done in first:
                assert done.returncode == 0, done.stderr[-3000:]
            started = [d for d in first if "started a local Prefect server" in d.stdout]
            assert len(started) == 1, [d.stdout[-500:] for d in first]
            pid = int((home / "server.pid").read_text())
            later = _mathmill(sample_args(fake.base_url, tmp_path / "r0"), env)
        # A failed run says where its logs are, then the one-line error.
        config = tmp_path / "no-retries.json"
        config.write_text(json.dumps({"model": {"max_retries": 0}}))
        failed = _mathmill(
            sample_args(
                f"http://127.0.0.1:{free_port()}/v1", tmp_path / "dead", "--config", str(config)
            ),
            env,
        )
        assert failed.returncode == 1, failed.stderr[-3000:]
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("error: sample: 1 of 2 chunks did not finish"), last
        failed_link = re.search(r"Prefect UI: \S+/runs/flow-run/(\S+)", failed.stdout)
        assert failed_link is not None, failed.stdout
        assert later.returncode == 0, later.stderr[-3000:]
        assert "started a local Prefect server" not in later.stdout
        assert int((home / "server.pid").read_text()) == pid
        os.kill(pid, 0)  # still running: it outlives the runs
        status = _mathmill(["server", "status"], env)
        assert status.returncode == 0 and f"pid {pid}" in status.stdout, status.stdout
        links = [
            re.search(r"Prefect UI: (\S+)", d.stdout) for d in [*first, later]
        ]  # every run says where it is in the UI
        assert all(m is not None for m in links)
        ids = {m.group(1).rsplit("/", 1)[-1] for m in links if m is not None}
        assert all(
            m.group(1).startswith(f"http://127.0.0.1:{port}/runs/flow-run/") for m in links if m
        )
        runs = {str(r["id"]): r for r in _flow_runs(api)}
        assert ids <= set(runs) and len(ids) == 3  # the history stays on the server
        assert {runs[i]["state_type"] for i in ids} == {"COMPLETED"}
        assert runs[failed_link.group(1)]["state_type"] == "FAILED"
    finally:
        down = _mathmill(["server", "down", "--home", str(home)], env)
    assert "server stopped" in down.stdout, down.stdout + down.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{api}/health", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the local server still answers after `mathmill server down`")
    assert _mathmill(["server", "status"], env).returncode == 1


@pytest.mark.slow
def test_ephemeral_mode_uses_no_local_server(tmp_path: Path) -> None:
    home = tmp_path / "server"
    port = str(free_port())
    env = _env(tmp_path / "prefect", MATHMILL_SERVER_HOME=str(home), MATHMILL_SERVER_PORT=port)
    with FakeOpenAIServer(_answer) as fake:
        done = _mathmill(
            sample_args(fake.base_url, tmp_path / "run", "--prefect-server", "ephemeral"), env
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 problems, 10 samples" in done.stdout
    assert "Prefect UI" not in done.stdout and not home.exists()


def test_a_bad_server_mode_is_one_line(tmp_path: Path) -> None:
    done = _mathmill(
        sample_args("http://127.0.0.1:9/v1", tmp_path / "run"),
        _env(tmp_path / "prefect", MATHMILL_PREFECT_SERVER="cloud"),
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: MATHMILL_PREFECT_SERVER: expected 'local' or 'ephemeral', not 'cloud'"
    ]


# -- a cache that survives a moved endpoint -----------------------------------------------


def test_call_keys_hold_the_model_and_request_not_the_address() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}]}
    here = EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="m")
    there = here.model_copy(update={"base_url": "http://10.0.0.7:9000/v1"})
    key = CallCache.key("chat", here.cache_scope, body)
    assert key == CallCache.key("chat", there.cache_scope, body)
    assert here.identity == there.identity
    assert key != CallCache.key("chat", here.cache_scope, body | {"model": "other"})
    pinned = [e.model_copy(update={"cache_by_url": True}) for e in (here, there)]
    assert pinned[0].cache_scope != pinned[1].cache_scope
    assert pinned[0].identity != pinned[1].identity
    embedded = here.model_copy(update={"cache_id": "embedded:x.gguf", "cache_by_url": True})
    assert embedded.cache_scope == "embedded:x.gguf"


def _rows(out: Path) -> list[dict[str, object]]:
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return sorted(
        ({k: v for k, v in r.items() if k != "created_at"} for r in rows),
        key=lambda r: str(r["id"]),
    )


def test_a_resume_after_the_endpoint_moved_pays_no_call(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.sample import SampleParams, sample
    from mathmill.tasks.generation import GenBackend

    def params(base_url: str, out: Path, **model: object) -> SampleParams:
        return SampleParams(
            input=str(PROBLEMS),
            out=str(out),
            samples=2,
            model={"base_url": base_url, "model": "m", **model},  # type: ignore[arg-type]
            backend=GenBackend(chunk_size=2),
        )

    out = tmp_path / "run"
    with FakeOpenAIServer(_answer) as first:
        asyncio.run(sample(params(first.base_url, out)))
        assert len(first.requests) == 5
    before = _rows(out)
    # The same model comes back on another port (a restart, another replica).
    with FakeOpenAIServer(_answer) as moved:
        assert moved.base_url != first.base_url
        asyncio.run(sample(params(moved.base_url, out)))
        assert moved.requests == []
        assert _rows(out) == before
        # Finished chunks are gone (another run pruned them): the call cache replays.
        for chunk in (out / "samples").iterdir():
            chunk.unlink()
        asyncio.run(sample(params(moved.base_url, out)))
        assert moved.requests == []
        assert _rows(out) == before
        # Keyed on the address on request: the moved server is asked again.
        asyncio.run(sample(params(moved.base_url, out, cache_by_url=True)))
        assert len(moved.requests) == 5
