"""Copies between vLLM's paged KV blocks and kvtier chunk payloads (batched, no per-token loops).

What vLLM 0.32 registers with a connector (``register_kv_caches``): one tensor per layer, its
first dimension the block id.  Two ways of holding a block, read off vLLM's source:

* ``cpu`` — the CPU attention backend (``vllm/v1/attention/backends/cpu_attn.py``,
  ``forward``: ``kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)``):
  ``(num_blocks, num_kv_heads, block_size, 2 * head_dim)``, contiguous, whose memory per block
  and head is ``block_size`` K rows then ``block_size`` V rows.  Native block view here:
  ``(num_blocks, heads, parts=2, block_size, head_dim)``.
* ``packed`` — every CUDA backend (FlashAttention ``flash_attn.py``: "(B, H, N, 2*D) ->
  ((B, N, H, D), (B, N, H, D))" by ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``;
  FlashInfer ``flashinfer.py``: "other dtypes pack K/V in the content dim"; Triton
  ``triton_attn.py``: ``kv_cache.split(head_size, dim=-1)``; MLA: one latent of
  ``kv_lora_rank + qk_rope_head_dim`` per token, ``H = 1``): the logical shape is
  ``(B, H, N, C)`` with ``C = parts * head_dim`` (K then V, or one MLA latent), and the
  *physical* order is any of ``vllm/v1/kv_cache_layout.py``'s ``KVCacheLayout`` stride
  permutations — ``LBHNC`` (HND), ``LBNHC`` (NHD), and the cross-layer ``BL..`` layouts, where the
  per-layer tensor is a strided view into one allocation spanning all layers.  The copies here
  use the tensor's own strides, so every such order is handled by the same code.  Native block
  view: ``(num_blocks, heads, block_size, parts, head_dim)``.

A kvtier chunk of ``C = m * block_size`` tokens is ``(layers, parts, C, heads, head_dim)``
(``kvtier.layout``).  Gathering ``n`` chunks is, per layer, one ``index_select`` of ``n * m``
blocks plus one permuting copy into a staging tensor ``(n, layers, parts, m, block_size, heads,
head_dim)`` whose ``[i]`` is chunk i's payload, byte for byte.  Scattering is the reverse: one
permuting copy and one ``index_copy_`` per layer.

On CPU the staging tensor *is* the host chunk buffers (DRAM slots handed out by the hierarchy):
``gather_into`` / ``scatter_from`` treat each run of adjacent buffers as one staging tensor.
On CUDA, chunks move in groups through two device staging buffers on two side streams, so one
group's gather/scatter (HBM, ~100x faster than PCIe) overlaps the next group's DMA to or from the
pinned DRAM slots; the compute stream is never used and never waits: a save's side stream waits
for an event recorded on the compute stream after the forward that wrote the blocks, a load's
after vLLM's own work on the newly allocated blocks (``after``).  The calls return once their
copies are done (they run on the connector's mover thread, or before a forward that needs them).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtier.errors import IntegrationError
from kvtier.hostmem import populated
from kvtier.integrations.vllm_config import PagedGeometry
from kvtier.integrations.vllm_paged_cuda import HAVE_TRITON, FusedCopy
from kvtier.tiers.cuda import Memcpy2D

# staging (n, parts, m, bs, H, D)  <->  the selected blocks in their native view, per format
_TO_CHUNK = {"cpu": (0, 3, 1, 4, 2, 5),  # (n, m, H, P, bs, D) -> (n, P, m, bs, H, D)
             "packed": (0, 4, 1, 3, 2, 5),  # (n, m, H, bs, P, D) -> (n, P, m, bs, H, D)
             "packed-nh": (0, 4, 1, 2, 3, 5)}  # (n, m, bs, H, P, D) -> (n, P, m, bs, H, D)
_CUDA_COPIES = ("auto", "fused", "torch")
_FROM_CHUNK = {fmt: tuple(int(i) for i in np.argsort(perm)) for fmt, perm in _TO_CHUNK.items()}


def geometry_of(kv_caches: dict[str, torch.Tensor], block_size: int, *, parts: int = 2) -> PagedGeometry:
    """Read the paged geometry off the tensors vLLM registers; error on layouts we cannot copy."""
    if not kv_caches:
        raise IntegrationError("vLLM registered no KV cache tensors")
    shapes = {tuple(t.shape) for t in kv_caches.values()}
    dtypes = {t.dtype for t in kv_caches.values()}
    devices = {t.device for t in kv_caches.values()}
    if len(shapes) != 1 or len(dtypes) != 1 or len(devices) != 1:
        raise IntegrationError(f"KVTierConnector needs one KV shape/dtype/device for all layers, got "
                               f"{shapes} {dtypes} {devices}")
    (shape,), (dtype,), (device,) = shapes, dtypes, devices
    if device.type not in ("cpu", "cuda"):
        raise IntegrationError(f"KVTierConnector copies KV on CPU or CUDA, not {device.type}")
    if len(shape) == 3 and parts == 1:  # MLA: (num_blocks, block_size, latent)
        shape = (shape[0], 1, shape[1], shape[2])
    if len(shape) != 4 or shape[2] != block_size or shape[3] % parts:
        raise IntegrationError(
            f"unsupported KV cache tensor shape {shape}: KVTierConnector supports vLLM's per-layer "
            f"(num_blocks, num_kv_heads, block_size={block_size}, {parts} * head_dim) layouts")
    for name, t in kv_caches.items():
        if device.type == "cpu" and not t.is_contiguous():
            raise IntegrationError(f"KV cache of {name} must be a contiguous CPU tensor")
        if t.stride(-1) != 1:
            raise IntegrationError(f"KV cache of {name}: the content dimension must be contiguous")
    return PagedGeometry(num_layers=len(kv_caches), num_kv_heads=shape[1], head_dim=shape[3] // parts,
                         dtype=str(dtype).removeprefix("torch."), block_size=block_size, parts=parts)


class PagedKV:
    """The registered KV tensors of one worker, with chunk gather/scatter."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], geometry: PagedGeometry, tokens_per_chunk: int,
                 *, group_chunks: int = 4, fmt: str | None = None, cuda_copy: str = "auto") -> None:
        g = geometry
        self.geometry = g
        self.blocks_per_chunk = tokens_per_chunk // g.block_size
        first = next(iter(kv_caches.values()))
        self.device = first.device
        self.fmt = fmt or ("cpu" if self.device.type == "cpu" else "packed")  # CUDA backends pack K|V
        if self.fmt == "packed" and first.dim() == 4 and first.stride(2) > first.stride(1):
            self.fmt = "packed-nh"  # NHD (LBNHC, BLNHC): tokens outside heads in memory
        self.layers = [self._native(t) for t in kv_caches.values()]
        self.dtype = first.dtype
        self.chunk_elems = g.num_layers * g.parts * tokens_per_chunk * g.num_kv_heads * g.head_dim
        self._staging = torch.empty(0, dtype=self.dtype)  # CPU: grown on demand, populated (kvtier.hostmem)
        self._group = group_chunks
        self._cuda_paths: dict[int, _CudaPath] = {}  # per calling thread: own streams and buffers
        self.cuda_copy, self.fused = self._fused_copy(cuda_copy)
        self._lock = threading.Lock()

    @property
    def _cuda(self) -> _CudaPath | None:
        """The calling thread's CUDA path (the mover and the step's thread copy concurrently)."""
        if self.device.type != "cuda":
            return None
        me = threading.get_ident()
        path = self._cuda_paths.get(me)
        if path is None:
            with self._lock:
                path = self._cuda_paths[me] = _CudaPath(self, self._group)
        return path

    def _fused_copy(self, mode: str) -> tuple[str, FusedCopy | None]:
        """(copy mode, fused kernel or None): ``fused`` is ``vllm_paged_cuda``'s one kernel per
        group of chunks, ``torch`` the per-layer torch ops; ``auto`` is ``fused`` where Triton runs."""
        if mode not in _CUDA_COPIES:
            raise IntegrationError(f"cuda_copy must be one of {', '.join(_CUDA_COPIES)}, got {mode!r}")
        if self.device.type != "cuda" or mode == "torch" or (mode == "auto" and not HAVE_TRITON):
            return "torch", None
        g = self.geometry
        to_hnpd = {"cpu": (0, 1, 3, 2, 4), "packed": (0, 1, 2, 3, 4), "packed-nh": (0, 2, 1, 3, 4)}[self.fmt]
        fused = FusedCopy([t.permute(*to_hnpd) for t in self.layers], parts=g.parts,
                          blocks_per_chunk=self.blocks_per_chunk, block_size=g.block_size,
                          heads=g.num_kv_heads, head_dim=g.head_dim)
        return "fused", fused

    def _native(self, t: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if t.dim() == 3:  # MLA
            t = t.unsqueeze(1)
        if self.fmt == "cpu":  # (nb, H, bs, 2D) whose memory is (nb, H, 2, bs, D)
            return t.view(t.shape[0], g.num_kv_heads, g.parts, g.block_size, g.head_dim)
        if self.fmt == "packed-nh":  # in memory order: (nb, bs, H, P, D)
            return torch.unflatten(t.transpose(1, 2), -1, (g.parts, g.head_dim))
        return torch.unflatten(t, -1, (g.parts, g.head_dim))  # (nb, H, bs, P, D): a strided view, no copy

    def _shape(self, num_chunks: int) -> tuple[int, ...]:
        g = self.geometry
        return (num_chunks, g.num_layers, g.parts, self.blocks_per_chunk, g.block_size, g.num_kv_heads, g.head_dim)

    def _stage(self, num_chunks: int) -> torch.Tensor:
        """Host (n, layers, parts, m, block_size, heads, head_dim): chunk i's payload is ``[i]``."""
        need = num_chunks * self.chunk_elems
        if self._staging.numel() < need:  # grow by half again at least: few (page-faulting) reallocations
            grown = max(need, self._staging.numel() * 3 // 2)
            if self.device.type == "cuda":
                self._staging = torch.empty(grown, dtype=self.dtype, pin_memory=True)
            else:
                self._staging = torch.frombuffer(populated(grown * self.dtype.itemsize), dtype=self.dtype)
        return self._staging[:need].view(self._shape(num_chunks))

    @staticmethod
    def payloads(stage: torch.Tensor) -> list[np.ndarray]:
        """Zero-copy uint8 views of each chunk in a host staging tensor."""
        flat = stage.reshape(stage.shape[0], -1).view(torch.uint8).numpy()
        return [flat[i] for i in range(stage.shape[0])]

    # --- the two copies, on tensors of the KV's device ------------------------------------------
    def _gather(self, stage: torch.Tensor, ids: torch.Tensor) -> None:
        """``ids``: ``m`` block ids per chunk of ``stage``, a long tensor on the KV's device."""
        m, n = self.blocks_per_chunk, stage.shape[0]
        perm = _TO_CHUNK[self.fmt]
        for layer, kv in enumerate(self.layers):
            blocks = kv.index_select(0, ids)  # (n*m, native block dims), in memory order
            stage[:, layer].copy_(blocks.reshape(n, m, *blocks.shape[1:]).permute(*perm))

    def _scatter(self, stage: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Write ``stage``'s blocks ``keep`` (None: all) to block ids ``dst`` (device tensors)."""
        perm = _FROM_CHUNK[self.fmt]
        for layer, kv in enumerate(self.layers):
            src = stage[:, layer].permute(*perm)  # (n, m, native block dims)
            src = src.reshape(-1, *kv.shape[1:])  # (n*m, ...) contiguous copy
            if keep is not None:
                src = src.index_select(0, keep)
            kv.index_copy_(0, dst, src)

    def _targets(self, block_ids: Sequence[int]) -> tuple[list[int], list[int] | None]:
        """(destination ids, positions kept or None for all) of a block list where -1 = skip."""
        keep = [j for j, b in enumerate(block_ids) if b >= 0]
        if len(keep) == len(block_ids):
            return list(block_ids), None
        return [block_ids[j] for j in keep], keep

    def _scatter_host(self, stage: torch.Tensor, block_ids: Sequence[int]) -> None:
        dst, keep = self._targets(block_ids)
        if dst:
            self._scatter(stage, torch.as_tensor(dst, dtype=torch.long),
                          None if keep is None else torch.as_tensor(keep, dtype=torch.long))

    # --- chunk buffers in host memory -------------------------------------------------------------
    def gather(self, block_ids: Sequence[int], after: Any = None) -> torch.Tensor:
        """Copy chunks out of vLLM blocks into host staging; ``block_ids``: ``m`` ids per chunk."""
        stage = self._stage(len(block_ids) // self.blocks_per_chunk)
        self.gather_into(self.payloads(stage), block_ids, after)
        return stage

    def gather_into(self, views: Sequence[np.ndarray | None], block_ids: Sequence[int], after: Any = None, *,
                    wait: bool = True) -> Any:
        """``gather`` into the given chunk buffers (None: skip that chunk's ``m`` blocks).

        ``after``: a CUDA event the copies wait for (the forward that wrote the blocks).
        ``wait=False``, on CUDA: return at once with an event that fires when the bytes are in
        the buffers (None if nothing was copied).  On CPU the copy is done on return (None)."""
        m = self.blocks_per_chunk
        runs = self._runs(views)
        if self._cuda is not None:
            return self._cuda.gather(runs, block_ids, after, wait=wait)
        for first, host in runs:
            self._gather(host, torch.as_tensor(block_ids[first * m:(first + host.shape[0]) * m], dtype=torch.long))

    def scatter(self, stage: torch.Tensor, block_ids: Sequence[int], after: Any = None) -> None:
        """Copy host-staged chunks into vLLM blocks; ``block_ids[j] < 0`` leaves block slot j alone."""
        if self._cuda is not None:
            self._cuda.scatter([(0, stage)], block_ids, after)
        else:
            self._scatter_host(stage, block_ids)

    def scatter_from(self, views: Sequence[np.ndarray], block_ids: Sequence[int], after: Any = None) -> None:
        """``scatter`` from the given chunk buffers (read-only views are fine: only read)."""
        m = self.blocks_per_chunk
        runs = self._runs(views)
        if self._cuda is not None:
            self._cuda.scatter(runs, block_ids, after)
            return
        for first, host in runs:
            self._scatter_host(host, block_ids[first * m:(first + host.shape[0]) * m])

    def scatter_pending(self, views: Sequence[np.ndarray], block_ids: Sequence[int], after: Any = None, *,
                        layerwise: bool = False) -> list[Any] | None:
        """``scatter_from`` without waiting, on CUDA: returns one event per layer (the same final
        event for all layers unless ``layerwise``); the views must stay valid until the last fires.
        On CPU (or with nothing to copy) the copy is done on return and the result is None."""
        cuda = self._cuda
        if cuda is None:
            self.scatter_from(views, block_ids, after)
            return None
        runs = self._runs(views)
        if layerwise:
            events = cuda.scatter_layers(runs, block_ids, after)
            if events is not None:
                return events
        done = cuda.scatter(runs, block_ids, after, wait=False)
        return None if done is None else [done] * self.geometry.num_layers

    def _runs(self, views: Sequence[np.ndarray | None]) -> list[tuple[int, torch.Tensor]]:
        """(index of the first chunk, staging-shaped host tensor) per run of adjacent buffers."""
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
            if span.flags.writeable:
                tensor = torch.from_numpy(span).view(self.dtype)
            else:
                with warnings.catch_warnings():  # borrowed slots are read-only views; scatter only reads them
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    tensor = torch.from_numpy(span).view(self.dtype)
            runs.append((i, tensor.view(self._shape(j - i))))
            i = j
        return runs

    # --- start-up -------------------------------------------------------------------------------
    def warm_up(self, num_chunks: int = 2) -> float | None:
        """Run the calling thread's first copies now, not on the first hit; returns the bytes/s of a
        timed scatter (host chunks -> blocks: what a DRAM hit costs), or None without blocks.

        A first copy pays for what is built on first use: on CUDA the thread's side streams,
        events and device staging buffers (``_CudaPath``), the Triton kernel's compilation for each
        direction (and, layer-wise, for the layer-index specialisations), the pinned allocator of
        the block-id uploads, ``cudaMemcpy2DAsync``'s lookup; on CPU the staging buffer's pages.
        The copies read the first blocks and write the same bytes back: nothing changes (vLLM has
        not used a block yet when the connector registers)."""
        m = self.blocks_per_chunk
        n = min(num_chunks, int(self.layers[0].shape[0]) // m)
        if n == 0:
            return None
        ids = list(range(n * m))
        stage = self.gather(ids)  # compiles/creates the gather side
        self.scatter(stage, ids)  # ... and the scatter side
        cuda = self._cuda
        if cuda is not None:
            events = cuda.scatter_layers([(0, stage)], ids, None)  # layer-wise loads' variants
            if events:
                events[-1].synchronize()
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            self.scatter(stage, ids)
            best = min(best, time.perf_counter() - t0)
        return n * self.chunk_elems * self.dtype.itemsize / max(best, 1e-9)

    def timing_mark(self) -> Any:
        """A point on the current stream to time device work from (``elapsed``): an event on CUDA."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    @staticmethod
    def elapsed(start: Any, end: Any) -> float | None:
        """Seconds between two ``timing_mark``s; None while the device has not reached ``end``."""
        if isinstance(start, float):
            return float(end - start)
        if not end.query():
            return None
        return float(start.elapsed_time(end)) / 1e3

    def current_stream(self) -> Any:
        """The calling thread's current CUDA stream (vLLM's compute stream in a worker hook)."""
        return torch.cuda.current_stream(self.device)

    def record(self) -> Any:
        """An event on the current CUDA stream (None on CPU): what a later copy must wait for."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class _CudaPath:
    """One calling thread's CUDA copies (see the module docstring and ``vllm_paged_cuda``)."""

    def __init__(self, paged: PagedKV, group_chunks: int) -> None:
        self.paged = paged
        self.group = group_chunks
        self.fused = paged.fused
        device = paged.device
        self.kernel_stream = torch.cuda.Stream(device)  # gathers / scatters in HBM
        self.copy_stream = torch.cuda.Stream(device)  # DMA to / from pinned host memory
        shape = paged._shape(group_chunks)
        self.buffers = [torch.empty(shape, dtype=paged.dtype, device=device) for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]  # buffer may be reused
        for event in self.free:
            event.record(self.copy_stream)
        self.memcpy2d = Memcpy2D.find()

    def _groups(self, runs: list[tuple[int, torch.Tensor]], size: int = 1, group: int = 0, *,
                last_single: bool = False) -> list[tuple[int, torch.Tensor]]:
        """Runs cut into groups of ``group`` chunks; the first group is ``size`` (one) chunk, so the
        first DMA starts after one chunk's gather (or the first scatter after one chunk's DMA).
        ``last_single``: the last group is one chunk too (a scatter's tail after the last DMA)."""
        out = []
        for first, host in runs:
            s = 0
            while s < host.shape[0]:
                out.append((first + s, host[s:s + size]))
                s += size
                size = group or self.group
        if last_single and len(out) > 1 and out[-1][1].shape[0] > 1:
            first, host = out.pop()
            out += [(first, host[:-1]), (first + host.shape[0] - 1, host[-1:])]
        return out

    @staticmethod
    def _last(done: Any, stream: Any, wait: bool) -> Any:
        """End of a gather or scatter whose last copy recorded ``done`` (None: nothing copied):
        wait for it, or (``wait=False``) return an event of its own on ``stream`` (``done`` is a
        reused ``free`` event, recorded again by later copies)."""
        if done is None:
            return None
        if wait:
            done.synchronize()
            return None
        last = torch.cuda.Event()
        last.record(stream)
        return last

    def _upload(self, values: list[int], stream: Any) -> torch.Tensor:
        """A long tensor on the device, copied without blocking the host (pinned source)."""
        host = torch.tensor(values, dtype=torch.long).pin_memory()
        with torch.cuda.stream(stream):
            return host.to(self.paged.device, non_blocking=True)  # host tensor kept alive by the caching allocator

    def _ids(self, groups: list[tuple[int, torch.Tensor]], block_ids: Sequence[int],
             stream: Any) -> list[torch.Tensor]:
        """Each group's block ids (``m`` per chunk, -1 = skip), as slices of one upload."""
        m = self.paged.blocks_per_chunk
        ids = self._upload([b for first, host in groups for b in block_ids[first * m:(first + host.shape[0]) * m]],
                           stream)
        out, at = [], 0
        for _, host in groups:
            out.append(ids[at:at + host.shape[0] * m])
            at += host.shape[0] * m
        return out

    def _gather_group(self, buf: torch.Tensor, ids: torch.Tensor) -> None:
        if self.fused is not None:
            self.fused.launch(buf, ids, row=self.paged.chunk_elems, layers=range(self.paged.geometry.num_layers),
                              to_stage=True, stream=self.kernel_stream)
        else:
            with torch.cuda.stream(self.kernel_stream):
                self.paged._gather(buf, ids)

    def _scatter_group(self, buf: torch.Tensor, ids: Any) -> None:
        if self.fused is not None:
            self.fused.launch(buf, ids, row=self.paged.chunk_elems, layers=range(self.paged.geometry.num_layers),
                              to_stage=False, stream=self.kernel_stream)
            return
        dst, keep = ids  # the torch ops: destination ids and kept positions (``_torch_targets``)
        if dst.numel():
            with torch.cuda.stream(self.kernel_stream):
                self.paged._scatter(buf, dst, keep)

    def _torch_targets(self, groups: list[tuple[int, torch.Tensor]], block_ids: Sequence[int],
                       stream: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per group (destination ids, kept positions or None for all), slices of one upload."""
        m = self.paged.blocks_per_chunk
        values: list[int] = []
        spans: list[tuple[int, int, int | None]] = []
        for first, host in groups:
            dst, keep = self.paged._targets(block_ids[first * m:(first + host.shape[0]) * m])
            spans.append((len(values), len(dst), None if keep is None else len(keep)))
            values += dst + (keep or [])
        uploaded = self._upload(values, stream)
        return [(uploaded[at:at + nd], None if nk is None else uploaded[at + nd:at + nd + nk])
                for at, nd, nk in spans]

    def gather(self, runs: list[tuple[int, torch.Tensor]], block_ids: Sequence[int], after: Any,
               wait: bool = True) -> Any:
        """Per group of chunks, gather then DMA.  ``wait=False``: return an event that fires when
        the last byte is in host memory instead of waiting for it."""
        if after is not None:
            self.kernel_stream.wait_event(after)
        groups = self._groups(runs)
        ids = self._ids(groups, block_ids, self.kernel_stream)
        done = None
        with torch.cuda.stream(self.copy_stream):  # the DMAs' stream; gathers name theirs
            for k, (_, host) in enumerate(groups):
                buf, n = self.buffers[k % 2], host.shape[0]
                ready = torch.cuda.Event()
                self.kernel_stream.wait_event(self.free[k % 2])
                self._gather_group(buf[:n], ids[k])
                ready.record(self.kernel_stream)
                self.copy_stream.wait_event(ready)
                host.copy_(buf[:n], non_blocking=True)
                self.free[k % 2].record(self.copy_stream)
                done = self.free[k % 2]
        return self._last(done, self.copy_stream, wait)

    def scatter(self, runs: list[tuple[int, torch.Tensor]], block_ids: Sequence[int], after: Any,
                wait: bool = True) -> Any:
        """Bulk: per group of chunks, DMA then scatter.  ``wait=False``: return the last event
        instead of waiting for it (the caller keeps the host buffers alive until it fires)."""
        if after is not None:
            self.copy_stream.wait_event(after)
        groups = self._groups(runs, last_single=True)  # a short last scatter after the last DMA
        ready = [torch.cuda.Event() for _ in groups]

        def dma(k: int) -> None:
            buf, host = self.buffers[k % 2], groups[k][1]
            self.copy_stream.wait_event(self.free[k % 2])
            buf[:host.shape[0]].copy_(host, non_blocking=True)
            ready[k].record(self.copy_stream)

        with torch.cuda.stream(self.copy_stream):
            if groups:
                dma(0)  # needs no block ids: the link starts before they are built and uploaded
            ids: list[Any] = (self._ids(groups, block_ids, self.kernel_stream) if self.fused is not None
                              else self._torch_targets(groups, block_ids, self.kernel_stream))
            done = None
            for k, (_, host) in enumerate(groups):
                if k:
                    dma(k)
                self.kernel_stream.wait_event(ready[k])
                self._scatter_group(self.buffers[k % 2][:host.shape[0]], ids[k])
                self.free[k % 2].record(self.kernel_stream)
                done = self.free[k % 2]
        return self._last(done, self.kernel_stream, wait)

    def scatter_layers(self, runs: list[tuple[int, torch.Tensor]], block_ids: Sequence[int],
                       after: Any) -> list[Any] | None:
        """Layer-wise: layer by layer, every group's slice of that layer (a 2-D copy: rows of
        ``layer_bytes`` at a pitch of ``chunk_bytes``) then its scatter; one event per layer, the host
        not blocked.  None where this cannot run (no fused kernel or no ``cudaMemcpy2DAsync``)."""
        if self.fused is None or self.memcpy2d is None:
            return None
        g, itemsize = self.paged.geometry, self.paged.dtype.itemsize
        layer_elems = self.paged.chunk_elems // g.num_layers
        layer_bytes, chunk_bytes = layer_elems * itemsize, self.paged.chunk_elems * itemsize
        if after is not None:
            self.copy_stream.wait_event(after)
        per_unit = self.group * g.num_layers  # one layer of this many chunks fills a staging buffer
        groups = self._groups(runs, per_unit, per_unit)
        ids = self._ids(groups, block_ids, self.kernel_stream)
        events, k = [], 0
        for layer in range(g.num_layers):
            for (_, host), group_ids in zip(groups, ids, strict=True):
                buf, n = self.buffers[k % 2].view(-1), host.shape[0]
                ready = torch.cuda.Event()
                self.copy_stream.wait_event(self.free[k % 2])
                self.memcpy2d(buf.data_ptr(), layer_bytes, host.data_ptr() + layer * layer_bytes, chunk_bytes,
                              layer_bytes, n, self.copy_stream)
                ready.record(self.copy_stream)
                self.kernel_stream.wait_event(ready)
                self.fused.launch(buf, group_ids, row=layer_elems, layers=range(layer, layer + 1), to_stage=False,
                                  stream=self.kernel_stream)
                self.free[k % 2].record(self.kernel_stream)
                k += 1
            event = torch.cuda.Event()
            event.record(self.kernel_stream)
            events.append(event)
        return events
