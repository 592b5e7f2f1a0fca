"""``kvtier serve``: the process that owns a node's shared DRAM pool and its slot table.

* **The pool** is one memfd (anonymous shared memory: no file to leak, nothing under /dev/shm),
  ``--dram`` bytes, populated at start.  A client gets it with the answer to its hello (SCM_RIGHTS)
  and maps it; the service never touches the bytes.  The first hello fixes the layout (its chunk
  size cuts the pool into slots); a client of another layout is refused with one line, until the
  pool is empty and no client is connected.
* **The table** (``kvtier.node.slots``): keys, slots, reservations, pins and LRU eviction.
* **One loop**, one thread: non-blocking sockets under ``selectors``.  Every request is metadata (a
  few dict operations), so no client waits behind another's copy: copies happen in the clients.
* **Failures**: a frame that is not this protocol (``kvtier.tiers.node_wire``) closes that connection
  with an error logged; when a connection closes for any reason (the client exited, was SIGKILLed,
  spoke garbage) its reservations are freed unpublished and its pins dropped.
* **Access**: the socket is 0600 (its directory 0700 when the service creates it) and a peer of
  another user (SO_PEERCRED) is refused; the pool is reachable only through the socket.
* **One service per socket**: ``<socket>.lock`` is held (flock) for the service's life; a second
  ``kvtier serve`` on the path fails with a clear error, and a stale socket file (its service died)
  is replaced.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import selectors
import signal
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from kvtier.errors import ServiceError
from kvtier.node.slots import SlotError, SlotTable
from kvtier.tiers.node_wire import HEADER, VERSION, ProtocolError, decode, encode, frame_length, keys_of

log = logging.getLogger("kvtier.node")

_BATCH_OPS = ("lookup", "reserve", "commit", "abort", "acquire", "release", "delete")


@dataclass(eq=False)
class _Client:
    id: int
    sock: socket.socket
    pid: int
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    hello: bool = False
    writing: bool = False  # registered for EVENT_WRITE (an answer waits for room in the socket)


class NodeServer:
    """One service on ``path`` with a pool of ``capacity`` bytes; ``serve()`` runs until ``stop()``."""

    def __init__(self, path: Path, capacity: int, *, prefault: bool = True) -> None:
        if capacity <= 0:
            raise ServiceError(f"--dram must be positive, got {capacity}")
        self.path = Path(path)
        self.capacity = capacity
        self._lock_fd = self._take_lock()
        try:
            self._pool_fd = self._make_pool(prefault)
            self._listener = self._bind()
        except BaseException:
            os.close(self._lock_fd)
            with contextlib.suppress(AttributeError):
                os.close(self._pool_fd)
            raise
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()  # stop() wakes the loop at once
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._clients: dict[int, _Client] = {}
        self._next_id = 0
        self._stopping = False
        self.table: SlotTable | None = None
        self.layout: tuple[str, str, int] | None = None  # (fingerprint hex, description, chunk bytes)
        self.protocol_errors = 0

    # --- start ---------------------------------------------------------------------------------
    def _take_lock(self) -> int:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServiceError(f"another kvtier serve is serving {self.path} (it holds {lock}): "
                               "stop it first, or give this one another --socket") from None
        return fd

    def _make_pool(self, prefault: bool) -> int:
        fd = os.memfd_create("kvtier-node-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.capacity)
            if prefault:  # the pages exist before the first client copies into them
                os.posix_fallocate(fd, 0, self.capacity)
        except OSError as exc:
            os.close(fd)
            raise ServiceError(f"cannot allocate a {self.capacity}-byte shared pool (--dram): "
                               f"{exc.strerror or exc}") from None
        return fd

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise ServiceError(f"{self.path} exists and is not a socket; not touching it (pick another --socket)")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                os.unlink(self.path)  # stale: we hold the lock, and nothing answers on it
                log.info("removed the stale socket %s", self.path)
            else:
                raise ServiceError(f"a process that holds no {self.path.name}.lock answers on {self.path}; "
                                   "not stealing its socket")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others may connect
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise ServiceError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.lstat(self.path).st_ino
        listener.listen(128)
        listener.setblocking(False)
        return listener

    # --- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        """Answer clients until ``stop()`` (a signal handler may call it)."""
        while not self._stopping:
            for key, events in self._sel.select(timeout=1.0):
                if key.data is None:
                    self._accept()
                    continue
                if key.data == "wake":
                    continue
                client: _Client = key.data
                if events & selectors.EVENT_WRITE:
                    self._flush(client)
                if events & selectors.EVENT_READ and client.id in self._clients:
                    self._read(client)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        """Close every connection and the listener, remove the socket file, give the pool back."""
        for client in list(self._clients.values()):
            self._drop(client, None)
        self._sel.close()
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:  # still ours, not a successor's
                os.unlink(self.path)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self._pool_fd)
        os.close(self._lock_fd)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (os.getuid(), 0):
            log.warning("refused a client of uid %d (pid %d): this service serves uid %d", uid, pid, os.getuid())
            sock.close()
            return
        sock.setblocking(False)
        self._next_id += 1
        client = _Client(self._next_id, sock, pid)
        self._clients[client.id] = client
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(1 << 16)  # under malloc's mmap threshold: no map/unmap per read
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(client, f"read failed: {exc}")
            return
        if not data:
            self._drop(client, None)
            return
        client.inbuf += data
        try:
            while len(client.inbuf) >= HEADER.size:
                length = frame_length(client.inbuf[:HEADER.size])
                if len(client.inbuf) < HEADER.size + length:
                    break
                request = decode(client.inbuf[HEADER.size:HEADER.size + length])
                del client.inbuf[:HEADER.size + length]
                if not self._answer(client, request):
                    return
        except (ProtocolError, SlotError) as exc:
            self.protocol_errors += 1
            log.error("client %d (pid %d): %s; closing its connection", client.id, client.pid, exc)
            self._drop(client, None)

    def _answer(self, client: _Client, request: dict[str, Any]) -> bool:
        """Handle one request; False if the connection was closed."""
        op = request.get("op")
        if op == "hello":
            return self._hello(client, request)
        if op == "stats":
            self._send(client, {"ok": True, **self.stats()})
            return True
        if op not in _BATCH_OPS:
            raise ProtocolError(f"unknown request {str(op)[:40]!r}")
        if not client.hello or self.table is None:
            raise ProtocolError(f"{op} before hello")
        table = self.table
        if op in ("commit", "abort", "release"):
            slots = self._slots_of(request.get("slots"))
            {"commit": table.commit, "abort": table.abort, "release": table.release}[op](client.id, slots)
            self._send(client, {"ok": True})
            return True
        keys = keys_of(request.get("keys"))
        if op == "lookup":
            answer: dict[str, Any] = {"present": [int(p) for p in table.lookup(keys)]}
        elif op == "delete":
            answer = {"deleted": [int(d) for d in table.delete(keys)]}
        else:
            answer = {"slots": (table.reserve if op == "reserve" else table.acquire)(client.id, keys)}
        self._send(client, {"ok": True, **answer})
        return True

    def _slots_of(self, slots: object) -> list[int]:
        assert self.table is not None
        n = self.table.num_slots
        if not isinstance(slots, list) or not all(type(s) is int and 0 <= s < n for s in slots):
            raise ProtocolError(f"slots must be a list of slot numbers below {n}")
        return slots

    def _hello(self, client: _Client, request: dict[str, Any]) -> bool:
        fingerprint, layout, chunk_bytes = request.get("fingerprint"), request.get("layout"), request.get("chunk_bytes")
        if client.hello or client.outbuf:
            raise ProtocolError("hello twice")
        if not (isinstance(fingerprint, str) and isinstance(layout, str) and type(chunk_bytes) is int
                and chunk_bytes > 0):
            raise ProtocolError("hello without a layout")
        problem = None
        if request.get("version") != VERSION:
            problem = (f"protocol version {str(request.get('version'))[:20]}; this kvtier serve speaks {VERSION}: "
                       "run the same kvtier version on both sides")
        elif chunk_bytes > self.capacity:
            problem = f"a chunk of {chunk_bytes} bytes does not fit this service's {self.capacity}-byte pool (--dram)"
        elif self.layout is None or (self.layout[0] != fingerprint and self._rebindable()):
            self.layout = (fingerprint, layout, chunk_bytes)
            self.table = SlotTable(self.capacity // chunk_bytes)
            log.info("pool bound to %s: %d slots of %d bytes", layout, self.table.num_slots, chunk_bytes)
        elif self.layout[0] != fingerprint:
            problem = (f"layout mismatch: this kvtier serve holds chunks of {self.layout[1]}, this client's layout is "
                       f"{layout}: one service per model (another --socket)")
        if problem is not None:
            log.warning("client %d (pid %d) refused: %s", client.id, client.pid, problem)
            self._send(client, {"ok": False, "error": problem})
            self._drop(client, None)
            return False
        assert self.table is not None and self.layout is not None
        client.hello = True
        frame = encode({"ok": True, "version": VERSION, "slots": self.table.num_slots, "slot_bytes": self.layout[2],
                        "pool_bytes": self.capacity})
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self._pool_fd]))]
        try:
            sent = client.sock.sendmsg([frame], fds)
        except OSError as exc:
            self._drop(client, f"hello answer failed: {exc}")
            return False
        client.outbuf += frame[sent:]
        self._flush(client)
        log.info("client %d (pid %d) connected", client.id, client.pid)
        return True

    def _rebindable(self) -> bool:
        """May a hello of another layout re-cut the pool?  Only when it holds nothing for anyone."""
        return (self.table is None or self.table.empty()) and not any(c.hello for c in self._clients.values())

    def _send(self, client: _Client, message: dict[str, Any]) -> None:
        client.outbuf += encode(message)
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            while client.outbuf:
                sent = client.sock.send(client.outbuf)
                del client.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._drop(client, f"write failed: {exc}")
            return
        if client.id in self._clients and client.writing != bool(client.outbuf):  # epoll_ctl only on a change
            client.writing = bool(client.outbuf)
            self._sel.modify(client.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if client.writing else 0),
                             client)

    def _drop(self, client: _Client, why: str | None) -> None:
        """Close a connection; its reservations are freed unpublished and its pins dropped."""
        if self._clients.pop(client.id, None) is None:
            return
        if why:
            log.warning("client %d (pid %d): %s; closing its connection", client.id, client.pid, why)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()
        if self.table is not None:
            reserved, pins = self.table.reclaim(client.id)
            if reserved or pins:
                log.info("client %d (pid %d) gone: reclaimed %d reservation(s), %d pin(s)",
                         client.id, client.pid, reserved, pins)

    def stats(self) -> dict[str, Any]:
        table = self.table.stats() if self.table is not None else {}
        return {**table, "clients": sum(c.hello for c in self._clients.values()), "pool_bytes": self.capacity,
                "layout": self.layout[1] if self.layout else None, "protocol_errors": self.protocol_errors}

def run(path: Path, capacity: int, *, prefault: bool = True) -> int:
    """``kvtier serve``: serve until SIGTERM or SIGINT, then clean up; the exit status."""
    server = NodeServer(path, capacity, prefault=prefault)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    log.info("serving %s: a %d-byte DRAM pool (pid %d)", path, capacity, os.getpid())
    try:
        server.serve()
    finally:
        server.close()
    log.info("stopped")
    return 0
