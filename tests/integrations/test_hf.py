"""The transformers integration on a tiny random Llama (fp32, CPU; CUDA too where present).

Every check compares against a full recompute by the same model: logits of the suffix, the
KV of the whole prompt, and greedy continuations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.hf import KVTierLM, calibrate_prefill, layout_for  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402
from tests.conftest import flip_byte  # noqa: E402
from tests.integrations.hf_helpers import C, greedy_reference, open_memory, prompt, reference, warm  # noqa: E402


@pytest.fixture
def memory(layout: KVLayout, tmp_path: Path) -> Iterator[ContextMemory]:
    mem = open_memory(layout, tmp_path)
    yield mem
    mem.close()


@pytest.mark.parametrize("layerwise", [True, False])
def test_loaded_prefix_matches_recompute(model: LlamaForCausalLM, memory: ContextMemory, layerwise: bool) -> None:
    shared = prompt(5 * C, seed=1)
    with KVTierLM(model, memory, layerwise=layerwise, cost="off") as lm:
        warm(lm, torch.cat([shared, prompt(9, seed=2)]))  # 5 full chunks + a partial tail
        ids = torch.cat([shared, prompt(23, seed=3)])  # same 5 chunks, another continuation
        with torch.no_grad():
            result = lm.prefill(ids)
    assert result.loaded_tokens == 5 * C and result.computed_tokens == 23
    memory.flush()  # the write-through of the new chunk borrows it from DRAM in the background
    assert not memory.tiers[0]._borrows  # every zero-copy DRAM view was released
    assert memory.tiers[0].stats.hits >= 5  # borrowed chunks are counted as hits (and touched in LRU)
    ref_logits, ref_cache = reference(model, ids)
    diff = (result.logits - ref_logits[:, 5 * C:]).abs().max().item()
    assert diff < 1e-4, diff
    for got, want in zip(result.cache.layers, ref_cache.layers, strict=True):
        assert got.keys.shape == want.keys.shape
        assert (got.keys - want.keys).abs().max().item() < 1e-4
        assert (got.values - want.values).abs().max().item() < 1e-4


def test_greedy_continuation_identical(model: LlamaForCausalLM, memory: ContextMemory) -> None:
    ids = prompt(4 * C + 5, seed=4)
    with KVTierLM(model, memory, cost="off") as lm:
        warm(lm, ids)
        tokens, result = lm.generate(ids, max_new_tokens=12)
    assert result.loaded_tokens == 4 * C
    assert tokens == greedy_reference(model, ids, 12)


def test_chunk_aligned_prompt_still_computes_a_token(model: LlamaForCausalLM, memory: ContextMemory) -> None:
    ids = prompt(3 * C, seed=5)
    with KVTierLM(model, memory, cost="off") as lm:
        warm(lm, ids)
        with torch.no_grad():
            result = lm.prefill(ids)
    assert result.loaded_tokens == 2 * C and result.computed_tokens == C  # never load the whole prompt
    ref_logits, _ = reference(model, ids)
    assert (result.logits - ref_logits[:, 2 * C:]).abs().max().item() < 1e-4


def test_stored_bytes_follow_the_layout(model: LlamaForCausalLM, memory: ContextMemory, layout: KVLayout) -> None:
    """Chunk payloads are (layers, K/V, tokens, heads, head_dim), as kvtier.layout documents."""
    ids = prompt(2 * C + 3, seed=6)
    with KVTierLM(model, memory) as lm:
        warm(lm, ids)
    _, ref_cache = reference(model, ids)
    keys = memory.keys_for(ids.numpy())
    out = np.empty(layout.chunk_bytes, dtype=np.uint8)
    assert memory.load(keys[1:2], [out]) == 1
    chunk = torch.from_numpy(out.view(np.float32).reshape(layout.chunk_shape))
    for layer_idx, layer in enumerate(ref_cache.layers):
        for part, states in enumerate((layer.keys, layer.values)):
            want = states[0, :, C:2 * C, :].permute(1, 0, 2).cpu()  # (tokens, heads, dim)
            assert torch.equal(chunk[layer_idx, part], want)


@pytest.mark.parametrize("in_place", [True, False])
def test_disk_chunks_after_a_restart(model: LlamaForCausalLM, layout: KVLayout, tmp_path: Path,
                                     in_place: bool) -> None:
    """After a restart the chunks come from disk: read straight into DRAM slots (promotion in
    place), or -- promotion off -- through staging in several groups of 2 chunks each."""
    ids = prompt(7 * C + 1, seed=7)
    mem = open_memory(layout, tmp_path)
    with KVTierLM(model, mem) as lm:
        warm(lm, ids)
    mem.close()
    mem = open_memory(layout, tmp_path, promotion="always" if in_place else "never")  # empty DRAM
    try:
        assert mem.lookup(mem.keys_for(ids.numpy())).tiers == (1,) * 7
        with KVTierLM(model, mem, staging_bytes=2 * layout.chunk_bytes, cost="off") as lm, torch.no_grad():
            result = lm.prefill(ids)
        assert result.loaded_tokens == 7 * C
        ref_logits, _ = reference(model, ids)
        assert (result.logits - ref_logits[:, 7 * C:]).abs().max().item() < 1e-4
        assert mem.tiers[1].stats.hits == 7
        assert mem.tiers[0].stats.promotions == (7 if in_place else 0)
        assert mem.lookup(mem.keys_for(ids.numpy())).tiers == ((0,) if in_place else (1,)) * 7
    finally:
        mem.close()


def test_corrupt_chunk_on_disk_falls_back_to_recompute(model: LlamaForCausalLM, layout: KVLayout,
                                                       tmp_path: Path) -> None:
    ids = prompt(6 * C + 4, seed=8)
    mem = open_memory(layout, tmp_path)
    with KVTierLM(model, mem) as lm:
        warm(lm, ids)
    keys = mem.keys_for(ids.numpy())
    mem.close()
    disk = DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30)
    path = disk.path_of(keys[3])
    disk.close()
    flip_byte(path, -5)  # bit rot in the payload of chunk 3

    mem = open_memory(layout, tmp_path)
    try:
        with KVTierLM(model, mem, cost="off") as lm:
            tokens, result = lm.generate(ids, max_new_tokens=6)
            lm.flush()
        assert result.loaded_tokens == 3 * C  # chunks 0-2 loaded, 3 was bad: recomputed from there
        assert mem.tiers[1].stats.corrupt == 1
        assert tokens == greedy_reference(model, ids, 6)
        with KVTierLM(model, mem, layerwise=False, cost="off") as lm, torch.no_grad():
            again = lm.prefill(ids)  # the recompute stored chunk 3 again
        assert again.loaded_tokens == 6 * C
        ref_logits, _ = reference(model, ids)
        assert (again.logits - ref_logits[:, 6 * C:]).abs().max().item() < 1e-4
    finally:
        mem.close()


def test_cost_model_decides_and_logs(model: LlamaForCausalLM, memory: ContextMemory, layout: KVLayout,
                                     caplog: pytest.LogCaptureFixture) -> None:
    ids = prompt(5 * C + 2, seed=9)
    prefill = PrefillCost(per_token_s=1e-3)
    slow = CostModel(links=(LinkCost(bandwidth_Bps=1.0), LinkCost(bandwidth_Bps=1.0)), prefill=prefill)
    fast = CostModel(links=(LinkCost(bandwidth_Bps=1e12), LinkCost(bandwidth_Bps=1e12)), prefill=prefill)
    ref_logits, _ = reference(model, ids)
    with KVTierLM(model, memory, cost=slow) as lm:
        warm(lm, ids)
        with caplog.at_level(logging.DEBUG, logger="kvtier.policy.cost"), torch.no_grad():
            result = lm.prefill(ids)
        assert result.plan is not None and result.plan.load_chunks == 0 and result.loaded_tokens == 0
        assert "fetch-or-recompute" in caplog.text and "load 0" in caplog.text
        assert (result.logits - ref_logits).abs().max().item() < 1e-4
        lm.cost = fast
        with torch.no_grad():
            result = lm.prefill(ids)
        assert result.plan is not None and result.plan.load_chunks == 5 and result.loaded_tokens == 5 * C
        assert (result.logits - ref_logits[:, 5 * C:]).abs().max().item() < 1e-4


def test_calibrate_prefill_fits_positive_costs(model: LlamaForCausalLM) -> None:
    # sizes far apart, so timing noise on a busy CI box cannot hide that time grows with tokens
    cost = calibrate_prefill(model, points=((0, 16), (0, 512), (0, 1000), (256, 256)), repeats=1)
    assert min(cost.fixed_s, cost.per_token_s, cost.per_token_ctx_s) >= 0
    assert cost.seconds(0, 1000) > cost.seconds(0, 16) > 0


def test_rejects_batches_and_empty_prompts(model: LlamaForCausalLM, memory: ContextMemory) -> None:
    with KVTierLM(model, memory, store=False) as lm:
        with pytest.raises(IntegrationError, match="batch size 1"):
            lm.prefill(torch.zeros((2, 8), dtype=torch.long))
        with pytest.raises(IntegrationError):
            lm.prefill([])


def test_layout_for_needs_a_model_id(model: LlamaForCausalLM) -> None:
    assert layout_for(model, tokens_per_chunk=C).model == "kvtier-test/tiny-random-llama"
    assert layout_for(model, model_id="x", tokens_per_chunk=C).num_kv_heads == 2


@pytest.mark.parametrize("awaits", ["tool", "user"])
def test_a_tool_pause_prefetches_the_sessions_chunks_from_disk(model: LlamaForCausalLM, layout: KVLayout,
                                                               tmp_path: Path, awaits: str) -> None:
    """``generate(session=, awaits="tool")`` tells the hierarchy; the session's chunks on disk come
    back into DRAM during the pause and serve its next call from there.  A user's turn: nothing."""
    ids = prompt(4 * C + 3, seed=12)
    first = open_memory(layout, tmp_path)
    with KVTierLM(model, first, cost="off") as lm:
        warm(lm, ids)
    first.close()
    tiers = [DramTier(layout, capacity_bytes=16 * layout.chunk_bytes),
             DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30, fsync=False)]
    mem = ContextMemory(layout, tiers, promotion="never", prefetch_share=0.5)  # a hit alone moves nothing up
    try:
        with KVTierLM(model, mem, cost="off") as lm:
            tokens, result = lm.generate(ids, max_new_tokens=3, session="agent-1", awaits=awaits)
            assert result.loaded_tokens == 4 * C and tokens == greedy_reference(model, ids, 3)
            assert mem.prefetch.drain(timeout=10)
            keys = mem.keys_for(ids.numpy())
            if awaits == "user":
                assert mem.lookup(keys).tiers == (1,) * 4 and mem.prefetch.stats.prefetched == 0
                return
            assert mem.lookup(keys).tiers == (0,) * 4 and mem.prefetch.stats.prefetched == 4
            nxt = torch.cat([ids, prompt(C, seed=13)])  # the next call: the answer and a tool result appended
            with torch.no_grad():
                again = lm.prefill(nxt, session="agent-1")
        assert again.loaded_tokens == 4 * C and mem.prefetch.stats.used == 4
    finally:
        mem.close()


def test_awaits_needs_a_session(model: LlamaForCausalLM, memory: ContextMemory) -> None:
    with KVTierLM(model, memory, cost="off", store=False) as lm, pytest.raises(IntegrationError, match="session"):
        lm.generate(prompt(C + 1, seed=14), max_new_tokens=1, awaits="tool")
