"""Mooncake JSONL parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.sim.workloads.mooncake import load_mooncake
from kvtier.errors import ConfigError
from tests.bench.conftest import write_mooncake


def test_fields_times_and_scope(tiny_mooncake: Path) -> None:
    reqs = load_mooncake(tiny_mooncake)
    assert len(reqs) == 6
    assert [r.time_s for r in reqs] == [0.0, 0.1, 0.25, 0.4, 0.9, 1.0]
    assert reqs[1].hash_ids == (0, 1, 2, 3) and reqs[1].input_tokens == 2000 and reqs[1].output_tokens == 5
    assert {r.scope for r in reqs} == {"mooncake:tiny.jsonl"}
    assert len({r.session for r in reqs}) == 6  # no session ids in Mooncake traces
    assert reqs[1].block_tokens == 512 and reqs[1].num_full_blocks == 3  # 2000 tokens: last block partial
    assert reqs[2].num_full_blocks == 1


def test_limit_and_sorting(tmp_path: Path) -> None:
    path = write_mooncake(tmp_path / "t.jsonl", [
        {"timestamp": 50, "input_length": 512, "output_length": 1, "hash_ids": [1]},
        {"timestamp": 10, "input_length": 512, "output_length": 1, "hash_ids": [2]},
        {"timestamp": 90, "input_length": 512, "output_length": 1, "hash_ids": [3]},
    ])
    assert [r.hash_ids for r in load_mooncake(path)] == [(2,), (1,), (3,)]
    assert len(load_mooncake(path, limit=2)) == 2


@pytest.mark.parametrize("line", [
    '{"timestamp": 0, "input_length": 512}',  # no hash_ids
    '{"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [1]}',
    "not json",
    '{"timestamp": 0, "input_length": 5000, "output_length": 1, "hash_ids": [1]}',  # ids do not cover input
])
def test_bad_records_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        load_mooncake(path)


def test_shared_sample(shared_traces: Path) -> None:
    reqs = load_mooncake(shared_traces / "mooncake_synthetic_trace.jsonl")
    assert len(reqs) == 3993
    assert all(len(r.hash_ids) * 512 >= r.input_tokens for r in reqs)
    assert reqs[-1].time_s > reqs[0].time_s
