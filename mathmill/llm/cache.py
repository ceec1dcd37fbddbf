"""A durable cache of finished LLM calls, so a resumed run never pays for a call twice.

Each successful response is stored under the SHA-256 of what was asked (the request
body with its model, a caller's salt such as a sample index, and the endpoint's
:attr:`~mathmill.llm.config.EndpointConfig.cache_scope`: empty unless the user keys
calls on the server, so a resume after the endpoint moved still replays them) in a SQLite file
that is committed per call. A process killed at any point loses at most the calls in
flight; re-running the same work replays the finished ones from the file.

The API key is never part of the key nor of what is stored.

>>> import tempfile, os
>>> cache = CallCache(os.path.join(tempfile.mkdtemp(), "calls.sqlite"))
>>> key = cache.key("chat", "", {"model": "m", "messages": []}, salt="0")
>>> cache.get(key) is None
True
>>> cache.put(key, {"text": "4"}); cache.get(key)
{'text': '4'}
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Any

from mathmill.errors import StorageError

__all__ = ["CallCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class CallCache:
    """Finished LLM calls keyed by request hash, in one SQLite file (WAL, one writer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed call survives the process being killed.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the LLM call cache {path}: {e}") from e

    def __repr__(self) -> str:
        return f"CallCache({self.path!r})"

    @staticmethod
    def key(kind: str, scope: str, body: dict[str, Any], *, salt: str = "") -> str:
        """The cache key of a request: SHA-256 over a canonical JSON of what was asked
        (``scope``: the endpoint's cache scope, often empty).
        """
        canonical = json.dumps(
            {"kind": kind, "scope": scope, "body": body, "salt": salt},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        value: dict[str, Any] = json.loads(row[0])
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a finished response (replacing any earlier one for ``key``)."""
        data = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls (key, value, created) VALUES (?, ?, ?)",
                (key, data, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM calls").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
