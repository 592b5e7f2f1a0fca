"""Gather/scatter between vLLM's CPU paged KV layout and kvtier chunks, against a slow reference."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier.integrations.vllm_config import PagedGeometry  # noqa: E402
from kvtier.integrations.vllm_paged import PagedKV, geometry_of  # noqa: E402

BS, HEADS, HD, LAYERS, NUM_BLOCKS = 4, 2, 8, 3, 16


def _caches() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"layer{i}": torch.randn(NUM_BLOCKS, HEADS, BS, 2 * HD) for i in range(LAYERS)}


def _reference_chunk(caches: dict[str, torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """(layers, 2, tokens, heads, hd), token by token, as the CPU backend reads K and V."""
    out = torch.empty(LAYERS, 2, len(blocks) * BS, HEADS, HD)
    for layer, kv in enumerate(caches.values()):
        view = kv.view(NUM_BLOCKS, HEADS, 2 * BS, HD)  # the backend's own view
        key_cache, value_cache = view.chunk(2, dim=2)
        for t in range(len(blocks) * BS):
            b, off = blocks[t // BS], t % BS
            out[layer, 0, t] = key_cache[b, :, off]
            out[layer, 1, t] = value_cache[b, :, off]
    return out


def test_geometry_is_read_from_the_tensors() -> None:
    assert geometry_of(_caches(), BS) == PagedGeometry(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HD,
                                                      dtype="float32", block_size=BS)


def test_gather_matches_the_backend_layout() -> None:
    caches = _caches()
    paged = PagedKV(caches, geometry_of(caches, BS), tokens_per_chunk=2 * BS)
    stage = paged.gather([5, 2, 9, 7])  # two chunks of two blocks
    for i, blocks in enumerate(([5, 2], [9, 7])):
        chunk = stage[i].reshape(LAYERS, 2, 2 * BS, HEADS, HD)
        assert torch.equal(chunk, _reference_chunk(caches, blocks))
    payloads = PagedKV.payloads(stage)
    assert payloads[0].nbytes == LAYERS * 2 * 2 * BS * HEADS * HD * 4 and payloads[0].base is not None


def test_scatter_roundtrip_and_skip() -> None:
    src = _caches()
    paged_src = PagedKV(src, geometry_of(src, BS), tokens_per_chunk=2 * BS)
    stage = paged_src.gather([1, 3, 4, 6]).clone()
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    paged_dst = PagedKV(dst, geometry_of(dst, BS), tokens_per_chunk=2 * BS)
    paged_dst.scatter(stage, [10, -1, 12, 13])  # block slot 1 is already computed: left alone
    for name in src:
        assert torch.equal(dst[name][10], src[name][1])
        assert torch.equal(dst[name][12], src[name][4]) and torch.equal(dst[name][13], src[name][6])
        assert not dst[name][11].any()  # untouched


def test_gather_into_and_scatter_from_chunk_buffers_in_runs() -> None:
    """Chunk buffers as DRAM slots hand them out: two adjacent (one run), one elsewhere, one None."""
    import numpy as np

    src = _caches()
    paged = PagedKV(src, geometry_of(src, BS), tokens_per_chunk=2 * BS)
    chunk_bytes = LAYERS * 2 * 2 * BS * HEADS * HD * 4
    pool = np.zeros(6 * chunk_bytes, np.uint8)
    slot = [pool[k * chunk_bytes:(k + 1) * chunk_bytes] for k in range(6)]
    views = [slot[2], slot[3], None, slot[0]]
    assert [(first, t.shape[0]) for first, t in paged._runs(views)] == [(0, 2), (3, 1)]
    block_ids = [1, 3, 4, 6, 8, 9, 10, 11]
    paged.gather_into(views, block_ids)
    reference = PagedKV.payloads(paged.gather(block_ids).clone())
    for view, want in zip(views, reference, strict=True):
        if view is not None:
            assert np.array_equal(view, want)
    assert not slot[1].any() and not slot[4].any()  # nothing written outside the views

    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    paged_dst = PagedKV(dst, geometry_of(dst, BS), tokens_per_chunk=2 * BS)
    read_only = [v.view() for v in (slot[2], slot[3], slot[0])]
    for v in read_only:
        v.flags.writeable = False
    paged_dst.scatter_from(read_only, [12, 13, 14, 15, 2, -1])
    for name in src:
        assert torch.equal(dst[name][12], src[name][1]) and torch.equal(dst[name][15], src[name][6])
        assert torch.equal(dst[name][2], src[name][10])
        assert not dst[name][3].any()


def test_unsupported_layout_is_refused() -> None:
    from kvtier.errors import IntegrationError

    with pytest.raises(IntegrationError, match="unsupported KV cache tensor shape"):
        geometry_of({"l0": torch.zeros(2, NUM_BLOCKS, BS, HEADS, HD)}, BS)
