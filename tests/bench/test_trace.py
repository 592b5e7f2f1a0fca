"""`kvtier bench trace` and `kvtier bench agentic` end to end (simulate mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.trace import capacity, load_paths, repeat
from kvtier.cli import main
from kvtier.errors import ConfigError


def test_trace_cli_writes_json_and_plots(tiny_mooncake: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(["bench", "trace", str(tiny_mooncake), "--dram", "25%,50%", "--disk", "100%",
               "--policy", "lru,s3fifo", "--replicas", "1", "--json", str(out), "--plot-dir", str(tmp_path / "png"),
               "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "simulate" and doc["chunk_tokens"] == 512 and doc["unique_chunks"] == 7
    assert doc["ideal"]["hit_rate_tokens"] == pytest.approx((1536 * 2 + 1024 + 512) / 9144)
    assert doc["baseline_no_cache"]["hit_rate_tokens"] == 0
    labels = [r["label"] for r in doc["runs"]]
    assert len(labels) == 8 and sum(lb.startswith("belady G2") for lb in labels) == 2
    assert sum(lb.startswith("belady all") for lb in labels) == 2
    for r in doc["runs"]:
        assert r["hit_rate_tokens"] <= doc["ideal"]["hit_rate_tokens"] + 1e-12
        assert "queued_ttft_p99_s" in r and r["ttft_p50_s"] > 0
    assert doc["speed"]["requests_per_s"] > 0
    assert (tmp_path / "png" / "hit_rate_vs_g2.png").stat().st_size > 1000
    assert (tmp_path / "png" / "ttft_cdf.png").stat().st_size > 1000
    assert "belady" in capsys.readouterr().out


def test_agentic_cli(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    rc = main(["bench", "agentic", "--sessions", "3", "--turns", "6", "--system-tokens", "3000",
               "--model", "qwen2.5-7b", "--chunk-blocks", "4", "--dram", "1GiB", "--policy", "lru",
               "--no-belady", "--json", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["workload"]["requests"] >= 18 and doc["chunk_tokens"] == 256
    assert doc["runs"][0]["capacity"] == {"dram": 1 << 30}
    assert doc["ideal"]["hit_rate_tokens"] > 0.5  # shared system prompt + growing contexts
    rc = main(["bench", "agentic", "--sessions", "3", "--turns", "6", "--system-tokens", "3000", "--hbm", "16GiB",
               "--dram", "16GiB", "--policy", "lru", "--json", str(out), "--plot-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    run = doc["runs"][1]
    assert list(run["capacity"]) == ["hbm", "dram"] and run["hit_rate_tokens_per_tier"]["hbm"] > 0
    assert doc["working_set_bytes"] < 16 << 30
    assert run["hit_rate_tokens"] == pytest.approx(doc["ideal"]["hit_rate_tokens"])  # 32 GiB holds it all


def test_helpers_and_errors(tiny_mooncake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert capacity("10%", 1000) == 100 and capacity("2GiB", 0) == 2 << 30
    reqs = load_paths([tiny_mooncake])
    twice = repeat(reqs, 2)
    assert len(twice) == 12 and twice[6].time_s > twice[5].time_s and twice[6].scope != twice[0].scope
    with pytest.raises(ConfigError):
        load_paths([tmp_path / "missing.jsonl"])
    for bad in (["--policy", "fifo"], ["--chunk-blocks", "0"], ["--time-scale", "0"], ["--repeat", "0"],
                ["--dram", "lots"]):  # the CLI turns the ConfigError into one line and exit status 2
        assert main(["bench", "trace", str(tiny_mooncake), "--no-progress", *bad]) == 2
        assert capsys.readouterr().err.startswith("kvtier: error: ")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["bench", "trace", str(empty), "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err
