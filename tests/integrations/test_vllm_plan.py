"""The scheduler-side planner on its own: which chunks are loaded into which blocks, which are saved.

vLLM's request and scheduler-output objects are stood in for by small dataclasses holding the
fields the planner reads; the end-to-end behaviour is tested in real vLLM (test_vllm.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvtier.integrations.vllm_plan import ChunkDirectory, Match, PinRequest, Planner, parse_pin_request
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier

LAYOUT = KVLayout(model="t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=8)
NS = namespace_key(LAYOUT)


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_prompt_tokens: int = -1  # -1: all tokens are prompt
    status: Any = None
    # what RequestKeyer reads besides tokens (tested on real vLLM requests in test_vllm_keys.py)
    mm_features: Any = None
    cache_salt: str | None = None
    lora_request: Any = None
    prompt_embeds: Any = None
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.all_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass
class NewReq:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class Cached:
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class Out:
    scheduled_new_reqs: list[NewReq]
    num_scheduled_tokens: dict[str, int]
    scheduled_cached_reqs: Cached = field(default_factory=Cached)


def _planner(**kw: Any) -> Planner:
    return Planner(namespace=NS, tokens_per_chunk=8, block_size=4, directory=ChunkDirectory(["dram", "disk"]), **kw)


def _keys(tokens: list[int]) -> list[ChunkKey]:
    return chunk_keys(tokens, tokens_per_chunk=8, namespace=NS)


def test_saves_whole_chunks_once_and_loads_them_back() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 20 tokens: chunks 0, 1 full, 4 tokens of tail
    first = Req("a", tokens)
    assert planner.match(first, 0) == (0, False)
    plan = planner.build(Out([NewReq("a", ([10, 11, 12, 13, 14],), 0)], {"a": 20}))
    assert plan.loads == [] and len(plan.saves) == 1
    assert plan.saves[0].keys == tuple(_keys(tokens))
    assert plan.saves[0].block_ids == (10, 11, 12, 13)  # the tail block 14 is never saved
    assert planner.finished(first)  # saves were planned: vLLM holds the blocks until the worker says
    assert planner.build(Out([], {})).held == {"a"}

    planner.directory.apply([(0, "dram", k, True) for k in _keys(tokens)])  # the worker reports the saves
    second = Req("b", [*tokens[:16], 99])  # 17 tokens: both chunks hit, limit = 16
    assert planner.match(second, 4) == (12, False)  # vLLM's own cache had the first block
    planner.allocated(second, [20, 21, 22, 23, 24], 12)
    plan = planner.build(Out([NewReq("b", ([20, 21, 22, 23, 24],), 4)], {"b": 13}))
    assert plan.saves == [] and len(plan.loads) == 1
    assert plan.loads[0].block_ids == (-1, 21, 22, 23)  # block 20 was computed by vLLM: left alone
    assert not plan.loads[0].async_load
    assert not planner.finished(second)  # nothing saved: blocks are freed at once


def test_a_hit_on_a_save_still_in_flight_loads_asynchronously_after_it() -> None:
    """A load before the forward would block the step until the mover, behind its backlog, had
    committed the save; loaded asynchronously, the mover reads it right after the save (FIFO) and
    only this request waits.  Once the save is reported the chunk is an ordinary DRAM hit."""
    tokens = list(range(1, 21))
    keys = _keys(tokens)
    second = Req("b", [*tokens[:16], 99])
    for mode, in_flight in (("auto", True), ("never", False)):
        planner = _planner(async_loads=mode)
        planner.match(Req("a", tokens), 0)
        planner.build(Out([NewReq("a", ([10, 11, 12, 13, 14],), 0)], {"a": 20}))  # saves chunks 0 and 1
        assert planner.match(second, 0) == (16, in_flight)
        assert planner.match(second, 8) == (8, in_flight)
        planner.directory.apply([(0, "dram", keys[1], True)])  # chunk 1 reported; chunk 0 still in flight
        assert planner.match(second, 8) == (8, False)  # vLLM holds chunk 0 itself: nothing to wait for
        assert planner.match(second, 0) == (16, in_flight)


def test_last_chunk_is_capped_so_one_token_is_computed() -> None:
    planner = _planner()
    tokens = list(range(1, 17))
    planner.directory.apply([(0, "dram", k, True) for k in _keys(tokens)])
    req = Req("c", tokens)  # 16 tokens = 2 whole chunks, but the last token must be computed
    assert planner.match(req, 0) == (15, False)
    planner.allocated(req, [5, 6, 7, 8], 15)
    plan = planner.build(Out([NewReq("c", ([5, 6, 7, 8],), 0)], {"c": 1}))
    assert plan.loads[0].block_ids == (5, 6, 7, 8) and (plan.loads[0].start, plan.loads[0].end) == (0, 15)


def test_hits_below_dram_load_asynchronously_into_the_allocated_blocks() -> None:
    planner = _planner()
    tokens = list(range(1, 18))
    keys = _keys(tokens)
    planner.directory.apply([(0, "dram", keys[0], True), (0, "disk", keys[1], True)])
    req = Req("x", tokens)
    assert planner.match(req, 0) == (16, True)
    planner.allocated(req, [7, 8, 9, 10, 11], 16)  # WAITING_FOR_REMOTE_KVS: not in the scheduler output
    plan = planner.build(Out([], {}))
    assert len(plan.loads) == 1 and plan.loads[0].async_load and plan.loads[0].block_ids == (7, 8, 9, 10)
    never = _planner(async_loads="never")
    never.directory.apply([(0, "disk", k, True) for k in keys])
    assert never.match(Req("y", tokens), 0) == (16, False)
    always = _planner(async_loads="always")
    always.directory.apply([(0, "dram", k, True) for k in keys])
    assert always.match(Req("z", tokens), 0) == (16, True)


def test_hit_tokens_are_split_by_the_tier_that_holds_them() -> None:
    """What vLLM 0.32+'s ``get_external_cache_hit_sources`` reports: the tokens vLLM takes, per tier."""
    planner = _planner()
    tokens = list(range(1, 26))
    keys = _keys(tokens)
    planner.directory.apply([(0, "dram", keys[0], True), (0, "disk", keys[1], True), (0, "disk", keys[2], True)])
    req = Req("s", tokens)
    assert planner.match(req, 4) == (20, True)  # vLLM's own cache holds 4 tokens (a block)
    planner.allocated(req, list(range(7)), 20)
    assert planner.hit_tiers(req, 20) == {"dram": 4, "disk": 16}
    assert planner.hit_tiers(req, 10) == {"dram": 4, "disk": 6}  # vLLM took fewer than matched
    assert planner.hit_tiers(req, 0) == {} and planner.hit_tiers(Req("unknown", tokens), 8) == {}


def test_may_load_async_is_answered_without_a_lookup() -> None:
    """vLLM 0.34 asks it of every waiting request (``--max-num-inflight-kv-loads``)."""
    req = Req("w", list(range(1, 18)))
    assert _planner().may_load_async(req)  # a disk tier: a hit may be asynchronous
    assert not Planner(namespace=NS, tokens_per_chunk=8, block_size=4,
                       directory=ChunkDirectory(["dram"])).may_load_async(req)  # DRAM hits load at once
    assert not _planner(async_loads="never").may_load_async(req)
    assert _planner(async_loads="always").may_load_async(req)


def test_a_resumed_request_without_resumed_req_ids_takes_its_new_table_whole() -> None:
    """vLLM 0.34 has no ``resumed_req_ids``: a preempted request comes back as a new request."""

    @dataclass
    class Cached034:
        req_ids: list[str] = field(default_factory=list)
        new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
        num_computed_tokens: list[int] = field(default_factory=list)

    planner = _planner()
    req = Req("r", list(range(1, 21)))
    planner.match(req, 0)
    planner.build(Out([NewReq("r", ([1, 2, 3],), 0)], {"r": 12}, Cached034()))  # type: ignore[arg-type]
    planner.build(Out([], {"r": 4}, Cached034(["r"], [([4],)], [12])))  # type: ignore[arg-type]
    assert planner.requests["r"].block_ids == [1, 2, 3, 4]
    planner.build(Out([NewReq("r", ([9, 8, 7, 6, 5],), 0)], {"r": 4}, Cached034()))  # type: ignore[arg-type]
    assert planner.requests["r"].block_ids == [9, 8, 7, 6, 5]


def test_an_evicted_chunk_is_recomputed_once_saved_again_and_hit_next_time() -> None:
    """The stale-index scenario: the worker evicts a chunk below the scheduler's feet."""
    planner = _planner()
    tokens = list(range(1, 18))
    keys = _keys(tokens)
    planner.directory.apply([(0, "disk", k, True) for k in keys])  # the worker's start-up scan
    planner.directory.apply([(0, "disk", keys[1], False)])  # evicted by the worker
    req = Req("e", tokens)
    assert planner.match(req, 0) == (8, True)  # only the first chunk is left
    planner.allocated(req, [1, 2, 3, 4, 5], 8)
    planner.build(Out([], {}))
    plan = planner.build(Out([NewReq("e", ([1, 2, 3, 4, 5],), 8)], {"e": 9}))
    assert [s.keys for s in plan.saves] == [(keys[1],)]  # recomputed, so saved again
    planner.directory.apply([(0, "dram", keys[1], True)])
    planner.finished(req)
    assert planner.match(Req("f", tokens), 0)[0] == 16


def test_a_failed_load_is_forgotten_and_its_chunk_saved_again() -> None:
    planner = _planner()
    tokens = list(range(1, 26))
    keys = _keys(tokens)
    planner.directory.apply([(0, "dram", k, True) for k in keys])
    req = Req("g", tokens)
    assert planner.match(req, 0) == (24, False)
    planner.allocated(req, list(range(7)), 24)
    plan = planner.build(Out([NewReq("g", (list(range(7)),), 0)], {"g": 25}))
    assert plan.saves == []  # held already
    planner.worker_report([], {keys[1], keys[2]})  # the worker found them corrupt (and deleted them)
    planner.directory.apply([(0, "dram", keys[1], False), (0, "dram", keys[2], False)])
    req.all_token_ids.append(7)
    plan = planner.build(Out([], {"g": 1}, Cached(["g"], set(), [None], [25])))
    assert [s.keys for s in plan.saves] == [(keys[1], keys[2])]


def test_a_refused_save_is_forgotten_but_not_planned_again_by_the_same_request() -> None:
    """The worker did not store a planned save (DRAM's policy refused it): the directory forgets
    it (no load is planned against it), the request goes on without saving it again every step,
    and the next request that computes the chunk plans it anew (the policy may admit it then)."""
    planner = _planner()
    tokens = list(range(1, 26))
    keys = _keys(tokens)
    req = Req("r", tokens)
    assert planner.match(req, 0) == (0, False)
    planner.allocated(req, list(range(7)), 0)
    plan = planner.build(Out([NewReq("r", (list(range(7)),), 0)], {"r": 25}))
    assert [s.keys for s in plan.saves] == [tuple(keys)]
    assert planner.match(Req("probe", tokens), 0)[0] == 24  # planned: counted as held meanwhile
    planner.worker_report([], set(), unsaved={keys[1], keys[2]})
    planner.directory.apply([(0, "dram", keys[0], True)])
    assert planner.match(Req("probe2", tokens), 0)[0] == 8  # forgotten: only chunk 0 is held
    req.all_token_ids.append(7)
    plan = planner.build(Out([], {"r": 1}, Cached(["r"], set(), [None], [25])))
    assert plan.saves == []  # not re-planned by the request that was refused
    planner.finished(req)
    again = Req("s", [*tokens, 7])
    assert planner.match(again, 0) == (8, False)
    planner.allocated(again, list(range(10, 17)), 8)
    plan = planner.build(Out([NewReq("s", (list(range(10, 17)),), 8)], {"s": 18}))
    assert [s.keys for s in plan.saves] == [(keys[1], keys[2])]


def test_tensor_parallel_chunks_count_only_when_every_rank_holds_them() -> None:
    directory = ChunkDirectory(["dram"], world_size=2)
    key = _keys(list(range(8)))[0]
    directory.apply([(0, "dram", key, True)])
    assert key not in directory
    directory.apply([(1, "dram", key, True)])
    assert key in directory
    directory.apply([(1, "dram", key, False)])
    assert key not in directory and directory.held


def test_a_salted_request_never_matches_another_salt() -> None:
    planner = _planner()
    tokens = list(range(1, 18))
    a = Req("s1", tokens, cache_salt="tenant-a")
    planner.match(a, 0)
    saved = planner.build(Out([NewReq("s1", ([1, 2, 3, 4, 5],), 0)], {"s1": 17})).saves[0].keys
    assert saved != tuple(_keys(tokens))
    assert planner.match(Req("s2", tokens, cache_salt="tenant-b"), 0) == (0, False)
    assert planner.match(Req("s3", tokens, cache_salt="tenant-a"), 0) == (16, True)  # its save in flight: async
    assert planner.match(Req("s4", tokens), 0) == (0, False)


def test_preempted_requests_are_named_for_the_worker() -> None:
    planner = _planner()
    out = Out([], {})
    out.preempted_req_ids = {"p1"}  # type: ignore[attr-defined]
    assert planner.build(out).preempted == {"p1"}


def test_generated_tokens_fill_chunks_that_are_saved() -> None:
    planner = _planner()
    req = Req("d", list(range(1, 7)))  # 6 prompt tokens
    planner.match(req, 0)
    plan = planner.build(Out([NewReq("d", ([1, 2],), 0)], {"d": 6}))
    assert plan.saves == []
    req.all_token_ids += [50, 51]  # two generated tokens: the second is being computed now
    plan = planner.build(Out([], {"d": 1}, Cached(["d"], set(), [None], [7])))
    assert len(plan.saves) == 1 and plan.saves[0].block_ids == (1, 2)


def test_a_pin_request_pins_the_prompts_full_chunks_once() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 2 full chunks + a 4-token tail
    req = Req("p", tokens, kv_transfer_params={"kvtier": {"pin": True, "ttl_s": 60}})
    planner.match(req, 0)
    pins = planner.build(Out([NewReq("p", ([1, 2, 3, 4, 5],), 0)], {"p": 20})).pins
    assert len(pins) == 1
    assert pins[0].keys == tuple(_keys(tokens))
    assert pins[0].ttl_s == 60.0 and not pins[0].unpin
    req.all_token_ids.append(99)  # a decode step: no second pin job
    assert planner.build(Out([], {"p": 1}, Cached(["p"], set(), [None], [20]))).pins == []


def test_unpin_and_no_pin() -> None:
    planner = _planner()
    tokens = list(range(1, 17))
    for rid, params in (("u", {"kvtier": {"unpin": True}}), ("n", None), ("o", {"other": 1})):
        planner.match(Req(rid, tokens, kv_transfer_params=params), 0)
    pins = planner.build(Out([NewReq(r, ([1, 2, 3, 4],), 0) for r in "uno"], {r: 16 for r in "uno"})).pins
    assert [(p.req_id, p.unpin) for p in pins] == [("u", True)]


def test_a_malformed_pin_request_is_ignored_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    planner = _planner()
    planner.match(Req("m", list(range(16)), kv_transfer_params={"kvtier": {"pin": "yes"}}), 0)
    assert planner.build(Out([NewReq("m", ([1, 2, 3, 4],), 0)], {"m": 16})).pins == []
    assert "not pinned" in caplog.text


class HungTier(Tier):
    """A remote tier whose server stopped answering (SIGSTOP): contains blocks until released."""

    name = "redis"
    shared = True

    def __init__(self) -> None:
        super().__init__(LAYOUT)
        self.release = threading.Event()
        self.calls = 0
        self.present: set[ChunkKey] = set()

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self.calls += 1
        self.release.wait(5)
        return [k in self.present for k in keys]

    def put(self, key: ChunkKey, payload: Any) -> bool:
        raise NotImplementedError

    def get_into(self, key: ChunkKey, out: Any) -> bool:
        raise NotImplementedError

    def contains(self, key: ChunkKey) -> bool:
        return self.contains_many([key])[0]

    def delete(self, key: ChunkKey) -> bool:
        raise NotImplementedError

    def keys(self) -> Iterator[ChunkKey]:
        return iter(())

    @property
    def capacity_bytes(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return 0


def test_a_hung_remote_tier_costs_the_scheduler_one_deadline_not_one_per_lookup() -> None:
    tier = HungTier()
    keys = _keys(list(range(32)))
    tier.present.update(keys)
    directory = ChunkDirectory(["dram", "redis"], remote=[[tier]], probe_deadline_s=0.05)
    t0 = time.perf_counter()
    assert directory.longest_prefix(keys).chunks == 0  # waits one deadline, then a miss
    for _ in range(50):  # the probe is still out: later lookups do not wait behind it
        assert directory.longest_prefix(keys).chunks == 0
    assert time.perf_counter() - t0 < 0.5 and tier.calls == 1
    tier.release.set()  # the server is back (SIGCONT): the late answer serves the next lookups
    deadline = time.monotonic() + 5
    while directory.longest_prefix(keys).chunks < len(keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    match = directory.longest_prefix(keys)
    assert match.chunks == len(keys) and match.below_dram
    directory.close()


def test_remote_misses_are_cached_for_a_while() -> None:
    tier = HungTier()
    tier.release.set()
    now = [0.0]
    directory = ChunkDirectory(["dram", "redis"], remote=[[tier]], probe_deadline_s=1.0, probe_ttl_s=2.0,
                               clock=lambda: now[0])
    keys = _keys(list(range(16)))
    assert directory.longest_prefix(keys).chunks == 0 and tier.calls == 1
    assert directory.longest_prefix(keys).chunks == 0 and tier.calls == 1  # negative cache
    tier.present.update(keys)
    now[0] = 3.0  # expired: asked again
    assert directory.longest_prefix(keys).chunks == 2 and tier.calls == 2
    directory.close()


def test_disk_hits_come_from_the_files_not_a_start_up_index(tmp_path: Path) -> None:
    from kvtier.tiers.disk import chunk_path

    directory = ChunkDirectory(["dram", "disk"], disk_roots=[tmp_path])
    keys = _keys(list(range(16)))
    assert directory.longest_prefix(keys).chunks == 0
    for key in keys:  # another engine on this node wrote them
        path = chunk_path(tmp_path, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert directory.longest_prefix(keys) == Match((1, 1))
    chunk_path(tmp_path, keys[1]).unlink()  # evicted by whoever owns it
    assert directory.longest_prefix(keys) == Match((1,))


@pytest.mark.parametrize(("params", "expected"), [
    (None, None), ({}, None), ({"kvtier": {}}, None), ({"kvtier": {"pin": False}}, None),
    ({"kvtier": {"pin": True}}, PinRequest()), ({"kvtier": {"pin": True, "ttl_s": 5}}, PinRequest(ttl_s=5.0)),
    ({"kvtier": {"unpin": True}}, PinRequest(unpin=True)),
])
def test_parse_pin_request(params: Any, expected: PinRequest | None) -> None:
    assert parse_pin_request(params) == expected


@pytest.mark.parametrize("spec", [
    "pin", {"pin": 1}, {"pin": True, "ttl": 5}, {"pin": True, "unpin": True}, {"pin": True, "ttl_s": -1},
    {"pin": True, "ttl_s": float("inf")}, {"pin": True, "ttl_s": True}, {"unpin": True, "ttl_s": 5},
])
def test_parse_pin_request_rejects(spec: Any) -> None:
    with pytest.raises(ValueError, match="kvtier"):
        parse_pin_request({"kvtier": spec})


def test_a_cost_model_loads_only_the_chunks_faster_than_recomputing() -> None:
    """A DRAM head and a slow disk tail: load the head, let vLLM compute the tail."""
    from kvtier.errors import ConfigError
    from kvtier.policy.cost import CostModel, LinkCost, PrefillCost

    chunk_bytes = 1 << 20
    prefill = PrefillCost(per_token_s=1e-3)  # one chunk of 8 tokens: 8 ms to recompute
    slow = CostModel(links=(LinkCost(bandwidth_Bps=1e12), LinkCost(bandwidth_Bps=chunk_bytes / 0.1)), prefill=prefill)
    fast = CostModel(links=(LinkCost(bandwidth_Bps=1e12), LinkCost(bandwidth_Bps=1e12)), prefill=prefill)
    tokens = list(range(1, 34))  # 4 whole chunks + 1 token
    keys = _keys(tokens)
    changes = [(0, "dram", keys[0], True), (0, "dram", keys[1], True),
               (0, "disk", keys[2], True), (0, "disk", keys[3], True)]
    found = []
    for cost in (None, slow, fast):
        planner = _planner(cost=cost, chunk_bytes=chunk_bytes)
        planner.directory.apply(changes)
        found.append(planner.match(Req("r", tokens), 0))
    assert found[0] == (32, True)  # no cost model: everything found
    assert found[1] == (16, False)  # 100 ms per disk chunk vs 8 ms to recompute it: the DRAM head only
    assert found[2] == (32, True)
    planner = _planner(cost=slow, chunk_bytes=chunk_bytes)  # vLLM's prefix cache computed chunk 0
    planner.directory.apply(changes)
    assert planner.match(Req("s", tokens), 8) == (8, False)
    with pytest.raises(ConfigError, match="one link per tier"):
        _planner(cost=CostModel(links=(LinkCost(bandwidth_Bps=1e9),), prefill=prefill), chunk_bytes=chunk_bytes)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        _planner(cost=fast)


def test_each_request_is_hinted_once_with_its_keys_and_session() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 2 full chunks + a 4-token tail
    reqs = [Req("a", tokens, kv_transfer_params={"kvtier": {"session": "chat-7", "pin": True}}),
            Req("b", tokens, cache_salt="tenant-1"),  # no session given: the salt stands in
            Req("c", tokens)]
    for req in reqs:
        planner.match(req, 0)
        planner.match(req, 0)  # looked up again while it waits for blocks: no second hint
    hints = planner.build(Out([], {})).hints
    assert [(h.req_id, h.session) for h in hints] == [("a", "chat-7"), ("b", "tenant-1"), ("c", None)]
    assert hints[0].keys == hints[2].keys == tuple(_keys(tokens))  # every full chunk, the tail has none
    assert len(hints[1].keys) == 2 and hints[1].keys != hints[0].keys  # the salt is in the keys too
    assert planner.build(Out([], {})).hints == []


@dataclass
class Status:
    name: str


def test_a_finished_answer_tells_the_policy_whether_it_waits_for_a_tool() -> None:
    planner = _planner(tool_call_tokens=[900, 901])
    tokens = list(range(1, 21))
    done = [Req("t", tokens, cache_salt="s1", status=Status("FINISHED_STOPPED"), output_token_ids=[5, 901, 6]),
            Req("u", tokens, cache_salt="s2", status=Status("FINISHED_STOPPED"), output_token_ids=[5, 6]),
            Req("cut", tokens, cache_salt="s3", status=Status("FINISHED_LENGTH_CAPPED"), output_token_ids=[900]),
            Req("anon", tokens, status=Status("FINISHED_STOPPED"), output_token_ids=[901])]  # no session
    for req in done:
        planner.match(req, 0)
    planner.build(Out([], {}))
    for req in done:
        planner.finished(req)
    assert [(e.session, e.awaits) for e in planner.build(Out([], {})).ends] == [("s1", "tool"), ("s2", "user")]
    quiet = _planner()  # no tool-call tokens configured: nothing is told
    quiet.match(done[0], 0)
    quiet.finished(done[0])
    assert quiet.build(Out([], {})).ends == []


def test_a_malformed_session_is_ignored_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    planner = _planner()
    planner.match(Req("s", list(range(16)), kv_transfer_params={"kvtier": {"session": 42}}), 0)
    assert [h.session for h in planner.build(Out([], {})).hints] == [None]
    assert "no session" in caplog.text


def test_decisions_are_counted_and_the_workers_samples_change_them() -> None:
    """The default (online) model: a disk hit is loaded while the disk looks fast; after the worker
    reports slow disk loads the same hit is recomputed; each decision is counted for the stats."""
    from kvtier.integrations.calibrate import LoadSample, OnlineCost
    from kvtier.policy.cost import LinkCost, PrefillCost

    chunk_bytes = 1 << 20
    online = OnlineCost([LinkCost(bandwidth_Bps=1e12), LinkCost(bandwidth_Bps=1e12)], PrefillCost(per_token_s=1e-3),
                        chunk_bytes=chunk_bytes)
    planner = _planner(cost=online, chunk_bytes=chunk_bytes)
    tokens = list(range(1, 34))  # 4 whole chunks + 1 token
    keys = _keys(tokens)
    planner.directory.apply([(0, "dram", keys[0], True), (0, "dram", keys[1], True),
                             (0, "disk", keys[2], True), (0, "disk", keys[3], True)])
    assert planner.match(Req("a", tokens), 0) == (32, True)
    planner.worker_report([], set(), loads=[LoadSample(1, 2 * chunk_bytes, 2.0)] * 20)  # 1 MB/s
    assert planner.match(Req("b", tokens), 0) == (16, False)  # the DRAM head only
    planner.directory.apply([(0, "dram", keys[0], False), (0, "dram", keys[1], False),
                             (0, "disk", keys[0], True), (0, "disk", keys[1], True)])
    assert planner.match(Req("c", tokens), 0) == (0, False)
    assert planner.match(Req("d", list(range(100, 120))), 0) == (0, False)  # nothing found: no decision
    out = Out([NewReq("a", ([],), 0)], {"a": 33})
    plan = planner.build(out)
    assert plan.decisions == {"fetch_load_all": 1, "fetch_load_head": 1, "fetch_recompute": 1,
                              "fetch_skipped_chunks": 2 + 4}
    assert plan.forward == (33, 33 * 33 / 2)  # a prefill of 33 new tokens: timed by the worker
    assert planner.build(Out([], {"a": 1})).forward is None  # a decode step teaches nothing


def test_retention_and_awaits_from_the_request_reach_the_policy() -> None:
    from kvtier.policy.retention import Retention

    planner = _planner()  # no tool_call_tokens: only what requests say is told
    tokens = list(range(1, 21))
    said = [Req("t", tokens, status=Status("FINISHED_LENGTH_CAPPED"), output_token_ids=[5],
                kv_transfer_params={"kvtier": {"session": "s1", "priority": "high", "ttl_s": 60, "awaits": "tool"}}),
            Req("u", tokens, cache_salt="s2", status=Status("FINISHED_STOPPED"), output_token_ids=[5],
                kv_transfer_params={"kvtier": {"priority": -3, "awaits": "user"}}),
            Req("gone", tokens, status=Status("FINISHED_ABORTED"), output_token_ids=[],
                kv_transfer_params={"kvtier": {"session": "s3", "awaits": "tool"}}),
            Req("plain", tokens, cache_salt="s4", status=Status("FINISHED_STOPPED"), output_token_ids=[5])]
    for req in said:
        planner.match(req, 0)
    hints = planner.build(Out([], {})).hints
    assert [h.retention for h in hints] == [Retention(1, 60.0), Retention(-3, None), None, None]
    for req in said:
        planner.finished(req)
    assert [(e.session, e.awaits) for e in planner.build(Out([], {})).ends] == [("s1", "tool"), ("s2", "user")]
    assert parse_pin_request({"kvtier": {"pin": True, "priority": "low", "awaits": "user"}}) == PinRequest()


def test_each_malformed_hint_field_is_one_warning_and_the_rest_stands(caplog: pytest.LogCaptureFixture) -> None:
    from kvtier.policy.retention import Retention

    planner = _planner()
    params = {"kvtier": {"session": "s", "priority": "urgent", "ttl_s": 30, "awaits": "lunch"}}
    planner.match(Req("r", list(range(16)), kv_transfer_params=params), 0)
    (hint,) = planner.build(Out([], {})).hints
    assert (hint.session, hint.retention) == ("s", Retention(None, 30.0))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == ["kvtier: request r: kv_transfer_params['kvtier']['priority'] must be one of low, normal, high "
                     "or an int, got 'urgent'; normal priority",
                     "kvtier: request r: kv_transfer_params['kvtier']['awaits'] must be one of tool, user, got "
                     "'lunch'; ignored"]
    caplog.clear()
    planner.match(Req("q", list(range(16)), kv_transfer_params={"kvtier": {"awaits": "tool", "ttl_s": -1}}), 0)
    text = caplog.text
    assert "['ttl_s'] must be a positive number of seconds, got -1; no ttl" in text
    assert "['awaits'] needs a session" in text
