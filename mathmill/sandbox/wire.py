"""Length-prefixed JSON messages over pipes and sockets (sandbox internals)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["MessageReader", "encode", "recv_msg", "send_msg"]

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 30


def encode(obj: Any) -> bytes:
    """One message: a 4-byte big-endian length, then the JSON text."""
    data = json.dumps(obj, ensure_ascii=False).encode()
    return _HEADER.pack(len(data)) + data


def send_msg(fd: int, obj: Any) -> None:
    """Write one message (blocking)."""
    view = memoryview(encode(obj))
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


class MessageReader:
    """Decodes messages from chunks as they arrive (for non-blocking reads)."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the messages it completed. Raises ValueError on a
        message over the limit or one that is not JSON.
        """
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > self._limit:
                raise ValueError(f"message of {size} bytes is too large")
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(json.loads(self._buffer[_HEADER.size : end]))
            del self._buffer[:end]
        return messages
