"""The connector's CUDA data path: one fused kernel per copy, between vLLM's paged blocks and chunks.

A save gathers a request's blocks of *every layer* into kvtier's chunk layout
``(layers, parts, tokens, heads, head_dim)``; a load scatters chunks back into blocks.  Done with
torch ops that is one ``index_select`` + one permuting copy per layer and group of chunks: at 4K
tokens of a 32-layer model about 300 kernel launches, ~2 ms of fixed cost on an H200 before the
first byte crosses PCIe (0.69x raw at 4K, run 9 in ``benchmarks/gpu/results``).  Here one Triton
kernel does a whole call: program ``(j, l*parts + p)`` copies block slot ``j``'s part ``p`` of
layer ``l`` (``block_size * heads * head_dim`` elements), reading the layer's tensor through a
table of per-layer base addresses (vLLM allocates each layer separately, or as strided views of one
cross-layer allocation: the tensor's own strides cover both) and each chunk through a table of
chunk addresses.  Block id ``-1`` skips a slot (a load's blocks that are computed, not loaded).

Two ways to use it, chosen per ``PagedKV`` (``cuda_copy``):

* ``direct``: the chunk addresses are the pinned DRAM slots themselves; the kernel's loads and
  stores cross PCIe (UVA: pinned host memory is addressable from the device).  One launch per
  call; no staging, no copy engine.
* ``staged``: the kernel writes (reads) a device staging buffer and the copy engine moves it to
  (from) the pinned slots, groups double-buffered on two side streams so gathers overlap DMA.

Either way the compute stream is never used: the side streams wait on an event recorded after the
forward that wrote the blocks (a save) or after vLLM's own work on newly allocated blocks (a load).
Without Triton (CPU builds of torch) the per-layer torch ops of ``vllm_paged`` remain.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_blocks(layer_addrs, chunk_addrs, block_ids, s_blk, s_h, s_t, s_p,
                     ELEM: tl.constexpr, P: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
                     H: tl.constexpr, D: tl.constexpr, TO_CHUNK: tl.constexpr, TILE: tl.constexpr):
        j = tl.program_id(0)  # block slot: block j % M of chunk j // M
        lp = tl.program_id(1)  # layer * P + part
        blk = tl.load(block_ids + j)
        layer, part = lp // P, lp % P
        src = tl.load(layer_addrs + layer).to(tl.pointer_type(ELEM)) + blk * s_blk + part * s_p
        dst = tl.load(chunk_addrs + j // M).to(tl.pointer_type(ELEM)) + (lp * M + j % M) * (BS * H * D)
        size = tl.where(blk >= 0, BS * H * D, 0)  # block id -1: copy nothing
        for start in range(0, BS * H * D, TILE):
            e = start + tl.arange(0, TILE)
            ok = e < size
            off = (e // (H * D)) * s_t + ((e // D) % H) * s_h + e % D
            if TO_CHUNK:
                tl.store(dst + e, tl.load(src + off, mask=ok), mask=ok)
            else:
                tl.store(src + off, tl.load(dst + e, mask=ok), mask=ok)

    _ELEM = {1: tl.int8, 2: tl.int16, 4: tl.int32}


class FusedCopy:
    """The fused block <-> chunk copy for one worker's registered KV (native block views)."""

    def __init__(self, layers: Sequence[torch.Tensor], *, parts: int, blocks_per_chunk: int, block_size: int,
                 heads: int, head_dim: int) -> None:
        first = layers[0]  # native view (num_blocks, heads, block_size, parts, head_dim), any strides
        self.elem = first.element_size()
        if not HAVE_TRITON or self.elem not in (1, 2, 4):
            raise RuntimeError("the fused CUDA copy needs Triton and 1-, 2- or 4-byte KV elements")
        strides = {t.stride() for t in layers}
        if len(strides) != 1 or first.stride(-1) != 1:
            raise RuntimeError(f"the fused CUDA copy needs one stride order for all layers, got {strides}")
        self.s_blk, self.s_h, self.s_t, self.s_p, _ = first.stride()
        self.device = first.device
        self.parts, self.m, self.bs, self.heads, self.head_dim = parts, blocks_per_chunk, block_size, heads, head_dim
        self.num_layers = len(layers)
        self.layer_addrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64, device=self.device)
        self.chunk_bytes = self.num_layers * parts * blocks_per_chunk * block_size * heads * head_dim * self.elem

    def tables(self, chunk_addrs: Sequence[int], block_ids: Sequence[int], stream: Any) -> torch.Tensor:
        """One int64 device tensor: the chunk addresses, then the block ids (uploaded without
        blocking the host: pinned source, the copy queued on ``stream``)."""
        host = torch.tensor([*chunk_addrs, *block_ids], dtype=torch.int64).pin_memory()
        with torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def launch(self, table: torch.Tensor, num_chunks: int, *, to_chunk: bool, stream: Any) -> None:
        """Copy ``num_chunks`` chunks (``table``: their addresses, then ``m`` block ids each)."""
        chunk_addrs, block_ids = table[:num_chunks], table[num_chunks:num_chunks + num_chunks * self.m]
        tile = min(4096, triton.next_power_of_2(self.bs * self.heads * self.head_dim))
        grid = (num_chunks * self.m, self.num_layers * self.parts)
        with torch.cuda.stream(stream):
            _copy_blocks[grid](self.layer_addrs, chunk_addrs, block_ids, self.s_blk, self.s_h, self.s_t, self.s_p,
                               ELEM=_ELEM[self.elem], P=self.parts, M=self.m, BS=self.bs, H=self.heads,
                               D=self.head_dim, TO_CHUNK=to_chunk, TILE=tile, num_warps=4)
