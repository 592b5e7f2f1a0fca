"""ContextMemory: the tier hierarchy (G2 DRAM -> G3 disk -> G4 shared) behind one API.

Follow a chunk:

* **Store**, one path for every producer: reserve -> fill -> commit.  ``_reserve`` makes room in
  the top tier (its policy picks victims; a victim is **demoted**: written to the next tier down
  unless that tier has it, then deleted) and reserves a DRAM slot per new chunk, *pending* until
  published.  ``store_in_place(keys)`` hands the slots to a producer that writes them itself (a
  GPU copy engine), ``store(keys, payloads)`` copies each payload in, a promotion reads a lower
  tier into them.  ``_commit`` publishes them, places the chunks that got no slot, and (with
  ``write_through``) copies them in the background to every persistent or shared tier.
* **Inclusive or exclusive** tiers.  Inclusive (the default): every new chunk is written through,
  so a lower tier holds a copy of most of DRAM and G2 + G3 hold about max(G2, G3) of chunks.
  Exclusive (``exclusive=True``), between the top tier and the one below it (G2 and G3): only
  pinned chunks and the leading ``write_through_share`` of each stored batch are written through
  to G3; other chunks reach it when DRAM evicts them (demotion), and a promoted chunk leaves it
  (unless pinned), so G2 + G3 add up.  Tiers further down (G4) still take every write-through.
  ``close`` moves what only DRAM holds down to G3, so a restart finds it; a crash loses it.
  What each costs on a crash and for sharing: ``docs/benchmarks.md``.
* ``lookup(keys)`` answers the longest cached prefix and which tier holds each chunk, from the
  in-process indexes plus one batched ``contains`` probe per shared tier past the local hits.
  No payload moves: it is cheap enough for an engine's scheduler loop.
* **Load**, one path (``_borrow``): look the prefix up and *hold* it (a chunk being read is no
  victim), borrow the top-tier hits zero-copy, read lower-tier hits straight into slots reserved
  for them (**promotion in place**), one batched read per tier.  A failed read (corrupt,
  vanished) tries the copies below; a chunk with no good copy ends the prefix: a miss, never
  served.  ``borrow_prefix(keys)`` yields the views; ``load(keys, outs)`` copies each out.
* ``pin(keys)`` keeps chunks from being evicted from any tier (token warehousing);
  ``pin(keys, persist=True)`` records the pin in the disk tier, so it survives restarts and
  binds every process sharing that disk root; ``unpin`` releases this process's pins only,
  ``unpin(keys, persist=True)`` removes the records.
* ``hint(keys, session=, retention=)`` / ``hint_end(session, awaits=)`` tell the eviction policy
  what comes (``kvtier.policy.agent``, ``kvtier.policy.retention``); an answer awaiting a tool
  also prefetches the session's chunks back into DRAM in the background (``kvtier.prefetch``).
* The disk's capacity is the **root's**, shared by every process on it: before a put into the
  disk, every ``DiskTier.survey_s`` the index re-reads the root, adopts the chunks others wrote
  (they may be victims here) and leaves room for every other file (``_survey_disk``).

Tiers without slots (below DRAM, or a top tier without ``capabilities.slots``) take bytes through ``Tier.put``
(``_put``: demotion, write-through, chunks put below), room made the same way (``Directory.prepare_store``).

Bookkeeping lives in ``kvtier.directory`` (index, policies, pins, and each chunk's state: STORING,
PRESENT, LEAVING, read), which never touches bytes; every method here is plan (directory) -> move
(tiers) -> complete (directory).  Payload bytes move outside the directory's lock.  A chunk being
written is STORING (*pending*): lookups do not report it until its bytes are in.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from kvtier.config import KVTierConfig, check_openable, load_config, read_tenant_secret
from kvtier.directory import Directory
from kvtier.errors import ArgumentTypeError, ArgumentValueError, ConfigError, TierError
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout
from kvtier.policy.eviction import AWAITS, EvictionPolicy, make_policies
from kvtier.policy.retention import Retention
from kvtier.prefetch import Prefetcher
from kvtier.tiers import make_tier
from kvtier.tiers.base import Tier, TierStats
from kvtier.tiers.disk import DiskTier
from kvtier.validate import buffers_arg, chunk_keys_arg, count_arg, payloads_arg, ttl_arg

log = logging.getLogger(__name__)
_WRITER = "kvtier-writeback"  # the background thread's name prefix


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The longest cached prefix of a key sequence."""

    tiers: tuple[int, ...]  # tier level holding each chunk of the prefix (0 = top)
    tokens_per_chunk: int

    @property
    def num_chunks(self) -> int:
        return len(self.tiers)

    @property
    def num_tokens(self) -> int:
        return len(self.tiers) * self.tokens_per_chunk

    def chunks_per_tier(self, num_tiers: int) -> list[int]:
        counts = [0] * num_tiers
        for level in self.tiers:
            counts[level] += 1
        return counts


@dataclass(slots=True)
class _Reservation:
    """Where the bytes of each of ``keys`` go (from ``ContextMemory._reserve``); lists hold positions."""

    keys: list[ChunkKey]
    views: list[np.ndarray | None]  # a reserved top-tier slot, a spill buffer, or None (held already)
    slotted: list[int] = field(default_factory=list)  # reserved slots, pending until published
    spilled: list[int] = field(default_factory=list)  # no slot: the bytes wait in a plain buffer
    present: list[int] = field(default_factory=list)  # held already (or repeated): nothing to write

    def buffer(self, i: int) -> np.ndarray:
        view = self.views[i]
        assert view is not None
        return view

    def cut(self, upto: int) -> _Reservation:
        """Keep ``keys[:upto]``; return the slots reserved past it (to give back)."""
        tail = _Reservation(self.keys, self.views, [i for i in self.slotted if i >= upto])
        self.slotted = [i for i in self.slotted if i < upto]
        self.spilled = [i for i in self.spilled if i < upto]
        self.present = [i for i in self.present if i < upto]
        return tail


class InPlaceStore:
    """Chunks being written in place by the caller; from ``ContextMemory.store_in_place``.

    ``views[i]`` is where chunk ``keys[i]``'s bytes go: a reserved slot of the top DRAM tier, a
    plain host buffer (no slot: the top tier has no slots, or full of pinned, pending or held
    chunks; the commit places it as ``store`` would), or None (the hierarchy holds the chunk
    already: write nothing).  Either ``commit`` once every write is done, or ``abort``; as a
    ``with`` block it commits on a normal exit and aborts on an exception.  The views must not
    be used after either.
    """

    def __init__(self, memory: ContextMemory, reservation: _Reservation) -> None:
        self.memory = memory
        self.keys = reservation.keys
        self.views = reservation.views
        self.num_in_place = len(reservation.slotted)  # chunks written straight into top-tier slots
        self.stored: int | None = None  # chunks stored, once committed
        self._reservation = reservation
        self._open = True

    def commit(self, upto: int | None = None) -> int:
        """Publish the chunks (their bytes must all be written); returns how many were stored.

        ``upto``: publish only ``keys[:upto]`` (the rest were not written: dropped, as ``abort``).
        """
        if not self._open:
            raise RuntimeError("this in-place store was committed or aborted already")
        if upto is not None:
            upto = count_arg(upto, "upto", upper=len(self.keys))
        self._open = False
        if upto is not None:
            self.memory._finish(self._reservation.cut(upto), publish=False)
        self.stored = self.memory._commit(self._reservation)
        return self.stored

    def abort(self) -> None:
        """Drop the reservations: nothing is stored (victims demoted to make room stay demoted)."""
        if self._open:
            self._open = False
            self.memory._finish(self._reservation, publish=False)

    def __enter__(self) -> InPlaceStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.commit()


class ContextMemory:
    """A hierarchy of tiers for the KV chunks of one model layout."""

    def __init__(self, layout: KVLayout, tiers: Sequence[Tier], *, eviction: str = "lru",
                 promotion: str = "always", write_through: bool = True, tenant: str = "",
                 tenant_secret: bytes | None = None, exclusive: bool = False, write_through_share: float = 0.0,
                 policies: Sequence[EvictionPolicy] | None = None, prefetch_share: float = 0.0) -> None:
        """``policies``: one prebuilt eviction policy per tier, in place of ``eviction``'s;
        ``prefetch_share``: see ``kvtier.prefetch`` (``open`` takes ``prefetch.dram_share``)."""
        if not tiers:
            raise ValueError("ContextMemory needs at least one tier")
        self.layout = layout
        self.chunk_bytes = layout.chunk_bytes  # read per chunk on every path; the layout computes it per call
        self.tiers = list(tiers)
        self.namespace = namespace_key(layout, tenant, secret=tenant_secret)  # keyed with a secret
        self.promotion = promotion
        self.write_through = write_through
        if not 0.0 <= write_through_share <= 1.0:
            raise ConfigError(f"write_through_share must be in [0, 1], got {write_through_share}")
        self.exclusive = exclusive  # see the module docstring
        self.write_through_share = write_through_share  # exclusive: leading share written through
        disks = [t for t in self.tiers if isinstance(t, DiskTier)]
        self.pin_files = disks[0].pin_files if disks else None  # persistent pins, node-wide
        self.directory = Directory([t.name for t in self.tiers], [t.capacity_bytes for t in self.tiers],
                                   policies or make_policies(eviction, len(self.tiers)),
                                   chunk_bytes=layout.chunk_bytes, pin_records=self.pin_files)
        self.indexes = self.directory.indexes  # read-only views of the directory's state
        self.pins = self.directory.pins
        self._lock = self.directory.lock  # held across a few directory calls and tier calls that must agree
        self._surveying = threading.Lock()  # one ``_survey_disk`` at a time
        self._survey_job: Future[None] | None = None  # one queued for the writer thread
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WRITER)
        self._inflight: list[Future[None]] = []
        for level, tier in enumerate(self.tiers):  # persistent tiers come back with their chunks
            for key in tier.keys():  # noqa: SIM118 - oldest first where the tier knows ages (disk: mtime)
                self.indexes[level].add(key, layout.chunk_bytes)
        self.prefetch = Prefetcher(self, prefetch_share)  # during pauses: ``hint_end(awaits="tool")``

    @classmethod
    def open(cls, layout: KVLayout, config: KVTierConfig | None = None) -> ContextMemory:
        """Build the tiers named in ``config`` (default: ``load_config()``) and wrap them."""
        config = config or load_config()
        check_openable(config)  # a field name (disk.path, dram.capacity), not an OSError or MemoryError
        if layout.tokens_per_chunk != config.chunk_tokens:
            layout = replace(layout, tokens_per_chunk=config.chunk_tokens)
        secret = read_tenant_secret(config)
        tiers: list[Tier] = []
        try:
            for name in config.tiers:
                tiers.append(make_tier(name, config, layout))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return cls(layout, tiers, eviction=config.eviction, promotion=config.promotion,
                   write_through=config.write_through, tenant=config.tenant,
                   tenant_secret=secret, exclusive=config.exclusive,
                   write_through_share=config.write_through_share, prefetch_share=config.prefetch.dram_share)

    def listen(self, callback: Callable[[str, ChunkKey, bool], None]) -> None:
        """Call ``callback(tier name, key, added)`` for every chunk held now and each change after.

        Called under the hierarchy's lock, from whichever thread changes the index: keep it cheap
        (append to a list).  A chunk is reported when its space is reserved, before its bytes are
        in; a reader that acts on the report waits for the store itself (the vLLM worker does).
        """
        self.directory.listen(callback)

    # --- keys -------------------------------------------------------------------------------
    def keys_for(self, token_ids: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """Keys of every full chunk of a token sequence (the partial tail has none).

        ``token_ids``: a 1-D sequence or array of ints in [0, 2**31); floats are refused.
        """
        return chunk_keys(token_ids, tokens_per_chunk=self.layout.tokens_per_chunk, namespace=self.namespace)

    # --- lookup: control plane only ---------------------------------------------------------
    def lookup(self, keys: Iterable[ChunkKey]) -> PrefixHit:
        """Longest prefix of ``keys`` (any iterable) held by some tier, and the tier of each chunk."""
        keys = chunk_keys_arg(keys)
        levels = self.directory.lookup(keys)
        if len(levels) < len(keys):
            levels += self._probe_shared(keys[len(levels):])
        return PrefixHit(tuple(levels), self.layout.tokens_per_chunk)

    def _probe_shared(self, keys: Sequence[ChunkKey], batch: int = 64) -> list[int]:
        """Levels of the longest run of ``keys`` found by asking the shared tiers themselves."""
        shared = [lv for lv, t in enumerate(self.tiers) if t.shared]
        levels: list[int] = []
        for start in range(0, len(keys), batch):
            window = keys[start:start + batch]
            found: list[int | None] = [None] * len(window)
            for level in shared:
                todo = [i for i, f in enumerate(found) if f is None]
                if not todo:
                    break
                present = self.tiers[level].contains_many([window[i] for i in todo])
                for i, hit in zip(todo, present, strict=True):
                    if hit:
                        found[i] = level
            for key, level_or_none in zip(window, found, strict=True):
                if level_or_none is None or self.directory.leaving(level_or_none, key):
                    return levels
                levels.append(level_or_none)
        return levels

    # --- load: bytes out --------------------------------------------------------------------
    def load(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> int:
        """Copy the longest available prefix of ``keys`` into ``outs``; returns chunks loaded.

        Each ``outs[i]`` is a ``layout.chunk_bytes`` uint8 buffer; chunk i is loaded only if chunks
        0..i-1 were.  The load path (``_borrow``), one copy out of each view; lower-tier hits promoted.
        """
        keys = chunk_keys_arg(keys)
        outs = buffers_arg(outs, len(keys), self.layout)
        with self._borrow(keys, outs) as views:
            copies = [(out, view) for out, view in zip(outs, views, strict=False) if view is not out]
            for out, view in copies:
                np.copyto(out[:view.nbytes], view)
        self.tiers[0].stats.bytes_read += len(copies) * self.chunk_bytes
        if len(views) < len(keys):
            self.account_load([], [], miss_at=len(views))
        return len(views)

    def borrow_prefix(self, keys: Sequence[ChunkKey]) -> contextlib.AbstractContextManager[list[np.ndarray]]:
        """Read-only views of a loadable prefix of ``keys``, valid until the ``with`` block ends.

        ``load`` without its copies, for an engine that copies host chunks into its own memory
        (vLLM's paged blocks).  Until the block ends the slots are not reused and the chunks not
        evicted; a chunk that gets no DRAM slot (DRAM full of pinned or borrowed chunks) is read
        into a plain buffer, and promoted when the block ends.  The prefix ends at a miss: the
        caller loads the rest with ``load``, which also counts the miss.  Yields ``[]`` when the
        top tier has no slots (``capabilities.slots``) or promotion is off.
        """
        keys = chunk_keys_arg(keys)
        if not self.tiers[0].capabilities.slots or self.promotion != "always":
            return contextlib.nullcontext([])
        return self._borrow(keys, None)

    @contextlib.contextmanager
    def _borrow(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray] | None) -> Iterator[list[np.ndarray]]:
        """The load path: views of the longest loadable prefix of ``keys``, valid in the block.

        Every chunk read without a top-tier slot (none free, promotion off, the top tier is not
        DRAM) lands in ``outs[i]`` (None: a fresh buffer); with promotion on it is promoted
        (``_commit``) after the block, once the hold on the prefix is released.
        """
        top, size = self.tiers[0], self.chunk_bytes
        with contextlib.ExitStack() as stack:  # unwinds: borrows, unpublished slots, the hold
            keys, levels = stack.enter_context(self._hold(keys))
            promote = [i for i, level in enumerate(levels) if level > 0] if self.promotion == "always" else []
            res = self._reserve([keys[i] for i in promote], None if outs is None else [outs[i] for i in promote])
            stack.callback(self._finish, res, publish=False)  # a no-op once published
            slotted = {promote[j] for j in res.slotted}
            targets = {promote[j]: view for j, view in enumerate(res.views) if view is not None}
            for i in range(len(keys)):  # the rest that must be read: into the caller's buffers
                if i not in targets and (levels[i] > 0 or not top.capabilities.zero_copy_borrow):
                    targets[i] = outs[i] if outs is not None else np.empty(size, np.uint8)
            n, served = self._read(keys, levels, targets)
            self._finish(res.cut(bisect.bisect_left(promote, n)), publish=False)  # past the prefix
            promoted = self._finish(res, publish=True)
            views: list[np.ndarray] = []
            plain = {i: view for i, view in targets.items() if i not in slotted}
            for i in range(n):  # the rest are in top-tier slots: borrowed
                view = plain[i] if i in plain else stack.enter_context(top.borrow(keys[i]))
                if view is None:  # deleted meanwhile (``delete``)
                    n = i
                    break
                views.append(view)
            top.stats.promotions += len(promoted)
            self.account_load(keys[:n], served[:n])
            if self.exclusive:  # after the accounting, which would adopt them again
                self._drop_below(promoted)
            yield views
        self._commit(res, promotion=True)

    @contextlib.contextmanager
    def _hold(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[list[ChunkKey], list[int]]]:
        """``lookup``, and hold the prefix found (no top-tier victims) for the block."""
        hit = self.lookup(keys)
        keys, levels = self.directory.prepare_load(keys[:hit.num_chunks], hit.tiers,
                                                   top_slots=self.tiers[0].capabilities.slots)
        try:
            yield keys, levels
        finally:
            self.directory.complete_load(keys)

    def _read(self, keys: list[ChunkKey], levels: list[int], targets: dict[int, np.ndarray]) -> tuple[int, list[int]]:
        """Read ``keys[i]`` into ``targets[i]``, one ``get_many_into`` per tier; a failed read
        (corrupt, vanished) tries the copies below.  Returns (chunks read, tier of each)."""
        n, served, failed = len(keys), list(levels), []
        for level in sorted({levels[i] for i in targets}):
            idxs = [i for i in targets if levels[i] == level]
            got = self.tiers[level].get_many_into([keys[i] for i in idxs], [targets[i] for i in idxs])
            failed += [i for i, good in zip(idxs, got, strict=True) if not good]
        for i in sorted(failed):  # in prefix order, up to the first chunk with no good copy
            if i >= n:
                break
            good, served[i] = self._load_below(keys[i], targets[i], levels[i])
            if not good:
                n = i
        return n, served

    def _load_below(self, key: ChunkKey, out: np.ndarray, failed_level: int) -> tuple[bool, int]:
        self._forget_failed(failed_level, key)
        level = failed_level
        while level + 1 < len(self.tiers):
            level += 1
            tier = self.tiers[level]
            if key in self.indexes[level] or tier.shared:
                if tier.get_into(key, out):
                    return True, level
                self._forget_failed(level, key)
        return False, failed_level

    def _forget_failed(self, level: int, key: ChunkKey) -> None:
        """A read from tier ``level`` failed (corrupt, vanished): drop ``key`` from its index, unless
        a store put it back since (pending, or there again: a local tier is asked, under the lock,
        so an eviction and a re-store between the read and now leave the new copy indexed)."""
        tier = self.tiers[level]
        self.directory.forget(level, key, lambda: tier.capabilities.authoritative_contains and tier.contains(key))

    def account_load(self, keys: Sequence[ChunkKey], levels: Sequence[int], miss_at: int | None = None) -> None:
        """Count hits (and misses) and refresh eviction order for chunks an engine read itself.

        Tiers below the one that served a chunk and holding a copy of it are told too
        (``EvictionPolicy.access_above``): otherwise a lower tier's LRU would evict the
        write-through copies of the hottest chunks (always served from above, they look cold).

        ``load`` calls this; an engine that reads chunks without it (zero-copy ``borrow`` of DRAM
        slots, say) calls it so stats and LRU order stay right: ``keys[i]`` was served from tier
        ``levels[i]``; ``miss_at`` (if not None) says the lookup missed after the served prefix.
        """
        with self._lock:
            for level in levels[:len(keys)]:
                self.tiers[level].stats.hits += 1
                for above in range(level):
                    self.tiers[above].stats.misses += 1
            self.directory.record_load(keys, levels, self._still_there)
            self.prefetch.served(keys, levels)
            if miss_at is not None:
                for tier in self.tiers:
                    tier.stats.misses += 1

    def _still_there(self, level: int, key: ChunkKey) -> bool:
        """Under the lock: may a chunk read from tier ``level`` but not in its index be adopted?
        Not once a local tier no longer has it: an index entry with no bytes behind it would be
        a lie (the directory refuses a LEAVING one: an eviction or a delete since the read)."""
        tier = self.tiers[level]
        return not tier.capabilities.authoritative_contains or tier.contains(key)

    # --- store: bytes in --------------------------------------------------------------------
    def store(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> int:
        """Store chunks (``layout.chunk_bytes`` uint8 each); returns how many were stored.

        ``store_in_place`` and one memcpy per chunk into its slot.  Returns once every chunk is in
        the top tier that would take it; the write-through continues in the background (``flush``).
        """
        keys = chunk_keys_arg(keys)
        payloads = payloads_arg(payloads, len(keys), self.layout)
        with InPlaceStore(self, self._reserve(keys, payloads)) as op:
            for view, payload in zip(op.views, payloads, strict=True):
                if view is not None and view is not payload:
                    np.copyto(view, payload)
            return op.commit()

    def store_in_place(self, keys: Sequence[ChunkKey]) -> InPlaceStore:
        """Reserve room for chunks whose bytes the caller writes itself; see ``InPlaceStore``.

        Victims are demoted, never dropped (pinned, pending and held chunks are never victims).
        The chunks are *pending* (not reported by ``lookup``) until ``commit()``.
        """
        return InPlaceStore(self, self._reserve(chunk_keys_arg(keys)))

    def _reserve(self, keys: list[ChunkKey], spill: Sequence[np.ndarray] | None = None, *,
                 evictable: Callable[[ChunkKey], bool] | None = None) -> _Reservation:
        """Make room in the top tier and reserve a slot for each chunk it does not hold yet.

        A chunk that gets none is *spilled*: its view is ``spill[i]`` (None: a fresh buffer).
        ``evictable``: which chunks may be victims, in place of admission control (a prefetch).
        """
        top = self.tiers[0]
        plan = self.directory.prepare_store(0, keys, room=top.capabilities.slots, evictable=evictable)
        res = _Reservation(keys, [None] * len(keys), plan.reserved, plan.refused, plan.present)
        try:
            self._demote(0, plan.victims)
        except BaseException:  # a tier raised (a bug): the new chunks must not stay pending for good
            self.directory.abort_store(0, [keys[i] for i in res.slotted])
            raise
        if res.slotted:
            assert top.capabilities.slots
            with self._lock:  # one at a time, in a row; a victim's slot still being read is refused
                slots = {i: top.reserve([keys[i]]) for i in res.slotted}
            refused = [i for i, slot in slots.items() if slot is None]
            self.directory.abort_store(0, [keys[i] for i in refused])
            res.slotted, res.spilled = [i for i in res.slotted if slots[i] is not None], sorted(res.spilled + refused)
            for i, slot in slots.items():
                res.views[i] = None if slot is None else slot[0]
        for i in res.spilled:
            res.views[i] = spill[i] if spill is not None else np.empty(self.chunk_bytes, np.uint8)
        return res

    def _commit(self, res: _Reservation, *, promotion: bool = False) -> int:
        """Publish a reservation and place its spilled chunks; returns how many chunks are stored.

        Spilled chunks are reserved again once the ones published before them may go (a batch
        larger than the top tier ends as chunk-by-chunk stores would); what the top tier still
        refuses goes below.  A store then writes through; a promotion (from below) does not.
        """
        top = self.tiers[0]
        into_top, present = self._finish(res, publish=True), [res.keys[i] for i in res.present]
        spilled = [(res.keys[i], res.buffer(i)) for i in res.spilled]
        while spilled and top.capabilities.slots:
            again = self._reserve([key for key, _ in spilled], [buf for _, buf in spilled])
            for i in again.slotted:
                np.copyto(again.buffer(i), spilled[i][1])
            published = self._finish(again, publish=True)
            into_top, present = into_top + published, present + [again.keys[i] for i in again.present]
            spilled = [spilled[i] for i in again.spilled]
            if not published:
                break
        first = 1 if top.capabilities.slots else 0  # the slotted tier refused them; other tiers take puts
        placed = {key: self._put(first, key, buf) for key, buf in spilled}
        stored = into_top + present + [key for key, level in placed.items() if level is not None]
        if promotion:
            top.stats.promotions += len(into_top) + sum(level == 0 for level in placed.values())
            if self.exclusive:  # chunks promoted once the hold ended
                self._drop_below(into_top + [key for key, level in placed.items() if level == 0])
        elif self.write_through and stored:
            self._write_through_async(stored)
        return len(stored)

    def _finish(self, res: _Reservation, *, publish: bool) -> list[ChunkKey]:
        """Publish the reserved slots (their bytes are in), or give them back; returns their keys."""
        keys, res.slotted = [res.keys[i] for i in res.slotted], []
        if keys:
            top = self.tiers[0]
            assert top.capabilities.slots
            (top.commit if publish else top.abort)(keys)
            (self.directory.complete_store if publish else self.directory.abort_store)(0, keys)
        return keys

    # --- bytes into tiers without slots: demotion, write-through, chunks put below ----------
    def _put(self, level: int, key: ChunkKey, payload: np.ndarray) -> int | None:
        """``Tier.put`` into tier ``level``, else the first tier below that takes it; its level."""
        for lv in range(level, len(self.tiers)):
            if isinstance(disk := self.tiers[lv], DiskTier) and disk.survey_due():
                self._survey_disk(lv)
            plan = self.directory.prepare_store(lv, [key])
            if plan.present:
                return lv
            if not plan.reserved:  # everything here is pinned, or the chunk is larger than the tier
                continue
            stored = False
            try:
                if plan.victims:
                    self._demote(lv, plan.victims)
                stored = self.tiers[lv].put(key, payload)
            finally:  # also when a put raises: the chunk must not stay pending for good
                (self.directory.complete_store if stored else self.directory.abort_store)(lv, [key])
            if stored:
                return lv
        return None

    def _survey_disk(self, level: int) -> None:
        """Disk capacity is for the root, shared by every process on it: every ``survey_s``
        (before a put) re-read the root, adopt the chunks other processes wrote into this index
        (so that they may be victims here), forget those they deleted, and leave room for every
        other file under it (other layouts, temp files, pins).  The root may exceed its capacity
        by what the others wrote since this process's last survey, until its next put.  Run on
        the writer thread: a caller's put queues it there."""
        tier = self.tiers[level]
        assert isinstance(tier, DiskTier)
        if not threading.current_thread().name.startswith(_WRITER):  # not on the caller's time
            with self._lock:
                if self._survey_job is None or self._survey_job.done():
                    with contextlib.suppress(RuntimeError):  # closing: no more surveys
                        self._survey_job = self._background.submit(self._survey_disk, level)
            return
        if not tier.survey_due() or not self._surveying.acquire(blocking=False):
            return
        try:
            try:
                survey = tier.survey()
            except OSError as exc:  # the root went away or is unreadable: keep the last view
                tier.stats.errors += 1
                log.warning("disk survey of %s failed: %s", tier.root.parent, exc)
                return
            unseen = self.directory.reconcile(level, tier.capacity_bytes - survey.other_bytes, survey.chunks)
            gone = [k for k in unseen if not tier.has_file(k)]  # not just written after the listing
            tier.forget(gone)
            self.directory.drop(level, gone)
        finally:
            self._surveying.release()

    def _demote(self, level: int, victims: list[ChunkKey]) -> None:
        """Move ``victims`` (out of tier ``level``'s index, *leaving*) down a tier, then delete them."""
        tier = self.tiers[level]
        below = self.indexes[level + 1] if level + 1 < len(self.tiers) else None
        if level == 0:
            self.prefetch.left(victims)
        for key in victims:
            tier.stats.evictions += 1
            try:
                # One dict read needs no lock: the answer may change right after it either way, and
                # ``_put`` asks again under the lock.
                if below is not None and key not in below.sizes:
                    with tier.borrow(key) as view:
                        if view is not None and self._put(level + 1, key, view) is not None:
                            tier.stats.demotions += 1
            finally:  # even when a put below raised: the index no longer has it, so neither may the tier
                tier.delete(key)
                self.directory.complete_leave(level, [key])

    # --- exclusive tiers: a chunk in one place, written through only where it must be ---------
    def _persist_share(self, keys: list[ChunkKey]) -> list[ChunkKey]:
        """What an exclusive hierarchy writes through: pinned chunks and the batch's leading share."""
        return self.directory.persist_share(keys, self.write_through_share)

    def _drop_below(self, keys: list[ChunkKey]) -> None:
        """Promoted chunks leave the tier below the top (unless pinned): DRAM demotes them again."""
        if len(self.tiers) < 2:
            return
        for key in keys:  # LEAVING meanwhile: a reader's accounting must not adopt it again
            gone, marked = self.directory.prepare_leave(1, [key], evictable_only=True)
            if not gone:
                continue
            try:
                self.tiers[1].delete(key)
            finally:
                self.directory.complete_leave(1, marked)

    def hint(self, keys: Sequence[ChunkKey], *, session: str | None = None, now: float | None = None,
             retention: Retention | None = None) -> None:
        """Tell the eviction policy a request is coming: its full keys, its session, the time, and
        the retention it asks for its chunks (a priority, a ttl: ``kvtier.policy.retention``).

        Optional; the agent policy predicts reuse from it (``kvtier.policy.agent``).  ``now``
        defaults to the policy's clock (``time.monotonic``); a replay passes trace time.
        """
        self.directory.observe(keys, session=session, now=now, retention=retention)
        self.prefetch.note(session, keys)

    def hint_end(self, session: str, *, awaits: str) -> None:
        """Tell the eviction policy ``session``'s request got its answer, and what that waits for:
        ``"tool"`` (the agent runs a tool and calls back, seconds later) or ``"user"`` (a human's
        turn: minutes).  Optional, as ``hint``; an engine knows it from the output (a tool call
        or not), a replay from the trace (kv-cache-tester's ``stop``)."""
        if awaits not in AWAITS:
            raise ArgumentValueError(f"awaits must be one of {', '.join(AWAITS)}, got {awaits!r}")
        self.directory.observe_end(session, awaits=awaits)
        if awaits == "tool":  # back in seconds: its chunks below DRAM come up meanwhile (``kvtier.prefetch``)
            self.prefetch.start(session)

    def _write_through_async(self, keys: list[ChunkKey]) -> None:
        targets = [lv for lv, t in enumerate(self.tiers) if lv > 0 and (t.persistent or t.shared)]
        jobs = [(keys, targets)]
        if self.exclusive and 1 in targets:  # the tier below the top gets only what must persist
            jobs = [(self._persist_share(keys), [1]), (keys, [lv for lv in targets if lv != 1])]
        self._inflight = [f for f in self._inflight if not f.done() or f.exception() is not None]
        for job_keys, job_targets in jobs:
            if job_keys and job_targets:
                future = self._background.submit(self._write_through, job_keys, job_targets)
                future.add_done_callback(partial(_log_failure, len(job_keys)))
                self._inflight.append(future)

    def _write_through(self, keys: list[ChunkKey], targets: list[int]) -> None:
        for key in keys:
            with self.tiers[0].borrow(key) as view:
                if view is None:
                    continue  # evicted meanwhile, and so demoted already
                for level in targets:
                    self._put(level, key, view)

    def flush(self) -> None:
        """Wait for background write-through to finish.

        A write-through that failed (logged when it did; its chunks stay in the top tier and are
        demoted as usual) is raised here once, as a TierError: the next ``flush`` does not see it.
        """
        inflight, self._inflight = self._inflight, []
        failures = [exc for f in inflight if (exc := f.exception()) is not None]
        if failures:
            raise TierError(f"{len(failures)} background write-through(s) failed, the first with "
                            f"{type(failures[0]).__name__}: {failures[0]}") from failures[0]

    # --- pinning ----------------------------------------------------------------------------
    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None, *, persist: bool = False) -> None:
        """Never evict these chunks (from any tier) until unpinned or ``ttl_s`` passes.

        In-process pins are counted (nested pins need as many unpins).  ``persist=True`` writes
        a pin record to the disk tier instead (``PinFiles``): it survives restarts, every process
        sharing the disk root honours it (within ``PinFiles.recheck_s``), and one
        ``unpin(keys, persist=True)`` removes it.  Keys may be pinned before their chunks are
        stored.  Shared G4 stores keep their own retention rules.
        """
        keys = chunk_keys_arg(keys)
        ttl_s = ttl_arg(ttl_s)
        if not isinstance(persist, bool):
            raise ArgumentTypeError(f"persist: expected True or False, got {type(persist).__name__} {persist!r}")
        if persist:  # the record alone protects the chunk (``_evictable``), here and elsewhere
            if self.pin_files is None:
                raise ConfigError("persistent pins need a disk tier (add 'disk' to tiers)")
            self.pin_files.pin(keys, ttl_s)
            return
        self.directory.pin(keys, ttl_s)

    def unpin(self, keys: Sequence[ChunkKey], *, persist: bool = False) -> None:
        """Drop one in-process pin of each key; ``persist=True``: remove its persistent pin record
        instead (whichever process wrote it).  A process releases only what it pinned: a plain
        ``unpin`` never touches the records that warehouse chunks for every process."""
        keys = chunk_keys_arg(keys)
        if not isinstance(persist, bool):
            raise ArgumentTypeError(f"persist: expected True or False, got {type(persist).__name__} {persist!r}")
        if persist:
            if self.pin_files is None:
                raise ConfigError("persistent pins need a disk tier (add 'disk' to tiers)")
            self.pin_files.unpin(keys)
            return
        self.directory.unpin(keys)

    def pinned(self, key: ChunkKey) -> bool:
        """Is ``key`` pinned, by this process or by a persistent record?"""
        (key,) = chunk_keys_arg([key], "key")
        return self.directory.pinned(key)

    # --- maintenance ------------------------------------------------------------------------
    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove chunks from every tier (e.g. after a model update).

        Earlier stores' write-through is waited for first; a chunk being stored at the same time
        by another thread (pending) is left to that store: the delete counts as the earlier of the
        two.  While its bytes go it is *leaving*, as an eviction victim is, so a store racing the
        delete cannot lose its copy to it (``Directory.prepare_store``).
        """
        keys = chunk_keys_arg(keys)
        wait(list(self._inflight))  # this caller's earlier stores are written through: not pending
        for level, tier in enumerate(self.tiers):
            gone, marked = self.directory.prepare_leave(level, keys)
            try:
                tier.delete_many(gone)
            finally:
                self.directory.complete_leave(level, marked)

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats for tier in self.tiers}

    def usage(self) -> dict[str, tuple[int, int]]:
        """(used, capacity) bytes per tier, as the indexes account them."""
        return {ix.name: (ix.used_bytes, ix.capacity_bytes) for ix in self.indexes}

    def close(self, *, keep: bool = True) -> None:
        """Finish the write-through and close every tier, even when one of them fails (raised after).

        Exclusive tiers, ``keep``: first the chunks only DRAM holds go down to the persistent tier
        below (``_keep_top``), so a restart finds them; a crash still loses them.
        """
        self.prefetch.close()  # before the tiers it reads
        with contextlib.ExitStack() as stack:  # unwinds last first: the writer, then the tiers in order
            for tier in reversed(self.tiers):
                stack.callback(tier.close)
            stack.callback(self._background.shutdown, wait=True)
            try:
                self.flush()
            finally:  # a failed write-through must not cost the chunks only DRAM holds
                if keep:
                    self._keep_top()

    def _keep_top(self) -> int:
        """Exclusive tiers at close: copy DRAM's chunks that the tier below lacks into it, oldest
        first (its policy makes room as for a demotion, so the newest stay when it is smaller);
        returns how many went down."""
        if not self.exclusive or len(self.tiers) < 2 or not self.tiers[1].persistent:
            return 0
        top, below = self.tiers[0], self.indexes[1]
        with self._lock:
            keys = [key for key in self.indexes[0].sizes if key not in below.sizes]
        kept, failures = 0, []
        for key in keys:
            try:  # one chunk's failure, whatever it is, must not keep the others from going down
                with top.borrow(key) as view:
                    if view is not None and self._put(1, key, view) == 1:
                        kept += 1
            except Exception as exc:  # raised below, after the rest went down
                failures.append(exc)
        if keys:
            log.info("close: %d of DRAM's %d chunks not on %s went down to it", kept, len(keys), self.tiers[1].name)
        if failures:
            raise TierError(f"close: {len(failures)} chunk(s) did not go down to {self.tiers[1].name}, the first "
                            f"with {type(failures[0]).__name__}: {failures[0]}") from failures[0]
        return kept

    def __enter__(self) -> ContextMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_failure(num_keys: int, future: Future[None]) -> None:
    """Done-callback of a write-through: log a failure once, when it happens (``flush`` raises it)."""
    exc = future.exception()
    if exc is not None:
        log.error("write-through of %d chunks failed: %s: %s", num_keys, type(exc).__name__, exc,
                  exc_info=exc)
