"""A real ``kvtier serve`` for tests: a subprocess (``Service``) or a thread (``ThreadService``), on a
short socket path (a Unix socket path has at most 107 bytes; pytest's tmp_path may be longer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvtier.node.server import NodeServer
from kvtier.tiers.node_wire import decode, encode, frame_length

ROOT = Path(__file__).resolve().parents[2]


def ask(path: Path, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """One request on a fresh connection (``stats`` needs no hello)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(encode(message))
        head = sock.recv(4, socket.MSG_WAITALL)
        return decode(sock.recv(frame_length(head), socket.MSG_WAITALL))


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate()`` until truthy (its value), or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Service:
    """``kvtier serve --socket PATH --dram SIZE`` as a subprocess; stderr goes to ``log``."""

    def __init__(self, path: Path, dram: str = "4MiB") -> None:
        self.path, self.dram = path, dram
        self.log = path.with_name(path.name + f".{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> Service:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--socket", str(self.path),
                                          "--dram", self.dram, "--no-prefault"], stderr=err, cwd=ROOT)
        if wait:
            proc = self.proc
            wait_for(lambda: proc.poll() is not None or ask(self.path, {"op": "stats"}), what="kvtier serve to answer")
            assert proc.poll() is None, self.text()
        return self

    def text(self) -> str:
        return self.log.read_text()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ThreadService:
    """The same server in a thread of this process: real socket and memfd, no process start-up."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.server = NodeServer(path, capacity, prefault=False)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.server.close()
