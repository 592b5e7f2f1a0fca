"""G1 <-> G2: the copy engine between accelerator memory and the DRAM tier's pinned pool.

Not a Tier: it moves bytes between chunk payloads in host memory and KV tensors on a device,
and makes no policy decisions (what to load is ``kvtier.policy.cost``'s call, where bytes come
from is the hierarchy's).

Byte order.  A chunk payload is ``(num_layers, num_kv_parts, tokens_per_chunk, heads, head_dim)``
(``kvtier.layout``), so part ``p`` of layer ``l`` of a chunk is one contiguous block of
``(tokens_per_chunk, heads, head_dim)``.  A load lands straight in the prompt's KV on the device:
per layer a K and a V tensor of ``(tokens, heads, head_dim)`` (token-major; ``KVLoad``), so each
such block is one contiguous destination, and the consumer (the transformers cache) uses the
tensors as they are, through a ``(1, heads, tokens, head_dim)`` transposed view: the loaded KV is
copied once, host to device, and never again on the device.

CUDA.  Host sources are pinned (the DRAM pool is allocated pinned once, at start; staging
buffers likewise), so every copy is an asynchronous DMA (``non_blocking=True``) on a dedicated
stream per direction, never on the compute stream:

* bulk load: every layer of a run of chunks in consecutive pool slots is one strided copy per
  part, one event for the whole load;
* layer-wise load: layer 0 of every run, event 0, layer 1, event 1, ..., each layer queued when
  the consumer is ``LOOKAHEAD`` layers before it.  Part ``p`` of layer ``l`` of a run of
  consecutive pool slots is one strided ``cudaMemcpy2DAsync`` (rows of ``layer_bytes / 2`` at a
  pitch of ``chunk_bytes`` on the host, contiguous on the device; torch has no strided
  host-to-device copy without a host temporary); without it, one copy per part, layer and chunk.
  A consumer of layer ``l`` makes the *compute stream* wait on event ``l`` (a device-side wait:
  the host never blocks), so layer ``l+1`` streams in while layer ``l`` computes.
* store: per group of chunks, gather every layer's K and V into a ``(chunks, chunk_bytes)``
  device buffer (one small kernel per layer and part, on a gather stream, so the next group's
  gather overlaps this group's copy), then device-to-host copies straight into
  the DRAM slots that ``DramTier.reserve`` handed out (one copy per run of consecutive slots;
  ``copy_to_host``), committed once the copy's event has completed: no staging, no host memcpy.
  Without a DRAM top tier, one copy into pinned staging (``to_host``), then ``store``.

A load's tensors are allocated on the load stream and marked used by the compute stream, so
the caching allocator never hands them a block that queued compute kernels still use.  Host buffers must
stay alive and unchanged until ``KVLoad.wait_host()`` (or the store's event) says the copies
are done; the callers hold DRAM borrows until then.

On a machine without CUDA (or a device of "cpu") the same calls do plain synchronous copies:
events are None and waits return at once, so the integration and its tests run on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtier.errors import IntegrationError
from kvtier.layout import KVLayout


@dataclass(frozen=True, slots=True)
class Run:
    """``length`` chunks, starting at load position ``index``, in consecutive host slots."""

    index: int
    slot: int
    length: int


def coalesce(slots: Sequence[int | None]) -> list[Run]:
    """Group load positions whose host slots are consecutive (``None``: not in the pool).

    >>> coalesce([4, 5, 6, 9, None, 10])
    [Run(index=0, slot=4, length=3), Run(index=3, slot=9, length=1), Run(index=5, slot=10, length=1)]
    """
    runs: list[Run] = []
    for i, slot in enumerate(slots):
        if slot is None:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.index + last.length == i and last.slot + last.length == slot:
            runs[-1] = Run(last.index, last.slot, last.length + 1)
        else:
            runs.append(Run(i, slot, 1))
    return runs


def torch_dtype(layout: KVLayout) -> torch.dtype:
    dtype = getattr(torch, layout.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise IntegrationError(f"torch has no dtype {layout.dtype!r}")
    return dtype


class HostPool:
    """Maps numpy views of a pinned pool back to torch tensors of that pool (no copy).

    ``pool`` is ``DramTier.pool`` (a pinned uint8 tensor when CUDA is up) or any 1-D uint8
    tensor; views that lie outside it (e.g. a fresh buffer from a non-DRAM tier) are wrapped
    with ``torch.from_numpy``.
    """

    def __init__(self, pool: Any, slot_bytes: int) -> None:
        if isinstance(pool, np.ndarray):  # an unpinned pool (no CUDA): alias it, no copy
            pool = torch.from_numpy(pool)
        self.tensor: torch.Tensor | None = pool if isinstance(pool, torch.Tensor) else None
        self.slot_bytes = slot_bytes
        self._base = self.tensor.data_ptr() if self.tensor is not None else 0
        self._end = self._base + (self.tensor.numel() if self.tensor is not None else 0)

    def _offset(self, view: np.ndarray) -> int | None:
        addr: int = view.__array_interface__["data"][0]
        if self.tensor is None or not self._base <= addr < self._end:
            return None
        return addr - self._base

    def slot(self, view: np.ndarray) -> int | None:
        """Slot index of a whole-slot view of the pool, else None."""
        offset = self._offset(view)
        if offset is None or offset % self.slot_bytes or view.nbytes != self.slot_bytes:
            return None
        return offset // self.slot_bytes

    def slots_tensor(self, slot: int, count: int) -> torch.Tensor:
        assert self.tensor is not None
        return self.tensor[slot * self.slot_bytes:(slot + count) * self.slot_bytes]

    def as_tensor(self, view: np.ndarray) -> torch.Tensor:
        """A uint8 tensor over the same bytes (a copy only for read-only views outside the pool)."""
        if not view.flags.c_contiguous or view.dtype != np.uint8:
            raise IntegrationError("host chunk views must be contiguous uint8 arrays")
        offset = self._offset(view)
        if offset is not None:
            assert self.tensor is not None
            return self.tensor[offset:offset + view.nbytes]
        if not view.flags.writeable:  # not ours to alias writable; rare (views outside the pool)
            view = view.copy()
        return torch.from_numpy(view)


class Memcpy2D:
    """``cudaMemcpy2DAsync`` (host to device) from the libcudart torch has loaded, via ctypes.

    torch offers no strided host-to-device copy without a host-side temporary; a layer of
    consecutive pool slots is exactly a 2-D copy (rows of ``layer_bytes``, pitch ``chunk_bytes``).
    """

    _HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    @classmethod
    def find(cls) -> Memcpy2D | None:
        import ctypes

        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
            if not paths:
                return None
            fn = ctypes.CDLL(sorted(paths)[0]).cudaMemcpy2DAsync
        except (OSError, AttributeError):
            return None
        size = ctypes.c_size_t
        fn.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return cls(fn)

    def __call__(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                 stream: Any) -> None:
        err = self._fn(dst, dpitch, src, spitch, width, height, self._HOST_TO_DEVICE, stream.cuda_stream)
        if err:
            raise IntegrationError(f"cudaMemcpy2DAsync failed with CUDA error {err}")


class KVLoad:
    """One load of ``num_chunks`` chunks into a prompt's per-layer K and V on the device.

    The destination is the prompt's KV itself, not a staging buffer: ``tensors(l)`` is layer
    ``l``'s ``(K, V)``, each ``(tokens, heads, head_dim)`` (token-major) over all ``tokens`` of
    the prompt.  Chunk ``i`` lands at rows ``[i * C, (i + 1) * C)``; the consumer writes the
    other rows (the tokens it computes) itself.  Both sides store a part of a chunk as one
    ``(C, heads, head_dim)`` block, so a run of consecutive host slots is one strided copy per
    layer and part (rows of ``part_bytes``: pitch ``chunk_bytes`` on the host, contiguous on the
    device), and the loaded KV is never copied again on the device.

    Layer-wise (CUDA): ``copy_layers`` only registers host runs; ``finish`` queues the first
    ``LOOKAHEAD`` layers and ``ready(l)`` (the consumer reaching layer ``l``) the ones up to
    ``l + LOOKAHEAD``, each layer's tensors allocated as it is queued.  So neither the copies'
    launches nor the allocation of the prompt's KV wait in front of the forward: they run while
    the forward's own launches do, as a plain ``DynamicCache``'s concatenations would.  A
    layer-wise load is driven by one thread.  Otherwise (bulk, CPU) every layer is allocated at
    once, and ``copy_chunks`` queues every layer of its chunks at once (any thread: a split's
    loader).

    Streams: the tensors are allocated on the load stream (so the caching allocator never hands
    out a block that queued compute kernels still use, without the load stream waiting for the
    compute stream) and marked used by the compute stream (``record_stream``), which reads and
    writes them.
    """

    LOOKAHEAD = 2  # layer-wise: layers queued ahead of the one the consumer reached

    def __init__(self, engine: CopyEngine, num_chunks: int, *, tokens: int, layerwise: bool) -> None:
        lay = engine.layout
        if lay.num_kv_parts != 2:
            raise IntegrationError("KVLoad loads K/V layouts only (not MLA)")
        if tokens < num_chunks * lay.tokens_per_chunk:
            raise IntegrationError(f"{num_chunks} chunks do not fit a prompt of {tokens} tokens")
        self.engine = engine
        self.layout = lay
        self.num_chunks = num_chunks
        self.tokens = tokens  # rows of every layer's K and V
        self.layerwise = layerwise and engine.is_cuda
        self._row_bytes = lay.num_kv_heads * lay.head_dim * lay.itemsize  # one token of one part
        self._bufs: list[torch.Tensor | None] = [None] * lay.num_layers  # per layer: K rows, then V rows
        self._runs: list[tuple[torch.Tensor, int, int, bool]] = []  # registered, queued layer by layer
        self._queued = 0  # layer-wise: layers [0, _queued) have every registered run queued
        self._events: list[Any] = [None] * lay.num_layers
        self._final: Any = None
        self._compute: Any = None  # the stream the consumer reads and writes the tensors on
        if engine.is_cuda:  # which may reuse memory a load stream copy still wrote
            self._compute = torch.cuda.current_stream(engine.device)
            self._compute.wait_stream(engine.load_stream)
        if not self.layerwise:
            for layer in range(lay.num_layers):
                self._alloc(layer)

    def _alloc(self, layer: int) -> torch.Tensor:
        buf = self._bufs[layer]
        if buf is None:
            eng = self.engine
            with eng.stream_ctx(eng.load_stream):
                buf = torch.empty(2 * self.tokens * self._row_bytes, dtype=torch.uint8, device=eng.device)
            if eng.is_cuda:
                buf.record_stream(self._compute)
            self._bufs[layer] = buf
        return buf

    def tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (K, V), each ``(tokens, heads, head_dim)``; rows of loaded chunks are
        safe to read only after ``ready(layer)``, the others at once."""
        lay, half = self.layout, self.tokens * self._row_bytes
        buf = self._alloc(layer)
        dtype = torch_dtype(lay)
        shape = (self.tokens, lay.num_kv_heads, lay.head_dim)
        return buf[:half].view(dtype).view(shape), buf[half:].view(dtype).view(shape)

    # --- issuing copies (host side; returns at once on CUDA) --------------------------------
    def _host_runs(self, host: Sequence[np.ndarray], first: int) -> list[tuple[torch.Tensor, int, int, bool]]:
        """(host bytes, first chunk position, chunks, pinned) per run of consecutive slots of the DRAM
        pool or the load staging; any other view is a run of its own (not known to be pinned)."""
        runs: list[tuple[torch.Tensor, int, int, bool]] = []
        left: list[np.ndarray | None] = list(host)  # views not placed in a pool yet
        for pool in (self.engine.host_pool, self.engine.load_staging_pool):
            slots = [pool.slot(v) if v is not None else None for v in left]
            runs += [(pool.slots_tensor(r.slot, r.length), first + r.index, r.length, True) for r in coalesce(slots)]
            left = [v if slot is None else None for v, slot in zip(left, slots, strict=True)]
        runs += [(self.engine.host_pool.as_tensor(v), first + i, 1, False) for i, v in enumerate(left) if v is not None]
        return runs

    def _queue(self, layer: int, runs: Sequence[tuple[torch.Tensor, int, int, bool]]) -> None:
        """Queue layer ``layer``'s part of ``runs`` on the load stream (the caller holds it current)."""
        eng, lay, rb = self.engine, self.layout, self._row_bytes
        cb, lb, pb = lay.chunk_bytes, lay.layer_bytes, lay.layer_bytes // 2
        buf = self._alloc(layer)
        for src, pos, length, pooled in runs:
            for part in range(2):
                dst = (part * self.tokens + pos * lay.tokens_per_chunk) * rb  # the run's rows, contiguous
                off = layer * lb + part * pb  # this layer and part within each host chunk
                if pooled and eng.memcpy2d is not None:  # rows of pb bytes: pitch cb on the host, pb here
                    eng.memcpy2d(buf.data_ptr() + dst, pb, src.data_ptr() + off, cb, pb, length, eng.load_stream)
                    continue
                for i in range(length):
                    buf[dst + i * pb:dst + (i + 1) * pb].copy_(src[i * cb + off:i * cb + off + pb],
                                                                non_blocking=eng.is_cuda)

    def copy_chunks(self, host: Sequence[np.ndarray], first: int = 0) -> None:
        """Queue every layer of ``host[i]`` (chunk position ``first + i``) now; the host buffers may
        be reused once ``wait_host`` returns."""
        runs, eng = self._host_runs(host, first), self.engine
        with eng.stream_ctx(eng.load_stream):
            for layer in range(self.layout.num_layers):
                self._queue(layer, runs)

    def copy_layers(self, host: Sequence[np.ndarray], first: int = 0) -> None:
        """Layer-wise: register ``host`` (which must stay unchanged until ``wait_host``) to be queued
        layer by layer, one event per layer.  Without CUDA (or with ``layerwise=False``) this is
        ``copy_chunks``."""
        if not self.layerwise:
            self.copy_chunks(host, first)
            return
        self._runs += self._host_runs(host, first)

    def _queue_through(self, upto: int) -> None:
        """Layer-wise: queue layers ``[_queued, upto)``, recording event ``l`` after layer ``l``."""
        upto = min(upto, self.layout.num_layers)
        if self._queued >= upto:
            return
        eng = self.engine
        with eng.stream_ctx(eng.load_stream):
            for layer in range(self._queued, upto):
                self._queue(layer, self._runs)
                self._events[layer] = eng.record(eng.load_stream)
        self._queued = upto

    def finish(self) -> None:
        """No more copies are registered (call once, after the last copy_*); starts layer-wise ones."""
        if self.layerwise:
            self._queue_through(self.LOOKAHEAD)
        else:
            self._final = self.engine.record(self.engine.load_stream)

    # --- consuming (compute side) -----------------------------------------------------------
    def ready(self, layer: int) -> None:
        """Make the current stream wait for layer ``layer``'s copies (a device-side wait)."""
        if self.layerwise:
            self._queue_through(layer + 1 + self.LOOKAHEAD)
        elif self._final is None:  # bulk: every copy was queued before the consumer's first layer
            self._final = self.engine.record(self.engine.load_stream)
        event = self._events[layer] if self._events[layer] is not None else self._final
        if event is not None:
            torch.cuda.current_stream(self.engine.device).wait_event(event)

    def wait_queued(self) -> None:
        """Block until the copies queued so far are done (e.g. before reusing a staging buffer)."""
        CopyEngine.wait(self.engine.record(self.engine.load_stream))

    def wait_host(self) -> None:
        """Block until every copy has read its host source (then host buffers may be reused).

        Queues the registered layers not queued yet first (a consumer that stopped early)."""
        if self.layerwise:
            self._queue_through(self.layout.num_layers)
        self.wait_queued()


class CopyEngine:
    """Streams, events and pinned staging for one layout on one device."""

    def __init__(self, layout: KVLayout, device: torch.device | str, *, pool: Any = None,
                 staging_bytes: int = 256 << 20, copy2d: bool | None = None) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and not torch.cuda.is_available():
            raise IntegrationError(f"device {self.device} requested but CUDA is not available")
        self.host_pool = HostPool(pool, layout.chunk_bytes)
        self.group_chunks = max(1, staging_bytes // layout.chunk_bytes)
        # Pinned staging, allocated once: the store path's device-to-host target, and the landing
        # zone of chunks read from tiers below DRAM.  Each is used by one thread at a time.
        nbytes = self.group_chunks * layout.chunk_bytes
        self.store_staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_cuda)
        self.load_staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_cuda)
        self._staging_pool = HostPool(self.store_staging, layout.chunk_bytes)  # views of it stay pinned
        self.load_staging_pool = HostPool(self.load_staging, layout.chunk_bytes)  # loads copy runs of it
        # Strided host-to-device copies (one per layer per run of pool slots) when the CUDA
        # runtime that torch loaded can be called; else one copy per layer per chunk.
        self.memcpy2d = Memcpy2D.find() if self.is_cuda and copy2d is not False else None
        if copy2d and self.memcpy2d is None:
            raise IntegrationError("copy2d=True but cudaMemcpy2DAsync could not be found")
        if self.is_cuda:
            with torch.cuda.device(self.device):
                self.load_stream: Any = torch.cuda.Stream(self.device)
                self.store_stream: Any = torch.cuda.Stream(self.device)
                # gathers run beside the store stream's copies: the next group's gather (SMs,
                # device memory) overlaps the previous group's device-to-host copy (copy engine)
                self.gather_stream: Any = torch.cuda.Stream(self.device)
        else:
            self.load_stream = self.store_stream = self.gather_stream = None

    # --- small helpers ------------------------------------------------------------------------
    def stream_ctx(self, stream: Any) -> Any:
        import contextlib

        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def record(self, stream: Any) -> Any:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def views(self, staging: torch.Tensor, count: int) -> list[np.ndarray]:
        """``count`` chunk-sized numpy views of a staging buffer (``count <= group_chunks``)."""
        cb = self.layout.chunk_bytes
        flat = staging.numpy()
        return [flat[i * cb:(i + 1) * cb] for i in range(count)]

    # --- loads --------------------------------------------------------------------------------
    def start_load(self, num_chunks: int, *, tokens: int | None = None, layerwise: bool = True) -> KVLoad:
        """A load of ``num_chunks`` chunks into the KV of a ``tokens``-token prompt (default: just them)."""
        return KVLoad(self, num_chunks, layerwise=layerwise,
                      tokens=num_chunks * self.layout.tokens_per_chunk if tokens is None else tokens)

    def warm_up(self) -> None:
        """Run one chunk of the pool through a layer-wise load (CUDA): the first request then pays
        none of the load path's first-use costs (the strided copy's first call, the load stream's
        first allocation and events).  The bytes (the pool's first slot) are never read."""
        pool = self.host_pool.tensor
        if not self.is_cuda or pool is None or pool.numel() < self.layout.chunk_bytes:
            return
        load = self.start_load(1, layerwise=True)
        load.copy_layers([self.host_pool.slots_tensor(0, 1).numpy()])
        load.finish()
        for layer in range(self.layout.num_layers):
            load.ready(layer)
        load.wait_host()

    # --- stores -------------------------------------------------------------------------------
    def gather(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], first_token: int,
               num_chunks: int, *, after: Any = None) -> tuple[torch.Tensor, Any]:
        """Chunk payloads of tokens ``[first_token, first_token + num_chunks * C)``, on the device.

        ``kv[l]`` is layer ``l``'s ``(K, V)``, each ``(1, heads, tokens, head_dim)`` (the
        transformers layout).  Returns a ``(num_chunks, chunk_bytes)`` uint8 device tensor and
        the event after which it is complete (None on CPU).  Runs on the gather stream, after
        event ``after`` (recorded where ``kv`` was produced), or after the work queued on the
        current stream when ``after`` is None.
        """
        lay = self.layout
        c, h, d = lay.tokens_per_chunk, lay.num_kv_heads, lay.head_dim
        if len(kv) != lay.num_layers:
            raise IntegrationError(f"cache has {len(kv)} layers, layout {lay.describe()} has {lay.num_layers}")
        if after is not None:
            self.gather_stream.wait_event(after)
        elif self.is_cuda:
            self.gather_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self.stream_ctx(self.gather_stream):
            out = torch.empty((num_chunks, lay.chunk_bytes), dtype=torch.uint8, device=self.device)
            chunks = out.view(torch_dtype(lay)).view(num_chunks, lay.num_layers, lay.num_kv_parts, c, h, d)
            end = first_token + num_chunks * c
            for layer, parts in enumerate(kv):
                for part in range(lay.num_kv_parts):
                    src = parts[part][0, :, first_token:end, :]  # (H, T, D)
                    # (H, n, C, D) -> (n, C, H, D): the chunk's (tokens, heads, dim) order
                    chunks[:, layer, part].copy_(src.view(h, num_chunks, c, d).permute(1, 2, 0, 3))
            return out, self.record(self.gather_stream)

    def copy_to_host(self, device_chunks: torch.Tensor, after: Any,
                     dests: Sequence[np.ndarray | None]) -> Any:
        """Queue the device-to-host copies of gathered chunks into ``dests``; returns the done event.

        ``dests[i]`` receives chunk ``i`` (``None``: skip it).  Destinations in the DRAM pool (the
        slots of ``DramTier.reserve``) are written in place, runs of consecutive slots by one
        copy each; others (staging, plain buffers) one copy per chunk.  Copies run on the store
        stream after event ``after``.  The destinations must not be read, nor freed, before the
        returned event has completed (``wait``); on CPU the copies are done on return (None).
        """
        n, cb = device_chunks.shape[0], self.layout.chunk_bytes
        if len(dests) != n:
            raise IntegrationError(f"{n} chunks but {len(dests)} destinations")
        pool = self.host_pool
        slots = [pool.slot(v) if v is not None else None for v in dests]
        src = device_chunks.view(n, cb)
        if self.is_cuda:  # the caller may drop the chunks at once: free them only after the copies
            device_chunks.record_stream(self.store_stream)
        with self.stream_ctx(self.store_stream):
            self._after_gather(after)
            for run in coalesce(slots):
                pool.slots_tensor(run.slot, run.length).copy_(src[run.index:run.index + run.length].view(-1),
                                                              non_blocking=self.is_cuda)
            for i, (view, slot) in enumerate(zip(dests, slots, strict=True)):
                if view is not None and slot is None:
                    self._staging_pool.as_tensor(view).copy_(src[i], non_blocking=self.is_cuda)
            return self.record(self.store_stream)

    def _after_gather(self, after: Any) -> None:
        """Make the store stream wait for event ``after`` (None: for everything gathered so far)."""
        if after is not None:
            self.store_stream.wait_event(after)
        elif self.is_cuda:
            self.store_stream.wait_stream(self.gather_stream)

    @staticmethod
    def wait(event: Any) -> None:
        """Block the calling thread until ``event`` (from ``copy_to_host``) completes (None: at once)."""
        if event is not None:
            event.synchronize()

    def to_host(self, device_chunks: torch.Tensor, after: Any) -> list[np.ndarray]:
        """Copy gathered chunks into the store staging (one coalesced copy); blocks until done.

        Only one thread may store at a time: the views alias ``store_staging`` and are valid
        until the next ``to_host``.  ``copy_to_host`` into ``DramTier.reserve`` slots avoids
        the staging and the host copy after it.
        """
        n = device_chunks.shape[0]
        if n > self.group_chunks:
            raise IntegrationError(f"{n} chunks exceed the staging buffer of {self.group_chunks}")
        dst = self.store_staging[:n * self.layout.chunk_bytes]
        with self.stream_ctx(self.store_stream):
            self._after_gather(after)
            dst.copy_(device_chunks.view(-1), non_blocking=self.is_cuda)
            done = self.record(self.store_stream)
        self.wait(done)
        return self.views(self.store_staging, n)

    def record_now(self) -> Any:
        """An event at the end of the work queued so far on the current stream (None on CPU)."""
        return self.record(torch.cuda.current_stream(self.device)) if self.is_cuda else None
