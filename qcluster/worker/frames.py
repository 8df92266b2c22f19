"""The protocol between a worker and its slot processes (:mod:`qcluster.worker.slots`,
:mod:`qcluster.worker.child`): msgpack maps of plain data, each framed by its length.

Promises:

* A frame is a 4-byte big-endian length, then that many bytes of one msgpack map; nothing
  else travels, no pickle in either direction: the child never sends the parent anything
  a job made but its error text (bounded), so a job cannot make the worker load an object.
* A frame longer than :data:`MAX_FRAME` is refused (:class:`FrameError`) before it is read.
* :class:`FrameReader` takes bytes as they come (a nonblocking read loop) and yields
  whole frames; :func:`read_frame` reads one frame from a blocking socket (the child's
  side), None at a clean end of file.

The messages (keys of the map):

* parent → child, once: ``{"op": "hello", "path": [...], "job_paths": [...],
  "log_level": int}``; the child answers ``{"ready": pid}``;
* parent → child, one per run: ``{"op": "run", "run_id", "job_id", "func", "args",
  "kwargs", "scheduled_at", "attempt", "epoch", "worker_id", "shard", "shards"}``
  (``args``/``kwargs`` the row's JSON texts; ``shard``/``shards`` None but for a sharded
  job's run); the child answers ``{"ok": true}`` (with ``"result": "..."``, the
  return value's short repr, at most :data:`MAX_RESULT` characters, unless it returned
  None) or ``{"ok": false, "error": "Type: message"}`` when the run is over. A run's
  stdout and stderr do not travel here: they are the child's fds 1 and 2, pipes the
  worker reads (:mod:`qcluster.worker.output`).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

#: The largest frame either side accepts (a run's arguments are at most 64 KiB each).
MAX_FRAME = 1 << 20
#: The longest error text a child sends back (what ``qc_runs.error`` keeps of a job's).
MAX_ERROR = 4000
#: The longest repr of a return value a child sends back (``qc_run_output.result``).
MAX_RESULT = 1000
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """A frame that breaks the protocol: too long, or not a msgpack map."""


def encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"a frame of {len(body)} bytes is more than {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several kinds for broken input
        raise FrameError(f"unreadable frame: {type(e).__name__}") from None
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a map")
    return message


class FrameReader:
    """Whole frames out of a byte stream fed in pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The frames that ``data`` completes, in order. FrameError on a broken one."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise FrameError(f"a frame of {size} bytes is more than {MAX_FRAME}")
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
            del self._buffer[:_HEADER.size + size]
            frames.append(decode(body))
        return frames


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(n - len(chunks))
        if not data:
            if chunks:
                raise FrameError("the stream ended inside a frame")
            return None
        chunks += data
    return bytes(chunks)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """One frame from a blocking socket; None at end of file between frames."""
    header = _exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes is more than {MAX_FRAME}")
    body = _exactly(sock, size)
    if body is None:
        raise FrameError("the stream ended inside a frame")
    return decode(body)
