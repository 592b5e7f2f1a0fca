"""Gather/scatter for vLLM's CUDA KV layouts (``packed``: logical (B, H, N, parts*D), any stride
order, cross-layer views, MLA) against a reference that reads K and V as the backends do.

Runs on CPU tensors everywhere and, where CUDA is up, on the GPU path (side streams, device
staging, pinned host buffers) too: the same bytes must come out.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.integrations.vllm_config import PagedGeometry  # noqa: E402
from kvtier.integrations.vllm_paged import PagedKV, geometry_of  # noqa: E402

BS, HEADS, HD, LAYERS, NB, M = 4, 2, 8, 3, 24, 2  # m = 2 blocks per chunk
# (device, PagedKV cuda_copy): on CUDA every copy mode (the fused Triton kernel direct to pinned host
# memory or through device staging, and the per-layer torch ops) must move the same bytes
DEVICES = [("cpu", "auto")] + ([("cuda", mode) for mode in ("fused", "torch")]
                               if torch.cuda.is_available() else [])


def _caches(layout: str, device: str) -> dict[str, torch.Tensor]:
    """Per-layer tensors in logical (B, H, N, C) order with the physical order of ``layout``."""
    g = torch.Generator().manual_seed(0)
    parts = 1 if layout == "mla" else 2
    heads = 1 if layout == "mla" else HEADS
    c = parts * HD
    if layout in ("hnd", "mla"):  # LBHNC: contiguous per layer
        return {f"l{i}": torch.randn(NB, heads, BS, c, generator=g).to(device) for i in range(LAYERS)}
    if layout == "nhd":  # LBNHC: physical (B, N, H, C)
        return {f"l{i}": torch.randn(NB, BS, heads, c, generator=g).to(device).transpose(1, 2)
                for i in range(LAYERS)}
    assert layout == "cross"  # BLNHC: one allocation, blocks outermost, layers inside
    whole = torch.randn(NB, LAYERS, BS, heads, c, generator=g).to(device)
    return {f"l{i}": whole[:, i].transpose(1, 2) for i in range(LAYERS)}


def _reference(caches: dict[str, torch.Tensor], blocks: list[int], parts: int) -> torch.Tensor:
    """(layers, parts, tokens, heads, D) as FlashAttention reads it: transpose(1, 2).split(D, -1)."""
    heads = next(iter(caches.values())).shape[1]
    out = torch.empty(LAYERS, parts, len(blocks) * BS, heads, HD)
    for layer, kv in enumerate(caches.values()):
        split = kv.cpu().transpose(1, 2).split(HD, dim=-1)  # parts x (B, N, H, D)
        for t in range(len(blocks) * BS):
            for p in range(parts):
                out[layer, p, t] = split[p][blocks[t // BS], t % BS]
    return out


@pytest.mark.parametrize(("device", "cuda_copy"), DEVICES)
@pytest.mark.parametrize("layout", ["hnd", "nhd", "cross", "mla"])
def test_roundtrip_with_random_tables_shared_blocks_and_skips(layout: str, device: str, cuda_copy: str) -> None:
    parts = 1 if layout == "mla" else 2
    geometry = PagedGeometry(num_layers=LAYERS, num_kv_heads=1 if layout == "mla" else HEADS, head_dim=HD,
                             dtype="float32", block_size=BS, parts=parts)
    src = _caches(layout, device)
    paged = PagedKV(src, geometry, tokens_per_chunk=M * BS, fmt="packed", group_chunks=2, cuda_copy=cuda_copy)
    rng = random.Random(1)
    table = rng.sample(range(NB), 6)  # 3 chunks of 2 random blocks
    table[3] = table[0]  # a block shared by two chunks (prefix caching)
    stage = paged.gather(table, paged.record())
    for i in range(3):
        want = _reference(src, table[i * M:(i + 1) * M], parts)
        assert torch.equal(stage[i].reshape(want.shape), want), f"chunk {i}"
    if device == "cuda":  # pinned chunk buffers, as the DRAM tier hands out
        host = [torch.from_numpy(np.array(p)).pin_memory().numpy() for p in paged.payloads(stage)]
    else:
        host = [np.array(p) for p in paged.payloads(stage)]  # plain host buffers, as a lower tier hands out
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    back = PagedKV(dst, geometry, tokens_per_chunk=M * BS, fmt="packed", group_chunks=2, cuda_copy=cuda_copy)
    targets = rng.sample(range(NB), 6)
    targets[1] = -1  # computed by vLLM already: left alone
    back.scatter_from(host, targets, back.record())
    if device == "cuda":
        torch.cuda.synchronize()
    for name in src:
        for j, b in enumerate(targets):
            if b >= 0:
                assert torch.equal(dst[name][b].cpu(), src[name][table[j]].cpu()), (name, j)
        untouched = [b for b in range(NB) if b not in targets]
        assert not dst[name][untouched].any()


def test_an_unknown_cuda_copy_mode_is_refused() -> None:
    geometry = PagedGeometry(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HD, dtype="float32", block_size=BS,
                             parts=2)
    with pytest.raises(IntegrationError, match="cuda_copy"):
        PagedKV(_caches("hnd", "cpu"), geometry, tokens_per_chunk=M * BS, fmt="packed", cuda_copy="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="layer-wise loads are a CUDA path")
@pytest.mark.parametrize("layout", ["hnd", "nhd", "cross", "mla"])
def test_layerwise_scatter_fires_one_event_per_layer_and_moves_the_same_bytes(layout: str) -> None:
    parts = 1 if layout == "mla" else 2
    geometry = PagedGeometry(num_layers=LAYERS, num_kv_heads=1 if layout == "mla" else HEADS, head_dim=HD,
                             dtype="float32", block_size=BS, parts=parts)
    src = _caches(layout, "cuda")
    paged = PagedKV(src, geometry, tokens_per_chunk=M * BS, fmt="packed", group_chunks=2)
    table = random.Random(2).sample(range(NB), 8)
    stage = paged.gather(table, paged.record())
    host = [torch.from_numpy(np.array(p)).pin_memory().numpy() for p in paged.payloads(stage)]
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    back = PagedKV(dst, geometry, tokens_per_chunk=M * BS, fmt="packed", group_chunks=2)
    targets = random.Random(3).sample(range(NB), 8)
    targets[5] = -1
    events = back.scatter_pending(host, targets, back.record(), layerwise=True)
    assert events is not None and len(events) == LAYERS
    events[-1].synchronize()
    for name in src:
        for j, b in enumerate(targets):
            if b >= 0:
                assert torch.equal(dst[name][b], src[name][table[j]]), (name, j)


@pytest.mark.parametrize(("device", "cuda_copy"), DEVICES)
def test_vllm_026_flash_attn_3_layout_bf16(device: str, cuda_copy: str) -> None:
    """vLLM 0.26's FLASH_ATTN (FA3) on Hopper: one bf16 tensor per layer, logical (num_blocks, heads,
    block_size=16, 2*D) with K|V packed in the last dimension, NHD in memory (FlashAttentionBackend.
    get_kv_cache_shape / get_kv_cache_stride_order (0, 2, 1, 3)), as register_kv_caches hands it."""
    bs, heads, hd, layers, nb, m = 16, 4, 8, 2, 12, 2
    g = torch.Generator().manual_seed(5)
    src = {f"model.layers.{i}.self_attn.attn": torch.randn(nb, bs, heads, 2 * hd, generator=g)
           .to(torch.bfloat16).to(device).transpose(1, 2) for i in range(layers)}  # logical (B, H, N, 2D)
    first = next(iter(src.values()))
    assert first.shape == (nb, heads, bs, 2 * hd) and first.stride() == (bs * heads * 2 * hd, 2 * hd, heads * 2 * hd, 1)
    geometry = PagedGeometry(num_layers=layers, num_kv_heads=heads, head_dim=hd, dtype="bfloat16", block_size=bs,
                             parts=2)
    if device == "cuda":  # read off the tensors (CPU tensors must be the CPU backend's contiguous ones)
        assert geometry_of(src, bs) == geometry
    fmt = None if device == "cuda" else "packed"  # on CUDA: the format PagedKV picks itself
    paged = PagedKV(src, geometry, tokens_per_chunk=m * bs, fmt=fmt, cuda_copy=cuda_copy)
    assert paged.fmt == "packed-nh"
    table = [7, 2, 9, 0]
    stage = paged.gather(table, paged.record())
    for i in range(2):  # chunk (layers, parts, tokens, heads, D): K is [..., :D], V [..., D:] of each token
        for layer, kv in enumerate(src.values()):
            nhd = kv.cpu().transpose(1, 2)  # (B, N, H, 2D)
            want = torch.cat([nhd[b] for b in table[i * m:(i + 1) * m]])  # (tokens, H, 2D)
            got = stage[i].reshape(layers, 2, m * bs, heads, hd)[layer]
            assert torch.equal(got[0].cpu(), want[..., :hd]) and torch.equal(got[1].cpu(), want[..., hd:])
    host = [np.array(p) for p in paged.payloads(stage)]
    if device == "cuda":
        host = [torch.from_numpy(h).pin_memory().numpy() for h in host]
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    back = PagedKV(dst, geometry, tokens_per_chunk=m * bs, fmt=fmt, cuda_copy=cuda_copy)
    back.scatter_from(host, [3, 5, -1, 11], back.record())
    if device == "cuda":
        torch.cuda.synchronize()
    for name in src:
        for j, b in enumerate([3, 5, -1, 11]):
            if b >= 0:
                assert torch.equal(dst[name][b].cpu(), src[name][table[j]].cpu()), (name, j)
        assert not dst[name][[i for i in range(nb) if i not in (3, 5, 11)]].any()
