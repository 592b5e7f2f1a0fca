"""kv-cache-tester parser, nested sub-agents included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sim.workloads.kvtester import load_kvtester, load_kvtester_dir, parse_conversation
from kvtier.errors import ConfigError


def _req(t: float, n_in: int, ids: list[int]) -> dict:
    return {"t": t, "type": "n", "in": n_in, "out": 10, "hash_ids": ids}


def conversation(scope: str = "local") -> dict:
    """A parent with a sub-agent (relative times) that nests another (absolute times)."""
    return {
        "id": "conv", "block_size": 64, "hash_id_scope": scope, "tool_tokens": 100, "system_tokens": 28,
        "requests": [
            _req(0.0, 130, [1, 2]),
            _req(5.0, 200, [1, 2, 3]),
            {"t": 10.0, "type": "subagent", "agent_id": "a1", "requests": [
                _req(0.0, 128, [1, 2]),
                _req(2.0, 192, [1, 2, 5]),
                {"t": 3.0, "type": "subagent", "agent_id": "b", "requests": [_req(14.0, 64, [1])]},
            ]},
            _req(30.0, 260, [1, 2, 3, 4]),
        ],
    }


def test_nested_subagents_are_sessions_of_their_own() -> None:
    reqs = parse_conversation(conversation(), name="conv")
    assert [(r.session, r.time_s) for r in reqs] == [
        ("conv", 0.0), ("conv", 5.0), ("conv/a1", 10.0), ("conv/a1", 12.0), ("conv/a1/b", 24.0), ("conv", 30.0)]
    # local scope: one conversation is one id space, its sub-agents (at any depth) included
    assert {r.scope for r in reqs} == {"kvtester:conv"}
    assert reqs[3].hash_ids == (1, 2, 5) and reqs[3].input_tokens == 192 and reqs[3].block_tokens == 64
    assert reqs[0].num_full_blocks == 2  # 130 tokens: 2 full blocks + 2 tokens of tail


def test_sibling_subagents_share_their_prompt(shared_traces: Path) -> None:
    # trace_0010: four Explore sub-agents start from the same ~10K-token prompt
    from bench.sim.costmodel import CostModel, model_shape
    from bench.sim.sim import ideal, prepare

    reqs = load_kvtester(shared_traces / "kv-cache-tester" / "trace_0010.json")
    firsts = {}
    for r in reqs:
        if r.session != "trace_0010":
            firsts.setdefault(r.session, r)
    assert len(firsts) == 4 and len({r.scope for r in reqs}) == 1
    shared = ideal(prepare(list(firsts.values())), CostModel(shape=model_shape("llama-3.1-8b"))).hit_total.tolist()
    # the first sub-agent has nothing to reuse; each later one reuses ~10K tokens of its siblings'
    assert shared[0] == 0 and all(9_900 <= s <= 10_200 for s in shared[1:]), shared


def test_global_scope_is_shared() -> None:
    reqs = parse_conversation(conversation("global"), name="conv")
    assert {r.scope for r in reqs} == {"kvtester:global"}


def test_folder_offsets_and_errors(tmp_path: Path) -> None:
    for i in range(2):
        doc = conversation()
        doc["id"] = f"c{i}"
        (tmp_path / f"trace_{i}.json").write_text(json.dumps(doc))
    reqs = load_kvtester_dir(sorted(tmp_path.glob("*.json")), stagger_s=100.0)
    assert len(reqs) == 12 and reqs == sorted(reqs, key=lambda r: r.time_s)
    assert min(r.time_s for r in reqs if r.session.startswith("c1")) == 100.0
    bad = conversation()
    del bad["requests"][1]["hash_ids"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="request 1 of conv"):
        load_kvtester(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text(json.dumps(conversation())[:50])
    with pytest.raises(ConfigError, match=r"trunc\.json"):
        load_kvtester(tmp_path / "trunc.json")


def test_shared_samples(shared_traces: Path) -> None:
    # the three samples these numbers were read from (later files, e.g. with sub-agents, have their own tests)
    files = [shared_traces / "kv-cache-tester" / f"trace_{n}.json" for n in ("0001", "0012", "0016")]
    reqs = load_kvtester_dir(files)
    assert len(reqs) == sum(len(json.loads(f.read_text())["requests"]) for f in files) == 67
    assert len({r.session for r in reqs}) == 3
    # contexts grow turn by turn and the ids of a turn extend the previous turn's (mostly)
    first = [r for r in reqs if r.session == "trace_0001"]
    assert first[0].input_tokens == 71175 and first[0].hash_ids[:3] == (1, 2, 3)


def test_the_stop_reason_says_what_the_answer_waits_for() -> None:
    doc = conversation()
    doc["requests"][0]["stop"] = "tool_use"
    doc["requests"][1]["stop"] = "end_turn"
    doc["requests"][3]["stop"] = "max_tokens"  # neither: not known
    doc["requests"][0]["api_time"] = 7.5  # the answer took 7.5 s
    doc["requests"][1]["api_time"] = "slow"  # malformed: not known
    reqs = parse_conversation(doc, name="conv")
    assert [r.awaits for r in reqs if r.session == "conv"] == ["tool", "user", None]
    assert [r.answer_s for r in reqs if r.session == "conv"] == [7.5, None, None]
