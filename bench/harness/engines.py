"""vLLM engines (``vllm serve``) and LMCache servers on loopback, for ``kvtier bench vllm``.

Every process gets free 127.0.0.1 ports, its own log file and its own process group, and is
stopped by its PID: SIGTERM (vLLM's API server then stops its EngineCore and worker), and
SIGKILL of that group only if it does not exit in time.  Nothing listens beyond loopback.

Fairness: vLLM's CPU thread binding gives an engine without a KV connector one OpenMP thread
fewer than one with a connector (it reserves cores for the scheduler and the connector).  Every
engine here gets the same ``VLLM_CPU_OMP_THREADS_BIND`` (``EngineSpec.cpu_bind``), so a
"recompute" baseline computes with as many threads as the connectors it is compared with.

LMCache (0.5.6, optional: ``pip install -e ".[peers]"``) runs as its own ``lmcache server``
process, one per engine, driven by vLLM's ``LMCacheMPConnector`` in ``lmcache_driven`` mode
(KV copied through POSIX shared memory).  A vLLM worker attached to it leaves its
``/dev/shm/lmcache_kv_<pid>_*`` segment behind when it exits; ``EngineServer.stop`` removes
those of workers that are gone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.harness.servers import HOST, free_ports

LMCACHE_ENV = {"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"}
SHM = Path("/dev/shm")


def default_cpu_bind() -> str:
    """Every core of this machine, e.g. ``"0-1"``: the one binding all compared engines share."""
    return f"0-{max(1, os.cpu_count() or 1) - 1}"


def lmcache_missing() -> str | None:
    """None if LMCache can run here, else a one-line reason."""
    if importlib.util.find_spec("lmcache") is None:
        return 'LMCache is not installed (pip install lmcache==0.5.6, or pip install -e ".[peers]")'
    return None


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """One ``vllm serve`` process: a random-weight model, token-id prompts, no tokenizer."""

    name: str  # names the log file and the table column
    model: Path
    cpu_bind: str  # VLLM_CPU_OMP_THREADS_BIND, the same for every engine compared
    connector: str | None = None  # None (plain vLLM), "kvtier", "example" or "lmcache"
    extra_config: dict[str, Any] = field(default_factory=dict)  # kv_connector_extra_config
    prefix_caching: bool = False  # vLLM's own prefix cache
    block_size: int = 128
    max_model_len: int = 4096
    max_num_batched_tokens: int | None = None  # default: max_model_len (a whole prompt in one step)
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    num_gpu_blocks: int | None = None  # cap on vLLM's KV blocks (forces its own cache to overflow)

    def kv_transfer_config(self) -> dict[str, Any] | None:
        extra = dict(self.extra_config)
        if self.connector is None:
            return None
        if self.connector == "kvtier":
            return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                    "kv_role": "kv_both", "kv_connector_extra_config": extra}
        if self.connector == "example":
            return {"kv_connector": "ExampleConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
        if self.connector == "lmcache":
            return {"kv_connector": "LMCacheMPConnector",
                    "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
                    "kv_role": "kv_both", "kv_connector_extra_config": extra}
        raise ValueError(f"unknown connector {self.connector!r}")

    def argv(self, port: int) -> list[str]:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--served-model-name", self.name, "--dtype", "float32", "--skip-tokenizer-init", "--enforce-eager",
                "--max-model-len", str(self.max_model_len), "--block-size", str(self.block_size),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens or self.max_model_len),
                "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
                "--seed", "0", "--host", HOST, "--port", str(port),
                # drain on SIGTERM: the connector's shutdown runs (kvtier finishes its disk writes)
                "--shutdown-timeout", "60"]
        if self.num_gpu_blocks is not None:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks)]
        transfer = self.kv_transfer_config()
        if transfer is not None:
            args += ["--kv-transfer-config", json.dumps(transfer)]
        return args

    def env(self) -> dict[str, str]:
        return {**os.environ, **LMCACHE_ENV, "VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind,
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
                # a 16K-token fp32 prefill on two cores outlasts vLLM's 300 s step timeout
                "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "7200"}


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message ends with the tail of its log."""


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


class _Process:
    """A child process in its own process group, stopped by PID."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, url: str, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{what} exited with {self.proc.returncode}; log {self.log}:\n{_tail(self.log)}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                _get(url, timeout_s=2.0)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"{what} not ready within {timeout_s:.0f} s; log {self.log}:\n{_tail(self.log)}")
            time.sleep(1.0)

    def stop(self, timeout_s: float = 90.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # vLLM's EngineCore/worker normally exit with the API server; any left over are ours (same group).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class EngineServer:
    """``vllm serve`` for one ``EngineSpec``; ``url`` is its OpenAI-compatible endpoint."""

    def __init__(self, spec: EngineSpec, workdir: Path) -> None:
        self.spec = spec
        (self.port,) = free_ports(1)
        self.url = f"http://{HOST}:{self.port}"
        self.log = workdir / f"{spec.name}.log"
        self._process = _Process(spec.argv(self.port), spec.env(), self.log)

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float = 900.0) -> EngineServer:
        self._process.wait_ready(f"{self.url}/v1/models", f"vLLM engine {self.spec.name!r}", timeout_s)
        return self

    def metrics(self) -> dict[str, float]:
        """vLLM's prefix-cache counters (its own cache and the connector's), summed over labels."""
        from bench.harness.live import prefix_cache_counters

        return prefix_cache_counters(self.url)

    def stop(self) -> None:
        ours = _descendants(self.pid)
        self._process.stop()
        deadline = time.monotonic() + 10.0  # a killed worker may take a moment to go
        while any(_pid_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        for path in _lmcache_segments():  # left behind by this engine's worker
            if _segment_pid(path) in ours:
                with contextlib.suppress(OSError):
                    path.unlink()

    def __enter__(self) -> EngineServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def _lmcache_segments() -> set[Path]:
    return set(SHM.glob("lmcache_kv_*")) if SHM.is_dir() else set()


def _segment_pid(path: Path) -> int:
    parts = path.name.split("_")  # lmcache_kv_<pid>_<n>
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1


def _pid_alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class LMCacheServer:
    """``lmcache server`` on free loopback ports; ``connector_config()`` points vLLM at it.

    ``l1_gb`` is its DRAM (L1); ``disk`` adds an L2 on a local directory (LMCache's ``fs``
    adapter, one file per chunk) that a later server on the same directory reads back.
    """

    def __init__(self, workdir: Path, *, name: str = "lmcache-server", l1_gb: float = 1.0,
                 chunk_tokens: int = 256, disk: Path | None = None) -> None:
        self.port, self.http_port, self.prometheus_port = free_ports(3)
        self.log = workdir / f"{name}.log"
        argv = [sys.executable, "-c", "import sys; from lmcache.cli.main import main; sys.exit(main())",
                "server", "--host", HOST, "--port", str(self.port), "--http-host", HOST,
                "--http-port", str(self.http_port), "--prometheus-port", str(self.prometheus_port),
                "--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU", "--chunk-size", str(chunk_tokens),
                # without "auto" the server has no handler for vLLM's CPU transfer and vLLM hangs
                "--supported-transfer-mode", "auto"]
        if disk is not None:
            disk.mkdir(parents=True, exist_ok=True)
            argv += ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(disk)})]
        self._process = _Process(argv, {**os.environ, **LMCACHE_ENV}, self.log)

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float = 180.0) -> LMCacheServer:
        self._process.wait_ready(f"http://{HOST}:{self.http_port}/healthcheck", "lmcache server", timeout_s)
        return self

    def connector_config(self, *, save_decode_cache: bool = True) -> dict[str, Any]:
        """``kv_connector_extra_config`` for ``LMCacheMPConnector``.

        ``save_decode_cache`` also stores chunks holding generated tokens (LMCache's default
        stores prompt chunks only); kvtier stores both, so a next turn that repeats the answer
        can hit in either.
        """
        return {"lmcache.mp.host": f"tcp://{HOST}", "lmcache.mp.port": self.port, "lmcache.mp.mq_timeout": 60,
                "lmcache.mp.mp_transfer_mode": "lmcache_driven", "lmcache.mp.save_decode_cache": save_decode_cache}

    def hit_chunks(self) -> dict[str, int]:
        """Chunks its lookups found in L1 and in L2 so far, from its log (``retained keys (a L1, b L2)``)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return {}
        found = re.findall(r"retained keys \((\d+) L1, (\d+) L2\)", text)
        return {"l1": sum(int(a) for a, _ in found), "l2": sum(int(b) for _, b in found)}

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> LMCacheServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
