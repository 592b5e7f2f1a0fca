"""The scheduler-side planner on its own: which chunks are loaded into which blocks, which are saved.

vLLM's request and scheduler-output objects are stood in for by small dataclasses holding the
fields the planner reads; the end-to-end behaviour is tested in real vLLM (test_vllm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kvtier.integrations.vllm_plan import ChunkDirectory, PinRequest, Planner, parse_pin_request
from kvtier.keys import chunk_keys, namespace_key
from kvtier.layout import KVLayout

LAYOUT = KVLayout(model="t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=8)
NS = namespace_key(LAYOUT)


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_prompt_tokens: int = -1  # -1: all tokens are prompt

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


def _planner() -> Planner:
    return Planner(namespace=NS, tokens_per_chunk=8, block_size=4, directory=ChunkDirectory([]))


def test_saves_whole_chunks_once_and_loads_them_back() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 20 tokens: chunks 0, 1 full, 4 tokens of tail
    first = Req("a", tokens)
    assert planner.match(first, 0) == 0
    loads, saves, _ = planner.build(Out([NewReq("a", ([10, 11, 12, 13, 14],), 0)], {"a": 20}))
    assert loads == [] and len(saves) == 1
    assert saves[0].keys == tuple(chunk_keys(tokens, tokens_per_chunk=8, namespace=NS))
    assert saves[0].block_ids == (10, 11, 12, 13)  # the tail block 14 is never saved
    planner.finished("a")

    second = Req("b", [*tokens[:16], 99])  # 17 tokens: both chunks hit, limit = 16
    assert planner.match(second, 4) == 12  # vLLM's own cache had the first block
    planner.allocated(second, 12)
    loads, saves, _ = planner.build(Out([NewReq("b", ([20, 21, 22, 23, 24],), 4)], {"b": 13}))
    assert saves == [] and len(loads) == 1
    assert loads[0].block_ids == (-1, 21, 22, 23)  # block 20 was computed by vLLM: left alone


def test_last_chunk_is_capped_so_one_token_is_computed() -> None:
    planner = _planner()
    tokens = list(range(1, 17))
    planner.directory.add(chunk_keys(tokens, tokens_per_chunk=8, namespace=NS))
    req = Req("c", tokens)  # 16 tokens = 2 whole chunks, but the last token must be computed
    assert planner.match(req, 0) == 15
    planner.allocated(req, 15)
    loads, _, _ = planner.build(Out([NewReq("c", ([5, 6, 7, 8],), 0)], {"c": 1}))
    assert loads[0].block_ids == (5, 6, 7, 8) and (loads[0].start, loads[0].end) == (0, 15)


def test_generated_tokens_fill_chunks_that_are_saved() -> None:
    planner = _planner()
    req = Req("d", list(range(1, 7)))  # 6 prompt tokens
    planner.match(req, 0)
    _, saves, _ = planner.build(Out([NewReq("d", ([1, 2],), 0)], {"d": 6}))
    assert saves == []
    req.all_token_ids += [50, 51]  # two generated tokens: the second is being computed now
    _, saves, _ = planner.build(Out([], {"d": 1}, Cached(["d"], set(), [None], [7])))
    assert len(saves) == 1 and saves[0].block_ids == (1, 2)


def test_a_pin_request_pins_the_prompts_full_chunks_once() -> None:
    planner = _planner()
    tokens = list(range(1, 21))  # 2 full chunks + a 4-token tail
    req = Req("p", tokens, kv_transfer_params={"kvtier": {"pin": True, "ttl_s": 60}})
    planner.match(req, 0)
    _, _, pins = planner.build(Out([NewReq("p", ([1, 2, 3, 4, 5],), 0)], {"p": 20}))
    assert len(pins) == 1
    assert pins[0].keys == tuple(chunk_keys(tokens, tokens_per_chunk=8, namespace=NS))
    assert pins[0].ttl_s == 60.0 and not pins[0].unpin
    req.all_token_ids.append(99)  # a decode step: no second pin job
    _, _, pins = planner.build(Out([], {"p": 1}, Cached(["p"], set(), [None], [20])))
    assert pins == []


def test_unpin_and_no_pin() -> None:
    planner = _planner()
    tokens = list(range(1, 17))
    for rid, params in (("u", {"kvtier": {"unpin": True}}), ("n", None), ("o", {"other": 1})):
        planner.match(Req(rid, tokens, kv_transfer_params=params), 0)
    _, _, pins = planner.build(Out([NewReq(r, ([1, 2, 3, 4],), 0) for r in "uno"], {r: 16 for r in "uno"}))
    assert [(p.req_id, p.unpin) for p in pins] == [("u", True)]


def test_a_malformed_pin_request_is_ignored_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    planner = _planner()
    planner.match(Req("m", list(range(16)), kv_transfer_params={"kvtier": {"pin": "yes"}}), 0)
    _, _, pins = planner.build(Out([NewReq("m", ([1, 2, 3, 4],), 0)], {"m": 16}))
    assert pins == []
    assert "not pinned" in caplog.text


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
