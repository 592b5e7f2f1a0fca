"""The mover: the bytes of the hierarchy, moved between tiers as the directory planned.

``ContextMemory`` plans with ``kvtier.directory`` and calls the mover for the bytes; the mover asks
the directory for room (``Directory.prepare_store``) and tells it how each move ended, but decides
nothing itself: which chunks are victims, which a tier admits, which are written through in an
exclusive hierarchy, all come from the directory.

* **Store**, one path for every producer: ``reserve`` -> fill -> ``commit``.  ``reserve`` makes room
  in the top tier (a victim is **demoted**: written to the next tier down unless that tier has it,
  then deleted) and reserves a DRAM slot per new chunk, STORING until published; a chunk that gets
  no slot is *spilled* into a plain buffer.  ``InPlaceStore`` hands the views to a producer (a
  memcpy, a GPU copy engine, a read from a lower tier); ``commit`` publishes them, places the
  spilled ones (the top tier again once room frees, else ``put`` below) and writes through.
* **Tiers without slots** (below DRAM, or a top tier without ``capabilities.slots``) take bytes
  through ``Tier.put`` (``put``: demotion, write-through, chunks put below).
* **Read**: ``read`` fills the targets of a held prefix, one batched ``get_many_into`` per tier; a
  failed read (corrupt, vanished) tries the copies below, and drops the bad copy from the index.
* The disk's capacity is the **root's** (``Tier.shared_root()``), shared by every process on it:
  before a put into the disk, every ``DiskTier.survey_s`` the directory reconciles with the root
  (``survey_disk``, on the writer thread).

Threading: bytes move outside the directory's lock; the slot reservations of one batch are taken
under it (one at a time, in a row: a victim's slot still being read is refused).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial

import numpy as np

from kvtier.directory import Directory, Evictable, KeyState
from kvtier.errors import TierError
from kvtier.keys import ChunkKey
from kvtier.reservation import _Reservation
from kvtier.tiers.base import Tier

log = logging.getLogger(__name__)
_WRITER = "kvtier-writeback"  # the background thread's name prefix
_HANDOFF_BYTES = 256 << 20  # victims' bytes waiting for the writer thread (``wait_below=False``), at most


class Mover:
    """Moves the bytes of one hierarchy's chunks between its tiers; the directory decides."""

    def __init__(self, tiers: Sequence[Tier], directory: Directory, *, chunk_bytes: int, exclusive: bool,
                 write_through: bool, write_through_share: float,
                 left_top: Callable[[list[ChunkKey]], None]) -> None:
        """``left_top(keys)``: told of the top tier's victims before they go (``kvtier.prefetch``)."""
        self.tiers = list(tiers)
        self.directory = directory
        self.chunk_bytes = chunk_bytes
        self.exclusive = exclusive
        self.write_through = write_through
        self.write_through_share = write_through_share
        self._left_top = left_top
        self._lock = directory.lock
        self._surveying = threading.Lock()  # one ``survey_disk`` at a time
        self._survey_job: Future[None] | None = None  # one queued for the writer thread
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WRITER)
        self._inflight: list[Future[None]] = []  # background jobs (``_track``) a flush or delete waits for
        self._inflight_lock = threading.Lock()  # callers' threads and the mover's add to it
        self._handoff_bytes = 0  # victims' copies queued for the writer (``demote(wait_below=False)``)
        self._handoff_cap = max(_HANDOFF_BYTES, 4 * chunk_bytes)

    def wait_written(self) -> None:
        """Wait for the write-through queued so far (a failure stays for ``flush`` to raise)."""
        with self._inflight_lock:
            inflight = list(self._inflight)
        wait(inflight)

    def shutdown(self) -> None:
        """Stop the writer thread once its queued jobs are done."""
        self._background.shutdown(wait=True)

    # --- store: reserve -> fill -> commit -------------------------------------------------
    def reserve(self, keys: list[ChunkKey], spill: Sequence[np.ndarray] | None = None, *,
                 evictable: Evictable | None = None, wait_below: bool = True) -> _Reservation:
        """Make room in the top tier and reserve a slot for each chunk it does not hold yet.

        A chunk that gets none is *spilled*: its view is ``spill[i]`` (None: a fresh buffer), and
        the commit places it below.  ``wait_below=False`` (a top tier with slots only): nothing is
        written below on the caller's time (an engine's save path, where the blocks wait): such a
        chunk is *dropped*, view None, not stored (the caller copies nothing for it), and a victim
        the write-through has not written below yet goes to the writer thread rather than being
        written by this caller (``demote``; not with ``exclusive`` tiers, which demote as usual).
        ``evictable``: which chunks may be victims, in place of admission control (a prefetch).
        """
        top = self.tiers[0]
        plan = self.directory.prepare_store(0, keys, room=top.capabilities.slots, evictable=evictable)
        res = _Reservation(keys, [None] * len(keys), plan.reserved, plan.refused, plan.present)
        try:
            self.demote(0, plan.victims, wait_below=wait_below or self.exclusive or not top.capabilities.slots)
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
        if not wait_below and top.capabilities.slots:
            res.dropped, res.spilled = res.spilled, []
        for i in res.spilled:
            res.views[i] = spill[i] if spill is not None else np.empty(self.chunk_bytes, np.uint8)
        return res

    def commit(self, res: _Reservation, *, promotion: bool = False) -> int:
        """Publish a reservation and place its spilled chunks; returns how many chunks are stored.

        Spilled chunks are reserved again once the ones published before them may go (a batch
        larger than the top tier ends as chunk-by-chunk stores would); what the top tier still
        refuses goes below.  A store then writes through; a promotion (from below) does not.
        """
        top = self.tiers[0]
        into_top, present = self.finish(res, publish=True), [res.keys[i] for i in res.present]
        spilled = [(res.keys[i], res.buffer(i)) for i in res.spilled]
        while spilled and top.capabilities.slots:
            again = self.reserve([key for key, _ in spilled], [buf for _, buf in spilled])
            for i in again.slotted:
                np.copyto(again.buffer(i), spilled[i][1])
            published = self.finish(again, publish=True)
            into_top, present = into_top + published, present + [again.keys[i] for i in again.present]
            spilled = [spilled[i] for i in again.spilled]
            if not published:
                break
        first = 1 if top.capabilities.slots else 0  # the slotted tier refused them; other tiers take puts
        placed = {key: self.put(first, key, buf) for key, buf in spilled}
        stored = into_top + present + [key for key, level in placed.items() if level is not None]
        if promotion:
            top.stats.promotions += len(into_top) + sum(level == 0 for level in placed.values())
            if self.exclusive:  # chunks promoted once the hold ended
                self.drop_below(into_top + [key for key, level in placed.items() if level == 0])
        elif self.write_through and stored:
            self._write_through_async(stored)
        return len(stored)

    def finish(self, res: _Reservation, *, publish: bool) -> list[ChunkKey]:
        """Publish the reserved slots (their bytes are in), or give them back; returns their keys."""
        keys, res.slotted = [res.keys[i] for i in res.slotted], []
        if keys:
            top = self.tiers[0]
            assert top.capabilities.slots
            (top.commit if publish else top.abort)(keys)
            (self.directory.complete_store if publish else self.directory.abort_store)(0, keys)
        return keys

    # --- bytes into tiers without slots: demotion, write-through, chunks put below --------
    def put(self, level: int, key: ChunkKey, payload: np.ndarray) -> int | None:
        """``Tier.put`` into tier ``level``, else the first tier below that takes it; its level."""
        for lv in range(level, len(self.tiers)):
            if (root := self.tiers[lv].shared_root()) is not None and root.survey_due():
                self.survey_disk(lv)
            state, victims = self.directory.prepare_store_one(lv, key)
            if state is KeyState.PRESENT:
                return lv
            if state is KeyState.ABSENT:  # everything here is pinned, or the chunk is larger than the tier
                continue
            stored = False
            try:
                if victims:
                    self.demote(lv, victims)
                stored = self.tiers[lv].put(key, payload)
            finally:  # also when a put raises: the chunk must not stay pending for good
                (self.directory.complete_store if stored else self.directory.abort_store)(lv, [key])
            if stored:
                return lv
        return None

    def survey_disk(self, level: int) -> None:
        """Disk capacity is for the root, shared by every process on it: every ``survey_s``
        (before a put) re-read the root, adopt the chunks other processes wrote into this index
        (so that they may be victims here), forget those they deleted, and leave room for every
        other file under it (other layouts, temp files, pins).  The root may exceed its capacity
        by what the others wrote since this process's last survey, until its next put.  Run on
        the writer thread: a caller's put queues it there."""
        tier = self.tiers[level]
        root = tier.shared_root()
        assert root is not None
        if not threading.current_thread().name.startswith(_WRITER):  # not on the caller's time
            with self._lock:
                if self._survey_job is None or self._survey_job.done():
                    with contextlib.suppress(RuntimeError):  # closing: no more surveys
                        self._survey_job = self._background.submit(self.survey_disk, level)
            return
        if not root.survey_due() or not self._surveying.acquire(blocking=False):
            return
        try:
            try:
                survey = root.survey()
            except OSError as exc:  # the root went away or is unreadable: keep the last view
                tier.stats.errors += 1
                log.warning("disk survey of %s failed: %s", root.root.parent, exc)
                return
            unseen = self.directory.reconcile(level, tier.capacity_bytes - survey.other_bytes, survey.chunks)
            gone = [k for k in unseen if not root.has_file(k)]  # not just written after the listing
            root.forget(gone)
            self.directory.drop(level, gone)
        finally:
            self._surveying.release()

    def demote(self, level: int, victims: list[ChunkKey], *, wait_below: bool = True) -> None:
        """Move ``victims`` (out of tier ``level``'s index, *leaving*) down a tier, then delete them.

        ``wait_below=False``: a victim not in the tier below yet (its write-through is behind) is
        not written there on the caller's time: its bytes are copied for the writer thread to put
        below, within ``_HANDOFF_BYTES`` queued, else dropped (``stats.extra["dropped_unwritten"]``)."""
        tier = self.tiers[level]
        below = level + 1 if level + 1 < len(self.tiers) else None
        if below is not None and not wait_below:
            for key in victims:
                if not self.directory.indexed(below, key) and not self._hand_off(tier, below, key):
                    tier.stats.extra["dropped_unwritten"] = tier.stats.extra.get("dropped_unwritten", 0) + 1
            below = None
        if level == 0:
            self._left_top(victims)
        for key in victims:
            tier.stats.evictions += 1
            try:
                # One dict read needs no lock: the answer may change right after it either way, and
                # ``put`` asks again under the lock.
                if below is not None and not self.directory.indexed(below, key):
                    with tier.borrow(key) as view:
                        if view is not None and self.put(level + 1, key, view) is not None:
                            tier.stats.demotions += 1
            finally:  # even when a put below raised: the index no longer has it, so neither may the tier
                tier.delete(key)
                self.directory.complete_leave(level, [key])

    def _hand_off(self, tier: Tier, below: int, key: ChunkKey) -> bool:
        """Copy victim ``key``'s bytes for the writer thread to put into tier ``below``; False if
        the hand-off queue is full (or the bytes are gone)."""
        with self._lock:
            if self._handoff_bytes + self.chunk_bytes > self._handoff_cap:
                return False
            self._handoff_bytes += self.chunk_bytes
        copy = None
        try:
            with tier.borrow(key) as view:
                copy = None if view is None else np.array(view, copy=True)
            if copy is not None:
                self._track(self._background.submit(self._put_handed_off, below, key, copy), 1)
                return True
        except RuntimeError:  # closing: no more background work
            pass
        with self._lock:
            self._handoff_bytes -= self.chunk_bytes
        return False

    def _put_handed_off(self, level: int, key: ChunkKey, payload: np.ndarray) -> None:
        try:
            if self.put(level, key, payload) is not None:
                self.tiers[level - 1].stats.demotions += 1
        finally:
            with self._lock:
                self._handoff_bytes -= self.chunk_bytes

    def drop_below(self, keys: list[ChunkKey]) -> None:
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

    # --- read -----------------------------------------------------------------------------
    def probe_shared(self, keys: Sequence[ChunkKey], batch: int = 64) -> list[int]:
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

    def read(self, keys: list[ChunkKey], levels: list[int], targets: dict[int, np.ndarray]) -> tuple[int, list[int]]:
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
            if self.directory.indexed(level, key) or tier.shared:
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

    # --- write-through and close ----------------------------------------------------------
    def _write_through_async(self, keys: list[ChunkKey]) -> None:
        targets = [lv for lv, t in enumerate(self.tiers) if lv > 0 and (t.persistent or t.shared)]
        jobs = [(keys, targets)]
        if self.exclusive and 1 in targets:  # the tier below the top gets only what must persist
            share = self.directory.persist_share(keys, self.write_through_share)
            jobs = [(share, [1]), (keys, [lv for lv in targets if lv != 1])]
        for job_keys, job_targets in jobs:
            if job_keys and job_targets:
                self._track(self._background.submit(self._write_through, job_keys, job_targets), len(job_keys))

    def _track(self, future: Future[None], num_keys: int) -> None:
        """Keep a background job for ``flush`` / ``wait_written`` (finished good ones are pruned)."""
        future.add_done_callback(partial(_log_failure, num_keys))
        with self._inflight_lock:
            self._inflight = [f for f in self._inflight if not f.done() or f.exception() is not None]
            self._inflight.append(future)

    def _write_through(self, keys: list[ChunkKey], targets: list[int]) -> None:
        for key in keys:
            with self.tiers[0].borrow(key) as view:
                if view is None:
                    continue  # evicted meanwhile, and so demoted already
                for level in targets:
                    self.put(level, key, view)

    def flush(self) -> None:
        """Wait for background write-through to finish.

        A write-through that failed (logged when it did; its chunks stay in the top tier and are
        demoted as usual) is raised here once, as a TierError: the next ``flush`` does not see it.
        """
        with self._inflight_lock:
            inflight, self._inflight = self._inflight, []
        failures = [exc for f in inflight if (exc := f.exception()) is not None]
        if failures:
            raise TierError(f"{len(failures)} background write-through(s) failed, the first with "
                            f"{type(failures[0]).__name__}: {failures[0]}") from failures[0]

    def keep_top(self) -> int:
        """Exclusive tiers at close: copy DRAM's chunks that the tier below lacks into it, oldest
        first (its policy makes room as for a demotion, so the newest stay when it is smaller);
        returns how many went down."""
        if not self.exclusive or len(self.tiers) < 2 or not self.tiers[1].persistent:
            return 0
        top = self.tiers[0]
        keys = self.directory.only_in(0)
        kept, failures = 0, []
        for key in keys:
            try:  # one chunk's failure, whatever it is, must not keep the others from going down
                with top.borrow(key) as view:
                    if view is not None and self.put(1, key, view) == 1:
                        kept += 1
            except Exception as exc:  # raised below, after the rest went down
                failures.append(exc)
        if keys:
            log.info("close: %d of DRAM's %d chunks not on %s went down to it", kept, len(keys), self.tiers[1].name)
        if failures:
            raise TierError(f"close: {len(failures)} chunk(s) did not go down to {self.tiers[1].name}, the first "
                            f"with {type(failures[0]).__name__}: {failures[0]}") from failures[0]
        return kept


def _log_failure(num_keys: int, future: Future[None]) -> None:
    """Done-callback of a write-through: log a failure once, when it happens (``flush`` raises it)."""
    exc = future.exception()
    if exc is not None:
        log.error("write-through of %d chunks failed: %s: %s", num_keys, type(exc).__name__, exc,
                  exc_info=exc)
