"""``KVTierLM``'s default fetch-or-recompute model (``kvtier.integrations.hf_cost``) on CPU.

Real parts: tiny random Llamas, a DRAM tier, a disk tier (one made slow by sleeping in its reads:
the real tier underneath).  A model that computes slowly against its KV bytes must load a DRAM hit;
a disk that reads slower than the model recomputes must not be loaded.  With ``cost="off"`` both
load everything: the tests fail if the default were off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.calibrate import OnlineCost  # noqa: E402
from kvtier.integrations.hf import KVTierLM, layout_for  # noqa: E402
from kvtier.integrations.hf_cost import AutoCost, Decisions  # noqa: E402
from kvtier.keys import ChunkKey  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.policy.cost import FetchPlan, LinkCost, PrefillCost  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402
from tests.integrations.hf_helpers import VOCAB, C, open_memory, prompt, reference, warm  # noqa: E402

N = 6  # cached chunks of the prompts below
TAIL = 7


class SlowDisk(DiskTier):
    """The disk tier, each chunk read ``delay_s`` slower (a slow drive, or a remote mount)."""

    delay_s = 0.05

    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        time.sleep(self.delay_s)
        return super().get_into(key, out)

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        time.sleep(self.delay_s * len(keys))
        return super().get_many_into(keys, outs)


@pytest.fixture(scope="module")
def heavy() -> LlamaForCausalLM:
    """Much compute per byte of KV (wide MLP, one KV head): loading a hit from DRAM (or a sound disk)
    beats recomputing it, on any CPU."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=1024,
                      name_or_path="kvtier-test/heavy-random-llama")
    return LlamaForCausalLM(cfg).to(dtype=torch.float32).eval()


def test_by_default_a_dram_hit_is_loaded_after_a_calibration_at_start_up(heavy: LlamaForCausalLM, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    layout = layout_for(heavy, tokens_per_chunk=C)
    mem = open_memory(layout, tmp_path)
    ids = prompt(N * C + TAIL, seed=31)
    try:
        with caplog.at_level(logging.DEBUG, logger="kvtier.integrations.hf"), KVTierLM(heavy, mem) as lm:
            assert lm.auto_cost is not None and lm.cost is not None  # on without being asked
            assert lm.auto_cost.calibration_s < 5  # well under a second on an idle box; this one is shared
            assert "calibrated" in caplog.text
            warm(lm, ids)
            with torch.no_grad():
                result = lm.prefill(ids)
        assert result.plan is not None and result.loaded_tokens == N * C
        assert lm.decisions.as_dict() == {"load_all": 1, "load_head": 0, "recompute": 0, "split": 0}
        assert "load_all, load 6 chunks" in caplog.text
        ref_logits, _ = reference(heavy, ids)
        assert (result.logits - ref_logits[:, N * C:]).abs().max().item() < 1e-3
    finally:
        mem.close()


def slow_disk_memory(layout: KVLayout, root: Path) -> ContextMemory:
    """An empty DRAM over a slow disk that holds the chunks; hits stay on disk (no promotion)."""
    tiers = [DramTier(layout, capacity_bytes=64 * layout.chunk_bytes),
             SlowDisk(layout, path=root, capacity_bytes=1 << 30, fsync=False)]
    return ContextMemory(layout, tiers, promotion="never")


@pytest.mark.parametrize("cost", ["auto", "off"])
def test_a_disk_slower_than_recomputing_is_recomputed(heavy: LlamaForCausalLM, tmp_path: Path, cost: str) -> None:
    """The start-up figures see the real drive (fast: the first hit loads); that slow read teaches
    the model, and the next hits from that disk are recomputed (or split).  Off: all are loaded."""
    layout = layout_for(heavy, tokens_per_chunk=C)
    ids = prompt(N * C + TAIL, seed=32)
    first = open_memory(layout, tmp_path)
    with KVTierLM(heavy, first, cost="off") as lm:
        warm(lm, ids)
    first.close()
    mem = slow_disk_memory(layout, tmp_path)
    try:
        with KVTierLM(heavy, mem, cost=cost) as lm, torch.no_grad():
            results = [lm.prefill(ids) for _ in range(3)]
            assert mem.lookup(mem.keys_for(ids.numpy())).tiers == (1,) * N  # still on disk only
        assert results[0].loaded_tokens == N * C  # the drive itself is fast
        if cost == "off":
            assert all(r.loaded_tokens == N * C for r in results) and results[-1].plan is None
            assert lm.decisions.load_all == 3
            return
        assert lm.auto_cost is not None and lm.auto_cost.model.links[1].bandwidth_Bps < N * layout.chunk_bytes / 0.2
        for later in results[1:]:
            assert later.plan is not None and (later.loaded_tokens == 0 or later.plan.is_split), later.plan
        assert lm.decisions.load_all == 1 and lm.decisions.recompute + lm.decisions.split == 2
        ref_logits, _ = reference(heavy, ids)
        last = results[-1]
        assert (last.logits - ref_logits[:, -last.logits.shape[1]:]).abs().max().item() < 1e-3
    finally:
        mem.close()


def test_bad_cost_values_are_refused_and_off_is_none(model: LlamaForCausalLM, layout: KVLayout,
                                                     tmp_path: Path) -> None:
    mem = open_memory(layout, tmp_path)
    try:
        with pytest.raises(IntegrationError, match="cost must be"):
            KVTierLM(model, mem, cost="fast")
        with KVTierLM(model, mem, cost=None, store=False) as lm:
            assert lm.cost is None and lm.auto_cost is None
            lm.cost = "auto"  # calibrates now
            assert lm.auto_cost is not None
            lm.cost = "off"
            assert lm.cost is None and lm.auto_cost is None
    finally:
        mem.close()


def online(per_token_s: float = 1e-4) -> AutoCost:
    links = [LinkCost(bandwidth_Bps=1e9), LinkCost(bandwidth_Bps=1e8)]
    return AutoCost(OnlineCost(links, PrefillCost(per_token_s=per_token_s), chunk_bytes=1 << 20), stages=4,
                    tiers=["dram", "disk"], calibration_s=0.0)


def test_observations_refine_the_figures_and_stages_stay() -> None:
    cost = online()
    assert cost.model.stages == 4
    before = cost.model.prefill.seconds(0, 1000)
    for _ in range(20):
        cost.observe_forward(past=0, new=1000, seconds=10 * before)  # the model computes 10x slower
    assert cost.model.prefill.seconds(0, 1000) > 5 * before and cost.model.stages == 4
    for _ in range(20):
        cost.observe_read(1, 1 << 20, 1.0)  # 1 MiB/s from disk, plus the copy at the DRAM link's rate
    assert cost.model.links[1].bandwidth_Bps < 2 * (1 << 20)
    cost.observe_read(0, 1 << 20, 1.0)  # DRAM reads are no disk samples
    cost.observe_copy(1 << 30, 0.1)  # 10 GiB/s into the device
    assert cost.model.links[0].bandwidth_Bps > 1e9


def test_decisions_are_named_as_the_vllm_connectors_plus_split() -> None:
    def plan(load: int, compute: int = 0) -> FetchPlan:
        return FetchPlan(load_chunks=load, cached_chunks=4, est_load_s=0, est_compute_s=0, est_total_s=1,
                         est_recompute_s=1, compute_chunks=compute)

    d = Decisions()
    assert [d.count(plan(4), 4, 4), d.count(plan(2), 4, 2), d.count(plan(0), 4, 0), d.count(plan(4, 1), 4, 3),
            d.count(None, 4, 4)] == ["load_all", "load_head", "recompute", "split", "load_all"]
    assert d.as_dict() == {"load_all": 2, "load_head": 1, "recompute": 1, "split": 1}
