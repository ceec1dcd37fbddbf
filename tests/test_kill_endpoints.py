"""A run's endpoints killed mid-run: the sandbox server (``kill -9`` of its process
group; one of two replicas) and the S3 endpoint (stopped for a few seconds; stopped for
good, then started again). ``mathmill run synthesize`` runs as a subprocess against the
fake OpenAI server (tests/synth_world.py); the outage starts after a fixed number of
answers or at a fixed storage write (tests/kill_support.py), so at the same point of the
run whatever the machine's speed. Every case ends with the rows of an uninterrupted run
(none lost, doubled or changed) and no finished LLM call paid twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mathmill.errors import StorageError
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import SolutionRow
from mathmill.storage import RunStore, StorageConfig
from tests.chaos_support import Counting, normalize_row, run_env
from tests.conftest import S3_KEY, S3_SECRET, s3_client
from tests.kill_support import OnAnswer, SandboxServer, TcpProxy
from tests.sandbox_support import free_port
from tests.synth_world import SynthWorld
from tests.test_synthesize import CLI

pytestmark = pytest.mark.slow

Rows = dict[str, list[str]]
KINDS = ("fix", "crash", "ok", "dup")  # 7 problems, 14 CoTs, 26 code runs + 5 blind programs
EXPORTS = ("verified.jsonl", "unverified.jsonl", "dropped.jsonl")
RUN_TIMEOUT_S = 300


def command(llm_url: str, out: str, config: Path, *extra: str) -> list[str]:
    """4 topics (kinds above) of 2 problems, 2 rewrite rounds, chunks of 2 problems
    solved one after the other (so the chunks before an outage are finished).
    """
    return [
        *CLI,
        "run",
        "synthesize",
        *("--topics", "4", "--problems-per-topic", "2", "--short-cots", "1"),
        *("--rounds", "2", "--chunk-size", "2", "--concurrency", "4"),
        *("--base-url", llm_url, "--model", "fake", "--sandbox-timeout", "5"),
        *("--config", str(config), "--out", out, *extra),
    ]


def store_rows(store: RunStore, llm_url: str) -> Rows:
    """The run's final rows (Parquet and the JSONL exports), as sorted canonical JSON
    lines without timestamps and with the fake LLM server's address hidden. Use a fresh
    store for each read of object storage: s3fs keeps the listings it saw.
    """
    parquet = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    rows: Rows = {
        "verified+unverified": sorted(
            json.dumps(normalize_row(r.model_dump(mode="json"), llm_url), sort_keys=True)
            for r in parquet
        )
    }
    for name in EXPORTS:
        text = store.read_bytes(name).decode() if store.exists(name) else ""
        rows[name] = sorted(
            json.dumps(normalize_row(json.loads(line), llm_url), sort_keys=True)
            for line in text.splitlines()
        )
    return rows


def differences(expected: Rows, got: Rows) -> dict[str, tuple[int, int]]:
    """Per output: (rows lost, rows doubled or changed) against ``expected``."""
    out = {}
    for name, rows in expected.items():
        want, have = Counter(rows), Counter(got.get(name, []))
        lost, extra = sum((want - have).values()), sum((have - want).values())
        if lost or extra:
            out[name] = (lost, extra)
    return out


def first_difference(expected: Rows, got: Rows) -> str:
    """One lost and one unexpected row of the first output that differs (for messages)."""
    for name, rows in expected.items():
        want, have = Counter(rows), Counter(got.get(name, []))
        if want != have:
            lost, extra = list((want - have).elements()), list((have - want).elements())
            return f"{name}: lost {lost[:1]}, unexpected {extra[:1]}"
    return ""


def extra_rows(expected: Rows, got: Rows) -> dict[str, list[str]]:
    """Rows of ``got`` that ``expected`` does not have (a partial run must have none)."""
    out = {}
    for name, rows in got.items():
        extra = Counter(rows) - Counter(expected.get(name, []))
        if extra:
            out[name] = list(extra.elements())
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@dataclass
class Reference:
    rows: Rows
    calls: int  # distinct LLM calls answered
    config: Path  # the --config file of every run


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def reference(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run (local sandbox, local disk)."""
    config = tmp_path_factory.mktemp("config") / "synthesize.json"
    config.write_text(json.dumps({"chunk_concurrency": 1}))
    out = tmp_path_factory.mktemp("reference") / "run"
    world = Counting(SynthWorld(kinds=KINDS))
    with FakeOpenAIServer(world) as fake:
        done = run(command(fake.base_url, str(out), config), run_env(prefect_api))
        assert done.returncode == 0, done.stderr[-3000:]
        rows = store_rows(RunStore(str(out)), fake.base_url)
    assert world.paid_twice() == {}
    assert len(rows["verified+unverified"]) == 14 and len(rows["dropped.jsonl"]) >= 1
    return Reference(rows, world.finished_calls(), config)


# -- the sandbox server ----------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    server = SandboxServer(free_port(), tmp_path / "sandbox.log")
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(900)
def test_sandbox_killed_mid_run_stops_cleanly_then_resumes(
    prefect_api: dict[str, str], reference: Reference, sandbox: SandboxServer, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    world = Counting(SynthWorld(kinds=KINDS))
    # the 16th of the 26 regenerated programs (the 15th comes after a program ran: it
    # is a rewrite's) is answered once its server is dead
    killer = OnAnswer(world, "verify.regen", after=16, action=sandbox.kill)
    env = run_env(prefect_api)
    with FakeOpenAIServer(killer) as fake:
        argv = command(fake.base_url, str(out), reference.config, "--sandbox-url", sandbox.url)
        first = run(argv, env)
        assert killer.done.is_set()
        assert sandbox.left_behind == []  # no zygote, job or sandbox directory outlived it
        ran_before = sandbox.executions()
        # stopped with one line naming the sandbox, not with rows marked wrong
        assert first.returncode != 0
        errors = error_lines(first.stderr)
        assert len(errors) == 1, first.stderr[-3000:]
        assert sandbox.url in errors[0] and "re-run" in errors[0], errors[0]
        partial = store_rows(RunStore(str(out)), fake.base_url)
        assert extra_rows(reference.rows, partial) == {}
        kept = len(partial["verified+unverified"])
        assert 0 < kept < len(reference.rows["verified+unverified"])  # chunk 0 was done
        calls_first = world.finished_calls()

        sandbox.start()  # the same port
        second = run(argv, env)
        assert second.returncode == 0, second.stderr[-3000:]
        got = store_rows(RunStore(str(out)), fake.base_url)
    assert differences(reference.rows, got) == {}, first_difference(reference.rows, got)
    assert world.paid_twice() == {}
    assert world.finished_calls() == reference.calls
    assert sandbox.executions() > ran_before > 0
    print(  # noqa: T201  (the figures, with -s)
        f"sandbox killed after regen answer 16: {ran_before} code runs before, {kept} of "
        f"{len(got['verified+unverified'])} rows kept, {calls_first} of {reference.calls} "
        f"calls made by the first run, re-run made {reference.calls - calls_first}; "
        f"error: {errors[0]}"
    )


@pytest.mark.timeout(900)
def test_one_of_two_sandbox_replicas_killed_mid_run_run_completes(
    prefect_api: dict[str, str], reference: Reference, tmp_path: Path
) -> None:
    first_box = SandboxServer(free_port(), tmp_path / "sandbox-0.log")
    second_box = SandboxServer(free_port(), tmp_path / "sandbox-1.log")
    first_box.start()
    try:
        second_box.start()
        out = tmp_path / "run"
        world = Counting(SynthWorld(kinds=KINDS))
        killer = OnAnswer(world, "verify.regen", after=16, action=first_box.kill)
        urls = f"{first_box.url},{second_box.url}"
        with FakeOpenAIServer(killer) as fake:
            done = run(
                command(fake.base_url, str(out), reference.config, "--sandbox-url", urls),
                run_env(prefect_api),
            )
            assert done.returncode == 0, done.stderr[-3000:]
            got = store_rows(RunStore(str(out)), fake.base_url)
        assert killer.done.is_set() and first_box.left_behind == []
        before, after = first_box.executions(), second_box.executions()
    finally:
        first_box.stop()
        second_box.stop()
    assert differences(reference.rows, got) == {}, first_difference(reference.rows, got)
    assert world.paid_twice() == {} and world.finished_calls() == reference.calls
    assert before > 0 and after > 0  # both served, the survivor alone after the kill
    print(f"replica 0 ran {before} programs before its kill, replica 1 ran {after}")  # noqa: T201


# -- the S3 endpoint -------------------------------------------------------------------


@dataclass
class S3Run:
    bucket: str
    url: str  # s3://bucket/run
    proxy: TcpProxy
    direct: StorageConfig  # the same run directory, straight to moto (not through the proxy)
    env: dict[str, str]
    s3: Any  # a boto3 client straight to moto
    timers: list[threading.Timer] = field(default_factory=list)  # restarts to come


@pytest.fixture
def s3_run(prefect_api: dict[str, str], s3_endpoint: str, tmp_path: Path) -> Iterator[S3Run]:
    host, _, port = s3_endpoint.removeprefix("http://").partition(":")
    proxy = TcpProxy((host, int(port))).start()
    bucket = f"mm-kill-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/run"
    direct = StorageConfig(
        url=url,
        endpoint_url=s3_endpoint,
        key=SecretStr(S3_KEY),
        secret=SecretStr(S3_SECRET),
        region="us-east-1",
    )
    env = run_env(prefect_api) | {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MATHMILL_CACHE_DIR": str(tmp_path / "cache"),  # the call cache of s3:// runs
    }
    made = S3Run(bucket, url, proxy, direct, env, s3)
    yield made
    for timer in made.timers:
        timer.cancel()
    proxy.stop()


def objects(s3: Any, bucket: str) -> dict[str, str]:
    """Every object of the bucket (key -> ETag), read straight from moto."""
    found: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return found


ATTEMPTS_PUT = re.compile(r"^PUT /[^/]+/run/attempts/")
# botocore's own retries (5 tries, random backoff) ride out 3 s always, 8 s one time in
# two; mathmill's (StorageConfig.retry_s, 60 s by default) 8 s always
OUTAGE_S = 8.0


def attempts_written(proxy: TcpProxy) -> int:
    """Writes of verify chunks' ``attempts`` that went through the proxy."""
    return sum(ATTEMPTS_PUT.match(r) is not None for r in proxy.requests)


@pytest.mark.timeout(900)
def test_s3_endpoint_down_for_seconds_mid_write_run_rides_it_out(
    reference: Reference, s3_run: S3Run
) -> None:
    proxy = s3_run.proxy
    cuts: list[str] = []

    def cut(request_line: str) -> bool:
        """The second verify chunk's write: stop the endpoint, back in OUTAGE_S."""
        if ATTEMPTS_PUT.match(request_line) and not cuts and attempts_written(proxy) == 1:
            cuts.append(request_line)
            s3_run.timers.append(threading.Timer(OUTAGE_S, proxy.start))
            s3_run.timers[-1].start()
            return True
        return False

    proxy.cut = cut
    world = Counting(SynthWorld(kinds=KINDS))
    with FakeOpenAIServer(world) as fake:
        argv = command(
            fake.base_url, s3_run.url, reference.config, "--storage-endpoint-url", proxy.url
        )
        done = run(argv, s3_run.env)
        assert done.returncode == 0, done.stderr[-3000:]
        got = store_rows(RunStore(s3_run.direct), fake.base_url)
    assert len(cuts) == 1 and proxy.stops == 1  # the outage hit a chunk write
    assert differences(reference.rows, got) == {}, first_difference(reference.rows, got)
    assert world.paid_twice() == {} and world.finished_calls() == reference.calls
    print(f"cut at {cuts[0]!r}; {proxy.dropped} connections dropped")  # noqa: T201


@pytest.mark.timeout(900)
def test_s3_endpoint_down_for_good_run_stops_cleanly_then_resumes(
    reference: Reference, s3_run: S3Run
) -> None:
    proxy = s3_run.proxy
    at_cut: dict[str, str] = {}

    def cut(request_line: str) -> bool:
        """The second verify chunk's write: stop the endpoint until the run has exited."""
        if ATTEMPTS_PUT.match(request_line) and not at_cut and attempts_written(proxy) == 1:
            at_cut.update(objects(s3_run.s3, s3_run.bucket))
            return True
        return False

    proxy.cut = cut
    env = s3_run.env | {"MATHMILL_STORAGE_RETRY_S": "3"}
    world = Counting(SynthWorld(kinds=KINDS))
    with FakeOpenAIServer(world) as fake:
        argv = command(
            fake.base_url, s3_run.url, reference.config, "--storage-endpoint-url", proxy.url
        )
        started = time.monotonic()
        first = run(argv, env)
        first_s = time.monotonic() - started
        assert at_cut and not proxy.up
        assert first.returncode != 0
        errors = error_lines(first.stderr)
        assert len(errors) == 1, first.stderr[-3000:]
        assert proxy.url in errors[0] and "unreachable" in errors[0], errors[0]
        assert "re-run" in errors[0], errors[0]  # the run's own error, not the report's
        # every object written before the outage is still there, unchanged
        after = objects(s3_run.s3, s3_run.bucket)
        assert {k: after.get(k) for k in at_cut} == at_cut
        partial = store_rows(RunStore(s3_run.direct), fake.base_url)
        assert extra_rows(reference.rows, partial) == {}
        kept = len(partial["verified+unverified"])
        calls_first = world.finished_calls()

        proxy.cut = None
        proxy.start()
        second = run(argv, env)
        assert second.returncode == 0, second.stderr[-3000:]
        got = store_rows(RunStore(s3_run.direct), fake.base_url)
    assert differences(reference.rows, got) == {}, first_difference(reference.rows, got)
    assert world.paid_twice() == {} and world.finished_calls() == reference.calls
    print(  # noqa: T201  (the figures, with -s)
        f"{len(at_cut)} objects before the outage, {kept} rows kept; {calls_first} of "
        f"{reference.calls} calls by the first run, which stopped in {first_s:.0f}s with "
        f"{len(first.stderr.splitlines())} lines on stderr; error: {errors[0]}"
    )


def test_storage_waits_out_an_unreachable_endpoint_then_names_it() -> None:
    """The retry of :meth:`RunStore._call`, without a server: an unreachable endpoint is
    tried again for ``retry_s``, then is one error naming it; the next call fails at
    once; an answer from the endpoint (a missing object) is never retried.
    """
    config = StorageConfig(
        url="s3://bkt/run",
        endpoint_url="http://127.0.0.1:9",
        key=SecretStr(S3_KEY),
        secret=SecretStr(S3_SECRET),
        retry_s=1.5,
    )
    calls: list[str] = []

    def flaky(path: str) -> bytes:
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionRefusedError("refused")
        return b"x"

    def down(path: str) -> bytes:
        calls.append(path)
        raise ConnectionRefusedError("refused")

    def missing(path: str) -> bytes:
        calls.append(path)
        raise FileNotFoundError(path)

    store = RunStore(config)
    assert store._call("reading", "bkt/run/a", flaky) == b"x" and len(calls) == 3
    calls.clear()
    unreachable = r"storage endpoint http://127\.0\.0\.1:9 unreachable while reading s3://bkt/run/a"
    with pytest.raises(StorageError, match=unreachable):
        store._call("reading", "bkt/run/a", down)
    assert 2 <= len(calls) <= 5  # 0.25 + 0.5 s of backoff fit in 1.5 s, 1 s more does not
    calls.clear()
    with pytest.raises(StorageError, match="down a moment ago"):
        store._call("reading", "bkt/run/b", flaky)
    assert calls == []
    with pytest.raises(FileNotFoundError):
        RunStore(config)._call("reading", "bkt/run/c", missing)
    assert calls == ["bkt/run/c"]
    # an endpoint never reached (a typo) fails after FIRST_CONTACT_S, not retry_s
    calls.clear()
    typo = config.model_copy(update={"endpoint_url": "http://127.0.0.1:7", "retry_s": 600.0})
    with pytest.raises(StorageError, match="never reached by this run"):
        RunStore(typo)._call("reading", "bkt/run/d", down)
    assert 2 <= len(calls) <= 6  # 0.25 + 0.5 + 1 + 2 s of backoff fit in 5 s


def test_helpers_see_a_difference() -> None:
    """The comparison helpers catch a lost, a doubled and a changed row."""
    expected: Rows = {"x": ["a", "b"]}
    assert differences(expected, {"x": ["a"]}) == {"x": (1, 0)}
    assert differences(expected, {"x": ["a", "b", "b"]}) == {"x": (0, 1)}
    assert differences(expected, {"x": ["a", "c"]}) == {"x": (1, 1)}
    assert extra_rows(expected, {"x": ["c"]}) == {"x": ["c"]}
