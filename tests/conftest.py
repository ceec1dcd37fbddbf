"""Shared fixtures: a fake OpenAI-compatible server, a loopback S3 server (moto) and a
real Prefect server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.storage import RunStore, StorageConfig
from tests.docker_support import docker_image  # noqa: F401  (a session fixture)

S3_KEY = "mathmill-test-key"
S3_SECRET = "mathmill-test-secret"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    """A fresh fake OpenAI-compatible server on loopback."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto in server mode) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client on the loopback server, with the tests' keys."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


@pytest.fixture
def s3_store(s3_endpoint: str) -> RunStore:
    """A run directory in a fresh bucket on the loopback S3 server."""
    bucket = f"mm-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    return RunStore(
        StorageConfig(
            url=f"s3://{bucket}/runs/r1",
            endpoint_url=s3_endpoint,
            key=SecretStr(S3_KEY),
            secret=SecretStr(S3_SECRET),
            region="us-east-1",
        )
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> RunStore:
    """A run store on local disk and on the loopback S3 server."""
    if request.param == "local":
        return RunStore(str(tmp_path))
    return request.getfixturevalue("s3_store")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server for the session (the test harness: a temporary SQLite
    database), with task results in a temporary directory. Yields the environment a
    subprocess needs to use the same server.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: Path(results)}),
    ):
        yield {
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": os.environ.get("PATH", ""),
        }


@pytest.fixture(scope="session")
def vllm_config() -> Iterator[object]:
    """The bundled SmolLM2 as a vLLM engine config sized for CI (eager mode starts in
    ~30 s instead of ~100 s; 1 GiB of KV cache). The engine it loads is shared by every
    test of the session, as a worker process shares it across chunks.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.fail("vLLM is not installed: `make check` installs it (scripts/install_vllm.sh)")
    from mathmill.llm.vllm_engine import EngineConfig, release_engine
    from mathmill.llm.vllm_model import local_vllm_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield EngineConfig(
        model=str(local_vllm_model()),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        cpu_kv_cache_gb=1,
        seed=0,
    )
    release_engine()
