"""Start and stop real G4 servers on loopback for tests and benchmarks.

* ``RedisServer``: one Debian ``redis-server`` (standalone, or a cluster-enabled node).
* ``RedisClusterServers``: N cluster-enabled nodes joined with ``redis-cli --cluster create``
  (no replicas, ``cluster-require-full-coverage no`` so the shards left keep serving when one
  dies).  ``kill(i)`` / ``restart(i)`` simulate a shard failing and coming back on its port.
* ``MooncakeServers``: ``mooncake_master`` with its built-in HTTP metadata server, plus one
  ``mooncake_client`` storage node that contributes memory, so chunks outlive the processes
  that wrote them (inference clients contribute no memory of their own).

Every server gets free loopback ports and a private directory, and is stopped (SIGTERM, then
SIGKILL) by ``stop()`` or by leaving the ``with`` block.  Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (racy by nature; fine on a test machine)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout_s}s; log {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


class _Managed:
    def __enter__(self) -> _Managed:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError


# --- Redis ------------------------------------------------------------------------------------

def redis_binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        raise RuntimeError("redis-server/redis-cli not found: install Debian's redis-server (scripts/setup.sh)")
    return server, cli


def make_test_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 (server and client use), made with ``openssl``."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise RuntimeError("openssl not found: install Debian's openssl (scripts/setup.sh)")
    d = directory
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=kvtier-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
         "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf"],
    ]
    for cmd in steps:
        subprocess.run(cmd, cwd=d, check=True, capture_output=True, timeout=60)
    return {"ca": d / "ca.pem", "cert": d / "node.pem", "key": d / "node.key"}


class RedisServer(_Managed):
    """One ``redis-server`` on a free loopback port with ``requirepass``; no persistence.

    ``tls=True``: TLS only (no plaintext port), client certificates required (mutual TLS); the
    CA, certificate and key are in ``self.certs``.
    """

    def __init__(self, *, password: str = "kvtier-test", port: int | None = None, cluster: bool = False,
                 maxmemory: str = "2gb", workdir: Path | None = None, tls: bool = False) -> None:
        self.password = password
        self.tls = tls
        self.port = port or free_port()
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0  # explicit: the default port+10000 may be taken
        self.maxmemory = maxmemory
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"kvtier-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.certs = make_test_certs(self.dir) if tls else {}
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    def start(self) -> None:
        server, _ = redis_binaries()
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.certs["cert"]),
                     "--tls-key-file", str(self.certs["key"]), "--tls-ca-cert-file", str(self.certs["ca"]),
                     "--tls-auth-clients", "yes"]
        args = [server, *ports, "--bind", HOST, "--requirepass", self.password,
                "--masterauth", self.password, "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru",
                "--proto-max-bulk-len", "1gb", "--client-query-buffer-limit", "1gb", "--daemonize", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(self.bus_port),
                     "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
                     "--cluster-allow-reads-when-down", "yes"]
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, 10.0, "redis-server", log)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers) until ``resume``."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        _stop(self.proc)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers(_Managed):
    """``shards`` cluster-enabled redis-servers joined into one Redis Cluster (no replicas)."""

    def __init__(self, shards: int = 3, *, password: str = "kvtier-test", maxmemory: str = "1gb") -> None:
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-rcluster-"))
        self.nodes: list[RedisServer] = []
        try:
            for port in free_ports(shards):
                d = self.dir / str(port)
                d.mkdir()
                self.nodes.append(RedisServer(password=password, port=port, cluster=True, maxmemory=maxmemory,
                                              workdir=d))
            self._create()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def _create(self) -> None:
        _, cli = redis_binaries()
        if len(self.nodes) == 1:  # redis-cli refuses a 1-node cluster: assign every slot by hand
            node = self.nodes[0]
            self._cli(node.port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        else:
            addrs = [f"{HOST}:{n.port}" for n in self.nodes]
            out = subprocess.run([cli, "--no-auth-warning", "-a", self.password, "--cluster", "create", *addrs,
                                  "--cluster-replicas", "0", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_ok()

    def _cli(self, port: int, *args: str) -> str:
        _, cli = redis_binaries()
        out = subprocess.run([cli, "--no-auth-warning", "-a", self.password, "-h", HOST, "-p", str(port), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and knows all live nodes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            if all("cluster_state:ok" in self._cli(n.port, "CLUSTER", "INFO") for n in live):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok in {timeout_s}s")

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Start node ``i`` again on its port and directory (nodes.conf keeps its slots), empty."""
        self.nodes[i].start()
        self.wait_ok()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Mooncake ---------------------------------------------------------------------------------

def mooncake_binaries() -> tuple[str, str]:
    """Paths of ``mooncake_master`` and ``mooncake_client`` shipped in the mooncake wheel."""
    try:
        import mooncake
    except ImportError as exc:
        raise RuntimeError("mooncake is not installed: pip install 'kvtier[mooncake]'") from exc
    pkg = Path(mooncake.__file__).parent
    master, client = pkg / "mooncake_master", pkg / "mooncake_client"
    if not master.exists():  # fall back to the console script next to this interpreter
        found = shutil.which("mooncake_master", path=sysconfig.get_path("scripts") + os.pathsep
                             + os.path.dirname(sys.executable))
        master = Path(found) if found else master
    for b in (master, client):
        if not b.exists():
            raise RuntimeError(f"{b} not found in the mooncake package")
        if not os.access(b, os.X_OK):
            b.chmod(b.stat().st_mode | 0o111)
    return str(master), str(client)


class MooncakeServers(_Managed):
    """``mooncake_master`` (with its HTTP metadata server) + a storage node contributing memory."""

    def __init__(self, *, segment_size: str = "256MB") -> None:
        self.rpc_port, self.http_port, self.metrics_port, self.client_port = free_ports(4)
        self.segment_size = segment_size
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-mooncake-"))
        self.master: subprocess.Popen[bytes] | None = None
        self.storage: subprocess.Popen[bytes] | None = None
        try:
            self.start_master()
            self.start_storage()
        except BaseException:
            self.stop()
            raise

    @property
    def master_address(self) -> str:
        return f"{HOST}:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://{HOST}:{self.http_port}/metadata"

    def start_master(self) -> None:
        master, _ = mooncake_binaries()
        log = self.dir / "master.log"
        self.master = subprocess.Popen(
            [master, f"--rpc_port={self.rpc_port}", f"--rpc_address={HOST}", "--enable_http_metadata_server=true",
             f"--http_metadata_server_host={HOST}", f"--http_metadata_server_port={self.http_port}",
             f"--metrics_port={self.metrics_port}", "--metrics_host=127.0.0.1", "--rpc_thread_num=4",
             "--logtostderr=true"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait_port(self.rpc_port, self.master, 15.0, "mooncake_master", log)
        _wait_port(self.http_port, self.master, 15.0, "mooncake_master HTTP metadata server", log)

    def start_storage(self) -> None:
        _, client = mooncake_binaries()
        log = self.dir / "storage.log"
        self.storage = subprocess.Popen(
            [client, f"--master_server_address={self.master_address}", f"--metadata_server={self.metadata_server}",
             f"--host={HOST}", f"--port={self.client_port}", f"--global_segment_size={self.segment_size}",
             "--local_buffer_size=16MB", "--protocol=tcp", "--logtostderr=true"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait_port(self.client_port, self.storage, 15.0, "mooncake_client storage node", log)
        time.sleep(0.3)  # the segment is mounted just before the service port opens; let the master see it

    def kill_master(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait(5)

    def pause_master(self) -> None:
        """SIGSTOP: the master hangs (connections open, no answers) until ``resume_master``."""
        if self.master is not None:
            self.master.send_signal(signal.SIGSTOP)

    def resume_master(self) -> None:
        if self.master is not None:
            self.master.send_signal(signal.SIGCONT)

    def restart_master(self) -> None:
        """A fresh master on the same ports (its metadata, and so every object, is gone)."""
        self.kill_master()
        self.start_master()

    def stop(self) -> None:
        self.resume_master()
        _stop(self.storage)
        _stop(self.master)
        shutil.rmtree(self.dir, ignore_errors=True)
