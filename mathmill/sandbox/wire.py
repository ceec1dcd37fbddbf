"""Length-prefixed JSON messages over pipes and sockets (sandbox internals)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["recv_msg", "send_msg"]

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 30


def send_msg(fd: int, obj: Any) -> None:
    """Write one message (blocking)."""
    data = json.dumps(obj, ensure_ascii=False).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_msg(fd: int) -> Any:
    """Read one message (blocking); None at end of stream."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    data = _read_exact(fd, size)
    return None if data is None else json.loads(data)
