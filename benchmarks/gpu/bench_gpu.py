"""GPU benchmark of kvtier's G1 path, all in one run, against raw baselines measured in that run.

1. Raw pinned ``torch`` copy bandwidth (H2D, D2H) at the transfer sizes kvtier uses, vs
   kvtier's G2->G1 load (bulk, layer-wise) and G1->G2 store end to end (device KV -> chunk
   committed in the DRAM tier): in place (``store_in_place``, what ``KVTierLM`` does) and the
   former path (pinned staging + ``DramTier.put``), both in the same run.
2. TTFT for each cached context + ``--suffix`` new tokens: recompute, kvtier G2 hit (bulk),
   kvtier G2 hit (layer-wise), and the ideal ``max(KV bytes / peak H2D, suffix prefill)``.
   Hit logits are checked against recompute (bf16 tolerance) and greedy continuations compared.
3. G3 (local disk) -> G1 vs recompute with a cold page cache, the crossover the fitted cost
   model predicts, and whether the fetch-or-recompute decision picks the faster path.

Model: a Llama-3.1-8B-shaped random-weight model in bf16, built from a config (no downloads).

    PYTHONPATH=. PYTHONUNBUFFERED=1 python benchmarks/gpu/bench_gpu.py --json $OUT/gpu.json
    PYTHONPATH=. python benchmarks/gpu/bench_gpu.py --only copy --json $OUT/copy.json   # section 1 alone
    PYTHONPATH=. python benchmarks/gpu/bench_gpu.py --model tiny --device cpu --contexts 512,1024 \
        --g3-contexts 512,1024 --json /tmp/cpu.json        # a quick CPU dry run of the script
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from kvtier.hierarchy import ContextMemory
from kvtier.integrations.hf import KVTierLM, layout_for
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

console = Console(width=160)
GiB = 1 << 30


# --- setup ---------------------------------------------------------------------------------------
def build_model(kind: str, device: str, *, layers: int | None = None) -> Any:
    """A random-weight Llama built from a config (no downloads): ``llama-3.1-8b`` (bf16) or ``tiny``
    (bf16 on CUDA, fp32 on CPU); ``layers`` keeps that many decoder layers (default: all, 32 / 4)."""
    if kind == "llama-3.1-8b":
        n = layers or 32
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 8192,
                          name_or_path="random-init/Llama-3.1-8B-shaped" + (f"-{n}L" if n != 32 else ""))
        dtype = torch.bfloat16
    else:
        n = layers or 4
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=n,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                          name_or_path="random-init/tiny-llama" + (f"-{n}L" if n != 4 else ""))
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype, on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *,
          until: Literal["device", "stream"] = "device") -> tuple[float, Any]:
    """Seconds from an idle device until ``fn``'s work is done, and its result.

    ``until="device"``: every stream (copies on side streams included); ``"stream"``: the work
    queued on the current (compute) stream, e.g. a TTFT up to the logits, without kvtier's
    background store of the new chunks, which runs on its own streams after the forward.
    """
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    if until == "stream" and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    else:
        sync(device)
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device)[0] for _ in range(reps))


def checkpoint(result: dict[str, Any], path: Path | None) -> None:
    """Write what is measured so far, so a crash late in the run loses nothing before it."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=float))


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. raw copy bandwidth -----------------------------------------------------------------------
def raw_bandwidth(host: torch.Tensor, device: torch.device, sizes: dict[str, int], total: int,
                  reps: int) -> dict[str, dict[str, float]]:
    """GB/s of pinned<->device copies of each size, ``total`` bytes per timing, on a side stream."""
    dev = torch.empty(total, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    out: dict[str, dict[str, float]] = {}
    for name, size in sizes.items():
        n = max(1, total // size)
        res: dict[str, float] = {"bytes_per_copy": size, "copies": n}
        for direction in ("h2d", "d2h"):
            def run(size: int = size, n: int = n, direction: str = direction, dev: torch.Tensor = dev) -> None:
                ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with ctx:
                    for i in range(n):
                        d, h = dev[i * size:(i + 1) * size], host[i * size:(i + 1) * size]
                        if direction == "h2d":
                            d.copy_(h, non_blocking=True)
                        else:
                            h.copy_(d, non_blocking=True)
            seconds = median_time(run, device, reps)
            res[f"{direction}_GBps"] = n * size / seconds / 1e9
        out[name] = res
    del dev
    free(device)
    return out


# --- helpers around kvtier ---------------------------------------------------------------------
def load_only(lm: KVTierLM, ids: torch.Tensor, reps: int = 1) -> tuple[float, int]:
    """Seconds to bring the cached prefix of ``ids`` to the device (no compute), chunks loaded.

    With ``reps > 1``: one warm-up (device buffer allocation, as in a serving loop), then the median.
    """
    keys = lm.memory.keys_for(ids.numpy())
    usable = min(len(keys), (len(ids) - 1) // lm.layout.tokens_per_chunk)
    hit = lm.memory.lookup(keys[:usable])

    def run() -> int:
        with contextlib.ExitStack() as borrows:
            load, n = lm._fetch(keys[:hit.num_chunks], borrows)
            if load is not None:
                load.wait_host()
        return n

    if reps == 1:
        return timed(run, lm.device)
    n = run()
    return statistics.median(timed(run, lm.device)[0] for _ in range(reps)), n


def store_staging_put(lm: KVTierLM, keys: list[Any], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The former store path, for comparison: D2H into pinned staging, then ``store`` (host memcpy)."""
    eng, c, stored = lm.engine, lm.layout.tokens_per_chunk, 0
    for start in range(0, len(keys), eng.group_chunks):
        group = keys[start:start + eng.group_chunks]
        chunks, gathered = eng.gather(kv, start * c, len(group))
        stored += lm.memory.store(group, eng.to_host(chunks, gathered))
    return stored


def store_bandwidth(model: Any, writer: KVTierLM, memory: ContextMemory, ids: torch.Tensor, n: int,
                    device: torch.device, reps: int) -> dict[str, Any]:
    """G1 -> G2 store of ``n`` tokens' KV: D2H into staging alone, and end to end by both paths.

    End to end = gather on the device + device-to-host + the chunks committed in the DRAM tier
    (visible to ``lookup``), timed from the first gather to the last commit; the chunks are
    deleted before each repetition, so every one is a fresh store into free slots.
    """
    c = writer.layout.tokens_per_chunk
    cache = DynamicCache()
    model(input_ids=ids[None, :n].to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    keys = memory.keys_for(ids.numpy())[:n // c]
    nbytes = len(keys) * writer.layout.chunk_bytes
    eng = writer.engine
    memory.delete(keys)

    def d2h_only() -> float:
        seconds = 0.0
        for start in range(0, len(keys), eng.group_chunks):
            count = min(eng.group_chunks, len(keys) - start)
            chunks, _ = eng.gather(kv, start * c, count)
            sync(device)
            seconds += timed(lambda chunks=chunks: eng.to_host(chunks, None), device)[0]
            del chunks
        return seconds

    # in place last: the chunks left in DRAM for the loads after this are the ones KVTierLM stores
    paths = {"staging_put": lambda: store_staging_put(writer, list(keys), kv),
             "in_place": lambda: writer._store(list(keys), 0, kv, None)}
    times: dict[str, list[float]] = {"d2h_only": [], **{name: [] for name in paths}}
    stored: dict[str, int] = {}
    for rep in range(reps + 1):  # the first round is a warm-up
        t = d2h_only()
        if rep:
            times["d2h_only"].append(t)
        for name, fn in paths.items():
            memory.delete(keys)
            seconds, stored[name] = timed(fn, device)
            assert memory.lookup(keys).num_chunks == len(keys), f"{name}: not every chunk is visible"
            if rep:
                times[name].append(seconds)
    out: dict[str, Any] = {"tokens": n, "chunks": len(keys), "bytes": nbytes, "reps": reps,
                           "group_chunks": eng.group_chunks, "stored": stored,
                           "d2h_only_GBps": nbytes / statistics.median(times["d2h_only"]) / 1e9,
                           "end_to_end_GBps": nbytes / statistics.median(times["in_place"]) / 1e9,
                           "staging_put_GBps": nbytes / statistics.median(times["staging_put"]) / 1e9,
                           "seconds": times,
                           "end_to_end_note": "gather on device + D2H straight into reserved DRAM slots + commit "
                                              "(ContextMemory.store_in_place, as KVTierLM stores)",
                           "staging_put_note": "gather + D2H into pinned staging + ContextMemory.store "
                                               "(DramTier.put host memcpy): the path before run 5"}
    return out


def ttft(lm: KVTierLM, ids: torch.Tensor) -> tuple[float, Any]:
    return timed(lambda: lm.prefill(ids, logits_to_keep=1), lm.device)


def evict_page_cache(root: Path) -> int:
    """Drop the page cache of every chunk file under ``root`` (fadvise DONTNEED); files touched."""
    os.sync()
    count = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def fit_link(samples: list[tuple[int, float]]) -> LinkCost:
    """latency + bytes / bandwidth through (bytes, seconds) samples (least squares, clamped)."""
    x = np.array([b for b, _ in samples], dtype=float)
    y = np.array([s for _, s in samples])
    if len(samples) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
    else:
        slope, intercept = y[0] / x[0], 0.0
    slope = slope if slope > 0 else float(np.max(y / x))
    return LinkCost(bandwidth_Bps=1.0 / slope, latency_s=max(float(intercept), 0.0))


# --- the run -------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", default="4096,16384,32768,65536", help="cached tokens, comma-separated")
    ap.add_argument("--suffix", type=int, default=256, help="new tokens after the cached context")
    ap.add_argument("--g3-contexts", default="4096,8192,16384,32768", help="'' skips section 3")
    ap.add_argument("--g3-root", default=None, help="directory on the local disk (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=["all", "copy"], default="all",
                    help="copy: section 1 alone (raw bandwidth, G2->G1 load and G1->G2 store at one context)")
    args = ap.parse_args()
    device = torch.device(args.device)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    g3_contexts = [int(x) for x in args.g3_contexts.split(",") if x]
    suffix, reps, C = args.suffix, args.reps, args.chunk_tokens
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    result["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    console.print(result["env"])

    t0 = time.perf_counter()
    model = build_model(args.model, args.device)
    layout = layout_for(model, tokens_per_chunk=C)
    result["model"] = {"layout": layout.describe(), "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
                       "kv_bytes_per_token": layout.bytes_per_token, "chunk_bytes": layout.chunk_bytes,
                       "build_s": time.perf_counter() - t0}
    console.print(result["model"])
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(0, vocab, (n + suffix,), generator=gen) for n in sorted(set(contexts + g3_contexts))}

    pool_chunks = (max(contexts) + suffix) // C + 2
    dram = DramTier(layout, capacity_bytes=pool_chunks * layout.chunk_bytes)
    memory = ContextMemory(layout, [dram], write_through=False)
    result["dram"] = {"pool_bytes": dram.capacity_bytes, "pinned": dram.pinned}
    lms = {"bulk": KVTierLM(model, memory, layerwise=False, store=False, cost="off"),
           "layerwise": KVTierLM(model, memory, layerwise=True, store=False, cost="off"),
           "layerwise_per_chunk_copies": KVTierLM(model, memory, layerwise=True, store=False, copy2d=False, cost="off")}
    writer = KVTierLM(model, memory, store=True)
    result["copy2d_available"] = lms["layerwise"].engine.memcpy2d is not None

    with torch.no_grad():
        # --- 1. raw copy bandwidth at kvtier's transfer sizes ----------------------------------
        total = min(dram.capacity_bytes, 4 * GiB if device.type == "cuda" else 256 << 20)
        sizes = {"layer_slice": layout.layer_bytes, "chunk": layout.chunk_bytes, "1GiB": min(GiB, total)}
        raw = raw_bandwidth(dram.pool if isinstance(dram.pool, torch.Tensor) else torch.from_numpy(dram.pool),
                            device, sizes, total, reps) if device.type == "cuda" else {}
        result["raw_bandwidth"] = raw
        peak_h2d = max((r["h2d_GBps"] for r in raw.values()), default=0.0) * 1e9
        console.print(raw)
        n_store = max(x for x in contexts if x <= 32768) if any(x <= 32768 for x in contexts) else min(contexts)

        if args.only == "copy":  # section 1 alone: store, then load what was stored
            result["store"] = store_bandwidth(model, writer, memory, prompts[n_store], n_store, device, reps)
            free(device)
            console.print({k: v for k, v in result["store"].items() if k != "seconds"})
            row: dict[str, Any] = {"cached_tokens": n_store}
            for mode, lm in lms.items():
                seconds, chunks = load_only(lm, prompts[n_store], reps)
                row[f"load_only_{mode}_s"] = seconds
                row[f"load_only_{mode}_GBps"] = chunks * layout.chunk_bytes / seconds / 1e9
            result["ttft"] = [row]
            console.print(row)
            for lm in [*lms.values(), writer]:
                lm.close()
            memory.close()
            report(result)
            checkpoint(result, args.json)
            return 0

        # warm-up: kernels, cuBLAS handles, allocator, clocks (the first context is timed right after)
        warm = prompts[min(prompts)][None].to(device)
        for _ in range(3):
            cache = DynamicCache()
            model(input_ids=warm[:, :-suffix], past_key_values=cache, use_cache=True, logits_to_keep=1)
            model(input_ids=warm[:, -suffix:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        del cache, warm
        sync(device)

        # --- 2. TTFT per context ----------------------------------------------------------------
        rows: list[dict[str, Any]] = []
        prefill_samples: list[tuple[int, int, float]] = []
        for n in contexts:
            ids = prompts[n]
            row: dict[str, Any] = {"cached_tokens": n, "new_tokens": suffix,
                                   "kv_bytes": n * layout.bytes_per_token}
            gpu_ids = ids[None].to(device)

            def recompute(gpu_ids: torch.Tensor = gpu_ids) -> Any:
                return model(input_ids=gpu_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

            r_reps = reps if n <= 32768 else max(2, reps - 1)
            row["recompute_s"] = median_time(recompute, device, r_reps)
            _, ref = timed(recompute, device)
            ref_logits = ref.logits[0, -1].float()
            del ref
            free(device)
            # suffix-only prefill with the prefix KV already on the device (the compute floor)
            prefix_cache = DynamicCache()
            model(input_ids=gpu_ids[:, :n], past_key_values=prefix_cache, use_cache=True, logits_to_keep=1)

            def suffix_only(cache: DynamicCache = prefix_cache, gpu_ids: torch.Tensor = gpu_ids, n: int = n) -> None:
                model(input_ids=gpu_ids[:, n:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.crop(-suffix)  # drop the suffix again (negative: tokens to remove)

            row["suffix_prefill_s"] = median_time(suffix_only, device, reps)
            del prefix_cache
            free(device)
            prefill_samples += [(0, n + suffix, row["recompute_s"]), (n, suffix, row["suffix_prefill_s"])]

            # populate G2: a miss through kvtier, then the background store (timed to completion)
            miss_s, miss = ttft(writer, ids)
            row["kvtier_miss_s"] = miss_s
            t_store, _ = timed(writer.flush, device)
            row["store_bg_tail_s"] = t_store
            del miss
            free(device)

            for mode, lm in lms.items():
                seconds, chunks = load_only(lm, ids, reps)
                row[f"load_only_{mode}_s"] = seconds
                row[f"load_only_{mode}_GBps"] = chunks * layout.chunk_bytes / seconds / 1e9
                free(device)
                row[f"hit_{mode}_s"] = median_time(lambda lm=lm, ids=ids: lm.prefill(ids, logits_to_keep=1),
                                                   device, reps + 2)
                _, hit = ttft(lm, ids)
                row["loaded_tokens"] = hit.loaded_tokens
                logits = hit.logits[0, -1].float()
                row[f"hit_{mode}_logits_maxabs"] = (logits - ref_logits).abs().max().item()
                row[f"hit_{mode}_logits_rel_l2"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                row[f"hit_{mode}_argmax_equal"] = bool(logits.argmax() == ref_logits.argmax())
                del hit, logits
                free(device)
            kv_s = n * layout.bytes_per_token / peak_h2d if peak_h2d else 0.0
            row["ideal_s"] = max(kv_s, row["suffix_prefill_s"])
            row["ideal_kv_copy_s"] = kv_s
            row["layerwise_over_ideal"] = row["hit_layerwise_s"] / row["ideal_s"]
            row["speedup_layerwise_vs_recompute"] = row["recompute_s"] / row["hit_layerwise_s"]
            row["speedup_bulk_vs_recompute"] = row["recompute_s"] / row["hit_bulk_s"]
            rows.append(row)
            result["ttft"] = rows
            checkpoint(result, args.json)
            console.print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
            free(device)
        result["ttft"] = rows

        # --- G1 -> G2 store bandwidth (synchronous, for the number) ----------------------------
        result["store"] = store_bandwidth(model, writer, memory, prompts[n_store], n_store, device, reps)
        free(device)
        console.print({k: v for k, v in result["store"].items() if k != "seconds"})
        checkpoint(result, args.json)

        # greedy continuation: kvtier hit vs recompute, bf16
        ids = prompts[min(contexts)]
        tokens_hit, _ = lms["layerwise"].generate(ids, 16)
        cache = DynamicCache()
        out = model(input_ids=ids[None].to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        tokens_ref = [int(tok)]
        for _ in range(15):
            out = model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True)
            tok = out.logits[0, -1].argmax()
            tokens_ref.append(int(tok))
        result["greedy"] = {"context": min(contexts), "tokens": 16, "identical": tokens_hit == tokens_ref,
                            "hit": tokens_hit, "recompute": tokens_ref}
        console.print(result["greedy"])
        checkpoint(result, args.json)
        del cache, out
        free(device)

        # --- cost model from this run's figures ----------------------------------------------
        prefill = PrefillCost.fit(prefill_samples)
        big = max(rows, key=lambda r: r["cached_tokens"])
        g2 = LinkCost(bandwidth_Bps=big["load_only_layerwise_GBps"] * 1e9)
        result["prefill_cost"] = {"fixed_s": prefill.fixed_s, "per_token_s": prefill.per_token_s,
                                  "per_token_ctx_s": prefill.per_token_ctx_s, "samples": prefill_samples}

        # --- 3. G3 (local disk) -> G1 vs recompute ---------------------------------------------
        for lm in lms.values():
            lm.close()
        writer.close()
        memory.close()
        del dram, memory
        free(device)
        g3_link = LinkCost(bandwidth_Bps=1e9)  # replaced by the measured figure below
        try:
            if not g3_contexts:
                raise _Skip
            root_ctx = tempfile.TemporaryDirectory(prefix="kvtier-g3-", dir=args.g3_root)
            with root_ctx as root:
                disk = DiskTier(layout, path=root, capacity_bytes=1 << 40, fsync=False)
                g3_memory = ContextMemory(layout, [disk], write_through=False)
                g3 = KVTierLM(model, g3_memory, store=True, layerwise=False, cost="off")
                st = os.statvfs(root)
                result["g3_disk"] = {"root": root, "free_bytes": st.f_bavail * st.f_frsize, "fs": _fs_type(root),
                                 "io_threads": 4, "fsync": False, "page_cache": "evicted per file (fadvise DONTNEED)"}
                g3_rows: list[dict[str, Any]] = []
                link_samples: list[tuple[int, float]] = []
                for n in g3_contexts:
                    ids = prompts[n]
                    row = {"cached_tokens": n, "kv_bytes": n * layout.bytes_per_token}
                    _, miss = ttft(g3, ids)
                    g3.flush()
                    del miss
                    rec = next((r["recompute_s"] for r in rows if r["cached_tokens"] == n), None)
                    if rec is None:
                        gpu_ids = ids[None].to(device)
                        rec = median_time(lambda gpu_ids=gpu_ids: model(
                            input_ids=gpu_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1),
                            device, reps)
                    row["recompute_s"] = rec
                    if not any(p == 0 and m == n + suffix for p, m, _ in prefill_samples):
                        prefill_samples.append((0, n + suffix, rec))
                    cold, warm_t, load_cold = [], [], []
                    g3.cost = None  # force loading
                    for _ in range(reps):
                        row["files_evicted"] = evict_page_cache(Path(root))
                        load_cold.append(load_only(g3, ids)[0])
                        evict_page_cache(Path(root))
                        cold.append(ttft(g3, ids)[0])
                        warm_t.append(ttft(g3, ids)[0])
                        free(device)
                    row["g3_load_only_cold_s"] = statistics.median(load_cold)
                    row["g3_hit_cold_s"] = statistics.median(cold)
                    row["g3_hit_warm_pagecache_s"] = statistics.median(warm_t)
                    row["g3_load_cold_GBps"] = row["kv_bytes"] / row["g3_load_only_cold_s"] / 1e9
                    link_samples.append((row["kv_bytes"], row["g3_load_only_cold_s"]))
                    g3_rows.append(row)
                    result["g3"] = g3_rows
                    checkpoint(result, args.json)
                    console.print(row)
                g3_link = fit_link(link_samples)
                prefill = PrefillCost.fit(prefill_samples)  # now with the longer contexts measured here
                result["prefill_cost"] = {"fixed_s": prefill.fixed_s, "per_token_s": prefill.per_token_s,
                                          "per_token_ctx_s": prefill.per_token_ctx_s, "samples": prefill_samples}
                cost = CostModel(links=(g3_link,), prefill=prefill, stages=1)
                result["g3_link"] = {"bandwidth_GBps": g3_link.bandwidth_Bps / 1e9, "latency_s": g3_link.latency_s}
                g3.cost = cost
                for row in g3_rows:
                    n = row["cached_tokens"]
                    evict_page_cache(Path(root))
                    seconds, res = ttft(g3, prompts[n])
                    plan = res.plan
                    faster = "load" if row["g3_hit_cold_s"] < row["recompute_s"] else "recompute"
                    chosen = "load" if plan is not None and plan.load_chunks > 0 else "recompute"
                    row.update({"auto_s": seconds, "auto_choice": chosen, "auto_loaded_tokens": res.loaded_tokens,
                                "measured_faster": faster, "choice_correct": chosen == faster,
                                "est_load_all_s": cost.links[0].seconds(n * layout.bytes_per_token)
                            + prefill.seconds(n, suffix),
                            "est_chosen_s": plan.est_total_s if plan else None,
                                "est_recompute_s": plan.est_recompute_s if plan else None})
                    del res
                    free(device)
                result["g3"] = g3_rows
                result["g3_crossover"] = crossover(cost, layout, C, suffix)
                result["g2_crossover"] = crossover(CostModel(links=(g2,), prefill=prefill, stages=layout.num_layers),
                                                   layout, C, suffix)
                g3.close()
                g3_memory.close()
        except _Skip:
            pass
        except Exception as exc:  # keep sections 1-2 even if the disk part fails
            import traceback

            traceback.print_exc()
            result["g3_error"] = repr(exc)
        links = (g2, g3_link) if g3_contexts else (g2,)  # no G3 figure without section 3
        cost_all = CostModel(links=links, prefill=prefill, stages=layout.num_layers)
        result["cost_model"] = json.loads(cost_all.to_json())
        if args.json:  # the figures, measured once, as the integration loads them (CostModel.load)
            cost_all.save(args.json.with_name(args.json.stem + "_cost_model.json"))

    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
        console.print(f"wrote {args.json}")
    return 0


class _Skip(Exception):
    """Section 3 not asked for (``--g3-contexts ''``)."""


def crossover(cost: CostModel, layout: Any, c: int, suffix: int) -> dict[str, Any]:
    """Smallest cached context (multiple of C, up to 128K) at which loading beats recomputing."""
    wins = []
    for n in range(c, 131072 + 1, c):
        plan = cost.plan([0] * (n // c), total_tokens=n + suffix, tokens_per_chunk=c, chunk_bytes=layout.chunk_bytes)
        wins.append((n, plan.load_chunks > 0))
    first = next((n for n, w in wins if w), None)
    last_recompute = max((n for n, w in wins if not w), default=None)
    return {"first_load_wins_at_tokens": first, "last_recompute_wins_at_tokens": last_recompute,
            "range_checked": [c, 131072]}


def _fs_type(path: str) -> str:
    best, fs = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return fs


def report(result: dict[str, Any]) -> None:
    raw = result.get("raw_bandwidth", {})
    if raw:
        t = Table(title="1. Copy bandwidth (GB/s): raw pinned torch copies vs kvtier")
        for col in ("transfer", "bytes/copy", "H2D", "D2H"):
            t.add_column(col)
        for name, r in raw.items():
            t.add_row(f"raw {name}", f"{r['bytes_per_copy']:,}", f"{r['h2d_GBps']:.1f}", f"{r['d2h_GBps']:.1f}")
        peak = max(r["h2d_GBps"] for r in raw.values())
        peak_d2h = max(r["d2h_GBps"] for r in raw.values())
        for row in result["ttft"]:
            for mode in ("bulk", "layerwise", "layerwise_per_chunk_copies"):
                bw = row[f"load_only_{mode}_GBps"]
                t.add_row(f"kvtier G2->G1 {mode} ({row['cached_tokens'] // 1024}K)", "",
                          f"{bw:.1f} ({bw / peak:.2f}x)", "")
        s = result["store"]
        t.add_row(f"kvtier G1->G2 D2H into staging ({s['tokens'] // 1024}K)", "", "",
                  f"{s['d2h_only_GBps']:.1f} ({s['d2h_only_GBps'] / peak_d2h:.2f}x)")
        t.add_row("kvtier G1->G2 end to end, in place (committed in DRAM)", "", "",
                  f"{s['end_to_end_GBps']:.1f} ({s['end_to_end_GBps'] / peak_d2h:.2f}x)")
        if "staging_put_GBps" in s:
            t.add_row("kvtier G1->G2 end to end, staging + DramTier.put (former)", "", "",
                      f"{s['staging_put_GBps']:.1f} ({s['staging_put_GBps'] / peak_d2h:.2f}x)")
        console.print(t)
    if "recompute_s" not in (result["ttft"] or [{}])[0]:
        return
    t = Table(title="2. TTFT (ms), cached context + new tokens")
    for col in ("cached", "recompute", "hit bulk", "hit layer-wise", "ideal", "lw/ideal", "speedup lw",
                "logits max|d| / rel", "argmax ="):
        t.add_column(col)
    for r in result["ttft"]:
        t.add_row(f"{r['cached_tokens'] / 1024:g}K+{r['new_tokens']}", f"{r['recompute_s'] * 1e3:.1f}",
                  f"{r['hit_bulk_s'] * 1e3:.1f}", f"{r['hit_layerwise_s'] * 1e3:.1f}", f"{r['ideal_s'] * 1e3:.1f}",
                  f"{r['layerwise_over_ideal']:.2f}", f"{r['speedup_layerwise_vs_recompute']:.1f}x",
                  f"{r['hit_layerwise_logits_maxabs']:.3f} / {r['hit_layerwise_logits_rel_l2']:.4f}",
                  str(r["hit_layerwise_argmax_equal"]))
    console.print(t)
    if "g3" in result:
        t = Table(title="3. G3 (local disk, cold page cache) -> G1 vs recompute (ms)")
        for col in ("cached", "recompute", "G3 hit cold", "G3 hit warm", "G3 load GB/s", "auto", "auto chose",
                    "faster", "correct"):
            t.add_column(col)
        for r in result["g3"]:
            t.add_row(f"{r['cached_tokens'] / 1024:g}K", f"{r['recompute_s'] * 1e3:.1f}",
                      f"{r['g3_hit_cold_s'] * 1e3:.1f}", f"{r['g3_hit_warm_pagecache_s'] * 1e3:.1f}",
                      f"{r['g3_load_cold_GBps']:.2f}", f"{r['auto_s'] * 1e3:.1f}", r["auto_choice"],
                      r["measured_faster"], str(r["choice_correct"]))
        console.print(t)
        console.print({"g3_crossover": result["g3_crossover"], "g2_crossover": result["g2_crossover"]})


if __name__ == "__main__":
    raise SystemExit(main())
