"""Copies between vLLM's paged KV blocks and kvtier chunk payloads (batched, no per-token loops).

vLLM's CPU attention backend gives each layer one tensor (layout ``LBHNC``)::

    kv_cache[layer]: (num_blocks, num_kv_heads, block_size, 2 * head_dim)

whose memory, per block and head, is ``block_size`` K rows followed by ``block_size`` V rows
(the backend views it as ``(num_blocks, heads, 2 * block_size, head_dim)`` and splits dim 2).
So the *native block view* used here is ``(num_blocks, heads, 2, block_size, head_dim)``.

A kvtier chunk of ``C = m * block_size`` tokens is ``(layers, 2, C, heads, head_dim)``
(``kvtier.layout``).  Gathering ``n`` chunks is, per layer, one ``index_select`` of ``n * m``
blocks plus one permuting copy into a staging tensor ``(n, layers, 2, m, block_size, heads,
head_dim)`` whose ``[i]`` is chunk i's payload, byte for byte.  Scattering is the reverse: one
permuting copy and one ``index_copy_`` per layer.  Staging tensors are reused between steps.

With a DRAM top tier no staging is needed: ``gather_into`` / ``scatter_from`` take the chunk
buffers themselves (reserved or borrowed DRAM slots), treating each run of adjacent buffers
(consecutive slots, the common case) as one staging tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from kvtier.errors import IntegrationError
from kvtier.hostmem import populated
from kvtier.integrations.vllm_config import PagedGeometry


def geometry_of(kv_caches: dict[str, torch.Tensor], block_size: int) -> PagedGeometry:
    """Read the paged geometry off the tensors vLLM registers; error on layouts we cannot copy."""
    if not kv_caches:
        raise IntegrationError("vLLM registered no KV cache tensors")
    shapes = {tuple(t.shape) for t in kv_caches.values()}
    dtypes = {t.dtype for t in kv_caches.values()}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise IntegrationError(f"KVTierConnector needs one KV shape/dtype for all layers, got {shapes} {dtypes}")
    (shape,), (dtype,) = shapes, dtypes
    if len(shape) != 4 or shape[2] != block_size or shape[3] % 2:
        raise IntegrationError(
            f"unsupported KV cache tensor shape {shape}: KVTierConnector supports vLLM's CPU attention "
            f"layout (num_blocks, num_kv_heads, block_size={block_size}, 2 * head_dim)")
    for name, t in kv_caches.items():
        if not t.is_contiguous() or t.device.type != "cpu":
            raise IntegrationError(f"KV cache of {name} must be a contiguous CPU tensor")
    return PagedGeometry(num_layers=len(kv_caches), num_kv_heads=shape[1], head_dim=shape[3] // 2,
                         dtype=str(dtype).removeprefix("torch."), block_size=block_size)


class PagedKV:
    """The registered KV tensors of one worker, with chunk gather/scatter."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], geometry: PagedGeometry, tokens_per_chunk: int) -> None:
        g = geometry
        self.geometry = g
        self.blocks_per_chunk = tokens_per_chunk // g.block_size
        # (num_blocks, heads, 2, block_size, head_dim) views, in layer order
        self.layers = [t.view(t.shape[0], g.num_kv_heads, 2, g.block_size, g.head_dim) for t in kv_caches.values()]
        self.dtype = self.layers[0].dtype
        self._staging = torch.empty(0, dtype=self.dtype)  # grown on demand, populated (kvtier.hostmem)

    def _stage(self, num_chunks: int) -> torch.Tensor:
        """(n, layers, 2, m, block_size, heads, head_dim): chunk i's payload is ``[i]``, contiguous."""
        g = self.geometry
        shape = (num_chunks, g.num_layers, 2, self.blocks_per_chunk, g.block_size, g.num_kv_heads, g.head_dim)
        need = int(np.prod(shape))
        if self._staging.numel() < need:  # grow by half again at least: few (page-faulting) reallocations
            grown = max(need, self._staging.numel() * 3 // 2)
            self._staging = torch.frombuffer(populated(grown * self.layers[0].element_size()), dtype=self.dtype)
        return self._staging[:need].view(shape)

    @staticmethod
    def payloads(stage: torch.Tensor) -> list[np.ndarray]:
        """Zero-copy uint8 views of each chunk in a staging tensor."""
        flat = stage.reshape(stage.shape[0], -1).view(torch.uint8).numpy()
        return [flat[i] for i in range(stage.shape[0])]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy chunks out of vLLM blocks; ``block_ids`` has ``m`` ids per chunk, in order."""
        stage = self._stage(len(block_ids) // self.blocks_per_chunk)
        self._gather(stage, block_ids)
        return stage

    def _gather(self, stage: torch.Tensor, block_ids: Sequence[int]) -> None:
        m, n = self.blocks_per_chunk, stage.shape[0]
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        for layer, kv in enumerate(self.layers):
            blocks = kv.index_select(0, ids)  # (n*m, heads, 2, bs, hd)
            blocks = blocks.view(n, m, *blocks.shape[1:])  # (n, m, heads, 2, bs, hd)
            stage[:, layer].copy_(blocks.permute(0, 3, 1, 4, 2, 5))  # (n, 2, m, bs, heads, hd)

    def gather_into(self, views: Sequence[np.ndarray | None], block_ids: Sequence[int]) -> None:
        """``gather`` into the given chunk buffers (None: skip that chunk's ``m`` blocks)."""
        m = self.blocks_per_chunk
        for first, stage in self._runs(views):
            self._gather(stage, block_ids[first * m:(first + stage.shape[0]) * m])

    def scatter_from(self, views: Sequence[np.ndarray], block_ids: Sequence[int]) -> None:
        """``scatter`` from the given chunk buffers (read-only views are fine: only read)."""
        m = self.blocks_per_chunk
        for first, stage in self._runs(views):
            self.scatter(stage, block_ids[first * m:(first + stage.shape[0]) * m])

    def _runs(self, views: Sequence[np.ndarray | None]) -> list[tuple[int, torch.Tensor]]:
        """(index of the first chunk, staging-shaped tensor) per run of adjacent buffers."""
        g = self.geometry
        runs: list[tuple[int, torch.Tensor]] = []
        i = 0
        while i < len(views):
            head = views[i]
            if head is None:
                i += 1
                continue
            j, end = i + 1, head.ctypes.data + head.nbytes
            while j < len(views) and (nxt := views[j]) is not None and nxt.ctypes.data == end:
                end += nxt.nbytes
                j += 1
            span = np.lib.stride_tricks.as_strided(head, shape=(end - head.ctypes.data,), strides=(1,))
            with warnings.catch_warnings():  # borrowed slots are read-only views; scatter only reads them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensor = torch.from_numpy(span).view(self.dtype)
            shape = (j - i, g.num_layers, 2, self.blocks_per_chunk, g.block_size, g.num_kv_heads, g.head_dim)
            runs.append((i, tensor.view(shape)))
            i = j
        return runs

    def scatter(self, stage: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Copy staged chunks into vLLM blocks; ``block_ids[j] < 0`` leaves block slot j alone."""
        g = self.geometry
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        keep = (ids >= 0).nonzero().flatten()
        if keep.numel() == 0:
            return
        dst = ids.index_select(0, keep)
        whole = keep.numel() == ids.numel()
        for layer, kv in enumerate(self.layers):
            src = stage[:, layer].permute(0, 2, 4, 1, 3, 5)  # (n, m, heads, 2, bs, hd)
            src = src.reshape(-1, g.num_kv_heads, 2, g.block_size, g.head_dim)  # (n*m, ...) contiguous copy
            if not whole:
                src = src.index_select(0, keep)
            kv.index_copy_(0, dst, src)
