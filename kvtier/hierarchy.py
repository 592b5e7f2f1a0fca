"""ContextMemory: the tier hierarchy (G2 DRAM -> G3 disk -> G4 shared) behind one API.

Follow a chunk:

* **Plan -> move -> complete.**  The bookkeeping is ``kvtier.directory`` (which tier holds which
  chunk, the eviction policies, pins, and each chunk's state: STORING, PRESENT, LEAVING, read); it
  never touches bytes.  The bytes move through ``kvtier.mover``.  Each method here asks the
  directory, moves, and tells the directory how the move ended.
* **Store**, one path for every producer: reserve -> fill -> commit (``Mover.reserve``: room made
  in the top tier, victims **demoted** to the tier below, a DRAM slot per new chunk, STORING until
  published).  ``store_in_place(keys)`` hands the slots to a producer that writes them itself (a
  GPU copy engine), ``store(keys, payloads)`` copies each payload in, a promotion reads a lower
  tier into them.  ``Mover.commit`` publishes them, places the chunks that got no slot, and (with
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
* The disk's capacity is the **root's**, shared by every process on it (``Mover.survey_disk``).

Threading: the directory's lock guards the bookkeeping; payload bytes move outside it.  A chunk
being written is STORING (*pending*): lookups do not report it until its bytes are in.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kvtier.config.loader import load_config
from kvtier.config.schema import KVTierConfig, check_openable, read_tenant_secret
from kvtier.directory import Directory
from kvtier.errors import ArgumentTypeError, ArgumentValueError, ConfigError
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout
from kvtier.mover import Mover
from kvtier.policy.eviction import EvictionPolicy
from kvtier.policy.registry import make_policies
from kvtier.policy.retention import AWAITS, Retention
from kvtier.prefetch import Prefetcher
from kvtier.reservation import InPlaceStore
from kvtier.tiers import make_tier
from kvtier.tiers.base import Tier, TierStats
from kvtier.validate import buffers_arg, chunk_keys_arg, payloads_arg, ttl_arg

log = logging.getLogger(__name__)

__all__ = ["ContextMemory", "InPlaceStore", "PrefixHit"]


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
        roots = [r for t in self.tiers if (r := t.shared_root()) is not None]
        self.pin_files = roots[0].pin_files if roots else None  # persistent pins, node-wide
        self.directory = Directory([t.name for t in self.tiers], [t.capacity_bytes for t in self.tiers],
                                   policies or make_policies(eviction, len(self.tiers)),
                                   chunk_bytes=layout.chunk_bytes, pin_records=self.pin_files)
        self.indexes = self.directory.indexes  # read-only views of the directory's state
        self.pins = self.directory.pins
        self._lock = self.directory.lock  # held across a few directory calls and tier calls that must agree
        self.mover = Mover(self.tiers, self.directory, chunk_bytes=self.chunk_bytes, exclusive=exclusive,
                           write_through=write_through, write_through_share=write_through_share,
                           left_top=lambda victims: self.prefetch.left(victims))
        for level, tier in enumerate(self.tiers):  # persistent tiers come back with their chunks
            self.directory.adopt(level, tier.keys())  # oldest first where the tier knows ages (disk: mtime)
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
            levels += self.mover.probe_shared(keys[len(levels):])
        return PrefixHit(tuple(levels), self.layout.tokens_per_chunk)

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
        (``Mover.commit``) after the block, once the hold on the prefix is released.
        """
        top, size = self.tiers[0], self.chunk_bytes
        with contextlib.ExitStack() as stack:  # unwinds: borrows, unpublished slots, the hold
            keys, levels = stack.enter_context(self._hold(keys))
            promote = [i for i, level in enumerate(levels) if level > 0] if self.promotion == "always" else []
            res = self.mover.reserve([keys[i] for i in promote], None if outs is None else [outs[i] for i in promote])
            stack.callback(self.mover.finish, res, publish=False)  # a no-op once published
            slotted = {promote[j] for j in res.slotted}
            targets = {promote[j]: view for j, view in enumerate(res.views) if view is not None}
            for i in range(len(keys)):  # the rest that must be read: into the caller's buffers
                if i not in targets and (levels[i] > 0 or not top.capabilities.zero_copy_borrow):
                    targets[i] = outs[i] if outs is not None else np.empty(size, np.uint8)
            n, served = self.mover.read(keys, levels, targets)
            self.mover.finish(res.cut(bisect.bisect_left(promote, n)), publish=False)  # past the prefix
            promoted = self.mover.finish(res, publish=True)
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
                self.mover.drop_below(promoted)
            yield views
        self.mover.commit(res, promotion=True)

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
        with InPlaceStore(self.mover, self.mover.reserve(keys, payloads)) as op:
            for view, payload in zip(op.views, payloads, strict=True):
                if view is not None and view is not payload:
                    np.copyto(view, payload)
            return op.commit()

    def store_in_place(self, keys: Sequence[ChunkKey], *, wait_below: bool = True) -> InPlaceStore:
        """Reserve room for chunks whose bytes the caller writes itself; see ``InPlaceStore``.

        Victims are demoted, never dropped (pinned, pending and held chunks are never victims).
        The chunks are *pending* (not reported by ``lookup``) until ``commit()``.
        ``wait_below=False``: a chunk the top DRAM tier gives no slot (its policy refused it, or
        every slot is pinned, pending or read) is not stored, and its view is None, rather than
        written to a plain buffer and put below on the caller's time (an engine's save path:
        copying and writing a chunk the cache does not want costs the engine its blocks' time).
        Lower tiers still receive the stored chunks by write-through and demotion.
        """
        return InPlaceStore(self.mover, self.mover.reserve(chunk_keys_arg(keys), wait_below=wait_below))

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

    def flush(self) -> None:
        """Wait for background write-through to finish.

        A write-through that failed (logged when it did; its chunks stay in the top tier and are
        demoted as usual) is raised here once, as a TierError: the next ``flush`` does not see it.
        """
        self.mover.flush()

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
        self.mover.wait_written()  # this caller's earlier stores are written through: not pending
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
        below (``Mover.keep_top``), so a restart finds them; a crash still loses them.
        """
        self.prefetch.close()  # before the tiers it reads
        with contextlib.ExitStack() as stack:  # unwinds last first: the writer, then the tiers in order
            for tier in reversed(self.tiers):
                stack.callback(tier.close)
            stack.callback(self.mover.shutdown)
            try:
                self.flush()
            finally:  # a failed write-through must not cost the chunks only DRAM holds
                if keep:
                    self.mover.keep_top()

    def __enter__(self) -> ContextMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


