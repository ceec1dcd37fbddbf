"""Blocks and the settings around them, without a server: conversions, precedence of a
role's endpoint, storage paths inside blocks, the local server's environment. The
saved-and-loaded path runs in tests/test_deploy.py against a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from mathmill.blocks import LLMEndpoint, SandboxEndpoint, block_ref, block_types
from mathmill.blocks.storage import storage_from_block, storage_url
from mathmill.errors import ConfigError
from mathmill.flows.options import ModelRole, resolve_role
from mathmill.flows.synthesize import SynthesizeParams, plan
from mathmill.local_server import ServerHome, server_env


def test_llm_endpoint_block_becomes_an_endpoint_with_a_live_limit() -> None:
    block = LLMEndpoint(
        base_url="http://vllm:8000/v1",
        model="qwen",
        api_key=SecretStr("sk-secret"),
        max_concurrency=32,
        input_price_per_1m=0.5,
        extra_body={"top_k": 20},
    )
    endpoint = block.endpoint("gpu-a")
    assert endpoint.api_key.get_secret_value() == "sk-secret"
    assert endpoint.concurrency_limit == "llm-gpu-a" and endpoint.max_concurrency == 32
    assert endpoint.price is not None and endpoint.price.input_per_1m == 0.5
    assert endpoint.extra_body == {"top_k": 20}
    assert "sk-secret" not in repr(block) and "sk-secret" not in endpoint.model_dump_json()
    quiet = block.model_copy(update={"live_concurrency": False}).endpoint("gpu-a")
    assert quiet.concurrency_limit is None


def test_a_role_overrides_its_block_and_never_inherits_another_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = LLMEndpoint(base_url="http://a/v1", model="m", api_key=SecretStr("k-a")).endpoint("a")
    role = ModelRole(block="a", model="m2", max_concurrency=3, timeout_s=9)
    endpoint = resolve_role(role, "critic", None, block)
    assert (endpoint.base_url, endpoint.model, endpoint.max_concurrency) == ("http://a/v1", "m2", 3)
    assert endpoint.timeout_s == 9 and endpoint.api_key.get_secret_value() == "k-a"
    # the default's block (and its key) does not leak into a role with its own URL
    monkeypatch.setenv("B_KEY", "k-b")
    merged = ModelRole(base_url="http://b/v1", model="x").over(
        ModelRole(block="a", api_key_env="B_KEY", temperature=0.3)
    )
    assert merged.block is None and merged.api_key_env is None and merged.temperature == 0.3
    # a role on a block takes the block's model, not the default's
    on_block = ModelRole(block="a").over(ModelRole(base_url="http://b/v1", model="other"))
    assert (on_block.block, on_block.base_url, on_block.model) == ("a", None, None)
    assert (
        plan(SynthesizeParams(models={"critic": {"block": "a"}}))
        .roles["critic"]
        .startswith("block a")
    )
    with pytest.raises(ValidationError, match="block or base_url"):
        ModelRole(block="a", base_url="http://b/v1")
    with pytest.raises(ValidationError, match="concurrency_limit"):
        ModelRole(concurrency_limit="no spaces please")


def test_sandbox_block_gives_the_flow_options() -> None:
    options = SandboxEndpoint(backend="http", url="http://sandbox:8090", timeout_s=5).options()
    assert (options.backend, options.url, options.timeout_s) == ("http", "http://sandbox:8090", 5)
    docker = SandboxEndpoint(backend="docker", image="mathmill-sandbox:1").options()
    assert (docker.backend, docker.image) == ("docker", "mathmill-sandbox:1")


def test_run_directories_inside_storage_blocks(tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    aws = AwsCredentials(
        aws_access_key_id="id",
        aws_secret_access_key=SecretStr("sec"),
        region_name="eu-west-1",
        aws_client_parameters=AwsClientParameters(endpoint_url="http://minio:9000"),
    )
    cfg = storage_from_block(S3Bucket(bucket_name="b", bucket_folder="mm/", credentials=aws), "r")
    assert (cfg.url, cfg.endpoint_url, cfg.region) == (
        "s3://b/mm/r",
        "http://minio:9000",
        "eu-west-1",
    )
    assert cfg.key is not None and cfg.key.get_secret_value() == "id"
    assert cfg.secret is not None and cfg.secret.get_secret_value() == "sec"
    minio = MinIOCredentials(minio_root_user="u", minio_root_password=SecretStr("p"))
    cfg = storage_from_block(S3Bucket(bucket_name="b", credentials=minio), "runs/x")
    assert cfg.url == "s3://b/runs/x" and cfg.secret is not None
    local = storage_from_block(LocalFileSystem(basepath=str(tmp_path)), "runs/a")
    assert local.url == f"{tmp_path}/runs/a"
    remote = RemoteFileSystem(
        basepath="s3://bk/base",
        settings={"key": "k", "client_kwargs": {"endpoint_url": "http://e"}},
    )
    cfg = storage_from_block(remote, "v1")
    assert (cfg.url, cfg.endpoint_url) == ("s3://bk/base/v1", "http://e")
    with pytest.raises(ConfigError, match="relative path"):
        storage_url("s3://b", "s3://other/x")
    with pytest.raises(ConfigError, match="leaves"):
        storage_url("s3://b/base", "../escape")
    assert (
        block_ref("data") == "s3-bucket/data"
        and block_ref("local-file-system/x") == "local-file-system/x"
    )


def test_result_storage_follows_the_storage_block() -> None:
    assert SynthesizeParams().result_storage() is None
    assert SynthesizeParams(storage_block="data").result_storage() == "s3-bucket/data"
    cfg = SynthesizeParams(storage_block="data", results_block="local-file-system/res")
    assert cfg.result_storage() == "local-file-system/res"
    with pytest.raises(ValidationError, match="storage_block"):
        SynthesizeParams(storage_block="bad name")


def test_block_types_include_prefect_aws_s3() -> None:
    slugs = [t.get_block_type_slug() for t in block_types()]
    assert slugs[:2] == ["mathmill-llm-endpoint", "mathmill-sandbox"] and "s3-bucket" in slugs


def test_local_server_environment(tmp_path: Path) -> None:
    home = ServerHome(tmp_path)
    env = server_env(home, "http://127.0.0.1:4300/api", {"PREFECT_API_URL": "http://elsewhere/api"})
    assert "PREFECT_API_URL" not in env  # the server must not talk to another server
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"{tmp_path}/prefect.db")
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "500"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


async def test_a_missing_block_is_one_error_naming_the_parameter(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.blocks import load_storage
    from mathmill.flows.resources import open_runtime
    from mathmill.storage import StorageConfig

    with pytest.raises(ConfigError, match=r"^storage_block: no block 's3-bucket/nope' on the"):
        await load_storage("runs/x", "nope", None)
    roles = {"solver": ModelRole(block="nope")}
    with pytest.raises(
        ConfigError, match=r"^models.solver.block: no block 'mathmill-llm-endpoint/"
    ):
        async with open_runtime(
            StorageConfig(url=str(tmp_path)), roles, sandbox=None, row_concurrency=1
        ):
            pass
