"""ContextMemory: the tier hierarchy (G2 DRAM -> G3 disk -> G4 shared) behind one API.

Follow a chunk:

* ``store(keys, payloads)`` puts each chunk into the top tier.  To make room, the top tier's
  eviction policy picks victims; a victim is **demoted** (written to the next tier down, unless
  that tier has it already) and only then deleted.  A chunk that fits nowhere is dropped.  With
  ``write_through`` the chunk is also copied, in the background, to every persistent or shared
  tier, so a restart or another instance finds it.
* ``lookup(keys)`` answers the longest cached prefix and which tier holds each chunk, from the
  in-process indexes plus one batched ``contains`` probe per shared tier past the local hits.
  No payload moves: it is cheap enough for an engine's scheduler loop.
* ``load(keys, outs)`` copies the longest available prefix into caller buffers, trying lower
  tiers when a copy fails (a corrupt chunk is a miss: never served), and **promotes** lower-tier
  hits into the top tier (``promotion="always"``).
* ``borrow_prefix(keys)`` is ``load`` without the copies, for an engine that reads host chunks
  itself: read-only views of top-tier DRAM slots, lower-tier hits read straight into reserved
  slots (promotion in place).
* ``pin(keys)`` keeps chunks from being evicted from any tier (token warehousing);
  ``pin(keys, persist=True)`` records the pin in the disk tier, so it survives restarts and
  binds every process sharing that disk root.
* ``store_in_place(keys)`` is ``store`` for a producer that writes the bytes itself (a GPU
  copy engine): it makes room exactly as ``store`` does (victims demoted), reserves top-tier
  DRAM slots and hands out writable views of them; ``commit()`` publishes the chunks and starts
  the write-through.  No staging buffer, no host memcpy.

Threading: index state (``TierIndex``, ``PinSet``) changes under one lock; payload bytes move
outside it.  A chunk being written is *pending*: lookups do not report it until its bytes are in.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvtier.config import KVTierConfig, load_config
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout
from kvtier.policy.eviction import make_policy
from kvtier.policy.index import PinSet, TierIndex
from kvtier.tiers import make_tier
from kvtier.tiers.base import Tier, TierStats
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier


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


class InPlaceStore:
    """Chunks being written in place by the caller; from ``ContextMemory.store_in_place``.

    ``views[i]`` is where chunk ``keys[i]``'s bytes go: a reserved slot of the top DRAM tier
    (written in place, published by ``commit``), a plain host buffer (stored through the
    ordinary ``store`` path at commit: the top tier is not DRAM, or full of pinned or borrowed
    chunks), or None (the hierarchy holds the chunk already: write nothing).  Either ``commit``
    once every write is done, or ``abort``; as a ``with`` block it commits on a normal exit and
    aborts on an exception.  The views must not be used after either.
    """

    def __init__(self, memory: ContextMemory, keys: list[ChunkKey], views: list[np.ndarray | None],
                 reserved: list[ChunkKey], copies: list[int], present: list[ChunkKey]) -> None:
        self.memory = memory
        self.keys = keys
        self.views = views
        self._reserved = reserved  # keys with a reserved top-tier slot
        self._copies = copies  # positions whose view is a plain buffer: store() at commit
        self._present = present  # held already (or duplicates): counted as stored, nothing to write
        self.stored: int | None = None  # chunks stored, once committed
        self._open = True

    @property
    def num_in_place(self) -> int:
        """How many chunks are written straight into top-tier slots."""
        return len(self._reserved)

    def commit(self, upto: int | None = None) -> int:
        """Publish the chunks (their bytes must all be written); returns how many were stored.

        ``upto``: publish only ``keys[:upto]`` (the rest were not written: dropped, as ``abort``).
        """
        if not self._open:
            raise RuntimeError("this in-place store was committed or aborted already")
        self._open = False
        if upto is not None and upto < len(self.keys):
            kept = set(self.keys[:upto])
            dropped = [k for k in self._reserved if k not in kept]
            self._reserved = [k for k in self._reserved if k in kept]
            self._copies = [i for i in self._copies if i < upto]
            self._present = [k for k in self._present if k in kept]
            self.memory._abort_in_place(dropped)
        self.stored = self.memory._commit_in_place(self)
        return self.stored

    def abort(self) -> None:
        """Drop the reservations: nothing is stored (victims demoted to make room stay demoted)."""
        if self._open:
            self._open = False
            self.memory._abort_in_place(self._reserved)

    def __enter__(self) -> InPlaceStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            if self._open:
                self.commit()
        else:
            self.abort()


class ContextMemory:
    """A hierarchy of tiers for the KV chunks of one model layout."""

    def __init__(self, layout: KVLayout, tiers: Sequence[Tier], *, eviction: str = "lru",
                 promotion: str = "always", write_through: bool = True, tenant: str = "") -> None:
        if not tiers:
            raise ValueError("ContextMemory needs at least one tier")
        self.layout = layout
        self.tiers = list(tiers)
        self.namespace = namespace_key(layout, tenant)
        self.promotion = promotion
        self.write_through = write_through
        self.indexes = [TierIndex(t.name, t.capacity_bytes, make_policy(eviction)) for t in self.tiers]
        self.pins = PinSet()  # this process's pins
        disks = [t for t in self.tiers if isinstance(t, DiskTier)]
        self.pin_files = disks[0].pin_files if disks else None  # persistent pins, node-wide
        self._pending: set[tuple[int, ChunkKey]] = set()  # (level, key) reserved, bytes not in yet
        self._leaving: set[tuple[int, ChunkKey]] = set()  # (level, key) evicted, bytes not gone yet
        self._lock = threading.RLock()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-writeback")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
        self._inflight: list[Future[None]] = []
        for level, tier in enumerate(self.tiers):  # persistent tiers come back with their chunks
            for key in tier.keys():  # noqa: SIM118 - oldest first where the tier knows ages (disk: mtime)
                self.indexes[level].add(key, layout.chunk_bytes)

    @classmethod
    def open(cls, layout: KVLayout, config: KVTierConfig | None = None) -> ContextMemory:
        """Build the tiers named in ``config`` (default: ``load_config()``) and wrap them."""
        config = config or load_config()
        if layout.tokens_per_chunk != config.chunk_tokens:
            from dataclasses import replace

            layout = replace(layout, tokens_per_chunk=config.chunk_tokens)
        tiers: list[Tier] = []
        try:
            for name in config.tiers:
                tiers.append(make_tier(name, config, layout))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return cls(layout, tiers, eviction=config.eviction, promotion=config.promotion,
                   write_through=config.write_through, tenant=config.tenant)

    def listen(self, callback: Callable[[str, ChunkKey, bool], None]) -> None:
        """Call ``callback(tier name, key, added)`` for every chunk held now and each change after.

        Called under the hierarchy's lock, from whichever thread changes the index: keep it cheap
        (append to a list).  A chunk is reported when its space is reserved, before its bytes are
        in; a reader that acts on the report waits for the store itself (the vLLM worker does).
        """
        with self._lock:
            for index in self.indexes:
                for key in list(index.sizes):
                    callback(index.name, key, True)
                index.on_change = callback

    # --- keys -------------------------------------------------------------------------------
    def keys_for(self, token_ids: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """Keys of every full chunk of a token sequence (the partial tail has none)."""
        return chunk_keys(token_ids, tokens_per_chunk=self.layout.tokens_per_chunk, namespace=self.namespace)

    # --- lookup: control plane only ---------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey]) -> PrefixHit:
        """Longest prefix of ``keys`` held by some tier, and the tier of each chunk."""
        levels: list[int] = []
        with self._lock:
            if self._pending:
                for key in keys:
                    level = self._locate(key)
                    if level is None:
                        break
                    levels.append(level)
            else:  # the common case, kept tight: it runs in the engine's scheduler loop
                top = self.indexes[0].sizes
                for key in keys:
                    if key in top:
                        levels.append(0)
                        continue
                    level = self._locate(key, below=0)
                    if level is None:
                        break
                    levels.append(level)
        if len(levels) < len(keys):
            levels += self._probe_shared(keys[len(levels):])
        return PrefixHit(tuple(levels), self.layout.tokens_per_chunk)

    def _locate(self, key: ChunkKey, below: int = -1) -> int | None:
        for level in range(below + 1, len(self.indexes)):
            if key in self.indexes[level] and (level, key) not in self._pending:
                return level
        return None

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
                if level_or_none is None or (level_or_none, key) in self._leaving:
                    return levels
                levels.append(level_or_none)
        return levels

    # --- load: bytes out --------------------------------------------------------------------
    def load(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> int:
        """Copy the longest available prefix of ``keys`` into ``outs``; returns chunks loaded.

        Each ``outs[i]`` is a ``layout.chunk_bytes`` uint8 buffer.  Chunk i is loaded only if
        chunks 0..i-1 were.  Hits in lower tiers are promoted to the top tier.
        """
        hit = self.lookup(keys)
        n = hit.num_chunks
        ok = [False] * n
        by_level: dict[int, list[int]] = {}
        for i, level in enumerate(hit.tiers):
            by_level.setdefault(level, []).append(i)
        served_from = list(hit.tiers)
        for level, idxs in sorted(by_level.items()):
            results = self.tiers[level].get_many_into([keys[i] for i in idxs], [outs[i] for i in idxs])
            for i, good in zip(idxs, results, strict=True):
                ok[i] = good
        for i in range(n):  # a failed copy (corrupt, vanished): try the tiers below it
            if not ok[i]:
                ok[i], served_from[i] = self._load_below(keys[i], outs[i], hit.tiers[i])
                if not ok[i]:
                    n = i
                    break
        self.account_load(keys, served_from[:n], miss_at=n if n < len(keys) else None)
        if self.promotion == "always":
            for i in range(n):
                if served_from[i] > 0:
                    self._promote(keys[i], outs[i])
        return n

    def load_async(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> Future[int]:
        """``load`` on a background thread: the engine overlaps it with other work.

        The buffers in ``outs`` must stay alive and untouched until the future completes.
        """
        return self._loader.submit(self.load, keys, outs)

    @contextlib.contextmanager
    def borrow_prefix(self, keys: Sequence[ChunkKey]) -> Iterator[list[np.ndarray]]:
        """Read-only views of a loadable prefix of ``keys``, each in a top-tier DRAM slot.

        ``load`` without its copies, for an engine that copies host chunks into its own memory
        (vLLM's paged blocks): DRAM hits are borrowed zero-copy; a run of lower-tier hits is read
        straight into DRAM slots reserved for it (``store_in_place``: promotion in place, no
        staging, no second copy), then borrowed.  Checksums, corrupt-chunk fallback to lower
        copies, stats and eviction order are as in ``load``.  The views stay valid (their slots
        are not reused) until the block ends.

        The prefix may be shorter than ``load``'s: it stops at a miss, and also where a chunk
        gets no DRAM slot (the top tier is full of pinned or borrowed chunks); the caller loads
        the rest with ``load``, which also counts the miss.  Yields ``[]`` when the top tier is
        not DRAM or promotion is off.
        """
        top = self.tiers[0]
        views: list[np.ndarray] = []
        with contextlib.ExitStack() as borrows:
            if isinstance(top, DramTier) and self.promotion == "always":
                hit = self.lookup(keys)
                i, n = 0, hit.num_chunks
                while i < n:
                    if hit.tiers[i] == 0:
                        view = borrows.enter_context(top.borrow(keys[i]))
                        if view is None:  # evicted since the lookup
                            break
                        self.account_load(keys[i:i + 1], [0])
                        views.append(view)
                        i += 1
                        continue
                    j = i
                    while j < n and hit.tiers[j] != 0:
                        j += 1
                    got = self._promote_in_place(keys[i:j], hit.tiers[i:j], borrows, views)
                    if got < j - i:
                        break
                    i = j
            yield views

    def _promote_in_place(self, keys: Sequence[ChunkKey], levels: Sequence[int],
                          borrows: contextlib.ExitStack, views: list[np.ndarray]) -> int:
        """Read lower-tier chunks into reserved top-tier slots, publish and borrow them."""
        top = self.tiers[0]
        assert isinstance(top, DramTier)
        op = self.store_in_place(keys)
        served = list(levels)
        n = len(keys)
        targets = [(i, view) for i, view in enumerate(op.views) if view is not None]
        by_level: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, view in targets:
            by_level.setdefault(levels[i], []).append((i, view))
        ok = [True] * n
        for level, items in sorted(by_level.items()):
            results = self.tiers[level].get_many_into([keys[i] for i, _ in items], [v for _, v in items])
            for (i, view), good in zip(items, results, strict=True):
                if not good:  # corrupt or vanished: try the tiers below, as load does
                    ok[i], served[i] = self._load_below(keys[i], view, levels[i])
        n = next((i for i in range(n) if not ok[i]), n)
        op.commit(upto=n)
        plain = set(op._copies)  # got no slot: went through store(); our buffer holds the bytes
        got = 0
        for i in range(n):
            out: np.ndarray | None = op.views[i]
            if out is None:
                served[i] = 0  # in the top tier already (promoted meanwhile)
            if i not in plain:  # now (or already) in a slot: borrow it
                out = borrows.enter_context(top.borrow(keys[i]))
                if out is None:
                    break
            assert out is not None
            views.append(out)
            got += 1
        if got:
            self.account_load(keys[:got], served[:got])
            promoted = sum(1 for i in range(got) if op.views[i] is not None)
            with self._lock:
                top.stats.promotions += promoted
        return got

    def _load_below(self, key: ChunkKey, out: np.ndarray, failed_level: int) -> tuple[bool, int]:
        with self._lock:
            self.indexes[failed_level].discard(key)
        level = failed_level
        while level + 1 < len(self.tiers):
            level += 1
            tier = self.tiers[level]
            if key in self.indexes[level] or tier.shared:
                if tier.get_into(key, out):
                    return True, level
                with self._lock:
                    self.indexes[level].discard(key)
        return False, failed_level

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
            for key, level in zip(keys, levels, strict=False):
                self.tiers[level].stats.hits += 1
                for above in range(level):
                    self.tiers[above].stats.misses += 1
                index = self.indexes[level]
                if key in index:
                    index.touch(key)
                elif index.used_bytes + self.layout.chunk_bytes <= index.capacity_bytes:
                    index.add(key, self.layout.chunk_bytes)  # another process wrote it: adopt
                for lower in self.indexes[level + 1:]:  # write-through copies below
                    if key in lower:
                        lower.touch_copy(key)
            if miss_at is not None:
                for tier in self.tiers:
                    tier.stats.misses += 1

    def _promote(self, key: ChunkKey, payload: np.ndarray) -> None:
        if self._insert(0, key, payload):
            self.tiers[0].stats.promotions += 1

    # --- store: bytes in --------------------------------------------------------------------
    def store(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> int:
        """Store chunks (``layout.chunk_bytes`` uint8 each); returns how many were stored.

        Returns once every chunk is in the top tier that would take it; copies to persistent
        tiers (write-through) continue in the background: ``flush()`` waits for them.
        """
        stored = []
        for key, payload in zip(keys, payloads, strict=True):
            self.layout.check_payload(payload)
            if self._insert(0, key, payload):
                stored.append(key)
        if self.write_through and stored:
            self._write_through_async(stored)
        return len(stored)

    def store_in_place(self, keys: Sequence[ChunkKey]) -> InPlaceStore:
        """Reserve room for chunks whose bytes the caller writes itself; see ``InPlaceStore``.

        Room is made as ``store`` makes it (the top tier's policy picks victims, which are
        demoted, never dropped; pinned and pending chunks are never victims), then one slot per
        chunk is reserved in the top tier when it is a ``DramTier``.  Reserved chunks are
        *pending*: ``lookup`` does not report them, nor does the tier serve them, until
        ``commit()``; then the write-through to persistent tiers starts, as after ``store``.
        """
        keys = list(keys)
        size = self.layout.chunk_bytes
        index, top = self.indexes[0], self.tiers[0]
        dram = top if isinstance(top, DramTier) else None
        views: list[np.ndarray | None] = [None] * len(keys)
        planned: list[int] = []  # positions with room made in the top tier's index
        copies: list[int] = []  # positions for the ordinary store path, at commit
        present: list[ChunkKey] = []
        victims: list[ChunkKey] = []
        seen: set[ChunkKey] = set()
        with self._lock:
            for i, key in enumerate(keys):
                if key in index or key in seen:  # as store: held (or being written) already
                    if key in index:
                        index.touch(key)
                    present.append(key)
                    continue
                seen.add(key)
                room = None if dram is None else index.plan_room(
                    size, lambda k: self._evictable(0, k))
                if room is None:  # not DRAM, or everything evictable is pinned or pending
                    copies.append(i)
                    continue
                index.add(key, size)  # reserve the space; pending until commit
                self._pending.add((0, key))
                self._leaving.update((0, v) for v in room)
                victims += room
                planned.append(i)
        for victim in victims:
            self._demote(0, victim)
        if planned:
            assert dram is not None
            slots = dram.reserve([keys[i] for i in planned])
            if slots is None:  # some freed slots are still borrowed: chunk by chunk, as put would
                got = {i: dram.reserve([keys[i]]) for i in planned}
                refused = [i for i in planned if got[i] is None]
                with self._lock:
                    for i in refused:
                        self._pending.discard((0, keys[i]))
                        index.discard(keys[i])
                copies = sorted(copies + refused)
                planned = [i for i in planned if got[i] is not None]
                slots = [view[0] for i in planned if (view := got[i]) is not None]
            for i, slot in zip(planned, slots, strict=True):
                views[i] = slot
        for i in copies:
            views[i] = np.empty(size, dtype=np.uint8)
        return InPlaceStore(self, keys, views, [keys[i] for i in planned], copies, present)

    def _commit_in_place(self, op: InPlaceStore) -> int:
        top = self.tiers[0]
        if op._reserved:
            assert isinstance(top, DramTier)
            top.commit(op._reserved)
            with self._lock:
                self._pending.difference_update((0, k) for k in op._reserved)
        stored = op._reserved + op._present
        for i in op._copies:  # the ordinary path: make room again, or go below
            view = op.views[i]
            assert view is not None
            if self._insert(0, op.keys[i], view):
                stored.append(op.keys[i])
        if self.write_through and stored:
            self._write_through_async(stored)
        return len(stored)

    def _abort_in_place(self, reserved: list[ChunkKey]) -> None:
        if reserved:
            top = self.tiers[0]
            assert isinstance(top, DramTier)
            top.abort(reserved)
            with self._lock:
                for key in reserved:
                    self._pending.discard((0, key))
                    self.indexes[0].discard(key)

    def _write_through_async(self, keys: list[ChunkKey]) -> None:
        targets = [lv for lv, t in enumerate(self.tiers) if lv > 0 and (t.persistent or t.shared)]
        if targets:
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(self._background.submit(self._write_through, keys, targets))

    def _write_through(self, keys: list[ChunkKey], targets: list[int]) -> None:
        for key in keys:
            with self.tiers[0].borrow(key) as view:
                if view is None:
                    continue  # evicted meanwhile, and so demoted already
                for level in targets:
                    self._insert(level, key, view)

    def flush(self) -> None:
        """Wait for background write-through to finish."""
        for future in list(self._inflight):
            future.result()
        self._inflight = []

    def _evictable(self, level: int, key: ChunkKey) -> bool:
        """May ``key`` be a victim in tier ``level``?  Not when pinned (here or on disk) or pending."""
        if key in self.pins or (level, key) in self._pending:
            return False
        return self.pin_files is None or key not in self.pin_files

    def _insert(self, level: int, key: ChunkKey, payload: np.ndarray) -> bool:
        """Put a chunk into tier ``level``, demoting victims; falls through to lower tiers."""
        index, tier = self.indexes[level], self.tiers[level]
        size = payload.nbytes
        with self._lock:
            if key in index:
                index.touch(key)
                return True
            victims = index.plan_room(size, lambda k: self._evictable(level, k))
            if victims is not None:
                index.add(key, size)  # reserve the space; pending until the bytes are in
                self._pending.add((level, key))
                self._leaving.update((level, v) for v in victims)
        if victims is None:  # everything here is pinned, or the chunk is larger than the tier
            return level + 1 < len(self.tiers) and self._insert(level + 1, key, payload)
        for victim in victims:
            self._demote(level, victim)
        stored = tier.put(key, payload)
        with self._lock:
            self._pending.discard((level, key))
            if not stored:
                index.discard(key)
        if stored:
            return True
        return level + 1 < len(self.tiers) and self._insert(level + 1, key, payload)

    def _demote(self, level: int, key: ChunkKey) -> None:
        tier = self.tiers[level]
        tier.stats.evictions += 1
        below = level + 1
        if below < len(self.tiers):
            with self._lock:
                already = key in self.indexes[below]
            if not already:
                with tier.borrow(key) as view:
                    if view is not None and self._insert(below, key, view):
                        tier.stats.demotions += 1
        tier.delete(key)
        with self._lock:
            self._leaving.discard((level, key))

    # --- pinning ----------------------------------------------------------------------------
    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None, *, persist: bool = False) -> None:
        """Never evict these chunks (from any tier) until unpinned or ``ttl_s`` passes.

        In-process pins are counted (nested pins need as many unpins).  ``persist=True`` writes
        a pin record to the disk tier instead (``PinFiles``): it survives restarts, every process
        sharing the disk root honours it (within ``PinFiles.recheck_s``), and one ``unpin``
        removes it.  Keys may be pinned before their chunks are stored.  Shared G4 stores keep
        their own retention rules.
        """
        keys = list(keys)
        if persist:  # the record alone protects the chunk (``_evictable``), here and elsewhere
            if self.pin_files is None:
                raise ConfigError("persistent pins need a disk tier (add 'disk' to tiers)")
            self.pin_files.pin(keys, ttl_s)
            return
        with self._lock:
            self.pins.pin(keys, ttl_s)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        """Drop one in-process pin of each key, and its persistent pin record if any."""
        keys = list(keys)
        with self._lock:
            self.pins.unpin(keys)
        if self.pin_files is not None:
            self.pin_files.unpin(keys)

    def pinned(self, key: ChunkKey) -> bool:
        """Is ``key`` pinned, by this process or by a persistent record?"""
        with self._lock:
            if key in self.pins:
                return True
        return self.pin_files is not None and key in self.pin_files

    # --- maintenance ------------------------------------------------------------------------
    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove chunks from every tier (e.g. after a model update)."""
        for key in keys:
            for index, tier in zip(self.indexes, self.tiers, strict=True):
                with self._lock:
                    index.discard(key)
                tier.delete(key)

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats for tier in self.tiers}

    def usage(self) -> dict[str, tuple[int, int]]:
        """(used, capacity) bytes per tier, as the indexes account them."""
        return {ix.name: (ix.used_bytes, ix.capacity_bytes) for ix in self.indexes}

    def close(self) -> None:
        self.flush()
        self._loader.shutdown(wait=True)
        self._background.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> ContextMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
