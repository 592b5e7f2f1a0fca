"""Compute + load split on a tiny random Llama (fp32, CPU; CUDA too where present).

The chunks sit on disk only (a fresh ``ContextMemory`` on the root a first one wrote), so the
hit is a slow-tier hit; every check compares against a full recompute by the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.hf import KVTierLM  # noqa: E402
from kvtier.integrations.hf_split import Fronts, Pacer, SplitOptions, run_split  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402
from tests.conftest import FakeClock, flip_byte  # noqa: E402
from tests.integrations.hf_helpers import C, greedy_reference, open_memory, prompt, reference, warm  # noqa: E402

N = 6  # cached chunks of the prompts below
TAIL = 7  # tokens after them


@pytest.fixture
def cold(model: LlamaForCausalLM, layout: KVLayout, tmp_path: Path) -> Iterator[tuple[ContextMemory, torch.Tensor]]:
    """A prompt whose N full chunks are on disk only (a restarted process, empty DRAM)."""
    ids = prompt(N * C + TAIL, seed=11)
    first = open_memory(layout, tmp_path)
    with KVTierLM(model, first) as lm:
        warm(lm, ids)
    first.close()
    mem = open_memory(layout, tmp_path)
    assert mem.lookup(mem.keys_for(ids.numpy())).tiers == (1,) * N
    yield mem, ids
    mem.close()


# --- the fronts, without threads ---------------------------------------------------------------
def test_a_late_loader_stops_at_the_compute_front() -> None:
    fronts = Fronts(16)
    assert fronts.claim_load(2) == (14, 16)
    fronts.delivered(14)
    assert fronts.claim_compute(8) == (0, 8)  # compute runs on while the loader is behind
    assert fronts.claim_load(2) == (12, 14)  # the loader claims the next group ...
    assert fronts.claim_compute(8) == (8, 12)  # ... which compute leaves to it (no wasted read)
    assert fronts.claim_compute(8) is None
    fronts.delivered(12)
    assert fronts.claim_load(2) is None and fronts.stopped  # nothing left between the fronts
    assert fronts.claim_compute(4) is None and (fronts.computed, fronts.loaded) == (12, 12)


def test_compute_goes_on_up_to_the_group_in_flight() -> None:
    fronts = Fronts(8)
    assert fronts.claim_load(2) == (6, 8)
    assert fronts.claim_compute(8) == (0, 6)  # the group [6, 8) is being read: stop before it
    assert fronts.claim_compute(8) is None
    fronts.delivered(6)
    assert fronts.claim_load(2) is None  # met
    assert (fronts.computed, fronts.loaded) == (6, 6)


def test_a_late_compute_meets_the_loader_earlier() -> None:
    fronts = Fronts(8)
    assert fronts.claim_compute(1) == (0, 1)
    for lo in (6, 4):
        assert fronts.claim_load(2) == (lo, lo + 2)
        fronts.delivered(lo)
    assert fronts.claim_load(2) == (3, 4)  # groups shrink to half the gap near the meeting ...
    fronts.delivered(3)
    assert fronts.claim_load(2) == (2, 3)
    fronts.delivered(2)
    assert fronts.claim_load(2) == (1, 2)  # ... and never go below the compute front
    fronts.delivered(1)
    assert fronts.claim_load(2) is None and fronts.claim_compute(4) is None


def test_groups_in_flight_are_claimed_downwards_and_a_failure_gives_up_those_below() -> None:
    fronts = Fronts(16)
    assert fronts.claim_load(4) == (12, 16)
    assert fronts.claim_load(4) == (8, 12)  # a second group read at once, below the first
    assert fronts.claim_compute(16) == (0, 8)  # compute stops at the lowest group in flight
    fronts.delivered(12)  # delivered in order, from the top
    fronts.failed(9)  # the next one, [8, 12), has a bad chunk at 9
    assert (fronts.loaded, fronts.failed_at, fronts.reading) == (12, 9, 12)
    assert fronts.claim_load(4) is None
    assert fronts.claim_compute(16) == (8, 12)  # the compute covers the group given up


def test_planned_mode_keeps_the_floor_and_a_failure_moves_the_compute_on() -> None:
    fronts = Fronts(10, floor=5)
    assert fronts.claim_compute(8, until=5) == (0, 5)
    assert fronts.claim_compute(8, until=5) is None
    assert fronts.claim_load(2) == (8, 10)
    fronts.delivered(8)
    assert fronts.claim_load(2) == (7, 8)  # half the 3 chunks left above the floor
    fronts.failed(7)  # chunk 7 is corrupt: [5, 8) stays unloaded
    assert fronts.claim_load(2) is None and fronts.failed_at == 7 and fronts.loaded == 8
    assert fronts.claim_compute(8) == (5, 8)  # compute takes the failed chunk (and the gap) over


def test_the_pacer_gives_the_compute_its_share_of_what_is_left() -> None:
    """Steps sized ``gap x r_c / (r_c + r_l)``, the gap net of what the loader reads while the
    GPU works off its queue; 0 once the loader should close the gap on its own."""
    clock, fronts = FakeClock(), Fronts(100)
    pacer = Pacer(fronts, clock=clock)
    assert pacer.size(16) == 16  # nothing measured: a full step
    assert fronts.claim_compute(20) == (0, 20)
    assert fronts.claim_load(20) == (80, 100)
    clock.now = 1.0
    pacer.computed(20)  # the GPU: 20 chunks/s
    assert pacer.size(16) == 16  # the loader has delivered nothing yet
    fronts.delivered(80)  # the loader: 20 chunks in 1 s
    # GPU idle, 60 chunks unclaimed, equal rates: 30 each, capped at the step
    assert pacer.size(16) == 16 and pacer.size(64) == 30
    assert fronts.claim_compute(20) == (20, 40)  # queued, not done: the loader reads 20 meanwhile
    assert pacer.size(64) == 10  # (60 - 20 - 20) / 2
    assert fronts.claim_compute(20) == (40, 60)  # 40 queued: the loader reaches the front first
    assert pacer.size(64) == 0
    clock.now = 3.0
    pacer.computed(60)  # all done; the loader (20 chunks in 3 s) is now the slow side
    assert pacer.size(64) == int(20 * 20 / (20 + 20 / 3))


def test_split_options_are_checked() -> None:
    with pytest.raises(IntegrationError, match="mode"):
        SplitOptions(mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(IntegrationError, match="step_tokens"):
        SplitOptions(step_tokens=0)
    with pytest.raises(IntegrationError, match="reads_in_flight"):
        SplitOptions(reads_in_flight=0)
    with pytest.raises(IntegrationError, match="first_step_share"):
        SplitOptions(first_step_share=1.5)


# --- the executor on a real model and disk -------------------------------------------------------
def split_prefill(model: LlamaForCausalLM, lm: KVTierLM, ids: torch.Tensor, c: int,
                  options: SplitOptions) -> tuple[torch.Tensor, int, int | None]:
    """run_split at a planned meeting point, then the suffix: (logits, computed chunks, failed_at)."""
    keys = lm.memory.keys_for(ids.numpy())
    with contextlib.ExitStack() as borrows, ThreadPoolExecutor(1) as pool, torch.no_grad():
        split = run_split(model, lm.memory, lm.engine, ids, keys, compute_chunks=c, end=N, options=options,
                          borrows=borrows, pool=pool)
        out = model(input_ids=ids[N * C:].to(model.device)[None], past_key_values=split.cache, use_cache=True)
        if split.load is not None:
            split.load.wait_host()
    assert split.computed_chunks + (N - split.computed_chunks) == split.end == N
    return out.logits, split.computed_chunks, split.failed_at


@pytest.mark.parametrize("c", [0, N // 2, N])
def test_split_at_any_point_matches_recompute(model: LlamaForCausalLM, cold: tuple[ContextMemory, torch.Tensor],
                                              c: int) -> None:
    mem, ids = cold
    with KVTierLM(model, mem, store=False, cost="off") as lm:
        logits, computed, failed = split_prefill(model, lm, ids, c, SplitOptions(mode="planned", step_tokens=C,
                                                                                 group_chunks=2))
    assert computed == c and failed is None
    assert mem.tiers[1].stats.hits == N - c  # only the loaded region was read
    ref_logits, _ = reference(model, ids)
    assert (logits - ref_logits[:, N * C:]).abs().max().item() < 1e-4


@pytest.mark.parametrize(("share", "forwards"), [(0.0, 4), (0.5, 3), (1.0, 1)])
def test_the_heads_first_step_covers_its_share_of_the_plan(model: LlamaForCausalLM,
                                                           cold: tuple[ContextMemory, torch.Tensor],
                                                           share: float, forwards: int) -> None:
    mem, ids = cold
    calls: list[int] = []

    def counting(**kwargs: object) -> object:
        calls.append(1)
        return model(**kwargs)

    with KVTierLM(model, mem, store=False, cost="off") as lm:
        keys = lm.memory.keys_for(ids.numpy())
        options = SplitOptions(mode="planned", step_tokens=C, group_chunks=1, first_step_share=share)
        with contextlib.ExitStack() as borrows, ThreadPoolExecutor(1) as pool, torch.no_grad():
            split = run_split(counting, lm.memory, lm.engine, ids, keys, compute_chunks=4, end=N, options=options,
                              borrows=borrows, pool=pool)
            out = model(input_ids=ids[N * C:].to(model.device)[None], past_key_values=split.cache, use_cache=True)
            assert split.load is not None
            split.load.wait_host()
    assert len(calls) == forwards and split.computed_chunks == 4
    ref_logits, _ = reference(model, ids)
    assert (out.logits - ref_logits[:, N * C:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("reads_in_flight", [1, 3])
def test_a_corrupt_chunk_in_the_loaded_region_is_computed(model: LlamaForCausalLM, layout: KVLayout,
                                                          cold: tuple[ContextMemory, torch.Tensor],
                                                          tmp_path: Path, reads_in_flight: int) -> None:
    """Reads of the groups below the corrupt one may be in flight: none of them is queued."""
    mem, ids = cold
    keys = mem.keys_for(ids.numpy())
    disk = DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30)
    flip_byte(disk.path_of(keys[4]), -5)  # bit rot in chunk 4, inside the loaded region [2, 6)
    disk.close()
    with KVTierLM(model, mem, store=False, cost="off") as lm:
        options = SplitOptions(mode="planned", step_tokens=C, group_chunks=1, reads_in_flight=reads_in_flight)
        logits, computed, failed = split_prefill(model, lm, ids, 2, options)
    assert failed == 4 and computed == 5  # chunk 5 loaded, 4 failed: computed up to it
    assert mem.tiers[1].stats.corrupt == 1
    ref_logits, _ = reference(model, ids)
    assert (logits - ref_logits[:, N * C:]).abs().max().item() < 1e-4


def slow_disk_cost(layout: KVLayout) -> CostModel:
    """Figures under which a split wins: one chunk's read costs about one chunk's prefill."""
    per_chunk = 16e-3
    return CostModel(links=(LinkCost(bandwidth_Bps=1e12), LinkCost(bandwidth_Bps=layout.chunk_bytes / per_chunk)),
                     prefill=PrefillCost(per_token_s=per_chunk / C))


@pytest.mark.parametrize("mode", ["adaptive", "planned"])
def test_prefill_executes_the_cost_models_split(model: LlamaForCausalLM, layout: KVLayout,
                                                cold: tuple[ContextMemory, torch.Tensor], mode: str) -> None:
    mem, ids = cold
    options = SplitOptions(mode=mode, step_tokens=C, group_chunks=1)  # type: ignore[arg-type]
    with KVTierLM(model, mem, cost=slow_disk_cost(layout), split=options) as lm:
        tokens, result = lm.generate(ids, max_new_tokens=8)
        lm.flush()
    plan = result.plan
    assert plan is not None and plan.is_split and 0 < plan.compute_chunks < plan.load_chunks == N
    # wherever they met (adaptive: wherever the threads' timing put it), the fronts add up
    assert result.head_tokens + result.loaded_tokens == N * C
    assert result.computed_tokens == len(ids) - result.loaded_tokens
    if mode == "planned":
        assert result.head_tokens == plan.compute_chunks * C
    assert tokens == greedy_reference(model, ids, 8)
    with KVTierLM(model, mem, split=None, cost=slow_disk_cost(layout)) as lm:
        assert lm.cost is not None
        plain = lm.cost.plan((1,) * N, total_tokens=len(ids), tokens_per_chunk=C, chunk_bytes=layout.chunk_bytes)
    assert not plain.is_split  # split=None: the cost model's pure decisions only


def test_a_split_with_a_corrupt_chunk_stores_it_again(model: LlamaForCausalLM, layout: KVLayout,
                                                      cold: tuple[ContextMemory, torch.Tensor],
                                                      tmp_path: Path) -> None:
    mem, ids = cold
    keys = mem.keys_for(ids.numpy())
    disk = DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30)
    flip_byte(disk.path_of(keys[N - 1]), -5)  # the last chunk: the loader's first read fails
    disk.close()
    options = SplitOptions(mode="planned", step_tokens=C, group_chunks=1)
    with KVTierLM(model, mem, cost=slow_disk_cost(layout), split=options) as lm:
        with torch.no_grad():
            result = lm.prefill(ids)
        lm.flush()
    assert result.loaded_tokens == 0 and result.head_tokens == N * C  # all computed
    ref_logits, _ = reference(model, ids)
    assert (result.logits - ref_logits[:, N * C:]).abs().max().item() < 1e-4
    assert mem.lookup(keys).num_chunks == N  # the recomputed chunk was stored again


def test_a_split_without_a_dram_tier_reads_into_plain_buffers(model: LlamaForCausalLM, layout: KVLayout,
                                                             cold: tuple[ContextMemory, torch.Tensor],
                                                             tmp_path: Path) -> None:
    _, ids = cold
    mem = ContextMemory(layout, [DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30, fsync=False)])
    try:
        options = SplitOptions(mode="planned", step_tokens=C, group_chunks=2)
        two = slow_disk_cost(layout)
        disk_only = CostModel(links=two.links[1:], prefill=two.prefill)  # the disk is level 0 here
        with KVTierLM(model, mem, cost=disk_only, split=options, store=False) as lm, torch.no_grad():
            result = lm.prefill(ids)
        assert result.plan is not None and result.plan.is_split
        assert result.loaded_tokens == (N - result.plan.compute_chunks) * C > 0
        ref_logits, _ = reference(model, ids)
        assert (result.logits - ref_logits[:, N * C:]).abs().max().item() < 1e-4
    finally:
        mem.close()
