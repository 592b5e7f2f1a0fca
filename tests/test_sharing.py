"""Two kvtier instances in separate processes, each with its own DRAM and disk (two "nodes"),
share chunks through G4: what one stores, the other finds below its local tiers, loads, and
promotes into its own DRAM.  Run on a 3-shard Redis Cluster and on Mooncake Store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness.servers import MooncakeServers, RedisClusterServers
from kvtier.config import KVTierConfig, from_dict
from kvtier.hierarchy import ContextMemory
from kvtier.layout import KVLayout
from tests.tiers.servers import mooncake_servers, redis_cluster, unique_prefix  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = dict(model="test/share", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", tokens_per_chunk=16)
NUM_CHUNKS = 12


def _tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30_000, size=NUM_CHUNKS * 16 + 5)


def _payloads(layout: KVLayout, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 99)
    return [rng.integers(0, 256, size=layout.chunk_bytes, dtype=np.uint8) for _ in range(NUM_CHUNKS)]


def node_main(role: str, config_json: str, seed: int) -> dict[str, Any]:
    """One instance: ``write`` stores a conversation's chunks; ``read`` looks them up and loads them."""
    config: KVTierConfig = from_dict(KVTierConfig, json.loads(config_json))
    layout = KVLayout(**LAYOUT)  # type: ignore[arg-type]
    with ContextMemory.open(layout, config) as mem:
        keys = mem.keys_for(_tokens(seed))
        expected = _payloads(layout, seed)
        if role == "write":
            stored = mem.store(keys, expected)
            mem.flush()
            return {"stored": stored}
        before = mem.lookup(keys)
        outs = [np.zeros(layout.chunk_bytes, dtype=np.uint8) for _ in keys]
        loaded = mem.load(keys, outs)
        equal = all(np.array_equal(o, p) for o, p in zip(outs[:loaded], expected, strict=False))
        after = mem.lookup(keys)
        stats = {name: s.as_dict() for name, s in mem.stats().items()}
        return {"levels_before": list(before.tiers), "loaded": loaded, "equal": equal,
                "levels_after": list(after.tiers), "stats": stats}


def _run_node(role: str, config: dict[str, Any], seed: int) -> dict[str, Any]:
    code = ("import json, sys; from tests.test_sharing import node_main; "
            "print('RESULT ' + json.dumps(node_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, role, json.dumps(config), str(seed)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    return result


def _node_config(tmp: Path, node: str, g4: str, g4_section: dict[str, Any]) -> dict[str, Any]:
    return {"chunk_tokens": 16, "tiers": ["dram", "disk", g4],
            "dram": {"capacity": 64 << 10}, "disk": {"path": str(tmp / node), "fsync": False},
            g4: g4_section}


def _check_sharing(tmp: Path, g4: str, section: dict[str, Any]) -> None:
    a, b = _node_config(tmp, "node-a", g4, section), _node_config(tmp, "node-b", g4, section)
    assert _run_node("write", a, seed=1)["stored"] == NUM_CHUNKS
    got = _run_node("read", b, seed=1)  # node B: empty DRAM, empty disk of its own
    assert got["levels_before"] == [2] * NUM_CHUNKS  # found below the local tiers, in G4
    assert got["loaded"] == NUM_CHUNKS and got["equal"]
    assert got["stats"]["dram"]["promotions"] == NUM_CHUNKS  # G4 hits promoted into local DRAM
    assert got["levels_after"] == [0] * NUM_CHUNKS
    assert got["stats"][g4]["hits"] == NUM_CHUNKS and got["stats"][g4]["errors"] == 0
    # and the other way round: B's new conversation is found by A
    assert _run_node("write", b, seed=2)["stored"] == NUM_CHUNKS
    back = _run_node("read", a, seed=2)
    assert back["loaded"] == NUM_CHUNKS and back["equal"]
    assert set(back["levels_before"]) == {2}
    # a tenant that was not salted the same way sees nothing
    other = _run_node("read", {**a, "tenant": "someone-else"}, seed=1)
    assert other["loaded"] == 0


def test_two_nodes_share_through_redis_cluster(tmp_path: Path, redis_cluster: RedisClusterServers) -> None:  # noqa: F811
    _check_sharing(tmp_path, "redis", {"url": redis_cluster.url, "cluster": True,
                                       "password": redis_cluster.password, "key_prefix": unique_prefix()})


def test_two_nodes_share_through_mooncake(tmp_path: Path, mooncake_servers: MooncakeServers) -> None:  # noqa: F811
    _check_sharing(tmp_path, "mooncake", {"master_address": mooncake_servers.master_address,
                                          "metadata_server": mooncake_servers.metadata_server,
                                          "global_segment_size": 0, "local_buffer_size": 16 << 20,
                                          "staging_bytes": 4 << 20, "key_prefix": unique_prefix()})


@pytest.mark.parametrize("g4", ["redis", "mooncake"])
def test_g4_down_at_start_is_a_cold_start_not_a_crash(tmp_path: Path, g4: str) -> None:
    from bench.harness.servers import free_port

    section: dict[str, Any] = (
        {"url": f"redis://127.0.0.1:{free_port()}/0", "cluster": True} if g4 == "redis" else
        {"master_address": f"127.0.0.1:{free_port()}", "metadata_server": f"http://127.0.0.1:{free_port()}/metadata",
         "global_segment_size": 0, "timeout_s": 0.5})
    got = _run_node("read", _node_config(tmp_path, "node-c", g4, section), seed=3)
    assert got["loaded"] == 0 and got["levels_before"] == []


@pytest.mark.slow
def test_second_vllm_on_another_node_starts_warm_from_g4(tmp_path: Path,
                                                         redis_cluster: RedisClusterServers) -> None:  # noqa: F811
    """vLLM + KVTierConnector on "node A" (its own disk dir) serves two prompts; a second vLLM
    process on "node B" (another disk dir, empty) gets the same outputs, loading from Redis."""
    pytest.importorskip("vllm")
    from tests.integrations.vllm_helpers import build_tiny_model, run_vllm

    model = build_tiny_model(tmp_path / "model")
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 2000, size=n).tolist() for n in (300, 260)]
    redis_section = {"url": redis_cluster.url, "cluster": True, "password": redis_cluster.password,
                     "key_prefix": unique_prefix()}

    def node(name: str) -> dict[str, Any]:
        work = tmp_path / name
        work.mkdir()
        # probe_deadline_s: the scheduler waits for the Redis probe however loaded this machine is
        # (with the default 20 ms a slow answer is a miss, counted as computed tokens, and node B's
        # hit count varied from run to run)
        extra = {"chunk_tokens": 128, "tiers": ["dram", "disk", "redis"], "dram": {"capacity": "64MiB"},
                 "disk": {"path": str(work / "disk"), "capacity": "256MiB", "fsync": False}, "redis": redis_section,
                 "probe_deadline_s": 30.0, "cost_model": "off"}  # every whole chunk is loaded from G4
        spec = {"model": str(model), "block_size": 64, "max_tokens": 6, "max_model_len": 2048, "phases": [prompts],
                "connector": "kvtier", "extra_config": extra, "stats_file": str(work / "stats.json")}
        return run_vllm(spec, work, name)

    a = node("node-a")
    counters_a = a["phases"][0]["stats"]["counters"]
    assert counters_a.get("load_tokens", 0) == 0 and counters_a["save_chunks"] == 4  # 2 + 2 whole chunks
    b = node("node-b")
    assert b["phases"][0]["outputs"] == a["phases"][0]["outputs"]
    counters_b = b["phases"][0]["stats"]["counters"]
    assert counters_b["hit_tokens_redis"] == 4 * 128  # every whole chunk came from G4
    assert counters_b.get("load_failed_chunks", 0) == 0
