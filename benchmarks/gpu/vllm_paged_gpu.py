"""The vLLM connector's GPU data path on a real GPU, driven as vLLM's model runner would, without vLLM.

vLLM cannot be installed on the GPU machine, so this harness allocates paged KV caches in the
layouts vLLM 0.32's CUDA backends register (``kvtier.integrations.vllm_paged``: HND, NHD, the
cross-layer BLNHC view, MLA) for a Llama-3.1-8B shape, and drives the connector's vLLM-free worker
core (``WorkerCore``) through the calls the connector makes per step: record the compute stream's
event, start loads (sync DRAM hits / async lower-tier hits), save after the forward, finished.

1. exactness: G1 -> kvtier -> G1 bit-identical for every layout, random block tables, 16-token
   blocks in 256-token chunks, a block shared by two requests, a partly-computed first chunk,
   sync and async loads;
2. bandwidth: save and load GB/s of 4K/32K/128K-token requests vs raw pinned torch copies of the
   same bytes, in the same run;
3. no stall: the compute stream's step time (bf16 matmuls) while 32K-token loads and saves run
   vs without transfers.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu/vllm_paged_gpu.py --json $OUT/paged.json
    PYTHONPATH=. python3 benchmarks/gpu/vllm_paged_gpu.py --device cpu --small    # a CPU dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kvtier.hierarchy import ContextMemory
from kvtier.integrations.vllm_config import PagedGeometry, make_layout
from kvtier.integrations.vllm_paged import PagedKV
from kvtier.integrations.vllm_plan import LoadJob, SaveJob
from kvtier.integrations.vllm_worker import WorkerCore
from kvtier.keys import chunk_keys, namespace_key
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

BLOCK, CHUNK = 16, 256
GROUP = [4]  # --group-chunks
M = CHUNK // BLOCK


def allocate(layout: str, num_blocks: int, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
             device: str) -> dict[str, torch.Tensor]:
    """Per-layer KV tensors as vLLM's CUDA backends register them: logical (B, H, N, parts*D)."""
    if layout == "mla":
        return {f"l{i}": torch.randn(num_blocks, BLOCK, head_dim, dtype=dtype, device=device) for i in range(layers)}
    c = 2 * head_dim
    if layout == "hnd":  # LBHNC
        return {f"l{i}": torch.randn(num_blocks, heads, BLOCK, c, dtype=dtype, device=device) for i in range(layers)}
    if layout == "nhd":  # LBNHC: physical (B, N, H, C)
        return {f"l{i}": torch.randn(num_blocks, BLOCK, heads, c, dtype=dtype, device=device).transpose(1, 2)
                for i in range(layers)}
    assert layout == "cross"  # BLNHC: one allocation, blocks outermost
    whole = torch.randn(num_blocks, layers, BLOCK, heads, c, dtype=dtype, device=device)
    return {f"l{i}": whole[:, i].transpose(1, 2) for i in range(layers)}


class Engine:
    """One worker: registered KV + ContextMemory (pinned DRAM [+ disk]) + WorkerCore."""

    def __init__(self, layout: str, *, num_blocks: int, layers: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, dram_chunks: int, disk: Path | None = None,
                 cuda_copy: str = "auto") -> None:
        parts = 1 if layout == "mla" else 2
        self.geometry = PagedGeometry(num_layers=layers, num_kv_heads=1 if layout == "mla" else heads,
                                      head_dim=head_dim, dtype=str(dtype).removeprefix("torch."),
                                      block_size=BLOCK, parts=parts)
        self.kv = allocate(layout, num_blocks, layers, heads, head_dim, dtype, device)
        self.layout = make_layout(self.geometry, chunk_tokens=CHUNK, model_id=f"llama-8b-shaped-{layout}")
        tiers: list[Any] = [DramTier(self.layout, capacity_bytes=dram_chunks * self.layout.chunk_bytes)]
        if disk is not None:
            tiers.append(DiskTier(self.layout, path=disk, capacity_bytes=64 << 30, fsync=False))
        self.memory = ContextMemory(self.layout, tiers, write_through=disk is not None)
        self.paged = PagedKV(self.kv, self.geometry, CHUNK, fmt="packed", group_chunks=GROUP[0],  # CUDA layouts
                             cuda_copy=cuda_copy if device == "cuda" else "auto")
        self.worker = WorkerCore(self.memory, self.paged)
        self.namespace = namespace_key(self.layout)

    def keys(self, tokens: list[int]) -> list[Any]:
        return chunk_keys(tokens, tokens_per_chunk=CHUNK, namespace=self.namespace)

    def save(self, req: str, keys: list[Any], blocks: list[int]) -> None:
        """wait_for_save: submitted after the forward, confirmed through finished()."""
        self.worker.save([SaveJob(req, tuple(keys), tuple(blocks))], self.paged.record())

    def load(self, req: str, keys: list[Any], blocks: list[int], *, start: int, end: int, async_load: bool,
             layerwise: bool = False) -> None:
        ids = tuple(b if j * BLOCK < end and (j + 1) * BLOCK > start else -1 for j, b in enumerate(blocks))
        job = LoadJob(req, 0, start, end, tuple(keys), ids, async_load)
        if async_load:
            self.worker.load_async(job, self.paged.record())
        else:  # start_load_kv queues the copies; here the host then waits for them (wait_for_save does)
            self.worker.load_now(job, self.paged.record(), layerwise=layerwise)
            self.worker.end_step()

    def settle(self, req: str) -> None:
        """Wait until the request's jobs are done and the worker reports it as finished.

        Blocks on the jobs (``flush``) rather than polling ``finished``: a poll every 50 us took
        the GIL from the mover thread hundreds of times per save (vLLM asks once per step)."""
        self.worker.hold([req])
        self.worker.flush([req])
        deadline = time.monotonic() + 600
        while req not in self.worker.finished()[0]:  # the done-callbacks may still be running
            assert time.monotonic() < deadline
            time.sleep(0.0001)

    def close(self) -> None:
        self.worker.close()


def exactness(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for layout in ("hnd", "nhd", "cross", "mla"):
        head_dim = 576 if layout == "mla" else args.head_dim  # DeepSeek's kv_lora_rank 512 + rope 64
        nb = 64 * M
        disk = tmp / f"disk-{layout}-{args.mode}"
        eng = Engine(layout, num_blocks=nb, layers=args.layers, heads=args.heads, head_dim=head_dim,
                     dtype=torch.bfloat16, device=args.device, dram_chunks=16, disk=disk, cuda_copy=args.mode)
        rng = random.Random(7)
        tokens = [rng.randrange(1, 50000) for _ in range(4 * CHUNK + 100)]
        keys = eng.keys(tokens)  # 4 chunks
        table = rng.sample(range(nb // 2), 4 * M)  # random blocks in the first half
        eng.save("a", keys, table)
        shared = table[:M] + rng.sample(range(nb // 2, nb), 3 * M)  # request b shares chunk 0's blocks
        eng.save("b", eng.keys(tokens[:CHUNK] + tokens[CHUNK + 1:4 * CHUNK + 1]), shared)
        eng.settle("a")
        eng.settle("b")
        want = {name: t[table].clone() for name, t in eng.kv.items()}
        results = {}
        for mode, async_load, layerwise in (("sync", False, False), ("async", True, False),
                                            ("layerwise", False, True)):
            dst = rng.sample(range(nb // 2, nb), 4 * M)
            for t in eng.kv.values():
                t[dst] = 0
            start = 3 * BLOCK  # vLLM computed the first 3 blocks itself: those slots are skipped
            eng.load(mode, keys, dst, start=start, end=4 * CHUNK - 1, async_load=async_load, layerwise=layerwise)
            eng.settle(mode)
            if args.device == "cuda":
                torch.cuda.synchronize()
            ok = all(torch.equal(t[dst[3:]], want[name][3:]) for name, t in eng.kv.items())
            skipped_zero = all(not t[dst[:3]].any() for t in eng.kv.values())
            results[mode] = ok and skipped_zero
        # a fresh hierarchy over the same disk: chunks come back from G3 (async), still exact
        eng.memory.flush()
        eng.close()
        again = Engine(layout, num_blocks=nb, layers=args.layers, heads=args.heads, head_dim=head_dim,
                       dtype=torch.bfloat16, device=args.device, dram_chunks=16, disk=disk, cuda_copy=args.mode)
        dst = rng.sample(range(nb), 4 * M)
        again.load("disk", keys, dst, start=0, end=4 * CHUNK - 1, async_load=True)
        again.settle("disk")
        if args.device == "cuda":
            torch.cuda.synchronize()
        results["disk"] = all(torch.equal(again.kv[name][dst], want[name]) for name in want)
        again.close()
        row = {"layout": layout, "cuda_copy": eng.paged.cuda_copy, **results, "chunk_bytes": eng.layout.chunk_bytes}
        print("exactness", row, flush=True)
        rows.append(row)
    return rows


def _timed(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    sizes = [int(s) for s in args.sizes.split(",")]
    nb = args.kv_tokens // BLOCK
    eng = Engine("hnd", num_blocks=nb, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                 dtype=torch.bfloat16, device=args.device, dram_chunks=max(sizes) // CHUNK + 2,
                 cuda_copy=args.mode)
    rows = [_bandwidth_row(eng, size, nb, args) for size in sizes]
    eng.close()
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _raw_copies(nbytes: int, device: str, reps: int) -> tuple[float, float]:
    """Seconds of one raw pinned D2H and H2D copy of ``nbytes`` (the baseline, same run)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    t_d2h = _timed(lambda: (host.copy_(dev, non_blocking=True), _sync(device)), reps)
    t_h2d = _timed(lambda: (dev.copy_(host, non_blocking=True), _sync(device)), reps)
    return t_d2h, t_h2d


def _bandwidth_row(eng: Engine, size: int, nb: int, args: argparse.Namespace) -> dict[str, Any]:
    n = size // CHUNK
    nbytes = n * eng.layout.chunk_bytes
    rng = random.Random(size)
    t_d2h, t_h2d = _raw_copies(nbytes, args.device, args.reps)
    blocks = rng.sample(range(nb), n * M)  # a fragmented block table, as after hours of serving
    seq = [0]

    def save() -> float:
        """Seconds from wait_for_save's submit to the worker reporting the request (not the eviction).

        The keys are computed before the clock starts: in vLLM the scheduler hashes them and the
        save job carries them (``SaveJob.keys``), so they are not the worker's cost."""
        seq[0] += 1
        eng.memory.delete(eng.keys([size + seq[0] - 1] * (n * CHUNK)))  # room for this one, untimed
        keys = eng.keys([size + seq[0]] * (n * CHUNK))
        _sync(args.device)
        t0 = time.perf_counter()
        eng.save(f"s{size}-{seq[0]}", keys, blocks)
        eng.settle(f"s{size}-{seq[0]}")
        return time.perf_counter() - t0

    save()
    t_save = statistics.median(save() for _ in range(args.reps))

    def save_direct() -> float:
        """The same save on this thread, no mover: the copies and the hierarchy's bookkeeping."""
        seq[0] += 1
        eng.memory.delete(eng.keys([size + seq[0] - 1] * (n * CHUNK)))
        keys = eng.keys([size + seq[0]] * (n * CHUNK))
        after = eng.paged.record()
        _sync(args.device)
        t0 = time.perf_counter()
        with eng.memory.store_in_place(keys) as op:
            eng.paged.gather_into(op.views, blocks, after)
        return time.perf_counter() - t0

    t_save_direct = statistics.median(save_direct() for _ in range(args.reps))
    keys = eng.keys([size + seq[0]] * (n * CHUNK))
    dst = rng.sample(range(nb), n * M)

    def load() -> None:
        seq[0] += 1
        eng.load(f"l{size}-{seq[0]}", keys, dst, start=0, end=n * CHUNK, async_load=False)
        _sync(args.device)

    load()
    t_load = _timed(load, args.reps)

    def borrow_only() -> None:
        with eng.memory.borrow_prefix(keys) as views:
            assert len(views) == n

    def copy_only() -> None:  # where a load's time goes: the copies alone, views borrowed already
        with eng.memory.borrow_prefix(keys) as views:
            _sync(args.device)
            t0 = time.perf_counter()
            eng.paged.scatter_from(views, dst, None)
            _sync(args.device)
            spent.append(time.perf_counter() - t0)

    spent: list[float] = []
    t_borrow = _timed(borrow_only, args.reps)
    for _ in range(args.reps):
        copy_only()
    pool_d2h, pool_h2d, split_d2h = _pool_copies(eng, n, args)
    if args.profile and size == min(int(s) for s in args.sizes.split(",")):
        _profile(save_direct, load)
    if args.timeline and size == min(int(s) for s in args.sizes.split(",")) and args.device == "cuda":
        _timeline(save, "save")
        _timeline(load, "load")
    eng.memory.delete(keys)
    stream = _save_stream(eng, n, blocks, args)  # the DRAM tier is empty again: room for k requests
    behind = _save_behind_forward(eng, n, blocks, args)
    row = {"cuda_copy": eng.paged.cuda_copy, "tokens": size, "bytes": nbytes,
           "raw_d2h_gbps": nbytes / t_d2h / 1e9, "save_gbps": nbytes / t_save / 1e9, "save_vs_raw": t_d2h / t_save,
           "save_s": t_save, "save_direct_s": t_save_direct, "raw_d2h_s": t_d2h,
           "raw_h2d_gbps": nbytes / t_h2d / 1e9, "load_gbps": nbytes / t_load / 1e9, "load_vs_raw": t_h2d / t_load,
           "raw_pool_d2h_s": pool_d2h, "raw_pool_h2d_s": pool_h2d, "raw_grouped_d2h_s": split_d2h,
           "load_borrow_s": t_borrow, "load_copies_s": statistics.median(spent), "load_s": t_load, "raw_h2d_s": t_h2d,
           **stream, **behind}
    print("bandwidth", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def _save_stream(eng: Engine, n: int, blocks: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Sustained saves: ``k`` requests' saves submitted back to back (requests finishing in
    consecutive steps) until all are reported, vs ``k`` raw D2H copies of the same bytes back to
    back.  The mover works through the queue, so its hand-off is paid once, not per request."""
    k = min(8, (eng.memory.tiers[0].capacity_bytes // eng.layout.chunk_bytes - 2) // n)
    if k < 2 or args.device != "cuda":
        return {}
    nbytes = n * eng.layout.chunk_bytes
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t_raw = _timed(lambda: ([host.copy_(dev, non_blocking=True) for _ in range(k)], _sync("cuda")), args.reps)
    batch = [0]

    def burst() -> float:
        batch[0] += 1
        old = [eng.keys([1_000_000 + batch[0] - 1, i] * (n * CHUNK // 2)) for i in range(k)]
        for keys in old:
            eng.memory.delete(keys)  # the previous burst's chunks, untimed
        new = [eng.keys([1_000_000 + batch[0], i] * (n * CHUNK // 2)) for i in range(k)]
        _sync("cuda")
        t0 = time.perf_counter()
        for i, keys in enumerate(new):
            eng.save(f"burst{batch[0]}-{i}", keys, blocks)
        for i in range(k):
            eng.settle(f"burst{batch[0]}-{i}")
        return time.perf_counter() - t0

    burst()
    t = statistics.median(burst() for _ in range(args.reps))
    for i in range(k):
        eng.memory.delete(eng.keys([1_000_000 + batch[0], i] * (n * CHUNK // 2)))
    return {"stream_requests": k, "stream_save_s": t, "stream_raw_d2h_s": t_raw, "stream_save_vs_raw": t_raw / t}


def _save_behind_forward(eng: Engine, n: int, blocks: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """The save as vLLM issues it: ``wait_for_save`` right after the forward is *queued*, while the
    GPU still runs it.  A stand-in forward (bf16 matmuls, ~20 ms) is queued, then the save (waiting
    on its event) or a raw D2H of the same bytes (waiting on the same kind of event); the tail is
    the time after the forward alone, so the worker's host work before its first copy is hidden
    behind the forward, as it is in serving."""
    if args.device != "cuda":
        return {}
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    nbytes = n * eng.layout.chunk_bytes
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()

    def forward() -> None:
        for _ in range(80):
            a.mm(a)

    def fwd_only() -> None:
        forward()
        _sync("cuda")

    def raw() -> None:
        forward()
        done = eng.paged.record()
        with torch.cuda.stream(side):
            side.wait_event(done)
            host.copy_(dev, non_blocking=True)
        _sync("cuda")

    seq = [0]

    def ours() -> float:
        seq[0] += 1
        eng.memory.delete(eng.keys([2_000_000, seq[0] - 1] * (n * CHUNK // 2)))
        keys = eng.keys([2_000_000, seq[0]] * (n * CHUNK // 2))
        _sync("cuda")
        t0 = time.perf_counter()
        forward()
        eng.save(f"behind{seq[0]}", keys, blocks)
        eng.settle(f"behind{seq[0]}")
        return time.perf_counter() - t0

    fwd_only()
    t_fwd = _timed(fwd_only, args.reps)
    raw()
    t_raw = _timed(raw, args.reps)
    ours()
    t_ours = statistics.median(ours() for _ in range(args.reps))
    eng.memory.delete(eng.keys([2_000_000, seq[0]] * (n * CHUNK // 2)))
    return {"behind_forward_s": t_fwd, "behind_raw_tail_s": t_raw - t_fwd, "behind_save_tail_s": t_ours - t_fwd,
            "behind_save_vs_raw": (t_raw - t_fwd) / (t_ours - t_fwd)}


def _pool_copies(eng: Engine, n: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Raw copies into the DRAM tier's own pinned pool (one copy each way), and D2H cut into the
    connector's groups (1, then ``--group-chunks`` chunks): what the pool and the grouping cost."""
    if args.device != "cuda":
        return 0.0, 0.0, 0.0
    pool = eng.memory.tiers[0].pool  # the pinned slots, as a torch tensor
    nbytes = n * eng.layout.chunk_bytes
    host = pool[:nbytes]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h = _timed(lambda: (host.copy_(dev, non_blocking=True), _sync("cuda")), args.reps)
    h2d = _timed(lambda: (dev.copy_(host, non_blocking=True), _sync("cuda")), args.reps)
    cuts, at, size = [], 0, 1
    while at < n:
        cuts.append((at, min(n, at + size)))
        at, size = at + size, GROUP[0]
    cb = eng.layout.chunk_bytes

    def grouped() -> None:
        for a, b in cuts:
            host[a * cb:b * cb].copy_(dev[a * cb:b * cb], non_blocking=True)
        _sync("cuda")

    return d2h, h2d, _timed(grouped, args.reps)


def _timeline(fn: Any, name: str) -> None:
    """One call under torch.profiler: every GPU copy and kernel, and the host's CUDA calls, in
    microseconds from the call's start (where the time between raw-rate DMAs goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        _sync("cuda")
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type.name == "CUDA" or "cudaMemcpy" in e.name
              or "cudaLaunch" in e.name or "Synchronize" in e.name or "cuLaunch" in e.name]
    events.sort(key=lambda e: e.time_range.start)
    start = min((e.time_range.start for e in prof.events()), default=0)
    print(f"timeline of one {name}: wall {wall * 1e3:.2f} ms (profiled)", flush=True)
    for e in events[:80]:
        print(f"  {e.device_type.name:4} {e.time_range.start - start:9.0f} us +{e.time_range.elapsed_us():8.0f} us  "
              f"{e.name[:70]}", flush=True)


def _profile(*fns: Any) -> None:
    """Where the host time of the smallest size goes (cProfile, top functions by own time)."""
    import cProfile
    import pstats

    for fn in fns:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            fn()
        prof.disable()
        print(f"profile of 20 x {fn.__name__}:", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def no_stall(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Compute-stream step time with and without 32K-token loads + saves in flight."""
    if args.device != "cuda":
        return {}
    n = args.stall_tokens // CHUNK
    nb = max(4 * n * M, 1024)
    eng = Engine("hnd", num_blocks=nb, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                 dtype=torch.bfloat16, device="cuda", dram_chunks=2 * n + 2, cuda_copy=args.mode)
    a = torch.randn(args.matmul, args.matmul, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(args.matmul, args.matmul, dtype=torch.bfloat16, device="cuda")

    def step() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a.mm(b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    for _ in range(5):
        step()
    quiet = [step() for _ in range(args.steps)]
    rng = random.Random(5)
    keys = eng.keys([1] * (n * CHUNK))
    eng.save("warm", keys, rng.sample(range(nb), n * M))
    eng.settle("warm")
    stop = threading.Event()
    moved = [0]

    def transfers() -> None:  # what the connector does while vLLM keeps stepping: loads and saves
        i = 0
        while not stop.is_set():
            i += 1
            eng.load(f"l{i}", keys, rng.sample(range(nb), n * M), start=0, end=n * CHUNK, async_load=True)
            other = eng.keys([i + 10] * (n * CHUNK))
            eng.save(f"s{i}", other, rng.sample(range(nb), n * M))
            eng.settle(f"l{i}")
            eng.settle(f"s{i}")
            eng.memory.delete(other)
            moved[0] += 2 * n * eng.layout.chunk_bytes

    mover = threading.Thread(target=transfers)
    mover.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    busy = [step() for _ in range(args.steps)]
    elapsed = time.perf_counter() - t0
    stop.set()
    mover.join()
    eng.close()
    row = {"cuda_copy": eng.paged.cuda_copy, "tokens": args.stall_tokens, "step_s_quiet": statistics.median(quiet),
           "step_s_busy": statistics.median(busy), "ratio": statistics.median(busy) / statistics.median(quiet),
           "p90_ratio": sorted(busy)[int(0.9 * len(busy))] / sorted(quiet)[int(0.9 * len(quiet))],
           "transfer_gbps_during": moved[0] / elapsed / 1e9}
    print("no_stall", row, flush=True)
    return row


def layerwise(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A step that loads a 32K-token DRAM hit and then runs a forward (per layer a bf16 matmul
    standing in for the suffix's prefill): the host waiting for the copies before launching the
    forward (the connector before), the compute stream waiting for all of them (bulk), or each
    layer for its own (layer-wise), vs the ideal max(raw H2D of the bytes, the forward alone)."""
    if args.device != "cuda":
        return {}
    n = args.stall_tokens // CHUNK
    nb = max(2 * n * M, 1024)
    eng = Engine("hnd", num_blocks=nb, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                 dtype=torch.bfloat16, device="cuda", dram_chunks=n + 2, cuda_copy=args.mode)
    rng = random.Random(9)
    keys = eng.keys([3] * (n * CHUNK))
    eng.save("warm", keys, rng.sample(range(nb), n * M))
    eng.settle("warm")
    x = torch.randn(args.suffix, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 6 * 4096, dtype=torch.bfloat16, device="cuda")

    def forward(wait: Any) -> None:
        for layer in range(args.layers):
            wait(layer)
            x.mm(w)

    def compute_only() -> None:
        forward(lambda layer: None)
        torch.cuda.synchronize()

    def step(how: str) -> float:
        job = LoadJob(how, 0, 0, n * CHUNK, tuple(keys), tuple(rng.sample(range(nb), n * M)), False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.worker.load_now(job, eng.paged.record(), layerwise=how == "layerwise")
        if how == "host_waits":
            eng.worker.end_step()
            forward(lambda layer: None)
        elif how == "bulk":
            eng.worker.wait_loads()
            forward(lambda layer: None)
        else:
            forward(eng.worker.wait_layer)
        torch.cuda.synchronize()
        spent = time.perf_counter() - t0
        eng.worker.end_step()
        return spent

    compute_only()
    t_compute = _timed(compute_only, args.reps)
    _, t_h2d = _raw_copies(n * eng.layout.chunk_bytes, "cuda", args.reps)
    row: dict[str, Any] = {"cuda_copy": eng.paged.cuda_copy, "tokens": n * CHUNK, "suffix": args.suffix,
                           "forward_s": t_compute, "raw_h2d_s": t_h2d, "ideal_s": max(t_compute, t_h2d)}
    for how in ("host_waits", "bulk", "layerwise"):
        step(how)
        row[f"{how}_s"] = statistics.median(step(how) for _ in range(args.reps))
        row[f"{how}_vs_ideal"] = row[f"{how}_s"] / row["ideal_s"]
    eng.close()
    print("layerwise", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sizes", default="4096,32768,131072")
    p.add_argument("--kv-tokens", type=int, default=262144, help="KV cache capacity (blocks) to allocate")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stall-tokens", type=int, default=32768)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--matmul", type=int, default=8192)
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run)")
    p.add_argument("--only", default="exactness,bandwidth,stall,layerwise")
    p.add_argument("--suffix", type=int, default=2048, help="layerwise: tokens of the stand-in forward")
    p.add_argument("--cuda-copy", default="fused,torch", help="PagedKV cuda_copy modes to run, in turn")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="cProfile the smallest size's save and load")
    p.add_argument("--timeline", action="store_true", help="torch.profiler timeline of the smallest size's "
                   "save and load (GPU copies and kernels, host CUDA calls)")
    p.add_argument("--group-chunks", type=int, default=4, help="PagedKV group_chunks (chunks per DMA)")
    args = p.parse_args()
    GROUP[0] = args.group_chunks
    if args.small:
        args.layers, args.heads, args.head_dim, args.sizes, args.kv_tokens, args.reps = 2, 2, 64, "512,1024", 8192, 2
    import tempfile

    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
                           "torch": torch.__version__, "shape": {"layers": args.layers, "kv_heads": args.heads,
                                                                "head_dim": args.head_dim, "dtype": "bfloat16",
                                                                "block": BLOCK, "chunk": CHUNK}}
    only = set(args.only.split(","))
    modes = args.cuda_copy.split(",") if args.device == "cuda" else ["auto"]
    for section, run in (("exactness", exactness), ("bandwidth", bandwidth), ("stall", no_stall),
                         ("layerwise", layerwise)):
        if section not in only:
            continue
        rows = []
        for args.mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                got = run(args, Path(tmp))
            rows += got if isinstance(got, list) else [got]
        out[section] = rows
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
