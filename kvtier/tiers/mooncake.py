"""G4 on Mooncake Store: chunks in a cluster's pooled DRAM, found by every instance and node.

Key: ``<key_prefix>:<layout fingerprint, 16 hex>:<chunk key, 32 hex>`` (a Mooncake object key).
Value: the chunk format of ``kvtier.codec`` (64-byte header with checksums, then the payload).
A value failing validation, or of the wrong size, is removed, counted in ``stats.corrupt`` and
reported as a miss.

Data path: the tier owns one staging arena of ``staging_bytes`` (whole slots of header + chunk),
registered once with ``register_buffer`` so Mooncake's transfer engine moves bytes straight
between the arena and the storage nodes (no copies inside Mooncake).  A get lands in a slot
(``batch_get_into``), is validated there and only then copied into the caller's buffer, so a
bad value never touches it.  A put checksums the caller's payload, writes the 64-byte header
into a slot and sends header and payload as the two parts of one object
(``batch_put_from_multi_buffers``) straight from the caller's memory when that memory is
registered; otherwise it copies the payload behind the header in the slot first.  Caller memory
gets registered once per allocation (the top-level array a payload is a view of, e.g. a DRAM
pool), when that allocation holds at least two chunks (``zero_copy_min_bytes``): registering is
~0.5 ms, more than copying one small chunk.  It happens on a worker; puts copy until it is done.
The registration ends when that array is freed or the tier closes.  A call keeps its payload
arrays referenced until it really ends; one that overran may still be reading the caller's
payload after ``put`` returned False: if the caller rewrites it meanwhile, the stored value
fails its checksum on the next read (a counted miss, deleted), as any torn value does.  A batch
larger than the arena goes in rounds (``rounds_in_flight`` of them at once).

Faults: the Mooncake client retries internally for seconds when the master is gone, and its
``setup`` blocks for about 90 s, so every call runs on a small worker pool and the tier waits
at most ``timeout_s`` for it.  A whole tier call (the set-up wait, waits for staging slots, every
round of a batch larger than the arena) ends within ``deadline_s``: each wait is cut to what is
left, no round starts past the deadline, and a round that overruns it is a failure like any
overrun.  A call that fails (RPC or transfer error) or overruns records a
failure on the tier's ``CircuitBreaker``; while it is open every operation is a miss at once.
A call that overran keeps its staging slots until it really ends, so late bytes never land in
memory that was handed to someone else, and never in the caller's buffer.  Setup is retried
the same way (the first request after the backoff), so a tier built while the master is down
starts serving by itself when the master comes up.  Counted in ``stats.errors`` (keys whose
operation failed) and ``stats.extra["short_circuited"]`` (keys answered by an open breaker);
``stats.extra["zero_copy_puts"]`` counts chunks sent straight from the caller's memory.

Memory: with ``global_segment_size=0`` an inference process only reads and writes; dedicated
storage nodes (``mooncake_client`` or ``mooncake_store_service``) hold the chunks, so they
outlive the processes that wrote them.  A master restart without HA loses every object: they
are misses until written again.  ``keys()`` yields the chunks this process wrote or found
(the client API has no listing); ``used_bytes`` counts those.

Key naming, the known set and budget, counters, corrupt-chunk handling and the per-call deadline
are ``RemoteTier``'s (``kvtier.tiers.remote``); the arena, registered caller memory and the worker
pool are ``kvtier.tiers.mooncake_memory``'s; this module owns the store, its set-up, the breaker
and the rounds of a batch.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any, TypeVar

import numpy as np

from kvtier.codec import HEADER_BYTES, decode_chunk_into, encode_header
from kvtier.config.schema import MooncakeConfig
from kvtier.errors import ChunkFormatError, TierUnavailableError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.breaker import BreakerMode, CircuitBreaker
from kvtier.tiers.mooncake_memory import INVALID_PARAMS, CallerMemory, StagingArena, Workers
from kvtier.tiers.remote import RemoteTier, under_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")


# Mooncake Store error codes (mooncake-store/include/types.h) that matter here.
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
# INVALID_PARAMS (-600): on a get, the object is larger than the buffer, so not one of our chunks


def is_server_failure(code: int) -> bool:
    """Codes meaning the master or a storage node is unreachable or broken (they feed the breaker).

    INTERNAL_ERROR (-1), TRANSFER_FAIL (-800), RPC_FAIL (-900), etcd/HA errors (-1000..-1011).
    Anything else (not found, store full, lease held, bad size) is an ordinary miss or refusal.
    """
    return code == -1 or -1011 <= code <= -800


class MooncakeTier(RemoteTier):
    name = "mooncake"
    what = "Mooncake"
    # Caller allocations smaller than this are copied into staging rather than registered
    # (0 = twice the chunk size: a registration costs more than copying one small chunk).
    zero_copy_min_bytes = 0
    max_registered = 64  # caller allocations registered at once; the rest are copied
    # Rounds of one batch in flight at once.  2 overlaps one round's copy and checksum with the
    # other's transfer, which measured slower on a 2-core box (gets of 32 MiB chunks: 0.5x vs 0.8x
    # of raw); raise it where the client has cores to spare.
    rounds_in_flight = 1

    def __init__(self, layout: KVLayout, config: MooncakeConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or MooncakeConfig()
        super().__init__(layout, key_prefix=self.config.key_prefix, capacity=self.config.capacity,
                         deadline_s=self.config.deadline_s, counters=("zero_copy_puts",))
        self.slot_bytes = HEADER_BYTES + layout.chunk_bytes
        self.num_slots = max(2, self.config.staging_bytes // self.slot_bytes)
        self._arena = StagingArena(self.slot_bytes, self.num_slots)
        self.breaker = CircuitBreaker(self.config.breaker, clock=clock)
        self._workers = Workers(max_workers=4)
        self._store: Any = None
        self._setup: Future[Any] | None = None
        self._closed = False
        self._caller_memory = CallerMemory(min_bytes=self.zero_copy_min_bytes or 2 * layout.chunk_bytes,
                                           max_registered=self.max_registered, spawn=self._workers.spawn)
        self._connect()

    # --- connection ---------------------------------------------------------------------------
    def _make_store(self) -> Any:
        from mooncake.store import MooncakeDistributedStore

        c = self.config
        _check_reachable(c.master_address, c.timeout_s)  # setup itself blocks ~90 s on a dead master
        store = MooncakeDistributedStore()
        rc = store.setup(c.local_hostname, c.metadata_server, int(c.global_segment_size), int(c.local_buffer_size),
                         c.protocol, c.device_name, c.master_address)
        if rc != 0:
            raise TierUnavailableError(f"Mooncake setup failed with code {rc} (master {c.master_address}, "
                                       f"metadata {c.metadata_server})")
        rc = store.register_buffer(self._arena.array.ctypes.data, self._arena.array.nbytes)
        if rc != 0:
            store.close()
            raise TierUnavailableError(f"Mooncake register_buffer of {self._arena.array.nbytes} bytes failed: {rc}")
        return store

    def _connect(self) -> Any:
        """The store, or None while set-up is under way or the breaker holds off another attempt.

        Whoever starts a set-up attempt waits for it up to ``timeout_s``; calls meanwhile are
        misses at once.  The attempt's outcome is recorded when it ends, however late.
        """
        if self._store is not None:
            return self._store
        with self._lock:
            if self._setup is not None or self._closed or not self.breaker.allow():
                return None
            setup = self._setup = self._workers.spawn(self._make_store)
        setup.add_done_callback(self._setup_done)
        wait([setup], timeout=self._budget())
        return self._store

    def _setup_done(self, setup: Future[Any]) -> None:
        exc = setup.exception()
        with self._lock:
            self._setup = None
            store = None if exc is not None else setup.result()
            if store is not None and not self._closed:
                self._store, store = store, None
        if exc is not None:
            log.warning("Mooncake Store unavailable: %s", exc)
            self._record_failure()
            return
        self.breaker.record_success()
        if store is not None:  # closed meanwhile
            store.close()

    def _record_failure(self) -> None:
        self._breaker_failed(self.breaker)

    def _reachable(self, n: int) -> bool:
        """Cheap check before taking staging slots: False (counted) when set-up or the breaker says no."""
        if self._connect() is None or self.breaker.mode is BreakerMode.OPEN:
            self._count(short_circuited=n)
            return False
        return True

    def _submit(self, n: int, fn: Callable[[Any], T]) -> Future[T] | None:
        """Start ``fn(store)`` on the worker pool, or None (counted) when the breaker or set-up says no."""
        store = self._connect()
        if store is None or not self.breaker.allow():
            self._count(short_circuited=n)
            return None
        return self._workers.spawn(fn, store)

    def _wait(self, n: int, future: Future[T] | None) -> T | None:
        """The call's result, or None when it raised or overran ``timeout_s`` (a breaker failure)."""
        if future is None:
            return None
        try:
            return future.result(timeout=self._budget())
        except FutureTimeout:
            log.warning("Mooncake call overran %.1fs (timeout_s) or its deadline_s=%.1f", self.config.timeout_s,
                        self.config.deadline_s)
        except Exception as exc:
            log.warning("Mooncake call failed: %s", exc)
        self._record_failure()
        self._count(errors=n)
        return None

    def _call(self, n: int, fn: Callable[[Any], T]) -> T | None:
        return self._wait(n, self._submit(n, fn))

    def _judge(self, codes: Sequence[int]) -> int:
        """Feed a batch's return codes to the breaker; returns how many were server failures."""
        failed = sum(1 for c in codes if c < 0 and is_server_failure(c))
        if failed:
            self._record_failure()
            self._count(errors=failed)
        else:
            self.breaker.record_success()
        return failed

    def _pipelined(self, todo: list[int], start: Callable[[list[int], list[int]], Future[list[int]] | None],
                   finish: Callable[[list[int], list[int], list[int]], None]) -> None:
        """Move ``todo`` (indexes into the caller's lists) in rounds of at most arena / depth slots.

        ``start(batch, slots)`` fills slots if needed and submits the Mooncake call; with a depth
        of 2 the next round is started while one is in flight.  ``finish(batch, slots, codes)``
        reads the results of a round whose call succeeded; its slots are freed once the call has
        really ended.
        """
        depth = self.rounds_in_flight
        per_round = max(1, self.num_slots // depth)
        inflight: deque[tuple[list[int], list[int], Future[list[int]] | None]] = deque()
        while todo or inflight:
            if todo and self._out_of_time():
                self._count(errors=len(todo))  # past the call's deadline: no new round
                todo = []
                continue
            if todo and len(inflight) < depth:
                slots = self._arena.take(min(per_round, len(todo)), self._budget())
                if slots:
                    batch, todo = todo[:len(slots)], todo[len(slots):]
                    inflight.append((batch, slots, start(batch, slots)))
                    continue
                self._count(errors=len(todo))  # no staging memory within timeout_s: give up on the rest
                todo = []
                continue
            batch, slots, future = inflight.popleft()
            codes = self._wait(len(batch), future)
            try:
                if codes is not None:
                    finish(batch, slots, codes)
            finally:
                self._arena.give_when_done(future, slots)

    # --- the call's deadline (``RemoteTier._deadline``) ---------------------------------------
    def _budget(self) -> float:
        """How long one wait may last: ``timeout_s``, cut to what is left of the call's deadline."""
        deadline = self._call_deadline()
        return self.config.timeout_s if deadline is None else min(self.config.timeout_s, deadline.remaining())

    def _out_of_time(self) -> bool:
        deadline = self._call_deadline()
        return deadline is not None and deadline.expired

    # --- caller memory for zero-copy puts (``CallerMemory``) ---------------------------------
    def _registered(self, root: np.ndarray) -> bool:
        """True when caller allocation ``root`` is registered with the store; False means copy.

        Decided once per allocation per ``put_many``, so a registration that ends mid-call does
        not make some payloads go zero-copy and others not.
        """
        usable = not self._closed and self.breaker.mode is BreakerMode.CLOSED
        return self._caller_memory.registered(root, self._store if usable else None)

    # --- keys ---------------------------------------------------------------------------------
    def object_key(self, key: ChunkKey) -> str:
        return self.remote_name(key)

    # --- Tier interface -----------------------------------------------------------------------
    @under_deadline
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) != len(payloads):
            raise ValueError("put_many needs one payload per key")
        for p in payloads:
            self.layout.check_payload(p)
        ok = [False] * len(keys)
        if not self._reachable(len(keys)):
            return ok
        todo = self._within_budget(keys, payloads)
        zero_copy: dict[int, bool] = {}  # id(root allocation) -> registered: decided once per call

        def start(batch: list[int], slots: list[int]) -> Future[list[int]] | None:
            parts: list[list[int]] = []
            sizes: list[list[int]] = []
            for s, i in zip(slots, batch, strict=True):
                payload, view = payloads[i], self._arena.slot(s)
                view[:HEADER_BYTES] = np.frombuffer(encode_header(keys[i], self.layout.fingerprint, payload),
                                                    dtype=np.uint8)
                root = _root(payload)
                if id(root) not in zero_copy:
                    zero_copy[id(root)] = self._registered(root)
                if zero_copy[id(root)]:
                    parts.append([self._arena.ptr(s), payload.ctypes.data])
                    sizes.append([HEADER_BYTES, payload.nbytes])
                else:
                    view[HEADER_BYTES:] = payload
                    parts.append([self._arena.ptr(s)])
                    sizes.append([self.slot_bytes])
            with self._lock:
                self.stats.extra["zero_copy_puts"] += sum(len(p) == 2 for p in parts)
            names = [self.object_key(keys[i]) for i in batch]
            # the payloads ride along so that their memory outlives a call that overran
            return self._submit(len(batch), partial(_batch_put_parts, names, parts, sizes,
                                                    [payloads[i] for i in batch]))

        def finish(batch: list[int], slots: list[int], codes: list[int]) -> None:
            self._judge(codes)
            stored = [i for i, code in zip(batch, codes, strict=True) if code == 0 or code == OBJECT_ALREADY_EXISTS]
            for i in stored:
                ok[i] = True
            self._found([keys[i] for i in stored], sum(payloads[i].nbytes for i in stored), written=True)

        self._pipelined(todo, start, finish)
        return ok

    @under_deadline
    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) != len(outs):
            raise ValueError("get_many_into needs one buffer per key")
        ok = [False] * len(keys)
        if not self._reachable(len(keys)):
            return ok
        corrupt: list[ChunkKey] = []

        def start(batch: list[int], slots: list[int]) -> Future[list[int]] | None:
            names = [self.object_key(keys[i]) for i in batch]
            return self._submit(len(batch), partial(_batch_get_into, names, [self._arena.ptr(s) for s in slots],
                                                    self.slot_bytes))

        def finish(batch: list[int], slots: list[int], codes: list[int]) -> None:
            self._judge(codes)
            corrupt.extend(self._unpack(keys, outs, ok, batch, slots, codes))

        self._pipelined(list(range(len(keys))), start, finish)
        self._drop_corrupt(corrupt)
        return ok

    def _unpack(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray], ok: list[bool], batch: list[int],
                slots: list[int], codes: Sequence[int]) -> list[ChunkKey]:
        """Validate fetched slots and copy payloads out; returns the keys whose values are bad."""
        corrupt: list[ChunkKey] = []
        for s, i, n in zip(slots, batch, codes, strict=False):
            if n < 0:
                if n == INVALID_PARAMS:  # larger than a chunk: not ours
                    corrupt.append(keys[i])
                elif n == OBJECT_NOT_FOUND:
                    self._gone([keys[i]])
                continue
            try:
                got = decode_chunk_into(self._arena.slot(s)[:n].data, outs[i], key=keys[i],
                                        layout_fingerprint=self.layout.fingerprint,
                                        chunk_bytes=self.layout.chunk_bytes)
            except ChunkFormatError as exc:
                self._corrupt(keys[i], exc, log)
                corrupt.append(keys[i])
                continue
            ok[i] = True
            self._found([keys[i]], got)
        return corrupt

    @under_deadline
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.object_key(k) for k in keys]
        codes = self._call(len(keys), lambda st: st.batch_is_exist(names))
        if codes is None:
            return [False] * len(keys)
        self._judge(codes)
        return [c == 1 for c in codes]

    @under_deadline
    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.object_key(k) for k in keys]
        codes = self._call(len(keys), lambda st: st.batch_remove(names, True))  # force: ignore read leases
        if codes is None:
            return [False] * len(keys)
        self._judge(codes)
        self._gone([key for key, code in zip(keys, codes, strict=True) if code == 0 or code == OBJECT_NOT_FOUND])
        return [c == 0 for c in codes]

    def close(self) -> None:
        """Stop taking calls, then release memory once no call can touch it any more.

        Queued calls are cancelled; calls already running may still move bytes into the arena
        or out of registered caller memory, so they are waited for (up to ``timeout_s``) before
        any buffer is unregistered.  Calls that overrun that leave the release to the last of them.
        """
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        self._workers.shutdown()
        ptrs = self._caller_memory.close()
        self._workers.after_running(self.config.timeout_s, partial(self._release_memory, store, ptrs))

    def _release_memory(self, store: Any, ptrs: list[int]) -> None:
        """Unregister caller memory and the arena, and close the client (no call is running)."""
        if store is None:
            return
        for ptr in ptrs:
            try:
                store.unregister_buffer(ptr)
            except Exception as exc:
                log.info("Mooncake unregister_buffer: %s", exc)
        try:
            store.unregister_buffer(self._arena.array.ctypes.data)
            store.close()
        except Exception as exc:  # closing a client whose master is gone
            log.info("Mooncake close: %s", exc)


def _root(payload: np.ndarray) -> np.ndarray:
    """The top-level array ``payload`` is a view of (the allocation that gets registered)."""
    root = payload
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


def _check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise TierUnavailableError(f"Mooncake master {address} unreachable: {exc}") from exc


def _batch_put_parts(names: list[str], parts: list[list[int]], sizes: list[list[int]],
                     keep: list[np.ndarray], store: Any) -> list[int]:
    """Each object is the concatenation of its parts (header slot, then payload)."""
    del keep  # referenced until here, so the payload memory outlives the call
    return list(store.batch_put_from_multi_buffers(names, parts, sizes))


def _batch_get_into(names: list[str], ptrs: list[int], size: int, store: Any) -> list[int]:
    return list(store.batch_get_into(names, ptrs, [size] * len(names)))
