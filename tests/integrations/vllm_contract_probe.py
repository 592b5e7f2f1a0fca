"""Run in a child process whose ``sys.path`` starts with another vLLM release's pure-Python tree
(``test_vllm_compat.py``): checks kvtier's connector and planner against that release's real classes
and prints one JSON object.  ``python vllm_contract_probe.py signatures|planner|events``.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any


def signatures() -> dict[str, Any]:
    """Every connector hook kvtier defines that the release's ``KVConnectorBase_V1`` has too: the
    same parameter names and kinds, the same kind of attribute (method, classmethod, property)."""
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from kvtier.integrations.vllm import KVTierConnector

    compared, mismatches = [], []
    for name, ours in vars(KVTierConnector).items():
        if (name.startswith("__") and name != "__init__") or not hasattr(KVConnectorBase_V1, name):
            continue
        theirs = inspect.getattr_static(KVConnectorBase_V1, name)
        if type(ours) is not type(theirs):
            mismatches.append(f"{name}: {type(ours).__name__} here, {type(theirs).__name__} in vLLM")
            continue
        compared.append(name)
        if isinstance(ours, property) or not callable(getattr(KVConnectorBase_V1, name)):
            continue
        a = [(p.name, p.kind) for p in inspect.signature(getattr(KVTierConnector, name)).parameters.values()]
        b = [(p.name, p.kind) for p in inspect.signature(getattr(KVConnectorBase_V1, name)).parameters.values()]
        if a != b:
            mismatches.append(f"{name}{[n for n, _ in a]} here, {[n for n, _ in b]} in vLLM")
    abstract = sorted(getattr(KVConnectorBase_V1, "__abstractmethods__", ()))
    missing = [n for n in abstract if n in KVTierConnector.__abstractmethods__]
    return {"version": vllm.__version__, "compared": compared, "mismatches": mismatches,
            "abstract_unimplemented": missing}


def planner() -> dict[str, Any]:
    """A request scheduled, run, preempted and resumed, in the release's real ``Request`` and
    ``SchedulerOutput`` objects: the planner's block table follows vLLM's, and it saves each chunk once."""
    import vllm
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    from kvtier.integrations.vllm_plan import ChunkDirectory, Planner
    from kvtier.keys import namespace_key
    from kvtier.layout import KVLayout

    layout = KVLayout(model="t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=8)
    plan = Planner(namespace=namespace_key(layout), tokens_per_chunk=8, block_size=4,
                   directory=ChunkDirectory(["dram"]))
    req = Request("r0", list(range(1, 21)), SamplingParams(max_tokens=4), None)
    out: dict[str, Any] = {"version": vllm.__version__, "steps": []}

    def new_data(block_ids: list[int], computed: int) -> Any:
        fields = inspect.signature(NewRequestData.from_request).parameters
        args: dict[str, Any] = {"block_ids": (block_ids,)}
        if "prefill_token_ids" in fields:
            args["prefill_token_ids"] = list(req.all_token_ids)
        data = NewRequestData.from_request(req, **args)
        data.num_computed_tokens = computed
        return data

    def cached(new_block_ids: list[int] | None, computed: int) -> Any:
        data = CachedRequestData.make_empty()
        data.req_ids.append(req.request_id)
        data.new_block_ids.append(None if new_block_ids is None else (new_block_ids,))
        data.num_computed_tokens.append(computed)
        return data

    def step(new: list[Any], cached_reqs: Any, tokens: int, preempted: set[str] | None = None) -> None:
        so = SchedulerOutput.make_empty()
        so.scheduled_new_reqs = new
        so.scheduled_cached_reqs = cached_reqs
        so.num_scheduled_tokens = {req.request_id: tokens}
        so.total_num_scheduled_tokens = tokens
        if preempted is not None:
            so.preempted_req_ids = preempted
        built = plan.build(so)
        state = plan.requests.get(req.request_id)
        out["steps"].append({"saves": [list(s.block_ids) for s in built.saves], "preempted": sorted(built.preempted),
                             "table": None if state is None else list(state.block_ids)})

    assert plan.match(req, 0) == (0, False)
    step([new_data([10, 11, 12], 0)], CachedRequestData.make_empty(), 12)  # chunk 0 (blocks 10, 11) complete
    step([], cached([13, 14], 12), 8, preempted=set())  # tokens 12..20: chunk 1 (blocks 12, 13) complete
    # preempted; back with a new block table, which the planner must take whole: in 0.26-0.33 as a
    # cached request listed in resumed_req_ids, in 0.34 as a new request
    req.num_computed_tokens = 0
    assert plan.match(req, 0)[0] == 16  # its two saved chunks are a hit now (planned saves count)
    table = [20, 21, 22, 23, 24]
    if hasattr(CachedRequestData.make_empty(), "resumed_req_ids"):
        back = cached(table, 0)
        back.resumed_req_ids.add(req.request_id)
        step([], back, 4, preempted={"other"})
    else:
        step([new_data(table, 0)], CachedRequestData.make_empty(), 4, preempted={"other"})
    return out


def events() -> dict[str, Any]:
    """A chunk saved to DRAM, written through to disk and evicted from both, as the release's own
    ``BlockStored``/``BlockRemoved`` through its msgpack wire format (``vllm_events``)."""
    import msgspec
    import vllm
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash
    from vllm.v1.request import Request

    from kvtier.integrations import vllm_compat
    from kvtier.integrations.vllm_events import KVEvents
    from kvtier.integrations.vllm_plan import ChunkDirectory, Planner, SaveJob, StepPlan
    from kvtier.keys import namespace_key
    from kvtier.layout import KVLayout

    kinds = vllm_compat.event_kinds()
    assert kinds is not None
    layout = KVLayout(model="t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=8)
    plan = Planner(namespace=namespace_key(layout), tokens_per_chunk=8, block_size=4,
                   directory=ChunkDirectory(["dram", "disk", "redis"]))
    init_none_hash(sha256)
    req = Request("r0", list(range(1, 21)), SamplingParams(max_tokens=4), None, cache_salt="s",
                  block_hasher=get_request_block_hasher(4, sha256))
    tracker = KVEvents(kinds, plan, block_size=4, extra_keys=vllm_compat.event_extra_keys)
    plan.match(req, 0)
    keyer = plan.requests["r0"].keys
    assert keyer is not None
    key = keyer(20)[1]
    tracker.planned(StepPlan(saves=[SaveJob("r0", (key,), (2, 3))]))
    changes = [[(0, "dram", key, True)], [(0, "disk", key, True), (0, "redis", key, True)],
               [(0, "dram", key, False), (0, "disk", key, False), (0, "redis", key, False)]]
    for change in changes:
        plan.directory.apply(change)
        tracker.changed(change)
    payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=tracker.take()))
    got: list[Any] = msgspec.msgpack.Decoder(type=KVEventBatch).decode(payload).events
    want = [maybe_convert_block_hash(h) for h in req.block_hashes[2:4]]
    return {"version": vllm.__version__, "hashes_match": all(e.block_hashes == want for e in got),
            "events": [[type(e).__name__, e.medium, e.locality] for e in got],
            "extra_keys": [None if e.extra_keys is None else [list(k) if k else k for k in e.extra_keys]
                           for e in got if type(e).__name__ == "BlockStored"]}


if __name__ == "__main__":
    print(json.dumps({"signatures": signatures, "planner": planner, "events": events}[sys.argv[1]]()))
