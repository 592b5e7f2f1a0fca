"""The scheduler-side planner on its own: which chunks are loaded into which blocks, which are saved.

vLLM's request and scheduler-output objects are stood in for by small dataclasses holding the
fields the planner reads; the end-to-end behaviour is tested in real vLLM (test_vllm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.integrations.vllm_plan import ChunkDirectory, Planner
from kvtier.keys import chunk_keys, namespace_key
from kvtier.layout import KVLayout

LAYOUT = KVLayout(model="t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=8)
NS = namespace_key(LAYOUT)


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]

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


def _planner() -> Planner:
    return Planner(namespace=NS, tokens_per_chunk=8, block_size=4, directory=ChunkDirectory([]))


def test_saves_whole_chunks_once_and_loads_them_back() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 20 tokens: chunks 0, 1 full, 4 tokens of tail
    first = Req("a", tokens)
    assert planner.match(first, 0) == 0
    loads, saves = planner.build(Out([NewReq("a", ([10, 11, 12, 13, 14],), 0)], {"a": 20}))
    assert loads == [] and len(saves) == 1
    assert saves[0].keys == tuple(chunk_keys(tokens, tokens_per_chunk=8, namespace=NS))
    assert saves[0].block_ids == (10, 11, 12, 13)  # the tail block 14 is never saved
    planner.finished("a")

    second = Req("b", [*tokens[:16], 99])  # 17 tokens: both chunks hit, limit = 16
    assert planner.match(second, 4) == 12  # vLLM's own cache had the first block
    planner.allocated(second, 12)
    loads, saves = planner.build(Out([NewReq("b", ([20, 21, 22, 23, 24],), 4)], {"b": 13}))
    assert saves == [] and len(loads) == 1
    assert loads[0].block_ids == (-1, 21, 22, 23)  # block 20 was computed by vLLM: left alone


def test_last_chunk_is_capped_so_one_token_is_computed() -> None:
    planner = _planner()
    tokens = list(range(1, 17))
    planner.directory.add(chunk_keys(tokens, tokens_per_chunk=8, namespace=NS))
    req = Req("c", tokens)  # 16 tokens = 2 whole chunks, but the last token must be computed
    assert planner.match(req, 0) == 15
    planner.allocated(req, 15)
    loads, _ = planner.build(Out([NewReq("c", ([5, 6, 7, 8],), 0)], {"c": 1}))
    assert loads[0].block_ids == (5, 6, 7, 8) and (loads[0].start, loads[0].end) == (0, 15)


def test_generated_tokens_fill_chunks_that_are_saved() -> None:
    planner = _planner()
    req = Req("d", list(range(1, 7)))  # 6 prompt tokens
    planner.match(req, 0)
    _, saves = planner.build(Out([NewReq("d", ([1, 2],), 0)], {"d": 6}))
    assert saves == []
    req.all_token_ids += [50, 51]  # two generated tokens: the second is being computed now
    _, saves = planner.build(Out([], {"d": 1}, Cached(["d"], set(), [None], [7])))
    assert len(saves) == 1 and saves[0].block_ids == (1, 2)
