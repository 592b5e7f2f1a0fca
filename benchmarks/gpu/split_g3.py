"""Cold G3 (local disk) hits: recompute vs pure load vs compute + load split; and a multi-turn session.

Issue 16.  One run, every number against baselines measured in the same run:

1. **G3 hit** at each ``--contexts`` cached tokens (+ ``--suffix`` new): the chunks are on a
   ``DiskTier`` only (written by a first request), then each is read by a fresh
   ``ContextMemory`` (empty DRAM, as after a restart), with the page cache of every chunk file
   dropped (``os.sync`` + ``posix_fadvise(DONTNEED)`` per file: no root needed) and then warm:

   * ``recompute``: the whole prompt, no kvtier;
   * ``load``: ``KVTierLM`` loads every cached chunk from disk, then computes the suffix;
   * ``split``: ``KVTierLM`` with a cost model (prefill fitted in this run; the disk link from
     this context's ``load`` time) and ``SplitOptions(mode="adaptive")``: the head is recomputed
     while the tail streams from disk (``kvtier.integrations.hf_split``); reported with the
     plan's estimated meeting point and the one reached;
   * ``ideal``: ``1 / (1/t_recompute + 1/t_load)``, both rates combined with no overhead.

   Split logits are checked against recompute (max |diff|, argmax), and each split's phases are
   logged (``SplitTimings``: head queued / done, loader done, the compute side's wait at the
   meeting, the last host-to-device copy, the time after the meeting).
2. **Session**: ``--turns`` turns of ``--turn-tokens`` new tokens each, every turn's prompt the
   whole history; kvtier (DRAM + disk, the process's first kvtier use, turn 1 included) vs the KV
   kept in HBM (one growing ``DynamicCache``): TTFT per turn and the ratio (the first-hit penalty).
   ``--trace-turn N`` runs turn ``N`` of both under ``torch.profiler``: the top-25 ops (self device
   and CPU time) go to the log, chrome traces to ``<out>/trace_{kvtier,hbm}_turn<N>.json.gz``.

Model: Llama-3.1-8B-shaped, random weights, bf16, built from a config (no downloads);
``--layers`` keeps fewer of its 32 layers (faster; KV bytes per token shrink in proportion).
``--smoke``: a tiny model on CPU with small contexts (a dry run of the script, not a benchmark).

    PYTHONPATH=. PYTHONUNBUFFERED=1 python benchmarks/gpu/split_g3.py --out $OUT/split   # H200, ~4 min
    PYTHONPATH=. python benchmarks/gpu/split_g3.py --smoke --out /tmp/split-smoke      # CPU, seconds
    PYTHONPATH=. python benchmarks/gpu/split_g3.py --contexts '' --trace-turn 6 --out $OUT/trace  # session only

Writes ``<out>/split_g3.json`` (checkpointed after every row) and ``<out>/split_g3.log``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.cache_utils import DynamicCache

from benchmarks.gpu.bench_gpu import build_model, evict_page_cache, free, timed
from kvtier.hierarchy import ContextMemory
from kvtier.integrations.hf import KVTierLM, calibrate_prefill, layout_for
from kvtier.integrations.hf_attention import lower_right_attention
from kvtier.integrations.hf_split import SplitOptions
from kvtier.layout import KVLayout
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

log = logging.getLogger("split_g3")


# --- setup (the model builder and the timers are bench_gpu's) ------------------------------------
def to_logits(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds from an idle device until ``fn``'s compute-stream work is done (a TTFT: up to the
    logits, not kvtier's background store of the new chunks on its own streams)."""
    return timed(fn, device, until="stream")


def warm_page_cache(root: Path) -> int:
    """Read every chunk file under ``root`` once, so the next reads hit the page cache; bytes read."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while block := f.read(64 << 20):
                    total += len(block)
    return total


def clear(dram: DramTier) -> None:
    """Empty the (reused, pinned) DRAM pool: the next ContextMemory starts as after a restart."""
    for key in list(dram.keys()):  # a snapshot: delete while iterating
        dram.delete(key)


class Run:
    """One fresh ContextMemory (empty DRAM, the disk root as left) and one KVTierLM over it."""

    io_threads = 8  # the disk tier's parallel reads (set from --io-threads)
    lower_right = True  # KVTierLM's attention over a past (False from --stock-attention)

    def __init__(self, model: Any, layout: KVLayout, dram: DramTier, root: Path, **lm: Any) -> None:
        clear(dram)
        disk = DiskTier(layout, path=root, capacity_bytes=1 << 42, fsync=False, io_threads=self.io_threads)
        self.memory = ContextMemory(layout, [dram, disk], write_through=lm.pop("write_through", False))
        self.lm = KVTierLM(model, self.memory, lower_right=self.lower_right, **lm)

    def __enter__(self) -> KVTierLM:
        return self.lm

    def __exit__(self, *exc: object) -> None:
        self.lm.close()
        self.memory.close()  # closes the disk tier; DramTier.close is a no-op, the pool is reused


def logits_check(got: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    got, ref = got[0, -1].float(), ref[0, -1].float()
    return {"logits_maxabs": (got - ref).abs().max().item(),
            "logits_rel_l2": ((got - ref).norm() / ref.norm()).item(),
            "argmax_equal": bool(got.argmax() == ref.argmax())}


# --- 1. G3 hits ----------------------------------------------------------------------------------
def g3_row(model: Any, layout: KVLayout, dram: DramTier, root: Path, ids: torch.Tensor, n: int,
           prefill: PrefillCost, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    c = layout.tokens_per_chunk
    kv_bytes = n * layout.bytes_per_token
    row: dict[str, Any] = {"cached_tokens": n, "new_tokens": len(ids) - n, "kv_bytes": kv_bytes}
    gpu_ids = ids[None].to(device)
    rec = [to_logits(lambda: model(input_ids=gpu_ids, past_key_values=DynamicCache(), use_cache=True,
                               logits_to_keep=1), device) for _ in range(args.reps)]
    row["recompute_s"] = statistics.median(t for t, _ in rec)
    ref = rec[-1][1].logits
    del rec
    free(device)
    # the chunks, onto the disk only: a first request computes them, its store writes them
    writer_mem = ContextMemory(layout, [DiskTier(layout, path=root, capacity_bytes=1 << 42, fsync=False)],
                               write_through=False)
    with KVTierLM(model, writer_mem, split=None) as writer:
        def populate() -> None:
            writer.prefill(ids, logits_to_keep=1)
            writer.flush()

        t_write, _ = to_logits(populate, device)
    writer_mem.close()
    row["populate_s"] = t_write
    free(device)
    for state in ("cold", "warm"):
        loads, splits = [], []
        if state == "warm":  # the cold split read only the loaded tail: bring every file in
            warm_page_cache(root)
        for _ in range(args.reps):
            if state == "cold":
                row["files_evicted"] = evict_page_cache(root)
            with Run(model, layout, dram, root, store=False, split=None, cost="off") as lm:  # load all
                t, res = to_logits(partial(lm.prefill, ids, logits_to_keep=1), device)
                loads.append(t)
                assert res.loaded_tokens == (len(ids) - 1) // c * c, res.loaded_tokens
                del res
            free(device)
        t_load = statistics.median(loads)
        # the disk link as this context's pure load saw it (end to end: read, checksum, H2D, suffix)
        link = LinkCost(bandwidth_Bps=kv_bytes / max(t_load - prefill.seconds(n, len(ids) - n), 1e-6))
        cost = CostModel(links=(LinkCost(bandwidth_Bps=50e9), link), prefill=prefill)
        options = SplitOptions(mode="adaptive", step_tokens=args.step_tokens, group_chunks=args.group_chunks,
                               reads_in_flight=args.reads_in_flight, first_step_share=args.first_step_share)
        if args.force_split:  # smoke: make the model believe in a split whatever the box
            cost = CostModel(links=(LinkCost(bandwidth_Bps=50e9), LinkCost(
                bandwidth_Bps=kv_bytes / row["recompute_s"])), prefill=PrefillCost(
                per_token_s=row["recompute_s"] / len(ids)))
        for _ in range(args.reps):
            if state == "cold":
                evict_page_cache(root)
            with Run(model, layout, dram, root, store=False, cost=cost, split=options) as lm:
                t, res = to_logits(partial(lm.prefill, ids, logits_to_keep=1), device)
                splits.append(t)
                plan = res.plan
                row[f"split_{state}_check"] = logits_check(res.logits, ref)
                row[f"split_{state}_plan"] = {"is_split": plan.is_split, "compute_chunks": plan.compute_chunks,
                                              "load_chunks": plan.load_chunks, "est_total_s": plan.est_total_s,
                                              "est_recompute_s": plan.est_recompute_s}
                row[f"split_{state}_met_at_tokens"] = res.head_tokens  # computed head, where the fronts met
                row[f"split_{state}_loaded_tokens"] = res.loaded_tokens
                if res.split_timings is not None:  # where the time went (s from the split's start)
                    phases = res.split_timings.seconds()
                    phases["total_s"] = t
                    phases["after_meeting_s"] = t - phases["met_s"]  # suffix (+ its wait for the last copies)
                    row[f"split_{state}_phases"] = phases
                    log.info("split %s %d: %s", state, n, {k: round(v, 4) for k, v in phases.items()})
                del res
            free(device)
        t_split = statistics.median(splits)
        ideal = 1 / (1 / row["recompute_s"] + 1 / t_load)
        row.update({f"load_{state}_s": t_load, f"load_{state}_GBps": kv_bytes / t_load / 1e9,
                    f"split_{state}_s": t_split, f"ideal_{state}_s": ideal,
                    f"split_{state}_speedup_vs_best": min(row["recompute_s"], t_load) / t_split,
                    f"split_{state}_over_ideal": t_split / ideal,
                    f"disk_link_{state}_GBps": link.bandwidth_Bps / 1e9})
    del ref
    free(device)
    return row


# --- 2. multi-turn session -----------------------------------------------------------------------
def session(model: Any, layout: KVLayout, dram: DramTier, root: Path, prefill: PrefillCost,
            args: argparse.Namespace, device: torch.device, vocab: int) -> dict[str, Any]:
    tt = args.turn_tokens
    ids = torch.randint(0, vocab, (args.turns * tt,), generator=torch.Generator().manual_seed(7))
    cost = CostModel(links=(LinkCost(bandwidth_Bps=50e9), LinkCost(bandwidth_Bps=args.session_disk_GBps * 1e9)),
                     prefill=prefill, stages=layout.num_layers)
    # cuDNN's SDPA plans per (new tokens, past tokens) shape, whatever the strides, and keeps the
    # plan for the process: untimed, the in-HBM turns build every shape first, so neither timed side
    # pays another's planning (timed first, kvtier paid 30-80 ms per turn that the baseline reused)
    # (the in-HBM baseline attends as kvtier does: lower-right flash unless --stock-attention)
    attention = partial(lower_right_attention, model, Run.lower_right)
    warm = DynamicCache()
    with attention():
        for turn in range(1, args.turns + 1):
            to_logits(partial(model, input_ids=ids[(turn - 1) * tt:turn * tt][None].to(device),
                              past_key_values=warm, use_cache=True, logits_to_keep=1), device)
    del warm
    free(device)
    kvtier: list[dict[str, Any]] = []
    with Run(model, layout, dram, root, cost=cost, write_through=True) as lm:  # stores each turn in DRAM + disk
        for turn in range(1, args.turns + 1):
            prompt = ids[:turn * tt]
            t, res = timed_turn(partial(lm.prefill, prompt, logits_to_keep=1), device, args, turn, "kvtier")
            kvtier.append({"turn": turn, "prompt_tokens": len(prompt), "ttft_s": t,
                           "loaded_tokens": res.loaded_tokens, "head_tokens": res.head_tokens,
                           "profiled": turn == args.trace_turn})
            del res
            lm.flush()  # the background store of this turn's chunks, outside the timing
            lm.memory.flush()
    free(device)
    hbm: list[float] = []
    cache = DynamicCache()
    for turn in range(1, args.turns + 1):
        new = ids[(turn - 1) * tt:turn * tt][None].to(device)
        with attention():
            t, _ = timed_turn(partial(model, input_ids=new, past_key_values=cache, use_cache=True,
                                      logits_to_keep=1), device, args, turn, "hbm")
        hbm.append(t)
    del cache
    free(device)
    for row, t in zip(kvtier, hbm, strict=True):
        row["hbm_ttft_s"] = t
        row["ratio_vs_hbm"] = row["ttft_s"] / t
    return {"turns": kvtier, "turn_tokens": tt, "attention": "lower-right flash" if Run.lower_right else "stock",
            "note": "an untimed in-HBM pass first (attention plans for "
            "every shape), then kvtier (the process's first kvtier use is turn 1's), then HBM: one "
            "DynamicCache kept on the device across turns; no answers decoded"}


def timed_turn(fn: Callable[[], Any], device: torch.device, args: argparse.Namespace, turn: int,
               name: str) -> tuple[float, Any]:
    """A session turn's TTFT; turn ``--trace-turn`` runs under the profiler (its TTFT then includes
    the profiler's overhead: the row says ``profiled``)."""
    if turn != args.trace_turn:
        return to_logits(fn, device)
    return profile(fn, device, args.out, f"{name}_turn{turn}")


def profile(fn: Callable[[], Any], device: torch.device, out: Path, name: str) -> tuple[float, Any]:
    """``to_logits(fn)`` under torch.profiler: the top-25 ops by device and by CPU time to the log,
    a chrome trace to ``<out>/trace_<name>.json.gz`` (ui.perfetto.dev or chrome://tracing)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        t, result = to_logits(fn, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the side streams' copies too, inside the trace
    averages = prof.key_averages()
    log.info("trace %s: %.3f s under the profiler", name, t)
    sorts = [("self_cpu_time_total", "CPU")]
    if device.type == "cuda":
        sorts.insert(0, ("self_device_time_total", "device"))
    for sort_by, label in sorts:
        try:
            table = averages.table(sort_by=sort_by, row_limit=25)
        except (AttributeError, KeyError):  # a torch that still calls device time "cuda"
            table = averages.table(sort_by=sort_by.replace("device", "cuda"), row_limit=25)
        log.info("trace %s: top 25 ops by self %s time\n%s", name, label, table)
    raw = out / f"trace_{name}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    log.info("trace %s: chrome trace %s.gz", name, raw)
    return t, result


# --- the run -------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for split_g3.json and split_g3.log")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, small contexts: a dry run")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; smoke 2)")
    ap.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    ap.add_argument("--contexts", default=None,
                    help="cached tokens, comma-separated (default 16K,32K,64K,128K; '' skips the G3 section)")
    ap.add_argument("--suffix", type=int, default=None, help="new tokens after the cached context (256)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (256)")
    ap.add_argument("--reps", type=int, default=1, help="timings per cell (median)")
    ap.add_argument("--step-tokens", type=int, default=None, help="tokens per head forward of a split (4096)")
    ap.add_argument("--group-chunks", type=int, default=8, help="chunks per loader read of a split")
    ap.add_argument("--reads-in-flight", type=int, default=2, help="groups a split's loader reads at once")
    ap.add_argument("--first-step-share", type=float, default=0.75,
                    help="share of the plan's head a split computes in its first forward")
    ap.add_argument("--stock-attention", action="store_true",
                    help="kvtier's forwards over a past (and the in-HBM baseline's) attend through the model's own "
                         "masked SDPA, not lower-right causal flash")
    ap.add_argument("--io-threads", type=int, default=8, help="the disk tier's parallel reads")
    ap.add_argument("--turns", type=int, default=None, help="session turns (6); 0 skips the session")
    ap.add_argument("--turn-tokens", type=int, default=None, help="new tokens per turn (8192)")
    ap.add_argument("--session-disk-GBps", type=float, default=1.6, help="the session cost model's disk link")
    ap.add_argument("--root", default=None, help="directory on the local disk for G3 (default: a temp dir)")
    ap.add_argument("--force-split", action="store_true", help="cost model that always splits (smoke default)")
    ap.add_argument("--trace-turn", type=int, default=0,
                    help="run this session turn (1-based; 0: none) under torch.profiler, kvtier and KV kept in "
                         "HBM: top-25 ops to the log, chrome traces to <out>/trace_{kvtier,hbm}_turn<N>.json.gz")
    args = ap.parse_args()
    smoke = args.smoke
    defaults = {"layers": 2 if smoke else 32, "device": "cpu" if smoke else "cuda",
                "contexts": "512,1024" if smoke else "16384,32768,65536,131072", "suffix": 32 if smoke else 256,
                "chunk_tokens": 64 if smoke else 256, "step_tokens": 128 if smoke else 4096,
                "turns": 3 if smoke else 6, "turn_tokens": 256 if smoke else 8192}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.force_split = args.force_split or smoke
    if smoke:  # torch's OpenMP threads on a small, shared CPU box slow a tiny forward 100x (spinning)
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(args.out / "split_g3.log", mode="w")])
    logging.getLogger("kvtier.policy.cost").setLevel(logging.DEBUG)  # every plan, with its estimates
    Run.io_threads = args.io_threads
    Run.lower_right = not args.stock_attention
    device = torch.device(args.device)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    out_json = args.out / "split_g3.json"
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    result["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    log.info("env %s", result["env"])

    t0 = time.perf_counter()
    model = build_model("tiny" if smoke else "llama-3.1-8b", args.device, layers=args.layers)
    layout = layout_for(model, tokens_per_chunk=args.chunk_tokens)
    result["model"] = {"layout": layout.describe(), "layers": args.layers,
                       "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
                       "kv_bytes_per_token": layout.bytes_per_token, "build_s": time.perf_counter() - t0}
    log.info("model %s", result["model"])
    vocab = model.config.vocab_size
    c = layout.tokens_per_chunk
    pool_chunks = max(max(contexts, default=0) + args.suffix, args.turns * args.turn_tokens) // c + 2
    dram = DramTier(layout, capacity_bytes=pool_chunks * layout.chunk_bytes)
    result["dram"] = {"pool_bytes": dram.capacity_bytes, "pinned": dram.pinned}

    def save() -> None:
        out_json.write_text(json.dumps(result, indent=2, default=float))

    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="kvtier-split-", dir=args.root) as tmp:
        st = os.statvfs(tmp)
        result["disk"] = {"root": tmp, "free_bytes": st.f_bavail * st.f_frsize, "fsync": False,
                          "io_threads": args.io_threads,
                          "page_cache": "cold: os.sync + posix_fadvise(DONTNEED) per chunk file; warm: as left"}
        # prefill cost (kernels warmed by its first, discarded, repeat)
        top = min(max(contexts, default=16384), 16384)
        points = ((0, top // 8), (0, top // 4), (0, top // 2), (0, top), (top // 2, top // 8))
        t_cal, prefill = to_logits(lambda: calibrate_prefill(model, points=points, repeats=1, vocab=vocab,
                                                               lower_right=Run.lower_right), device)
        result["prefill_cost"] = {"fixed_s": prefill.fixed_s, "per_token_s": prefill.per_token_s,
                                  "per_token_ctx_s": prefill.per_token_ctx_s, "points": points, "seconds": t_cal}
        log.info("prefill cost %s", result["prefill_cost"])
        save()
        if args.turns:  # first: the process's first kvtier use is the session's
            result["session"] = session(model, layout, dram, Path(tmp) / "session", prefill, args, device, vocab)
            for row in result["session"]["turns"]:
                log.info("session %s", row)
            save()
        gen = torch.Generator().manual_seed(1)
        rows: list[dict[str, Any]] = []
        for n in contexts:
            ids = torch.randint(0, vocab, (n + args.suffix,), generator=gen)
            root = Path(tmp) / f"g3-{n}"
            try:
                row = g3_row(model, layout, dram, root, ids, n, prefill, args, device)
            finally:
                for dirpath, _dirs, files in os.walk(root, topdown=False):  # free the disk for the next
                    for name in files:
                        os.unlink(os.path.join(dirpath, name))
            rows.append(row)
            result["g3"] = rows
            log.info("g3 %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            save()
    report(result)
    save()
    log.info("wrote %s", out_json)
    return 0


def report(result: dict[str, Any]) -> None:
    lines = ["", "G3 hit TTFT, s (cached + suffix new tokens; speedup = min(recompute, load) / split)",
             "| cached | cache | recompute | load | split | ideal | speedup | split/ideal | met at | est c |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result.get("g3", []):
        for s in ("cold", "warm"):
            plan = r[f"split_{s}_plan"]
            lines.append(f"| {r['cached_tokens']:,} | {s} | {r['recompute_s']:.3f} | {r[f'load_{s}_s']:.3f} | "
                         f"{r[f'split_{s}_s']:.3f} | {r[f'ideal_{s}_s']:.3f} | "
                         f"{r[f'split_{s}_speedup_vs_best']:.2f}x | {r[f'split_{s}_over_ideal']:.2f} | "
                         f"{r[f'split_{s}_met_at_tokens']:,} | {plan['compute_chunks']} |")
    phases = [(r["cached_tokens"], s, r[f"split_{s}_phases"]) for r in result.get("g3", []) for s in ("cold", "warm")
              if f"split_{s}_phases" in r]
    if phases:
        lines += ["", "Split phases, s from the split's start (host clock; head done and last H2D copy: device)",
                  "| cached | cache | head queued | head done | loader done | waited | met | last H2D | "
                  "suffix wait | after meeting | total | read | groups |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for n, s, p in phases:
            lines.append(f"| {n:,} | {s} | {p['head_queued_s']:.3f} | {p.get('head_done_s', float('nan')):.3f} | "
                         f"{p['loader_done_s']:.3f} | {p['waited_s']:.3f} | {p['met_s']:.3f} | "
                         f"{p.get('h2d_done_s', float('nan')):.3f} | {p.get('suffix_wait_s', float('nan')):.3f} | "
                         f"{p['after_meeting_s']:.3f} | "
                         f"{p['total_s']:.3f} | {p['read_s']:.3f} | {p['groups']} |")
    if "session" in result:
        lines += ["", "Session TTFT, s: kvtier vs KV kept in HBM",
                  "| turn | prompt | kvtier | HBM | ratio | loaded |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in result["session"]["turns"]:
            lines.append(f"| {r['turn']} | {r['prompt_tokens']:,} | {r['ttft_s']:.3f} | {r['hbm_ttft_s']:.3f} | "
                         f"{r['ratio_vs_hbm']:.2f}x{' (profiled)' if r.get('profiled') else ''} | "
                         f"{r['loaded_tokens']:,} |")
    log.info("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
