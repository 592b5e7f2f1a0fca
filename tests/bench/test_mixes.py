"""Node-like mixes: the seeded tuning / held-out split, Poisson starts, and `kvtier bench mixes`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sim.workloads.mixes import conversation_files, draw, split
from kvtier.cli import main
from kvtier.errors import ConfigError


def _conversation(i: int) -> dict:
    ids = list(range(1, 4 + i % 3))
    return {"id": f"trace_{i:04d}", "block_size": 64, "hash_id_scope": "local", "requests": [
        {"t": 0.0, "type": "n", "in": 64 * len(ids), "out": 5, "hash_ids": ids, "stop": "tool_use", "api_time": 1.0},
        {"t": 3.0, "type": "n", "in": 64 * len(ids) + 64, "out": 5, "hash_ids": [*ids, 99], "stop": "end_turn"},
    ]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "traces"
    d.mkdir()
    for i in range(12):
        (d / f"trace_{i:04d}.json").write_text(json.dumps(_conversation(i)))
    return d


def test_the_split_is_seeded_disjoint_and_independent_of_order(folder: Path) -> None:
    files = conversation_files(folder)
    tuning, held_out = split(files)
    assert len(tuning) == len(held_out) == 6 and not set(tuning) & set(held_out)
    assert split(list(reversed(files))) == (tuning, held_out)  # only names and the seed matter
    assert split(files, seed=1) != (tuning, held_out)
    with pytest.raises(ConfigError, match="tuning_share"):
        split(files, tuning_share=1.0)


def test_a_mix_draws_from_its_set_with_staggered_starts(folder: Path) -> None:
    tuning, _ = split(conversation_files(folder))
    mix = draw(tuning, count=4, mix=0, mean_gap_s=100.0, set_name="tuning")
    assert set(mix.files) <= set(tuning) and len(set(mix.files)) == 4
    assert mix.starts_s[0] == 0.0 and list(mix.starts_s) == sorted(mix.starts_s) and mix.starts_s[-1] > 0
    assert draw(tuning, count=4, mix=0, mean_gap_s=100.0, set_name="tuning") == mix  # reproducible
    requests = mix.load()
    assert len(requests) == 8 and len({r.session for r in requests}) == 4
    assert [r.time_s for r in requests] == sorted(r.time_s for r in requests)
    with pytest.raises(ConfigError, match="a mix of 7"):
        draw(tuning, count=7, mix=0, mean_gap_s=1.0, set_name="tuning")


def test_mixes_cli_tables_and_json(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    rc = main(["bench", "mixes", str(folder), "--sizes", "3", "--chunk-blocks", "1", "--g2", "20%",
               "--g2-g3", "10%+10%", "--cost-model", "modelled", "--json", str(out), "--md", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [t["trace"].split(":")[0] for t in doc["traces"]] == ["tuning mix 0", "held-out mix 0"]
    assert len(doc["mixes"]) == 2 and all(len(m["files"]) == 3 for m in doc["mixes"])
    for trace in doc["traces"]:
        for row in trace["rows"]:
            assert 0 <= max(row["hit"].values()) <= row["bound"] <= trace["ideal"]
    assert "agent / best plain" in md.read_text()
    assert "worst ratio to the best plain policy" in capsys.readouterr().out


def test_mixes_needs_something_to_replay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "mixes"]) == 2
    assert "nothing to replay" in capsys.readouterr().err
