"""Worker side of the vLLM connector: moves bytes between vLLM's paged KV and kvtier, off the step.

No vLLM import: the connector (``kvtier.integrations.vllm``) forwards vLLM's worker hooks here,
and a harness can drive this class the same way on a machine without vLLM.

One *mover* thread runs every job in the order the scheduler planned them, so a load planned
after a save of the same chunk finds it:

* **save** (``save``, from ``wait_for_save``): gather the chunks' blocks straight into reserved
  DRAM slots and commit them; write-through continues on the hierarchy's own thread.  Nothing is
  written below DRAM on the mover's time (``wait_below=False``): a chunk DRAM does not take is not
  copied, a victim not yet written through goes to the writer thread (dropped if it lags far).
  The step does not wait.  On CUDA the mover only queues the copies; a *committer*
  thread commits each save when its copies' event fires, so the mover reserves and queues the
  next save while the DMA engine is still busy with this one (no idle link between saves).  A
  load or pin of a chunk still being saved waits for that commit.  The blocks stay readable
  because vLLM does not reuse them before we say so: a finished request's blocks are held
  (``request_finished`` returned True) until ``finished`` reports it (after the commit); a
  preempted request's are freed at once, so ``flush`` waits for its jobs in ``handle_preemptions``,
  before the next forward can overwrite them.
* **async load** (``load_async``): for hits below DRAM (disk, Redis, Mooncake): read into DRAM
  slots (promotion in place) and scatter into the request's new blocks while vLLM keeps
  stepping the other requests; ``finished`` reports the request as received.
* **sync load** (``load_now``): DRAM hits, scattered before the forward on the caller's thread
  (it first waits for any in-flight save of the same chunks).
* **pin** (token warehousing): on the mover too, so pin records never cost the step.
* **hint** (``hint``, before the step's loads, on the caller's thread: cheap, no I/O): tells the
  eviction policy which chunks a new request reads and its session (``ContextMemory.hint``).

Failed loads (evicted, corrupt, server down) are reported by block id (vLLM recomputes them) and
by key.  Every change of the hierarchy's index (``ContextMemory.listen``) is queued and sent to
the scheduler once per step (``take_report``), so the scheduler's ``ChunkDirectory`` is the
worker's view, one step late at most: it never plans from a private, stale index.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvtier.errors import TierError
from kvtier.hierarchy import ContextMemory, InPlaceStore
from kvtier.integrations.calibrate import ForwardSample, LoadSample
from kvtier.integrations.vllm_counters import PREFETCH_COUNTERS, ConnectorCounters
from kvtier.integrations.vllm_jobs import EndJob, HintJob, LoadJob, PinJob, SaveJob, StepPlan
from kvtier.integrations.vllm_paged import PagedKV
from kvtier.integrations.vllm_timing import ForwardTimer, HostWaits
from kvtier.keys import ChunkKey

logger = logging.getLogger("vllm.kvtier")


@dataclass
class WorkerReport:
    """Worker -> scheduler, once per step (summed over TP ranks by ``merge``)."""

    changes: list[tuple[int, str, ChunkKey, bool]] = field(default_factory=list)  # (rank, tier, key, added)
    missing: set[ChunkKey] = field(default_factory=set)  # planned loads that failed: recomputed, saved again
    unsaved: set[ChunkKey] = field(default_factory=set)  # planned saves not stored (refused, failed): not retried
    loads: list[LoadSample] = field(default_factory=list)  # timed loads, for the scheduler's cost model
    forwards: list[ForwardSample] = field(default_factory=list)  # timed prefill-heavy forwards

    def merge(self, other: WorkerReport) -> WorkerReport:
        self.changes += other.changes
        self.missing |= other.missing
        self.unsaved |= other.unsaved
        self.loads += other.loads
        self.forwards += other.forwards
        return self


class WorkerCore:
    """The byte-moving half of the connector, for one worker (one TP rank)."""

    def __init__(self, memory: ContextMemory, paged: PagedKV, *, rank: int = 0) -> None:
        self.memory = memory
        self.paged = paged
        self.rank = rank
        self.tokens_per_chunk = memory.layout.tokens_per_chunk
        self.counters = ConnectorCounters()  # totals since the last take_counters
        self._lock = threading.Lock()  # guards everything below, shared with the mover thread
        self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-mover")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-commit")
        self._jobs: dict[str, list[Future[None]]] = defaultdict(list)  # req id -> its unfinished jobs
        self._saving: dict[ChunkKey, Future[None]] = {}  # chunks being saved
        self._held: set[str] = set()  # finished requests whose blocks vLLM holds until we report them
        self._received: set[str] = set()  # async loads done since the last ``finished``
        self._failed_blocks: set[int] = set()
        self._missing: set[ChunkKey] = set()
        self._unsaved: set[ChunkKey] = set()
        self._changes: list[tuple[int, str, ChunkKey, bool]] = []
        self._pending: list[tuple[list[Any], contextlib.ExitStack]] = []  # this step's queued loads (CUDA)
        self._load_samples: list[LoadSample] = []
        self._forward_samples: list[ForwardSample] = []
        self.forwards = ForwardTimer(paged, self._keep_forward)  # for the scheduler's cost model
        self._waits = HostWaits(self.count)  # the step's blocking waits (wait_<cause>_s counters)
        self._prefetch_seen: dict[str, int] = memory.prefetch.stats.as_dict()  # reported so far
        self._closed: StepPlan | None = None  # the last plan ``close_step`` took
        memory.listen(self._on_change)

    def _on_change(self, tier: str, key: ChunkKey, added: bool) -> None:
        self._changes.append((self.rank, tier, key, added))  # list.append is atomic; swapped in take_report

    # --- jobs ---------------------------------------------------------------------------------
    def _submit(self, req_ids: Iterable[str], fn: Callable[..., None], *args: object) -> Future[None]:
        future: Future[None] = self._mover.submit(self._run, fn, *args)
        self._track(req_ids, future)
        return future

    def _track(self, req_ids: Iterable[str], future: Future[None]) -> None:
        """The requests' blocks are in use until ``future`` is done (``flush``, ``finished``)."""
        ids = tuple(set(req_ids))
        with self._lock:
            for req_id in ids:
                self._jobs[req_id].append(future)
        future.add_done_callback(partial(self._done, ids))

    @staticmethod
    def _run(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # a bug must not wedge the engine: the job's chunks are misses
            logger.exception("kvtier: background job failed")
            raise

    def _done(self, req_ids: tuple[str, ...], future: Future[None]) -> None:
        with self._lock:
            for req_id in req_ids:
                jobs = self._jobs.get(req_id)
                if jobs is not None:
                    jobs.remove(future)
                    if not jobs:
                        del self._jobs[req_id]

    def save(self, jobs: Sequence[SaveJob], after: Any = None) -> None:
        """Copy out the chunks of this step's saves, in the background (see the module doc).

        ``after``: on CUDA, an event recorded after the forward that wrote the blocks."""
        if not jobs:
            return
        keys = [k for job in jobs for k in job.keys]
        committed: Future[None] = Future()  # done once the chunks are committed (or failed)
        with self._lock:
            for key in keys:
                self._saving[key] = committed
        committed.add_done_callback(lambda f: self._saved(keys, f))
        self._track([job.req_id for job in jobs], committed)
        self._mover.submit(self._run, self._save, keys, [b for job in jobs for b in job.block_ids], after,
                           committed)

    def _save(self, keys: list[ChunkKey], block_ids: list[int], after: Any, committed: Future[None]) -> None:
        """On the mover: reserve DRAM slots, gather into them; commit here (CPU) or on the committer (CUDA)."""
        t0, op = time.perf_counter(), None
        try:
            op = self.memory.store_in_place(keys, wait_below=False)  # into DRAM slots; refused: not copied
            copied = self.paged.gather_into(op.views, block_ids, after, wait=False)
        except BaseException as exc:
            self._saved_all(keys, op, t0, committed, exc)
            raise
        if copied is None:  # CPU (or nothing to copy): the bytes are there
            self._saved_all(keys, op, t0, committed)
        else:
            self._committer.submit(self._commit_when_copied, keys, op, copied, t0, committed)

    def _commit_when_copied(self, keys: list[ChunkKey], op: InPlaceStore, copied: Any, t0: float,
                            committed: Future[None]) -> None:
        try:
            copied.synchronize()
        except BaseException as exc:
            self._saved_all(keys, op, t0, committed, exc)
            logger.exception("kvtier: a save's copies failed; its chunks are not stored")
            return
        self._saved_all(keys, op, t0, committed)

    def _saved_all(self, keys: list[ChunkKey], op: InPlaceStore | None, t0: float, committed: Future[None],
                   failed: BaseException | None = None) -> None:
        """Commit (or, after a failure, abort) a save and settle its future and counters."""
        stored = 0
        try:
            if op is not None and failed is None:
                stored = op.commit()
            elif op is not None:
                op.abort()
        except Exception as exc:  # the hierarchy raised (a tier bug): the chunks are misses
            failed = failed or exc
            logger.exception("kvtier: committing a save failed")
        finally:
            if stored < len(keys):  # no room (all pinned), or failed: the scheduler must not plan loads
                lost = [k for k in keys if not self.memory.lookup([k]).num_chunks]
                with self._lock:
                    self._unsaved.update(lost)
            self.count(save_chunks=stored, save_bytes=stored * self.memory.layout.chunk_bytes,
                       save_s=time.perf_counter() - t0, save_dropped_chunks=op.num_dropped if op else 0)
            if failed is None:
                committed.set_result(None)
            else:
                committed.set_exception(failed)

    def _wait_saves(self, keys: Iterable[ChunkKey]) -> None:
        """Wait for in-flight saves of these chunks (their bytes come first)."""
        with self._lock:
            waits = {f for k in keys if (f := self._saving.get(k)) is not None}
        with self._waits.timed("save", lambda: f"{len(waits)} saves of an earlier step"):
            for future in waits:
                _wait_quietly(future)

    def _saved(self, keys: list[ChunkKey], future: Future[None]) -> None:
        with self._lock:
            for key in keys:
                if self._saving.get(key) is future:
                    del self._saving[key]

    def load_now(self, job: LoadJob, after: Any = None, *, layerwise: bool = False) -> None:
        """Scatter a DRAM hit into vLLM's blocks before this step's forward.

        On CUDA the copies are queued and not waited for: ``wait_loads`` (all layers) or
        ``wait_layer`` (``layerwise``: one layer) makes the compute stream wait for them, and
        ``end_step`` releases the DRAM slots once they are done.  On CPU they are done on return."""
        self._wait_saves(job.keys)  # a chunk being saved by an earlier step: its bytes come first
        self._load(job, after, pending=True, layerwise=layerwise)

    def wait_layer(self, layer: int) -> None:
        """The compute stream waits (on the device, the host does not) for layer ``layer`` of this
        step's queued loads."""
        if self._pending:
            stream = self.paged.current_stream()
            for events, _ in self._pending:
                stream.wait_event(events[layer])

    def wait_loads(self) -> None:
        """The compute stream waits for every layer of this step's queued loads."""
        self.wait_layer(-1)

    def end_step(self) -> None:
        """After the forward: wait for this step's queued loads, release their DRAM slots."""
        pending, self._pending = self._pending, []
        with self._waits.timed("load", lambda: f"{len(pending)} DRAM loads of this step"):
            for events, borrowed in pending:
                try:
                    events[-1].synchronize()
                finally:
                    borrowed.close()

    def load_async(self, job: LoadJob, after: Any = None) -> None:
        """Load a lower-tier hit on the mover; ``finished`` reports the request when done.

        ``after``: on CUDA, an event after vLLM's own work on the new blocks (zeroing)."""
        future = self._submit([job.req_id], self._load, job, after)
        future.add_done_callback(partial(self._received_one, job.req_id))
        self.count(async_loads=1)

    def _received_one(self, req_id: str, future: Future[None]) -> None:
        with self._lock:
            self._received.add(req_id)

    def _load(self, job: LoadJob, after: Any = None, *, pending: bool = False, layerwise: bool = False) -> None:
        """``pending``: queue the DRAM part's copies and keep its slots borrowed (``end_step``)."""
        memory, paged, m = self.memory, self.paged, self.paged.blocks_per_chunk
        if not pending:  # on the mover: a save queued before this load may still be committing
            self._wait_saves(job.keys)
        t0 = time.perf_counter()
        loaded = 0
        timed = True  # False: the copies were only queued (CUDA, this step): the host time is not theirs
        hits_before = [t.stats.hits for t in memory.tiers]
        try:
            # DRAM hits are read in place, lower-tier hits promoted into DRAM slots and read there
            with contextlib.ExitStack() as borrowed:
                views = borrowed.enter_context(memory.borrow_prefix(job.keys))
                ids = job.block_ids[:len(views) * m]
                events = paged.scatter_pending(views, ids, after, layerwise=layerwise) if pending else None
                if events is not None:
                    self._pending.append((events, borrowed.pop_all()))
                    timed = False
                elif not pending:
                    paged.scatter_from(views, ids, after)
                loaded = len(views)
            if loaded < len(job.keys):  # no DRAM slot for the rest, no DRAM tier, or a miss: via staging
                stage = paged._stage(len(job.keys) - loaded)
                got = memory.load(job.keys[loaded:], paged.payloads(stage))
                paged.scatter(stage[:got], job.block_ids[loaded * m:(loaded + got) * m], after)
                loaded += got
        finally:  # whatever was not loaded (a miss, or an error) is recomputed by vLLM
            failed = [b for b in job.block_ids[loaded * m:] if b >= 0]
            with self._lock:
                self._failed_blocks.update(failed)
                self._missing.update(job.keys[loaded:])
            if failed:
                logger.warning("kvtier: request %s: %d of %d planned chunks could not be loaded; vLLM "
                               "recomputes %d blocks", job.req_id, len(job.keys) - loaded, len(job.keys),
                               len(failed))
            tokens = max(0, min(job.end, job.first_token + loaded * self.tokens_per_chunk) - job.start)
            hits = [t.stats.hits - before for t, before in zip(memory.tiers, hits_before, strict=True)]
            per_tier = {f"hit_tokens_{t.name}": n * self.tokens_per_chunk for t, n in zip(memory.tiers, hits,
                                                                                          strict=True)}
            seconds = time.perf_counter() - t0
            self.count(load_chunks=loaded, load_tokens=tokens, load_bytes=loaded * memory.layout.chunk_bytes,
                       load_s=seconds, load_failed_chunks=len(job.keys) - loaded, **per_tier)
            if timed and loaded == len(job.keys) and any(hits):  # a whole load: a sample of its lowest tier
                level = max(i for i, n in enumerate(hits) if n)
                with self._lock:
                    self._load_samples.append(LoadSample(level, hits[level] * memory.layout.chunk_bytes, seconds))

    def hint(self, jobs: Sequence[HintJob]) -> None:
        """Announce new requests to the eviction policy, in the order they were looked up.  The
        policy treats the latest hint as the request being served (``kvtier.policy.agent``): in a
        batched step approximate, as an earlier request's chunks may be stored after it."""
        for job in jobs:
            self.memory.hint(list(job.keys), session=job.session, retention=job.retention)

    def hint_ends(self, jobs: Sequence[EndJob]) -> None:
        """Tell the eviction policy what finished requests' answers wait for (a tool or the user)."""
        for job in jobs:
            self.memory.hint_end(job.session, awaits=job.awaits)
            self.count(**{f"answers_awaiting_{job.awaits}": 1})

    def pin(self, jobs: Sequence[PinJob]) -> None:
        for job in jobs:
            self._submit([job.req_id], self._pin, job)

    def _pin(self, job: PinJob) -> None:
        memory = self.memory
        self._wait_saves(job.keys)  # pin what the save before it stores
        try:
            persist = memory.pin_files is not None  # the request's pins are records when there is a disk
            if job.unpin:
                memory.unpin(job.keys, persist=persist)
            else:
                memory.pin(job.keys, job.ttl_s, persist=persist)
        except (OSError, TierError) as exc:  # a full or read-only disk: the chunks stay cached, just not pinned
            logger.warning("kvtier: request %s: pin records not written (%s)", job.req_id, exc)
            return
        self.count(**{"unpinned_chunks" if job.unpin else "pinned_chunks": len(job.keys)})

    def close_step(self, plan: StepPlan) -> None:
        """Once per plan, after its saves: pins, finished requests whose blocks vLLM holds for us,
        counts.  From ``wait_for_save``, and from ``get_finished``, which vLLM also calls in steps
        without a forward (no ``wait_for_save``); the second call does nothing."""
        if plan is not self._closed:
            self._closed = plan
            self.end_step()
            self.pin(plan.pins)
            self.hold(plan.held)
            self.count(uncacheable_requests=plan.uncacheable, **plan.decisions)

    # --- request lifetimes ----------------------------------------------------------------------
    def flush(self, req_ids: Iterable[str]) -> None:
        """Wait for the jobs of these requests (preempted: vLLM reuses their blocks next)."""
        with self._lock:
            futures = [f for r in req_ids for f in self._jobs.get(r, ())]
        with self._waits.timed("flush", lambda: f"{len(futures)} jobs of preempted requests, "
                                                f"{self.inflight()} jobs queued or running"):
            for future in futures:
                _wait_quietly(future)

    def hold(self, req_ids: Iterable[str]) -> None:
        """Finished requests whose blocks vLLM keeps until ``finished`` reports them."""
        with self._lock:
            self._held.update(req_ids)

    def finished(self) -> tuple[set[str], set[str]]:
        """(held requests whose jobs are all done, requests whose async load is done)."""
        with self._lock:
            sending = {r for r in self._held if r not in self._jobs}
            self._held -= sending
            received, self._received = self._received, set()
        return sending, received

    def take_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_report(self) -> WorkerReport | None:
        self.forwards.read()
        with self._lock:
            changes, self._changes = self._changes, []
            missing, self._missing = self._missing, set()
            unsaved, self._unsaved = self._unsaved, set()
            loads, self._load_samples = self._load_samples, []
            forwards, self._forward_samples = self._forward_samples, []
        if not changes and not missing and not unsaved and not loads and not forwards:
            return None
        return WorkerReport(changes=changes, missing=missing, unsaved=unsaved, loads=loads, forwards=forwards)

    def _keep_forward(self, sample: ForwardSample) -> None:
        with self._lock:
            self._forward_samples.append(sample)

    def inflight(self) -> int:
        with self._lock:
            return len({id(f) for jobs in self._jobs.values() for f in jobs})

    def warm_up(self) -> tuple[float | None, float]:
        """Take the lazy costs of a first copy off the first hit, on both threads that copy.

        Returns (bytes/s of a timed DRAM-to-blocks copy, seconds the warm-up took)."""
        t0 = time.perf_counter()
        rate = self.paged.warm_up()  # the step's thread: DRAM hits
        self._mover.submit(self.paged.warm_up).result()  # the mover: saves and lower-tier hits
        return rate, time.perf_counter() - t0

    def count(self, **deltas: float) -> None:
        with self._lock:
            self.counters.add(**deltas)

    def take_counters(self) -> ConnectorCounters:
        """The counters since the last call, with the prefetches' (``PREFETCH_COUNTERS``)."""
        now = self.memory.prefetch.stats.as_dict()
        with self._lock:
            counters, self.counters = self.counters, ConnectorCounters()
            seen, self._prefetch_seen = self._prefetch_seen, now
        counters.add(**{name: now[stat] - seen[stat] for stat, name in PREFETCH_COUNTERS.items()})
        return counters

    def close(self) -> None:
        """Finish every job, then close the hierarchy (flushes write-through)."""
        self.end_step()
        self._mover.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        self.memory.close()


def _wait_quietly(future: Future[None]) -> None:
    with contextlib.suppress(Exception):  # logged by the job itself; its chunks are misses
        future.result()
