"""A real PostgreSQL server for the tests and benchmarks, from Debian's ``postgresql``.

:func:`running_postgres` installs the package when it is missing (``apt-get install -y
postgresql``, as root: `make check` runs as root here), ``initdb``s a cluster in a
fresh temporary directory, starts ``postgres`` on a free port on 127.0.0.1 with its
socket in that directory, and stops and removes it at the end. PostgreSQL refuses to
run as root: as root, every server command runs as the ``postgres`` system user the
package creates (``runuser -u postgres --``); otherwise as the current user.

TCP logins need the password (scram-sha-256), as on a real server; the socket in the
directory trusts its owner, for administration (``createdb``).

The :func:`postgres` fixture skips, loudly and with the reason, only where no server
can be installed or started at all; MATHMILL_REQUIRE_POSTGRES=1 makes that a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "mathmill"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be installed or started here; the message says why."""


@dataclass
class Postgres:
    """A running test server: superuser ``user`` with ``password`` over TCP."""

    port: int
    password: str
    root: Path  # data directory, socket and log
    bindir: Path
    as_user: list[str]  # the command prefix that runs a server command as its owner
    host: str = "127.0.0.1"
    user: str = USER

    def url(self, database: str = "postgres") -> str:
        """The database's URL in Prefect's form (``postgresql+asyncpg://``)."""
        return (
            f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/{database}"
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` (over the socket); its URL."""
        done = subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "createdb"),
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                self.user,
                name,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(f"createdb {name} failed: {done.stderr.strip()}")
        return self.url(name)


def _bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps them per version)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _install() -> Path:
    """The bin directory, after installing Debian's ``postgresql`` when it is missing."""
    bindir = _bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0:
        raise PostgresUnavailable("PostgreSQL is not installed and this is not root (no apt-get)")
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable("PostgreSQL is not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "postgresql"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # a stale package list: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    bindir = _bindir()
    if done.returncode != 0 or bindir is None:
        tail = " ".join((done.stdout + done.stderr).split()[-40:])
        raise PostgresUnavailable(f"apt-get install postgresql failed: {tail}")
    return bindir


def _owner() -> tuple[list[str], int, int]:
    """The prefix running a command as the server's owner, and that owner's uid/gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("no 'postgres' system user (the package creates it)") from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("no runuser to run postgres as the postgres user")
    return ["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_postgres(settings: dict[str, str] | None = None) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on a free loopback port, removed on exit.
    ``settings`` are extra server settings (``-c name=value``).
    """
    bindir = _install()
    as_user, uid, gid = _owner()
    root = Path(tempfile.mkdtemp(prefix="mathmill-pg-"))  # under /tmp: postgres reaches it
    proc: subprocess.Popen[bytes] | None = None
    try:
        os.chown(root, uid, gid)
        password = secrets.token_urlsafe(16)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        os.chown(pwfile, uid, gid)
        pwfile.chmod(0o600)
        data = root / "data"
        init = subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        pwfile.unlink()
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-800:]}")
        port = _free_port()
        log = root / "postgres.log"
        extra = [a for k, v in (settings or {}).items() for a in ("-c", f"{k}={v}")]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *as_user,
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        os.chown(log, uid, gid)
        deadline = time.monotonic() + 60
        ready = [str(bindir / "pg_isready"), "-h", str(root), "-p", str(port), "-U", USER]
        while subprocess.run(ready, capture_output=True, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"postgres did not start (exit {proc.poll()}); log:\n{_tail(log)}"
                )
            time.sleep(0.2)
        yield Postgres(port=port, password=password, root=root, bindir=bindir, as_user=as_user)
    finally:
        if proc is not None and proc.poll() is None:
            # SIGINT: "fast" shutdown (ends the sessions, no waiting for clients)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the session (see :func:`running_postgres`)."""
    try:
        with running_postgres() as pg:
            yield pg
    except PostgresUnavailable as e:
        message = f"POSTGRESQL NOT TESTED: {e}"
        if os.environ.get("MATHMILL_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
