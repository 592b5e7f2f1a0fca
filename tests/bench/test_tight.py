"""`kvtier bench tight`: every policy against the prefix bound, per trace, as JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tight import parse_capacities
from kvtier.cli import main
from kvtier.errors import ConfigError


def test_tight_cli_tables_and_json(tiny_mooncake: Path, tmp_path: Path, capsys) -> None:
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    rc = main(["bench", "tight", str(tiny_mooncake), "--g2", "30%,60%", "--g2-g3", "30%+30%",
               "--policy", "lru,agent", "--cost-model", "modelled", "--json", str(out), "--md", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    (trace,) = doc["traces"]
    assert trace["unique_chunks"] == 7 and [r["capacity"] for r in trace["rows"]] == [
        "G2 30%", "G2 60%", "G2 30% + G3 30%"]
    for row in trace["rows"]:
        assert row["tokens"] == int(7 * row["share_pct"] / 100) * 512 or row["capacity"].endswith("G3 30%")
        assert 0 <= max(row["hit"].values()) <= row["bound"] <= trace["ideal"]
    assert doc["summary"]["default"] == "agent" and doc["speed"]["chunk_accesses_per_s"] > 0
    table = md.read_text()
    assert "| G2 60% |" in table and "agent / bound" in table
    assert "worst ratio to the bound" in capsys.readouterr().out


def test_capacity_errors() -> None:
    assert parse_capacities("1%", "1%+2%")[1].g3 == 2.0
    with pytest.raises(ConfigError, match="bad capacities"):
        parse_capacities("x", "")
    with pytest.raises(ConfigError, match="> 0"):
        parse_capacities("0%", "")


def test_an_unknown_policy_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tight", "nowhere.jsonl", "--policy", "lru,belady"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtier: error: ") and "unknown policy 'belady'" in err and err.count("\n") == 1


def test_synthetic_seeds_must_be_numbers(tiny_mooncake: Path, capsys) -> None:
    assert main(["bench", "tight", str(tiny_mooncake), "--synthetic", "one", "--cost-model", "modelled"]) == 2
    assert "expected seeds" in capsys.readouterr().err
