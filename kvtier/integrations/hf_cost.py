"""``KVTierLM``'s default fetch-or-recompute model: calibrated at start-up, refined from every request.

``KVTierLM(model, memory)`` (``cost="auto"``, the default) builds one; ``cost="off"`` (or None)
loads every usable cached chunk, a ``CostModel`` is a fixed, measured model.  No third cost
model: the figures are the ones the vLLM connector uses too (``kvtier.integrations.calibrate``,
payload-free and engine-free), the decision is ``kvtier.policy.cost.CostModel.plan``.

* **At start-up** (``calibrate_cost``; ``AutoCost.calibration_s`` says what it took, logged at INFO):
  the **DRAM link** from a timed copy of staged chunks into a prompt's KV on the model's device
  (``CopyEngine``, bulk, best of three after a warm one); the **disk link** from a cold read of two
  chunk files in the disk tier's format under its root (``calibrate.measure_disk``), in series
  with the DRAM link (a disk hit is read into DRAM, then copied); G4 a conservative default
  (``calibrate.G4_LINK``); the **prefill**'s shape (linear vs attention work) from the model's
  FLOPs over a timed matmul of its MLP shape (``calibrate.measure_matmul``, ``prefill_prior``),
  its scale and a fixed cost per forward from timed forwards of a chunk and of four (``scaled_prior``):
  a small model's time is mostly per-forward overheads that FLOPs miss (a tiny CPU model: 100x).
* **Online** (``OnlineCost``): every read from a tier below DRAM is a ``LoadSample`` (host time of
  the read into DRAM or staging plus the DRAM link's estimate of the copy to the device); on CPU the
  copy of DRAM chunks into the KV too (on CUDA it is queued on the load stream, untimed); every
  forward of a prompt's suffix is a ``ForwardSample`` (host clock on CPU, CUDA events read once
  they are done on CUDA, so no request waits for them), except one that waited for a layer-wise
  load.  Each tier's bandwidth is a decaying ratio of bytes over seconds, the prefill a decaying
  ratio of measured over predicted seconds applied to the prior's coefficients.
* **Stages**: with layer-wise loads (CUDA) load and compute overlap per layer (``stages`` =
  layers); otherwise they add up.

``Decisions`` counts what was decided for each prompt that found cached chunks (``load_all``,
``load_head``, ``recompute``, ``split``; the vLLM connector's names plus the split), each logged
at DEBUG on ``kvtier.integrations.hf``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from kvtier.hierarchy import ContextMemory
from kvtier.integrations.calibrate import (
    ForwardSample,
    LoadSample,
    ModelShape,
    OnlineCost,
    best_seconds,
    calibrate,
    default_links,
    describe,
    flops_or_default,
    prefill_prior,
    sync_device,
)
from kvtier.integrations.hf_attention import lower_right_attention
from kvtier.policy.cost import CostModel, FetchPlan, PrefillCost
from kvtier.tiers.cuda import CopyEngine

log = logging.getLogger("kvtier.integrations.hf")

AUTO, OFF = "auto", "off"


@dataclass(slots=True)
class Decisions:
    """Fetch-or-recompute decisions of prompts whose hit offered cached chunks."""

    load_all: int = 0  # every usable cached chunk loaded (also every decision with the cost model off)
    load_head: int = 0  # a leading part loaded, the rest recomputed
    recompute: int = 0  # nothing loaded: recomputing was estimated faster
    split: int = 0  # a head recomputed while the tail loaded (``hf_split``)

    def count(self, plan: FetchPlan | None, cached: int, loaded: int) -> str:
        """Count one decision (``plan`` None: the cost model is off) and return its name."""
        if plan is not None and plan.is_split:
            name = "split"
        else:
            want = plan.load_chunks if plan is not None else loaded
            name = "load_all" if want >= cached else "recompute" if want == 0 else "load_head"
        setattr(self, name, getattr(self, name) + 1)
        return name

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class AutoCost:
    """The default model of one ``KVTierLM``: ``model`` for ``plan``, ``observe_*`` to refine it."""

    def __init__(self, online: OnlineCost, *, stages: int, tiers: list[str], calibration_s: float) -> None:
        self.online = online
        self.stages = stages
        self.tiers = tiers
        self.calibration_s = calibration_s  # what calibrating at start-up cost
        self._base: CostModel | None = None
        self._model: CostModel | None = None

    @property
    def model(self) -> CostModel:
        base = self.online.model  # rebuilt by OnlineCost only after new samples
        if base is not self._base or self._model is None:
            self._base, self._model = base, dataclasses.replace(base, stages=self.stages)
        return self._model

    def link_Bps(self, level: int) -> float:
        return self.model.links[level].bandwidth_Bps

    def observe_read(self, level: int, nbytes: int, seconds: float) -> None:
        """``nbytes`` read from tier ``level`` into host memory in ``seconds``; the copy on to the
        device is added at the DRAM link's rate (the link figures are end to end)."""
        if level > 0 and nbytes > 0:
            self.online.observe_load(LoadSample(level, nbytes, seconds + nbytes / self.link_Bps(0)))

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        """``nbytes`` of DRAM chunks copied into a prompt's KV in ``seconds`` (host-synchronous copies)."""
        if nbytes > 0:
            self.online.observe_load(LoadSample(0, nbytes, seconds))

    def observe_forward(self, past: int, new: int, seconds: float) -> None:
        if new > 0:
            self.online.observe_forward(ForwardSample(new, new * (past + new / 2), seconds))

    def describe(self) -> str:
        return describe(self.model, self.tiers)


def calibrate_cost(model: Any, memory: ContextMemory, engine: CopyEngine, *, layerwise: bool) -> AutoCost:
    """Measure the links and the prefill at start-up (see the module docstring)."""
    t0 = time.perf_counter()
    layout = memory.layout
    cfg = model.config.get_text_config(decoder=True)
    param = next(model.parameters())
    roots = [r for t in memory.tiers if (r := t.shared_root()) is not None]
    root: Path | None = roots[0].root.parent if roots else None  # the configured path (vllm.py passes that)
    shape = ModelShape.from_hf_config(cfg)
    calibration = calibrate(dram_Bps=time_copy(engine), layout=layout, disk_root=root, shape=shape,
                            dtype=param.dtype, device=param.device)
    tiers = [t.name for t in memory.tiers]
    device = engine.device.type
    links, fixed = default_links(tiers, calibration, device=device, fixed={})
    prior = prefill_prior(shape, flops_or_default(calibration, device))
    online = OnlineCost(links, scaled_prior(model, prior, max(layout.tokens_per_chunk, 64)), fixed=fixed,
                        chunk_bytes=layout.chunk_bytes)
    stages = layout.num_layers if layerwise and engine.is_cuda else 1
    cost = AutoCost(online, stages=stages, tiers=tiers, calibration_s=time.perf_counter() - t0)
    log.info("kvtier: fetch or recompute calibrated in %.3f s: %s", cost.calibration_s, cost.describe())
    return cost


def scaled_prior(model: Any, prior: PrefillCost, tokens: int) -> PrefillCost:
    """``prior`` (from FLOPs) fitted to timed forwards of ``tokens`` and ``4 * tokens`` new tokens
    (the best of two each, after a warm one): a scale for its coefficients, plus a fixed cost per
    forward (a small model's time is mostly per-forward overheads that FLOPs do not see)."""
    cfg = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    sizes = (tokens, 4 * tokens)
    ids = torch.randint(0, cfg.vocab_size, (1, sizes[-1]), generator=torch.Generator().manual_seed(0)).to(device)
    times = {n: float("inf") for n in sizes}
    with torch.no_grad():
        model(input_ids=ids[:, :sizes[0]], logits_to_keep=1)  # warm-up
        for n in (*sizes, *sizes):
            sync_device(device)
            t0 = time.perf_counter()
            model(input_ids=ids[:, :n], logits_to_keep=1)
            sync_device(device)
            times[n] = min(times[n], time.perf_counter() - t0)
    (na, nb), (ta, tb) = sizes, (times[sizes[0]], times[sizes[1]])
    pa, pb = prior.seconds(0, na), prior.seconds(0, nb)
    s = (tb - ta) / (pb - pa) if pb > pa else 0.0
    fixed = ta - s * pa
    if not (s > 0 and fixed >= 0):  # noise (a busy host): no fixed cost, the larger forward's scale
        s, fixed = tb / pb if pb > 0 else 1.0, 0.0
    return PrefillCost(fixed_s=prior.fixed_s * s + fixed, per_token_s=prior.per_token_s * s,
                       per_token_ctx_s=prior.per_token_ctx_s * s)


def time_copy(engine: CopyEngine, *, chunks: int = 2, repeats: int = 3) -> float | None:
    """Bytes/s of a bulk copy of ``chunks`` staged chunks into a prompt's KV on the device: the
    best of ``repeats`` after a warm one (the staging is pinned on CUDA, as the DRAM pool is)."""
    chunks = min(chunks, engine.group_chunks)
    views = engine.views(engine.load_staging, chunks)

    def copy() -> None:
        load = engine.start_load(chunks, layerwise=False)
        load.copy_chunks(views)
        load.finish()
        load.wait_host()

    best = best_seconds(copy, repeats=repeats)  # each copy waits for itself
    return chunks * engine.layout.chunk_bytes / best if best > 0 else None


class ForwardTimer:
    """Times forwards without making a request wait: host clock on CPU; on CUDA a pair of events
    per forward, read at a later call once the end event is done."""

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self._pending: list[tuple[Any, Any, int, int]] = []

    def start(self) -> Any:
        return self._event() if self.engine.is_cuda else time.perf_counter()

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.engine.device))
        return event

    def stop(self, started: Any, past: int, new: int, cost: AutoCost) -> None:
        if not self.engine.is_cuda:
            cost.observe_forward(past, new, time.perf_counter() - started)
            return
        self._pending.append((started, self._event(), past, new))
        self.poll(cost)

    def poll(self, cost: AutoCost) -> None:
        """Observe the forwards whose end events are done."""
        while self._pending and self._pending[0][1].query():
            start, end, past, new = self._pending.pop(0)
            cost.observe_forward(past, new, start.elapsed_time(end) / 1e3)


@torch.no_grad()
def calibrate_prefill(model: Any, *, points: Sequence[tuple[int, int]] = ((0, 512), (0, 2048), (0, 4096),
                                                                          (4096, 256), (2048, 1024)),
                      repeats: int = 2, vocab: int | None = None, lower_right: bool = True) -> PrefillCost:
    """Measure prefill times at ``(past, new)`` token counts and fit a ``PrefillCost``.

    Run once per model and box; save it with the link figures as a ``CostModel`` JSON.
    ``lower_right``: attend over a past as ``KVTierLM`` does (its argument of that name).
    """
    device = next(model.parameters()).device
    vocab = vocab or model.config.get_text_config(decoder=True).vocab_size
    with lower_right_attention(model, lower_right):
        samples = _time_prefills(model, points, repeats, vocab, device)
    return PrefillCost.fit(samples)


def _time_prefills(model: Any, points: Sequence[tuple[int, int]], repeats: int, vocab: int,
                   device: torch.device) -> list[tuple[int, int, float]]:
    gen = torch.Generator().manual_seed(0)
    samples: list[tuple[int, int, float]] = []
    for past, new in points:
        ids = torch.randint(0, vocab, (1, past + new), generator=gen).to(device)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            cache = DynamicCache()
            if past:
                model(input_ids=ids[:, :past], past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync_device(device)
            t0 = time.perf_counter()
            model(input_ids=ids[:, past:], past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync_device(device)
            times.append(time.perf_counter() - t0)
        samples.append((past, new, float(np.median(times[1:]))))
    return samples
