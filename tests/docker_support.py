"""The Docker engine and the sandbox image for the tests of the Docker backend.

`make check` starts an engine where it can (scripts/build_sandbox_image.sh with
MATHMILL_DOCKER_SETUP=1) and then sets MATHMILL_REQUIRE_DOCKER=1, which turns a
missing engine from a loud skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install 'mathmill[docker]')"
    try:
        docker.from_env().ping()
    except Exception as e:  # docker.errors.DockerException and connection errors
        return f"no Docker engine answers: {e}"
    return None


def build_image() -> str:
    """Build (or find up to date) the sandbox image of this checkout; returns its tag.

    Skips loudly when no engine answers, fails when MATHMILL_REQUIRE_DOCKER=1.
    """
    problem = engine_problem()
    if problem:
        message = (
            f"DOCKER BACKEND NOT TESTED: {problem}. `make check` starts dockerd where it "
            "can (root, apt); see docs/sandbox.md"
        )
        if os.environ.get("MATHMILL_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_sandbox_image.sh"), sys.executable],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/build_sandbox_image.sh failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The sandbox image's tag, built from this checkout (cached by its inputs' hash)."""
    return build_image()
