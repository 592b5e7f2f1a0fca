"""The connector's CUDA data path: one fused kernel per copy, between vLLM's paged blocks and chunks.

A save gathers a request's blocks of *every layer* into kvtier's chunk layout
``(layers, parts, tokens, heads, head_dim)``; a load scatters chunks back into blocks.  Done with
torch ops that is one ``index_select`` + one permuting copy per layer and group of chunks: at 4K
tokens of a 32-layer model about 300 kernel launches, ~2 ms of fixed cost on an H200 before the
first byte crosses PCIe (0.69x raw at 4K, run 9 in ``benchmarks/gpu/results``).  Here one Triton
kernel does a whole call: program ``(j, l*parts + p)`` copies block slot ``j``'s part ``p`` of
layer ``l`` (``block_size * heads * head_dim`` elements), reading the layer's tensor through a
table of per-layer base addresses (vLLM allocates each layer separately, or as strided views of one
cross-layer allocation: the tensor's own strides cover both), and a device staging buffer
holding ``len(block_ids) / m`` chunks, each ``row`` elements apart.  Block id ``-1`` skips a
slot (a load's blocks that are computed, not loaded).  ``vllm_paged._CudaPath`` moves the
staging buffers to and from the pinned DRAM slots on the copy engine, groups double-buffered on
two side streams so gathers overlap DMA;
a layer-wise load stages one layer at a time (``row`` = one layer of a chunk).  The compute stream
is never used: the side streams wait on an event recorded after the forward that wrote the blocks
(a save) or after vLLM's own work on newly allocated blocks (a load).

Tried and dropped: the kernel reading/writing the pinned slots directly over PCIe (UVA, no
staging): 0.61-0.73x raw, and it held SMs for the whole transfer (the compute step took 13x
longer; ``benchmarks/gpu/results/h200_run10a_*``).  Without Triton (CPU builds of torch)
the per-layer torch ops of ``vllm_paged`` remain.
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

    # Triton reads a kernel's annotations itself (tl.constexpr, "i64", "*fp16", ...): the runtime
    # arguments stay unannotated, typed by Triton from each call, and so the kernel is untyped to mypy.
    @triton.jit  # type: ignore[untyped-decorator]
    def _copy_blocks(layer_addrs, stage, block_ids, row, layer0, s_blk, s_h, s_t, s_p,  # type: ignore[no-untyped-def]
                     P: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                     TO_STAGE: tl.constexpr, TILE: tl.constexpr):
        j = tl.program_id(0)  # block slot: block j % M of staged chunk j // M
        lp = tl.program_id(1)  # (layer - layer0) * P + part
        blk = tl.load(block_ids + j)
        src = tl.load(layer_addrs + layer0 + lp // P).to(tl.pointer_type(stage.dtype.element_ty))
        src += blk * s_blk + (lp % P) * s_p
        dst = stage + (j // M).to(tl.int64) * row + (lp * M + j % M) * (BS * H * D)
        size = tl.where(blk >= 0, BS * H * D, 0)  # block id -1: copy nothing
        for start in range(0, BS * H * D, TILE):
            e = start + tl.arange(0, TILE)
            ok = e < size
            off = (e // (H * D)) * s_t + ((e // D) % H) * s_h + e % D
            if TO_STAGE:
                tl.store(dst + e, tl.load(src + off, mask=ok), mask=ok)
            else:
                tl.store(src + off, tl.load(dst + e, mask=ok), mask=ok)


class FusedCopy:
    """The fused block <-> staging copy for one worker's registered KV."""

    def __init__(self, layers: Sequence[torch.Tensor], *, parts: int, blocks_per_chunk: int, block_size: int,
                 heads: int, head_dim: int) -> None:
        first = layers[0]  # views (num_blocks, heads, block_size, parts, head_dim), any strides
        if not HAVE_TRITON or first.element_size() not in (1, 2, 4):
            raise RuntimeError("the fused CUDA copy needs Triton and 1-, 2- or 4-byte KV elements")
        strides = {t.stride() for t in layers}
        if len(strides) != 1 or first.stride(-1) != 1:
            raise RuntimeError(f"the fused CUDA copy needs one stride order for all layers, got {strides}")
        self.s_blk, self.s_h, self.s_t, self.s_p, _ = first.stride()
        self.view_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32}[first.element_size()]  # bits, not values
        self.parts, self.m, self.bs, self.heads, self.head_dim = parts, blocks_per_chunk, block_size, heads, head_dim
        self.layer_addrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64, device=first.device)
        self.tile = min(4096, triton.next_power_of_2(block_size * heads * head_dim))

    def launch(self, stage: torch.Tensor, block_ids: torch.Tensor, *, row: int, layers: range, to_stage: bool,
               stream: Any) -> None:
        """Copy ``layers`` of ``len(block_ids) // m`` chunks between the blocks and ``stage``, where
        staged chunk ``i``'s first copied layer starts at element ``i * row``; ``block_ids`` a long
        device tensor (-1: skip that block slot)."""
        grid = (block_ids.numel(), len(layers) * self.parts)
        with torch.cuda.stream(stream):
            _copy_blocks[grid](self.layer_addrs, stage.view(self.view_dtype), block_ids, row, layers.start,
                               self.s_blk, self.s_h, self.s_t, self.s_p, P=self.parts, M=self.m, BS=self.bs,
                               H=self.heads, D=self.head_dim, TO_STAGE=to_stage, TILE=self.tile, num_warps=4)
