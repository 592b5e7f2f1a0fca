"""The G1<->G2 copy engine: coalescing, pool addressing, load/gather byte order.

CPU-side logic runs everywhere; the same round trips run on CUDA (pinned pool, side streams,
per-layer events) where a GPU is present and are skipped otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.tiers.cuda import CopyEngine, HostPool, Run, coalesce  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402
from tests.conftest import make_keys  # noqa: E402

LAYOUT = KVLayout(model="test/cuda", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32",
                  tokens_per_chunk=4)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA GPU"))]


def test_coalesce_groups_consecutive_slots() -> None:
    assert coalesce([]) == []
    assert coalesce([7]) == [Run(0, 7, 1)]
    assert coalesce([4, 5, 6, 9, None, 10, 11]) == [Run(0, 4, 3), Run(3, 9, 1), Run(5, 10, 2)]
    assert coalesce([3, 2, 1]) == [Run(0, 3, 1), Run(1, 2, 1), Run(2, 1, 1)]  # descending: no run
    assert coalesce([None, None]) == []


@pytest.mark.parametrize("as_torch", [False, True])
def test_host_pool_maps_views_back_to_slots(as_torch: bool) -> None:
    raw = np.arange(10 * 16, dtype=np.uint8)
    pool = HostPool(torch.from_numpy(raw) if as_torch else raw, slot_bytes=16)
    assert pool.slot(raw[32:48]) == 2
    assert pool.slot(raw[33:49]) is None  # not slot-aligned
    assert pool.slot(raw[32:40]) is None  # not a whole slot
    assert pool.slot(np.zeros(16, dtype=np.uint8)) is None  # outside the pool
    view = raw[48:64].view()
    view.flags.writeable = False  # DRAM borrows are read-only
    tensor = pool.as_tensor(view)
    assert tensor.data_ptr() == raw[48:].__array_interface__["data"][0]  # aliased, not copied
    assert torch.equal(tensor, torch.arange(48, 64, dtype=torch.uint8))
    outside = np.arange(16, dtype=np.uint8)
    outside.flags.writeable = False
    assert torch.equal(HostPool(None, 16).as_tensor(outside), torch.arange(16, dtype=torch.uint8))
    with pytest.raises(IntegrationError):
        pool.as_tensor(raw[::2])


def random_kv(n_tokens: int, device: str, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) of shape (1, heads, tokens, head_dim), the transformers layout."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, LAYOUT.num_kv_heads, n_tokens, LAYOUT.head_dim)
    return [(torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device))
            for _ in range(LAYOUT.num_layers)]


@pytest.mark.parametrize("device", DEVICES)
def test_gather_writes_the_documented_byte_order(device: str) -> None:
    engine = CopyEngine(LAYOUT, device, staging_bytes=8 * LAYOUT.chunk_bytes)
    kv = random_kv(3 * LAYOUT.tokens_per_chunk + 2, device)
    chunks, event = engine.gather(kv, LAYOUT.tokens_per_chunk, 2)  # chunks 1 and 2
    views = engine.to_host(chunks, event)
    c = LAYOUT.tokens_per_chunk
    for i, view in enumerate(views):
        payload = torch.from_numpy(view.view(np.float32).reshape(LAYOUT.chunk_shape))
        for layer, parts in enumerate(kv):
            for part in range(2):
                want = parts[part][0, :, (1 + i) * c:(2 + i) * c].permute(1, 0, 2).cpu()  # (C, H, D)
                assert torch.equal(payload[layer, part], want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layerwise", "copy2d"), [(True, None), (True, False), (False, None)])
def test_load_from_dram_pool_round_trips(device: str, layerwise: bool, copy2d: bool | None) -> None:
    """Byte-exact loads in every mode: per-layer 2-D copies, per-layer per-chunk copies, bulk."""
    dram = DramTier(LAYOUT, capacity_bytes=16 * LAYOUT.chunk_bytes)
    engine = CopyEngine(LAYOUT, device, pool=dram.pool, staging_bytes=8 * LAYOUT.chunk_bytes, copy2d=copy2d)
    kv = random_kv(5 * LAYOUT.tokens_per_chunk, device, seed=1)
    keys = make_keys(LAYOUT, 5)
    views = engine.to_host(*engine.gather(kv, 0, 5))
    assert [dram.put(k, v) for k, v in zip(keys, views, strict=True)] == [True] * 5
    dram.delete(keys[2])  # a hole: chunk 2 goes elsewhere, so slots are 0,1,3,4 + a new one
    assert dram.put(keys[2], views[2])
    order = [keys[4], keys[0], keys[1], keys[2], keys[3]]  # a load order that breaks some runs
    borrowed = []
    for key in order:
        with dram.borrow(key) as view:
            assert view is not None
            borrowed.append(view)  # the pool stays allocated; nothing else writes during the test
    extra = 3  # rows after the loaded chunks: the consumer's own (computed) tokens
    load = engine.start_load(5, tokens=5 * LAYOUT.tokens_per_chunk + extra, layerwise=layerwise)
    load.copy_layers(borrowed)
    load.finish()
    c = LAYOUT.tokens_per_chunk
    src_index = [4, 0, 1, 2, 3]
    for layer in range(LAYOUT.num_layers):
        load.ready(layer)
        got = load.tensors(layer)  # (K, V), each (tokens, heads, head_dim)
        for part in range(2):
            assert got[part].shape == (5 * c + extra, LAYOUT.num_kv_heads, LAYOUT.head_dim)
            assert got[part].is_contiguous()
            for pos, src in enumerate(src_index):
                want = kv[layer][part][0, :, src * c:(src + 1) * c].permute(1, 0, 2)  # (C, H, D)
                assert torch.equal(got[part][pos * c:(pos + 1) * c], want)
    load.wait_host()


def test_a_layerwise_load_queues_layers_as_the_consumer_reaches_them() -> None:
    """Copies (and the tensors they land in) are queued LOOKAHEAD layers ahead of the consumer."""
    if not torch.cuda.is_available():
        pytest.skip("layer-wise loads are CUDA-only (CPU copies are synchronous)")
    dram = DramTier(LAYOUT, capacity_bytes=4 * LAYOUT.chunk_bytes)
    engine = CopyEngine(LAYOUT, "cuda", pool=dram.pool)
    load = engine.start_load(1, layerwise=True)
    load.copy_layers([dram.pool.numpy()[:LAYOUT.chunk_bytes]])
    assert load._bufs == [None] * LAYOUT.num_layers  # nothing allocated nor queued yet
    load.finish()
    assert load._queued == min(load.LOOKAHEAD, LAYOUT.num_layers)
    load.ready(0)
    assert load._queued == min(1 + load.LOOKAHEAD, LAYOUT.num_layers)
    load.wait_host()
    assert load._queued == LAYOUT.num_layers and all(e is not None for e in load._events)


def test_the_strided_copy_call_lands_each_part_in_its_rows() -> None:
    """The ``cudaMemcpy2DAsync`` arguments, checked on CPU with a memmove stand-in of the same
    contract (rows of ``width`` bytes, source rows ``spitch`` apart, destination ``dpitch``)."""
    import ctypes

    def memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: object) -> None:
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

    dram = DramTier(LAYOUT, capacity_bytes=8 * LAYOUT.chunk_bytes, pin_memory=False)
    engine = CopyEngine(LAYOUT, "cpu", pool=dram.pool)
    engine.memcpy2d = memcpy2d  # type: ignore[assignment]
    kv = random_kv(4 * LAYOUT.tokens_per_chunk, "cpu", seed=3)
    keys = make_keys(LAYOUT, 4)
    views = engine.to_host(*engine.gather(kv, 0, 4))
    assert all(dram.put(k, v) for k, v in zip(keys, views, strict=True))
    borrowed = []
    for key in keys:
        with dram.borrow(key) as view:
            assert view is not None
            borrowed.append(view)
    assert coalesce([engine.host_pool.slot(v) for v in borrowed]) == [Run(0, 0, 4)]  # one run: one call per part
    c = LAYOUT.tokens_per_chunk
    load = engine.start_load(4, tokens=4 * c + 1, layerwise=False)
    load.copy_layers(borrowed)
    load.finish()
    for layer in range(LAYOUT.num_layers):
        load.ready(layer)
        for part, got in enumerate(load.tensors(layer)):
            assert torch.equal(got[:4 * c], kv[layer][part][0].permute(1, 0, 2))  # (T, H, D)
    load.wait_host()


def test_a_load_must_fit_its_prompt() -> None:
    engine = CopyEngine(LAYOUT, "cpu")
    with pytest.raises(IntegrationError, match="fit"):
        engine.start_load(2, tokens=LAYOUT.tokens_per_chunk)


def test_engine_refuses_more_chunks_than_staging() -> None:
    engine = CopyEngine(LAYOUT, "cpu", staging_bytes=2 * LAYOUT.chunk_bytes)
    assert engine.group_chunks == 2
    chunks, _ = engine.gather(random_kv(3 * LAYOUT.tokens_per_chunk, "cpu"), 0, 3)
    with pytest.raises(IntegrationError, match="staging"):
        engine.to_host(chunks, None)


def test_engine_rejects_wrong_layer_count() -> None:
    engine = CopyEngine(LAYOUT, "cpu")
    with pytest.raises(IntegrationError, match="layers"):
        engine.gather(random_kv(4, "cpu")[:2], 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(IntegrationError, match="CUDA is not available"):
        CopyEngine(LAYOUT, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pool_is_pinned_and_copies_are_asynchronous() -> None:
    dram = DramTier(LAYOUT, capacity_bytes=4 * LAYOUT.chunk_bytes)
    assert dram.pinned and dram.pool.is_pinned()
    engine = CopyEngine(LAYOUT, "cuda", pool=dram.pool)
    assert engine.store_staging.is_pinned() and engine.load_staging.is_pinned()
    load = engine.start_load(1, layerwise=True)
    assert load.layerwise and load._events == [None] * LAYOUT.num_layers
    load.copy_layers([dram.pool.numpy()[:LAYOUT.chunk_bytes]])
    load.wait_host()
    assert all(e is not None for e in load._events)  # one event per layer
