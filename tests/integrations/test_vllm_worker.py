"""The connector's worker core: saves commit when their copies finish; hints reach the eviction policy.

On CUDA the mover only queues a save's copies and a committer thread commits it once their
event fires.  These tests stand in for CUDA with a ``PagedKV`` whose copies land when a gate
opens (its "event" fires), so the ordering rules are checked on CPU: nothing is visible or
released before the bytes are there, the mover goes on meanwhile, a load or pin queued after a
save waits for it, and a failed copy is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.vllm_config import make_layout  # noqa: E402
from kvtier.integrations.vllm_paged import PagedKV, geometry_of  # noqa: E402
from kvtier.integrations.vllm_plan import EndJob, HintJob, LoadJob, PinJob, SaveJob, StepPlan  # noqa: E402
from kvtier.integrations.vllm_worker import WorkerCore  # noqa: E402
from kvtier.keys import ChunkKey, chunk_keys, namespace_key  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.policy.agent import AgentPolicy  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402

BS, HEADS, HD, LAYERS, NUM_BLOCKS, M = 4, 2, 8, 2, 64, 2  # M blocks per chunk
CHUNK = M * BS


class _Copy:
    """A queued copy: its bytes land when ``synchronize`` finds the gate open (the event fires)."""

    def __init__(self, run: Callable[[], Any], gate: threading.Event, fail: bool) -> None:
        self.run, self.gate, self.fail = run, gate, fail

    def synchronize(self) -> None:
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("copy failed (an injected CUDA error)")
        self.run()


class _AsyncPaged(PagedKV):
    """``gather_into(wait=False)`` returns a ``_Copy`` instead of copying, as the CUDA path does."""

    def __init__(self, caches: dict[str, Any]) -> None:
        super().__init__(caches, geometry_of(caches, BS), tokens_per_chunk=CHUNK)
        self.gate = threading.Event()
        self.queued: list[_Copy] = []
        self.fail = False

    def gather_into(self, views: Sequence[Any], block_ids: Sequence[int], after: Any = None, *,
                    wait: bool = True) -> Any:
        if wait:
            return super().gather_into(views, block_ids, after)
        if not self._runs(views):  # nothing to copy: no event, as on CUDA
            return None
        copy = _Copy(lambda: PagedKV.gather_into(self, views, block_ids, after), self.gate, self.fail)
        self.queued.append(copy)
        return copy


def _worker(disk: Path | None = None) -> tuple[WorkerCore, _AsyncPaged, dict[str, Any]]:
    torch.manual_seed(0)
    caches = {f"layer{i}": torch.randn(NUM_BLOCKS, HEADS, BS, 2 * HD) for i in range(LAYERS)}
    paged = _AsyncPaged(caches)
    layout = make_layout(paged.geometry, chunk_tokens=CHUNK, model_id="worker-test")
    tiers: list[Any] = [DramTier(layout, capacity_bytes=32 * layout.chunk_bytes)]
    if disk is not None:
        tiers.append(DiskTier(layout, path=disk, capacity_bytes=32 * layout.chunk_bytes, fsync=False))
    memory = ContextMemory(layout, tiers)
    return WorkerCore(memory, paged), paged, caches


def _keys(worker: WorkerCore, seed: int, chunks: int) -> tuple[ChunkKey, ...]:
    layout = worker.memory.layout
    return tuple(chunk_keys([seed] * (chunks * CHUNK), tokens_per_chunk=CHUNK, namespace=namespace_key(layout)))


def _until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_save_is_visible_and_released_only_once_its_copies_land() -> None:
    worker, paged, _ = _worker()
    a, b = _keys(worker, 1, 2), _keys(worker, 2, 3)
    worker.save([SaveJob("a", a, (1, 2, 3, 4))])
    worker.save([SaveJob("b", b, (5, 6, 7, 8, 9, 10))])
    worker.hold(["a", "b"])
    _until(lambda: len(paged.queued) == 2)  # the mover queued b's copies while a's are in flight
    assert worker.memory.lookup(a).num_chunks == 0 and worker.memory.lookup(b).num_chunks == 0
    assert worker.finished()[0] == set()  # vLLM must not reuse the blocks yet
    paged.gate.set()
    worker.flush(["a", "b"])
    released: set[str] = set()
    _until(lambda: released.update(worker.finished()[0]) or released == {"a", "b"})
    assert worker.memory.lookup(a).num_chunks == 2 and worker.memory.lookup(b).num_chunks == 3
    stage = paged.gather([5, 6, 7, 8, 9, 10])  # what b's blocks hold
    out = PagedKV.payloads(paged._stage(3))
    assert worker.memory.load(list(b), out) == 3
    assert all(bytes(o) == bytes(s) for o, s in zip(out, PagedKV.payloads(stage), strict=True))
    counters = worker.take_counters()
    assert counters.values["save_chunks"] == 5
    worker.close()


def test_a_load_queued_after_a_save_of_the_same_chunks_waits_for_its_commit() -> None:
    worker, paged, caches = _worker()
    keys = _keys(worker, 3, 2)
    worker.save([SaveJob("s", keys, (11, 12, 13, 14))])
    worker.load_async(LoadJob("l", 0, 0, 2 * CHUNK, keys, (40, 41, 42, 43), async_load=True))
    worker.pin([PinJob("p", keys)])
    threading.Timer(0.2, paged.gate.set).start()  # the copies land after the load was queued
    worker.flush(["s", "l", "p"])
    assert worker.take_load_errors() == set()
    for kv in caches.values():
        assert torch.equal(kv[40:44], kv[11:15])
    assert worker.memory.lookup(keys).num_chunks == 2
    assert worker.take_counters().values["pinned_chunks"] == 2
    worker.close()


def test_a_failed_copy_is_a_miss_and_releases_the_blocks() -> None:
    worker, paged, _ = _worker()
    paged.fail = True
    keys = _keys(worker, 4, 2)
    worker.save([SaveJob("f", keys, (1, 2, 3, 4))])
    worker.hold(["f"])
    paged.gate.set()
    worker.flush(["f"])
    _until(lambda: "f" in worker.finished()[0])
    assert worker.memory.lookup(keys).num_chunks == 0
    report = worker.take_report()
    assert report is not None and set(keys) <= report.unsaved  # the scheduler will not plan loads of them
    paged.fail = False
    worker.save([SaveJob("g", keys, (1, 2, 3, 4))])  # the slots were given back: a retry is stored
    worker.flush(["g"])
    assert worker.memory.lookup(keys).num_chunks == 2
    worker.close()


def test_a_chunk_dram_does_not_take_is_not_copied_and_its_blocks_go_back(tmp_path: Path) -> None:
    """DRAM full of pinned chunks: a save copies nothing (no buffer, no disk write on the mover),
    counts the chunks as not taken, reports them missing and releases the request at once."""
    worker, paged, _ = _worker(tmp_path)
    full = _keys(worker, 7, 32)
    paged.gate.set()
    worker.save([SaveJob("full", full, tuple(range(64)))])
    worker.flush(["full"])
    worker.memory.pin(list(full))
    queued = len(paged.queued)
    keys = _keys(worker, 8, 2)
    worker.save([SaveJob("d", keys, (0, 1, 2, 3))])
    worker.hold(["d"])
    _until(lambda: "d" in worker.finished()[0])
    assert len(paged.queued) == queued  # no copy was queued for it
    assert worker.memory.lookup(keys).num_chunks == 0  # in no tier: not put on disk either
    report = worker.take_report()
    assert report is not None and set(keys) <= report.unsaved and not report.missing
    counters = worker.take_counters().values
    assert counters["save_dropped_chunks"] == 2 and counters["save_chunks"] == 32
    worker.close()


# hints: the agent policy of the worker's hierarchy
LAYOUT = KVLayout(model="t", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HD, dtype="float32",
                  tokens_per_chunk=2 * BS)


def _core(capacity_chunks: int) -> WorkerCore:
    caches = {f"layer{i}": torch.zeros(NUM_BLOCKS, HEADS, BS, 2 * HD) for i in range(LAYERS)}
    paged = PagedKV(caches, geometry_of(caches, BS), tokens_per_chunk=2 * BS)
    memory = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=capacity_chunks * LAYOUT.chunk_bytes)],
                           eviction="agent")
    return WorkerCore(memory, paged)


def test_a_hint_tells_the_agent_policy_the_requests_chunks_and_session() -> None:
    core = _core(4)
    try:
        keys = core.memory.keys_for(list(range(40)))  # 5 chunks
        core.hint([HintJob("r1", tuple(keys), "chat-7")])
        policy = core.memory.indexes[0].policy
        assert isinstance(policy, AgentPolicy)
        model = policy.model
        assert model.hinted and list(model.sessions) == ["chat-7"]
        assert [model.depth_of(k) for k in keys] == [0, 1, 2, 3, 4]
        core.hint([HintJob("r2", tuple(keys[:2]), None), HintJob("r3", tuple(keys[1:3]), "chat-8")])
        assert list(model.sessions) == ["chat-7", "chat-8"]
        # each chunk's position in the newest request naming it: a batch's chunks are stored after all its hints
        assert [model.depth_of(k) for k in keys] == [0, 0, 1, 3, 4]
        # a second call of the session: its gap is learnt (trace time is the policy's clock here)
        core.hint([HintJob("r4", tuple(keys), "chat-7")])
        assert model.sessions["chat-7"].gap is not None
        payload = np.zeros(LAYOUT.chunk_bytes, np.uint8)
        assert core.memory.store(keys[:4], [payload] * 4) == 4  # the hinted request's chunks are admitted
        assert core.memory.lookup(keys).num_chunks == 4
        core.hint_ends([EndJob("chat-7", "user")])  # its answer waits for the user
        assert model.sessions["chat-7"].awaits == "user" and core.counters.values["answers_awaiting_user"] == 1
    finally:
        core.close()


def test_warm_up_times_a_copy_and_changes_no_block() -> None:
    worker, _, caches = _worker()
    before = {name: t.clone() for name, t in caches.items()}
    rate, seconds = worker.warm_up()
    assert rate is not None and rate > 0 and seconds >= 0
    assert all(torch.equal(caches[name], t) for name, t in before.items())
    worker.close()


def test_loads_and_forwards_are_timed_for_the_schedulers_cost_model() -> None:
    from kvtier.integrations.calibrate import ForwardSample

    worker, paged, _ = _worker()
    keys = _keys(worker, 1, 2)
    worker.save([SaveJob("r", keys, tuple(range(2 * M)))])
    paged.gate.set()
    _until(lambda: worker.memory.lookup(list(keys)).num_chunks == 2)
    worker.take_report()  # the save's index changes
    worker.load_now(LoadJob("s", 0, 0, 2 * CHUNK, keys, tuple(range(10, 10 + 2 * M))))
    worker.forwards.starts((300, 300 * 150.0))
    worker.forwards.ends()
    worker.forwards.starts(None)  # a step the planner did not ask to time
    worker.forwards.ends()
    report = worker.take_report()
    assert report is not None
    (load,) = report.loads
    assert (load.level, load.nbytes) == (0, 2 * worker.memory.layout.chunk_bytes) and load.seconds > 0
    (forward,) = report.forwards
    assert isinstance(forward, ForwardSample) and (forward.new_tokens, forward.ctx_pairs) == (300, 45000.0)
    assert worker.take_report() is None  # taken once
    worker.close()


def test_pin_requests_are_records_on_disk_and_an_unwritable_one_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    worker, _, _ = _worker(tmp_path)
    keys = _keys(worker, 5, 2)
    worker.pin([PinJob("p", keys)])
    worker.flush(["p"])
    pins = worker.memory.pin_files
    assert pins is not None and set(pins.records()) == set(keys)
    worker.pin([PinJob("u", keys, unpin=True)])  # a request's unpin removes the records
    worker.flush(["u"])
    assert pins.records() == {}
    disk = worker.memory.tiers[1]
    assert isinstance(disk, DiskTier)
    pins.close()
    (disk.root / "pins").rmdir()
    (disk.root / "pins").symlink_to(tmp_path)  # planted: no record is written through it
    with caplog.at_level(logging.WARNING):
        worker.pin([PinJob("x", keys)])
        worker.flush(["x"])
    assert "pin records not written" in caplog.text and "background job failed" not in caplog.text
    assert worker.take_counters().values["pinned_chunks"] == 2  # the first request's only
    worker.close()


def test_a_hints_retention_ranks_its_chunks() -> None:
    from kvtier.policy.retention import Retention

    core = _core(4)
    try:
        keys = core.memory.keys_for(list(range(16)))
        core.hint([HintJob("r1", tuple(keys), "chat-7", Retention(priority=1, ttl_s=60.0))])
        core.memory.store(keys, [np.zeros(LAYOUT.chunk_bytes, np.uint8)] * 2)
        model = core.memory.indexes[0].policy.model  # type: ignore[attr-defined]
        assert [model.nodes[k].rank for k in keys] == [3, 3]  # 2 x priority + 1 while the ttl runs
    finally:
        core.close()


def test_a_tool_end_prefetches_the_sessions_chunks_counted(tmp_path: Path) -> None:
    caches = {f"layer{i}": torch.zeros(NUM_BLOCKS, HEADS, BS, 2 * HD) for i in range(LAYERS)}
    paged = PagedKV(caches, geometry_of(caches, BS), tokens_per_chunk=2 * BS)
    tiers = [DramTier(LAYOUT, capacity_bytes=2 * LAYOUT.chunk_bytes),
             DiskTier(LAYOUT, path=tmp_path, capacity_bytes=64 * LAYOUT.chunk_bytes, fsync=False)]
    core = WorkerCore(ContextMemory(LAYOUT, tiers, prefetch_share=1.0), paged)  # type: ignore[arg-type]
    try:
        memory = core.memory
        keys = memory.keys_for(list(range(32)))  # 4 chunks
        payloads = [np.full(LAYOUT.chunk_bytes, i, np.uint8) for i in range(4)]
        core.hint([HintJob("r1", tuple(keys[:2]), "agent")])
        memory.store(keys[:2], payloads[:2])
        memory.flush()
        memory.store(keys[2:], payloads[2:])  # LRU: the session's chunks go down to disk
        memory.flush()
        memory.delete(keys[2:])
        core.hint_ends([EndJob("agent", "tool")])
        assert memory.prefetch.drain(60)
        assert memory.lookup(keys[:2]).tiers == (0, 0)
        counters = core.take_counters().values
        assert counters["prefetch_chunks"] == 2 and counters["answers_awaiting_tool"] == 1
        assert "prefetch_chunks" not in core.take_counters().values  # deltas: reported once
        memory.store(keys[2:], payloads[2:])  # the foreground evicts both prefetched chunks unread
        memory.flush()
        core.hint_ends([EndJob("agent", "tool")])  # mostly unread lately: the prefetcher backs off
        assert memory.prefetch.drain(60)
        counters = core.take_counters().values
        assert counters["prefetch_wasted_chunks"] == 2 and counters["prefetch_skipped"] == 1
        assert "prefetch_chunks" not in counters  # nothing prefetched for the skipped pause
    finally:
        core.close()


def test_a_plan_closes_once_with_or_without_wait_for_save() -> None:
    """``close_step`` takes a plan's pins, held requests and counts once, whichever hook comes first."""
    worker, _, _ = _worker()
    try:
        plan = StepPlan(held={"r1"}, uncacheable=2, decisions={"fetch_recompute": 1})
        worker.close_step(plan)
        worker.close_step(plan)  # get_finished after wait_for_save: nothing twice
        assert worker.finished() == ({"r1"}, set())
        assert worker.counters.values["uncacheable_requests"] == 2
        assert worker.counters.values["fetch_recompute"] == 1
    finally:
        worker.close()


def _hooks() -> tuple[WorkerCore, Any]:
    """vLLM's connector with its worker hooks only, around a real ``WorkerCore`` (no vLLM engine)."""
    from kvtier.integrations.vllm import KVTierConnector
    from kvtier.integrations.vllm_config import ConnectorOptions
    from kvtier.integrations.vllm_counters import ConnectorCounters

    worker, _, _ = _worker()
    connector = KVTierConnector.__new__(KVTierConnector)
    connector._worker = worker
    connector._layerwise, connector._layer_index, connector._layers_waited = False, {}, set()
    connector.options = ConnectorOptions(log_interval_s=0)
    connector._total, connector._interval, connector._logged_total = ConnectorCounters(), ConnectorCounters(), {}
    connector._last_log = connector._report_logged = 0.0
    connector._connector_metadata = None
    return worker, connector


def test_a_step_without_a_forward_still_releases_finished_requests() -> None:
    """vLLM 0.26's model runner (and async scheduling) runs steps with nothing scheduled: the
    connector's metadata is bound, ``start_load_kv`` and ``get_finished`` run, ``wait_for_save``
    does not.  Finished requests handed over in such a step must still be reported, else vLLM
    keeps their blocks for ever (seen on an H200: ``reset_prefix_cache`` refused, 177 blocks)."""
    pytest.importorskip("vllm")
    from kvtier.integrations.vllm import KVTierConnectorMetadata

    worker, connector = _hooks()
    try:
        connector.bind_connector_metadata(KVTierConnectorMetadata(plan=StepPlan(held={"done-1"})))
        connector.start_load_kv(None)  # type: ignore[arg-type]
        sending, received = connector.get_finished(set())  # no wait_for_save in this step
        assert sending == {"done-1"} and received is None
        connector.clear_connector_metadata()
    finally:
        worker.close()


def test_the_forward_is_timed_from_bind_when_vllm_starts_loads_after_it() -> None:
    """vLLM 0.32 calls ``start_load_kv`` after the forward when no load of the step is synchronous
    (``has_sync_kv_loads`` false: a step without loads, or with async ones), then ``wait_for_save``.
    Timed from ``start_load_kv``, every such forward read ~0 s and the scheduler's online prefill
    cost fell to nothing, so every hit was recomputed (seen in ``kvtier bench vllm --concurrent``:
    "recompute 0.0 ms").  The mark is taken at ``bind_connector_metadata``, before the forward."""
    pytest.importorskip("vllm")
    from kvtier.integrations.vllm import KVTierConnectorMetadata

    worker, connector = _hooks()
    try:
        for sync_load in (False, True):
            loads = [LoadJob("s", 0, 0, CHUNK, _keys(worker, 7, 1), tuple(range(M)), async_load=False)]
            plan = StepPlan(forward=(512, 512 * 256.0), loads=loads if sync_load else [])
            connector.bind_connector_metadata(KVTierConnectorMetadata(plan=plan))
            time.sleep(0.05)  # the forward
            connector.start_load_kv(None)  # type: ignore[arg-type]
            connector.wait_for_save()
            connector.clear_connector_metadata()
            report = worker.take_report()
            forwards = report.forwards if report is not None else []
            if sync_load:  # the load would be timed with the forward: no sample
                assert forwards == []
            else:
                (forward,) = forwards
                assert forward.new_tokens == 512 and forward.seconds >= 0.05
    finally:
        worker.close()


def test_a_flush_that_blocks_the_step_is_timed_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A preempted request's jobs that keep the step waiting show as ``wait_flush_*`` counters (on
    ``/metrics``) and one log line saying what was waited for; a wait under 1 ms counts nothing."""
    worker, _, _ = _worker()
    try:
        worker._submit(["slow"], time.sleep, 0.3)  # a job of the request still running on the mover
        with caplog.at_level(logging.INFO, logger="vllm.kvtier"):
            worker.flush(["slow"])
            worker.flush(["idle"])  # nothing to wait for
        counters = worker.take_counters().values
        assert counters["wait_flush_s"] >= 0.1 and counters["wait_flush_long"] == 1
        lines = [r.getMessage() for r in caplog.records if "the step waited" in r.getMessage()]
        assert len(lines) == 1 and "(flush): 1 jobs of preempted requests" in lines[0], lines
        worker.flush(["idle"])
        assert "wait_flush_s" not in worker.take_counters().values
    finally:
        worker.close()
