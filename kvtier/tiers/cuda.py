"""G1 <-> G2: the copy engine between accelerator memory and the DRAM tier's pinned pool.

Not a Tier: it moves bytes between chunk payloads in host memory and KV tensors on a device,
and makes no policy decisions (what to load is ``kvtier.policy.cost``'s call, where bytes come
from is the hierarchy's).

Byte order.  A chunk payload is ``(num_layers, num_kv_parts, tokens_per_chunk, heads, head_dim)``
(``kvtier.layout``), so layer ``l`` of a chunk is the contiguous range
``[l * layer_bytes, (l + 1) * layer_bytes)``.  On the device a load lands in one
``(num_chunks, chunk_bytes)`` uint8 buffer, chunk-major like the host, and ``KVLoad.layer(l)``
is the strided ``(num_chunks, layer_bytes)`` view of layer ``l``; the consumer (the
transformers cache) permutes it into ``(heads, tokens, head_dim)`` in the one copy it needs
anyway.

CUDA.  Host sources are pinned (the DRAM pool is allocated pinned once, at start; staging
buffers likewise), so every copy is an asynchronous DMA (``non_blocking=True``) on a dedicated
stream per direction, never on the compute stream:

* bulk load: runs of chunks in consecutive pool slots are one copy each (coalesced), one event
  for the whole load;
* layer-wise load: layer 0 of every chunk, record event 0, layer 1 of every chunk, event 1, ...
  Layer ``l`` of a run of consecutive pool slots is one strided ``cudaMemcpy2DAsync`` (rows of
  ``layer_bytes`` at a pitch of ``chunk_bytes``; torch has no strided host-to-device copy
  without a host temporary); without it, one copy per layer and chunk.
  A consumer of layer ``l`` makes the *compute stream* wait on event ``l`` (a device-side wait:
  the host never blocks), so layer ``l+1`` streams in while layer ``l`` computes.
* store: per group of chunks, gather every layer's K and V into a ``(chunks, chunk_bytes)``
  device buffer (one small kernel per layer and part, on a gather stream, so the next group's
  gather overlaps this group's copy), then device-to-host copies straight into
  the DRAM slots that ``DramTier.reserve`` handed out (one copy per run of consecutive slots;
  ``copy_to_host``), committed once the copy's event has completed: no staging, no host memcpy.
  Without a DRAM top tier, one copy into pinned staging (``to_host``), then ``store``.

Before its first copy the side stream waits for the compute stream, because the caching
allocator may hand the load a block that queued compute kernels still use.  Host buffers must
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
        addr = view.__array_interface__["data"][0]
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
    """One in-flight load of ``num_chunks`` chunks into a device buffer; see the module docstring."""

    def __init__(self, engine: CopyEngine, num_chunks: int, *, layerwise: bool) -> None:
        self.engine = engine
        self.layout = engine.layout
        self.num_chunks = num_chunks
        self.layerwise = layerwise and engine.is_cuda
        self.buffer: torch.Tensor | None = torch.empty((num_chunks, self.layout.chunk_bytes), dtype=torch.uint8,
                                  device=engine.device)  # (chunks, chunk_bytes), chunk-major
        self._events: list[Any] = [None] * self.layout.num_layers
        self._final: Any = None
        self._released: set[int] = set()
        if engine.is_cuda:  # the buffer may be memory that queued compute kernels still use
            engine.load_stream.wait_stream(torch.cuda.current_stream(engine.device))
            # and if it is freed early (an error mid-forward), the allocator must not hand it out
            # again before the copies queued on the load stream are done
            self.buffer.record_stream(engine.load_stream)

    def _buf(self) -> torch.Tensor:
        if self.buffer is None:
            raise IntegrationError("this load was released: every layer has been consumed")
        return self.buffer

    # --- issuing copies (host side; returns at once on CUDA) --------------------------------
    def copy_chunks(self, host: Sequence[np.ndarray], first: int = 0) -> None:
        """Whole-chunk copies of ``host[i]`` to position ``first + i``, coalescing pool runs."""
        pool, eng, buf = self.engine.host_pool, self.engine, self._buf()
        slots = [pool.slot(v) for v in host]
        with eng.stream_ctx(eng.load_stream):
            for run in coalesce(slots):
                dst = buf[first + run.index:first + run.index + run.length].view(-1)
                dst.copy_(pool.slots_tensor(run.slot, run.length), non_blocking=True)
            for i, slot in enumerate(slots):
                if slot is None:
                    buf[first + i].copy_(pool.as_tensor(host[i]), non_blocking=True)

    def copy_layers(self, host: Sequence[np.ndarray], first: int = 0) -> None:
        """Layer by layer: layer ``l`` of every chunk, then event ``l`` (layer-wise pipelining).

        Without CUDA (or with ``layerwise=False``) this is ``copy_chunks`` plus one event.
        """
        if not self.layerwise:
            self.copy_chunks(host, first)
            return
        eng, lb, cb, buf = self.engine, self.layout.layer_bytes, self.layout.chunk_bytes, self._buf()
        pool = eng.host_pool
        slots = [pool.slot(v) for v in host] if eng.memcpy2d is not None else [None] * len(host)
        runs = coalesce(slots)  # with cudaMemcpy2DAsync: one strided copy per layer and run
        singles = [(i, pool.as_tensor(v)) for i, (v, s) in enumerate(zip(host, slots, strict=True)) if s is None]
        stream = eng.load_stream
        with eng.stream_ctx(stream):
            for layer in range(self.layout.num_layers):
                lo = layer * lb
                for run in runs:  # rows of layer_bytes, pitch chunk_bytes, on both sides
                    assert eng.memcpy2d is not None and pool.tensor is not None
                    eng.memcpy2d(buf[first + run.index].data_ptr() + lo, cb,
                                 pool.tensor.data_ptr() + run.slot * cb + lo, cb, lb, run.length, stream)
                for i, src in singles:
                    buf[first + i, lo:lo + lb].copy_(src[lo:lo + lb], non_blocking=True)
                self._events[layer] = eng.record(stream)

    def keep(self, first: int) -> None:
        """Use chunks ``[first, num_chunks)`` only: the consumer computed the ones before (a split)."""
        self.buffer = self._buf()[first:]
        self.num_chunks -= first

    def finish(self) -> None:
        """Mark the end of the issued copies (call once, after the last copy_*)."""
        self._final = self.engine.record(self.engine.load_stream)

    # --- consuming (compute side) -----------------------------------------------------------
    def layer(self, layer: int) -> torch.Tensor:
        """``(num_chunks, layer_bytes)`` uint8 view of one layer, safe to read on the current stream."""
        if self.buffer is None:
            raise IntegrationError("this load was released: every layer has been consumed")
        event = self._events[layer] if self._events[layer] is not None else self._final
        if event is not None:
            torch.cuda.current_stream(self.engine.device).wait_event(event)
        lb = self.layout.layer_bytes
        return self.buffer[:self.num_chunks, layer * lb:(layer + 1) * lb]

    def release_layer(self, layer: int) -> None:
        """The consumer copied layer ``layer`` out; the device buffer goes once all layers have.

        Freeing on the compute stream is safe: it waited for every copy it read.
        """
        self._released.add(layer)
        if len(self._released) == self.layout.num_layers:
            self.buffer = None

    def wait_host(self) -> None:
        """Block until every copy has read its host source (then host buffers may be reused)."""
        if self._final is not None:
            self._final.synchronize()


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
    def start_load(self, num_chunks: int, *, layerwise: bool = True) -> KVLoad:
        return KVLoad(self, num_chunks, layerwise=layerwise)

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
