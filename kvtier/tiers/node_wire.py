"""The wire of ``kvtier serve``: frames on a Unix socket, and one client connection (``NodeConnection``).

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON: one object (never
pickle: a peer's bytes are data, not code).  The client sends a request, the service answers it,
one at a time per connection::

    {"op": "hello", "version": 1, "fingerprint": "<16 hex>", "layout": "<describe()>", "chunk_bytes": N}
        -> {"ok": true, "slots": S, "slot_bytes": N, "pool_bytes": P}  + the pool's memfd (SCM_RIGHTS)
    {"op": "lookup",  "keys": "<hex of the 16-byte keys, concatenated>"} -> {"ok": true, "present": [0|1, ...]}
    {"op": "reserve", "keys": ...}   -> {"ok": true, "slots": [slot | -1 (no room) | -2 (held already)]}
    {"op": "commit",  "slots": [...]} / {"op": "abort", "slots": [...]}    -> {"ok": true}
    {"op": "acquire", "keys": ...}   -> {"ok": true, "slots": [slot | -1 (miss)]}   pinned for reading
    {"op": "release", "slots": [...]}                                            -> {"ok": true}
    {"op": "delete",  "keys": ...}   -> {"ok": true, "deleted": [0|1, ...]}
    {"op": "stats"}                  -> {"ok": true, ...counters}
    any refusal                      -> {"ok": false, "error": "<one line>"}

A reserved slot is written by its client straight into the shared pool and is invisible until
committed; an acquired slot is not reused until released.  The service reclaims both when the
connection closes, so a client that dies mid-copy never publishes a half-written chunk.  A frame
the service cannot read closes the connection.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.errors import TierUnavailableError
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.layout import KVLayout

VERSION = 1
HEADER = struct.Struct(">I")
MAX_FRAME = 16 << 20  # a million keys' hex; a longer frame is garbage, not a request
NO_ROOM = -1  # a reserve's slot: every slot is reserved or pinned; an acquire's: a miss
HELD = -2  # a reserve's slot: the key is published already (same key, same bytes): nothing to write


class ProtocolError(Exception):
    """Bytes that are not a frame of this protocol (the service closes the connection)."""


class NodeRefused(TierUnavailableError):
    """The service answered ``{"ok": false}`` (a mismatched layout, a version it does not speak)."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """One frame's body -> the request or answer; ``ProtocolError`` if it is not a JSON object."""
    try:
        message = json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON frame: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a frame must be a JSON object, got {type(message).__name__}")
    return message


def frame_length(header: bytes | bytearray | memoryview) -> int:
    (length,) = HEADER.unpack(bytes(header))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes, over the {MAX_FRAME}-byte limit (not this protocol?)")
    return int(length)


def keys_hex(keys: list[ChunkKey]) -> str:
    return b"".join(keys).hex()


def keys_of(text: object) -> list[ChunkKey]:
    """The keys of a ``"keys"`` field; ``ProtocolError`` if it is not whole keys in hex."""
    if not isinstance(text, str):
        raise ProtocolError("keys must be a hex string")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError("keys are not hex") from None
    if len(raw) % KEY_BYTES:
        raise ProtocolError(f"keys are {len(raw)} bytes, not a whole number of {KEY_BYTES}-byte keys")
    return [ChunkKey(raw[i:i + KEY_BYTES]) for i in range(0, len(raw), KEY_BYTES)]


def hello(layout: KVLayout) -> dict[str, Any]:
    return {"op": "hello", "version": VERSION, "fingerprint": f"{layout.fingerprint:016x}",
            "layout": layout.describe(), "chunk_bytes": layout.chunk_bytes}


class NodeConnection:
    """One connection to the service: the socket and the pool mapped from the memfd it sent.

    ``request`` sends one frame and reads the answer within ``timeout`` seconds; any failure
    (refused, reset, timed out, garbage) raises ``TierUnavailableError`` and leaves the connection
    unusable (``close`` it; the service then reclaims its reservations and pins).
    """

    def __init__(self, path: Path, layout: KVLayout, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(max(timeout, 1e-3))
            self.sock.connect(str(path))
            answer, fds = self._call(hello(layout), time.monotonic() + timeout, want_fd=True)
            if not fds:
                raise TierUnavailableError("kvtier serve sent no pool with its hello")
            try:
                self.slot_bytes, self.num_slots = int(answer["slot_bytes"]), int(answer["slots"])
                size = int(answer["pool_bytes"])
                self._map = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            finally:
                for fd in fds:
                    os.close(fd)
        except OSError as exc:
            self.sock.close()
            raise TierUnavailableError(f"kvtier serve at {path}: {exc.strerror or exc}") from exc
        except BaseException:
            self.sock.close()
            raise
        self.pool = np.frombuffer(self._map, dtype=np.uint8)
        self.users = 0  # tier calls using this connection now (``kvtier.tiers.node`` counts them)
        self.broken = False  # failed once: no more requests; closed when the last user is done

    def slot(self, index: int) -> np.ndarray:
        return self.pool[index * self.slot_bytes:(index + 1) * self.slot_bytes]

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self._call(message, time.monotonic() + timeout)[0]

    def _call(self, message: dict[str, Any], until: float, *,
              want_fd: bool = False) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        try:
            self._wait(until)  # one timeout for the send and, mostly, the one read of the answer
            self.sock.sendall(encode(message))
            if want_fd:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
            else:
                data = self.sock.recv(1 << 16)
            answer = decode(self._rest(data, until))
        except (OSError, ProtocolError) as exc:
            for fd in fds:
                os.close(fd)
            raise TierUnavailableError(f"kvtier serve: {exc}") from exc
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            raise NodeRefused(str(answer.get("error", "refused")))
        return answer, fds

    def _wait(self, until: float) -> None:
        left = until - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)

    def _rest(self, data: bytes, until: float) -> bytes:
        """The body of the frame ``data`` begins (the service sends nothing unasked: no bytes after it)."""
        buf = bytearray(data)
        while True:
            if not data:
                raise ConnectionResetError("closed by the service")
            if len(buf) >= HEADER.size:
                length = frame_length(buf[:HEADER.size])
                if len(buf) >= HEADER.size + length:
                    return bytes(buf[HEADER.size:HEADER.size + length])
            self._wait(until)
            data = self.sock.recv(1 << 16)
            buf += data

    def close(self) -> None:
        """Close the socket; the mapping goes when the last view of it does."""
        self.sock.close()
