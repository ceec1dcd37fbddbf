"""``mathmill server ...`` and ``mathmill blocks ...``: a local Prefect server set up for
mathmill, and the blocks its deployments name.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mathmill.errors import ConfigError
from mathmill.local_server import default_home

__all__ = ["blocks_app", "server_app"]

server_app = typer.Typer(help="A local Prefect server for mathmill.", no_args_is_help=True)
blocks_app = typer.Typer(help="Prefect blocks: endpoints, sandbox, storage.", no_args_is_help=True)
console = Console(soft_wrap=True)

DEFAULT_HOME = default_home().root
Home = Annotated[
    Path,
    typer.Option(
        help="Server directory: SQLite database (the default), log, pid file.", file_okay=False
    ),
]
Host = Annotated[str, typer.Option(help="Interface the server listens on.")]
Port = Annotated[
    int,
    typer.Option(
        help="Port of the server's API and UI.", min=1, max=65535, envvar="MATHMILL_SERVER_PORT"
    ),
]


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server with `mathmill server up` and export "
            "the URL it prints"
        )
    return str(url)


@server_app.command("up")
def server_up(
    home: Home = DEFAULT_HOME,
    host: Host = "127.0.0.1",
    port: Port = 4200,
    prefect_file: Annotated[
        Path, typer.Option(help="Deployments to create.", dir_okay=False)
    ] = Path("deployments/prefect.yaml"),
    deploy: Annotated[bool, typer.Option(help="Deploy the prefect file.")] = True,
    ui_api_url: Annotated[
        str | None,
        typer.Option(help="API URL browsers reach (behind a proxy, or with --host 0.0.0.0)."),
    ] = None,
    crash_after: Annotated[
        float,
        typer.Option(
            min=60,
            help="A flow run whose heartbeats stop for this long (its worker or machine "
            "died) is marked Crashed by an automation (docs/deploy.md).",
        ),
    ] = 300.0,
    database: Annotated[
        str | None,
        typer.Option(
            help="postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE, or sqlite (a file "
            "in HOME, the default). Default: $MATHMILL_SERVER_DATABASE, which keeps the "
            "password out of the process list.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start a local Prefect server (SQLite, or PostgreSQL with --database) unless one
    answers, create the cpu, vllm and gpu work pools, register the block types and deploy
    deployments/prefect.yaml.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mathmill.blocks import register_blocks
    from mathmill.local_server import (
        ServerHome,
        api_url,
        create_pools,
        ensure_crash_automation,
        healthy,
        start_server,
    )
    from mathmill.local_server import deploy as deploy_file
    from mathmill.local_server_database import resolve_database

    server_home = ServerHome(home.expanduser())
    db = resolve_database(database, server_home)  # a bad URL stops here, before anything
    if healthy(api_url(host, port)):
        running = server_home.recorded_database() or "not recorded in this home"
        console.print(
            f"a Prefect server already answers on {host}:{port} (database {running}); "
            "it keeps its database",
            markup=False,
            highlight=False,
        )
    else:
        console.print(
            f"starting the Prefect server on {host}:{port} (home {server_home.root}, "
            f"database {db.masked}) ...",
            markup=False,
            highlight=False,
        )
    url = start_server(server_home, host, port, ui_api_url=ui_api_url, database=db)
    with temporary_settings({PREFECT_API_URL: url}):  # env changes come too late for prefect
        created = asyncio.run(create_pools())
        console.print(f"work pools: cpu, vllm ({', '.join(created) or 'none'} created)")
        slugs = asyncio.run(register_blocks())
        console.print(f"block types registered: {', '.join(slugs)}")
        made = asyncio.run(ensure_crash_automation(crash_after))
        console.print(
            f"automation: runs without a heartbeat for {crash_after:g}s marked crashed ({made})"
        )
    if deploy:
        deploy_file(prefect_file, url)
        console.print(f"deployed {prefect_file}")
    console.print(
        f"\nUI: {url.removesuffix('/api')}\n"
        f"export PREFECT_API_URL={url}\n"
        "then run flows with a worker:  prefect worker start --pool cpu"
    )


@server_app.command("down")
def server_down(home: Home = DEFAULT_HOME) -> None:
    """Stop the server `mathmill server up` started from HOME."""
    from mathmill.local_server import ServerHome, stop_server

    stopped = stop_server(ServerHome(home.expanduser()))
    console.print("server stopped" if stopped else "no server was running from " + str(home))


@server_app.command("status")
def server_status(home: Home = DEFAULT_HOME, port: Port = 4200) -> None:
    """Whether the local server (the one `mathmill run` starts and reuses) answers; its
    UI, process and log. Exits 1 when none answers.
    """
    from mathmill.local_server import ServerHome, api_url, healthy

    server_home = ServerHome(home.expanduser())
    url = api_url("127.0.0.1", port)
    try:
        pid = server_home.pid_file.read_text().strip()
    except OSError:
        pid = "none recorded"
    if not healthy(url):
        console.print(f"no Prefect server answers at {url} (home {server_home.root}, pid {pid})")
        raise typer.Exit(1)
    console.print(f"Prefect server up: UI {url.removesuffix('/api')}, API {url}")
    console.print(f"home {server_home.root}, pid {pid}, log {server_home.log_file}")
    database = server_home.recorded_database() or "not recorded"
    console.print(f"database {database}", markup=False, highlight=False)


@blocks_app.command("register")
def blocks_register() -> None:
    """Register mathmill's block types (and prefect-aws's S3 ones) on the server."""
    from mathmill.blocks import register_blocks

    _api_url()
    slugs = asyncio.run(register_blocks())
    console.print(f"registered: {', '.join(slugs)}")


@blocks_app.command("llm")
def blocks_llm(
    name: Annotated[str, typer.Argument(help="Block name, e.g. openrouter.")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL ending in /v1.")],
    model: Annotated[str, typer.Option(help="Model name.")],
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the key (read now).")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, max=4096)] = 16,
    structured_mode: Annotated[str, typer.Option(help="json_schema or json_object.")] = (
        "json_schema"
    ),
) -> None:
    """Save an LLM endpoint block (the key is read from API_KEY_ENV, stored as a secret)."""
    from pydantic import SecretStr, ValidationError

    from mathmill.blocks import LLMEndpoint

    _api_url()
    key = None
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise ConfigError(f"--api-key-env: environment variable {api_key_env} is unset")
        key = SecretStr(value)
    try:
        block = LLMEndpoint(
            base_url=base_url,
            model=model,
            api_key=key,
            max_concurrency=max_concurrency,
            structured_mode=structured_mode,
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"invalid endpoint: {first['loc']}: {first['msg']}") from None
    block.save(name, overwrite=True)
    limit = block.limit_name(name)
    said = str(limit)
    if limit is not None:  # made now, not by the first runs at once
        from mathmill.llm.live import ensure_limit

        made = asyncio.run(ensure_limit(limit, max_concurrency))
        said += f" ({'created' if made else 'kept'})"
    console.print(f"saved mathmill-llm-endpoint/{name}; live concurrency limit: {said}")


@blocks_app.command("s3")
def blocks_s3(
    name: Annotated[str, typer.Argument(help="Block name, e.g. mathmill-data.")],
    bucket: Annotated[str, typer.Option(help="Bucket name.")],
    folder: Annotated[str, typer.Option(help="Folder inside the bucket.")] = "",
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, R2); none = AWS.")
    ] = None,
    region: Annotated[str | None, typer.Option(help="Region name.")] = None,
    key_env: Annotated[str, typer.Option(help="Variable holding the access key id.")] = (
        "AWS_ACCESS_KEY_ID"
    ),
    secret_env: Annotated[str, typer.Option(help="Variable holding the secret key.")] = (
        "AWS_SECRET_ACCESS_KEY"
    ),
) -> None:
    """Save an s3-bucket block (prefect-aws) with its credentials block NAME-credentials;
    keys are read from the environment and stored as secrets.
    """
    from pydantic import SecretStr

    try:
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters
    except ImportError as e:
        raise ConfigError("the s3 extra is not installed: pip install 'mathmill[s3]'") from e
    _api_url()
    secret = os.environ.get(secret_env)
    credentials = AwsCredentials(
        aws_access_key_id=os.environ.get(key_env) or None,
        aws_secret_access_key=SecretStr(secret) if secret else None,
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url),
    )
    credentials.save(f"{name}-credentials", overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials).save(
        name, overwrite=True
    )
    console.print(
        f"saved s3-bucket/{name} (s3://{bucket}/{folder}) and aws-credentials/{name}-credentials"
    )
