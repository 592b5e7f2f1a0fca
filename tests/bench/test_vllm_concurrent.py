"""``kvtier bench vllm --concurrent`` end to end: plain vLLM and kvtier, two tiny sessions.

Real engines (``vllm serve`` on loopback, a 2-layer random model) started and stopped by the
bench.  vLLM's own KV cache is cut to what one request needs (the default for two sessions this
small), so once the two contexts outgrow it each turn evicts part of the other session's prefix
and kvtier must serve it; the counters must add up (every queried token hit vLLM's cache, hit
kvtier or was computed) and kvtier's per-tier split must cover what vLLM says it served.
LMCache is left out (CI does not install it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli import main

pytestmark = pytest.mark.slow


def test_concurrent_smoke_vllm_and_kvtier(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "concurrent.json"
    rc = main(["bench", "vllm", "--concurrent", "--modes", "vllm,kvtier", "--shape", "tiny",
               "--model-dir", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"),
               "--sessions", "2", "--turns", "10", "--max-context", "1024", "--max-output", "4",
               "--time-scale", "0.02", "--stagger", "0.2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    modes = {m["mode"]: m for m in doc["modes"]}
    assert list(modes) == ["vllm", "kvtier"] and doc["cpu_bind"]
    for m in modes.values():
        assert m["requests"] == 20 and m["errors"] == 0
        assert 0 < m["ttft_p50_s"] <= m["ttft_p90_s"] < 30 and m["requests_per_s"] > 0
        assert m["itl_samples"] == 20 * 3  # 4 tokens per answer: 3 gaps each
        assert m["vllm_hit_tokens"] + m["connector_hit_tokens"] + m["computed_tokens"] == m["queried_tokens"]
    assert modes["vllm"]["connector_hit_tokens"] == 0
    kvtier = modes["kvtier"]
    assert kvtier["connector_hit_tokens"] > 0  # vLLM's own cache overflowed: kvtier served the rest
    assert sum(kvtier["connector_hit_tokens_by_tier"].values()) >= kvtier["connector_hit_tokens"]
    assert kvtier["computed_tokens"] < modes["vllm"]["computed_tokens"]
    assert len(doc["results"]["kvtier"]) == 20
