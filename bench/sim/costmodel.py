"""Cost model of the simulator: model shapes, prefill time, and tier transfer times.

Prefill of ``new`` tokens on top of ``cached`` tokens (context ``C = cached + new``) costs::

    flops = 2 * params * new                         # weights: linear in new tokens
          + attn_flops_per_pair * (C**2 - cached**2) / 2   # causal attention over the context
    prefill_s = flops / gpu_flops

``gpu_flops`` is an effective rate, calibrated so that a Llama-3.1-8B prefill of 32K tokens takes
about 1.4 s on one H100 (vLLM, bf16): 5.2e14 linear + 2.8e14 attention FLOPs in 1.4 s = 5.7e14
FLOP/s, ~58% of the H100's dense bf16 peak.  Loading ``b`` bytes of hits from a tier costs
``latency + b / bandwidth`` per tier touched (G2->G1 over pinned PCIe/C2C, disk via NVMe, remote
via the network).  TTFT = loads + prefill (loads are not overlapped with compute: conservative).
Every number is overridable from the command line.

**Measured figures** (``measured``, ``newest_measured``): a ``kvtier.policy.cost.CostModel`` JSON
written by the GPU benchmark (``benchmarks/gpu/results/*cost_model.json``) replaces the prefill
model and the DRAM link (and the disk link where the run measured one).  A request's TTFT
(``request_ttft_s``) is then what the engine's fetch-or-recompute decision
(``kvtier.policy.cost.CostModel.plan``) would pay: it loads only the leading cached chunks that
are worth loading (a disk hit slower than recomputing is recomputed), with loads pipelined
against compute as measured (``stages``), and with ``split`` (the default, as ``KVTierLM``
runs it) a slow-tier hit may be split: its head recomputed while its tail loads
(``kvtier.integrations.hf_split``; measured on an H200 in ``docs/gpu.md``).  vLLM's connector
cannot split (its API loads a prefix only): ``split=False`` models it.  ``decide=False`` models
the cost model off (``KVTierLM(cost="off")``, the connector's ``cost_model: "off"``): every cached
chunk is loaded, however slow its tier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.layout import DEEPSEEK_V3, LLAMA_3_1_8B, LLAMA_3_1_70B, QWEN2_5_7B, KVLayout
from kvtier.policy import cost as runtime


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the cost model needs of a model: its KV layout, weights and attention width."""

    layout: KVLayout
    params: float  # parameters touched per token (active parameters for MoE)
    attn_flops_per_pair: float  # FLOPs of one (query token, key token) pair over all layers


def _gqa(layout: KVLayout, params: float, num_q_heads: int) -> ModelShape:
    # QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, per layer and query head.
    return ModelShape(layout=layout, params=params,
                      attn_flops_per_pair=4.0 * layout.num_layers * num_q_heads * layout.head_dim)


MODEL_SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": _gqa(LLAMA_3_1_8B, 8.0e9, 32),
    "llama-3.1-70b": _gqa(LLAMA_3_1_70B, 70.6e9, 64),
    "qwen2.5-7b": _gqa(QWEN2_5_7B, 7.6e9, 28),
    # MLA: 128 heads, qk dim 192 (128 nope + 64 rope), v dim 128; 37B active parameters.
    "deepseek-v3": ModelShape(layout=DEEPSEEK_V3, params=37e9,
                              attn_flops_per_pair=2.0 * DEEPSEEK_V3.num_layers * 128 * (192 + 128)),
}


def custom_shape(spec: str) -> ModelShape:
    """``custom:layers=32,kv_heads=8,head_dim=128,q_heads=32,params=8e9[,dtype=bfloat16]``."""
    try:
        kv = dict(item.split("=", 1) for item in spec.removeprefix("custom:").split(",") if item)
        layout = KVLayout(model=f"custom/{spec}", num_layers=int(kv["layers"]), num_kv_heads=int(kv["kv_heads"]),
                          head_dim=int(kv["head_dim"]), dtype=kv.get("dtype", "bfloat16"))
        return _gqa(layout, float(kv["params"]), int(kv["q_heads"]))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"bad custom model {spec!r} ({exc!r}); expected "
                          "custom:layers=L,kv_heads=H,head_dim=D,q_heads=Q,params=P") from exc


def model_shape(name: str) -> ModelShape:
    if name.startswith("custom:"):
        return custom_shape(name)
    try:
        return MODEL_SHAPES[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(MODEL_SHAPES)} or custom:...") from None


@dataclass(frozen=True, slots=True)
class Link:
    """Moving bytes out of one tier to the GPU."""

    bandwidth_Bps: float  # bytes per second
    latency_s: float = 0.0  # paid once per request that reads from the tier

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps if nbytes else 0.0


DEFAULT_LINKS: dict[str, Link] = {
    "hbm": Link(bandwidth_Bps=float("inf")),  # already on the GPU
    "dram": Link(bandwidth_Bps=50e9),  # pinned host memory -> GPU (H100 PCIe5 / GH200 C2C class)
    "disk": Link(bandwidth_Bps=5e9, latency_s=100e-6),  # one NVMe drive
    "remote": Link(bandwidth_Bps=2.5e9, latency_s=1e-3),  # 25 GbE-class network store
}


@dataclass(frozen=True, kw_only=True)
class CostModel:
    shape: ModelShape
    gpu_flops: float = 5.7e14  # effective prefill FLOP/s (see module docstring)
    links: dict[str, Link] = field(default_factory=lambda: dict(DEFAULT_LINKS))
    overhead_s: float = 0.005  # scheduling + first decode step
    prefill: runtime.PrefillCost | None = None  # measured prefill (None: the FLOP model above)
    stages: int = 1  # load/compute pipeline depth of the measured engine (1: they add up)
    source: str = "modelled"  # where the figures come from (a cost-model JSON path, or "modelled")
    split: bool = True  # the engine may compute a slow hit's head while its tail loads (KVTierLM does)
    decide: bool = True  # fetch or recompute per request; False: the cost model off, every cached chunk loaded

    def prefill_s(self, cached: int, new: int) -> float:
        context = cached + new
        flops = 2.0 * self.shape.params * new + self.shape.attn_flops_per_pair * (context**2 - cached**2) / 2
        return flops / self.gpu_flops

    def load_s(self, bytes_per_tier: dict[str, int]) -> float:
        return sum(self.links[name].seconds(n) for name, n in bytes_per_tier.items() if name in self.links)

    def ttft_s(self, *, cached: int, new: int, bytes_per_tier: dict[str, int]) -> float:
        return self.overhead_s + self.load_s(bytes_per_tier) + self.prefill_s(cached, new)

    def prefill_cost(self) -> runtime.PrefillCost:
        """The prefill figures in the engine's form (the FLOP model maps onto it exactly)."""
        if self.prefill is not None:
            return self.prefill
        return runtime.PrefillCost(per_token_s=2.0 * self.shape.params / self.gpu_flops,
                                   per_token_ctx_s=self.shape.attn_flops_per_pair / self.gpu_flops)

    def planner(self, tier_names: Sequence[str]) -> runtime.CostModel:
        """The engine's fetch-or-recompute model over these tiers (top first)."""
        links = tuple(runtime.LinkCost(bandwidth_Bps=self.links[n].bandwidth_Bps, latency_s=self.links[n].latency_s)
                      for n in tier_names)
        return runtime.CostModel(links=links, prefill=self.prefill_cost(), stages=self.stages)

    def request_ttft_s(self, planner: runtime.CostModel, hit_chunks: Sequence[int], *, context: int,
                       tokens_per_chunk: int) -> float:
        """TTFT of a request whose hit has ``hit_chunks[t]`` chunks in tier ``t`` (read top tier first),
        loading what ``planner.plan`` decides and recomputing the rest."""
        levels = [t for t, n in enumerate(hit_chunks) for _ in range(n)]
        if not levels:
            return self.overhead_s + self.prefill_cost().seconds(0, context)
        if not self.decide:  # load every usable chunk, whatever it costs; a tier's latency once
            usable = min(len(levels), max(context - 1, 0) // tokens_per_chunk)
            chunk_bytes = self.shape.layout.bytes_per_token * tokens_per_chunk
            load, taken = 0.0, 0
            for level, n in enumerate(hit_chunks):  # top tier first, as ``levels``
                n = min(n, usable - taken)
                taken += n
                load += planner.links[level].seconds(n * chunk_bytes)
            past = usable * tokens_per_chunk
            compute = self.prefill_cost().seconds(past, context - past)
            both = load + compute if self.stages == 1 else max(load, compute) + min(load, compute) / self.stages
            return self.overhead_s + both
        plan = planner.plan(levels, total_tokens=context, tokens_per_chunk=tokens_per_chunk,
                            chunk_bytes=self.shape.layout.bytes_per_token * tokens_per_chunk, split=self.split)
        return self.overhead_s + plan.est_total_s


def measured(path: str | Path, shape: ModelShape, *, disk_from: str | Path | None = None) -> CostModel:
    """Cost model with the figures of a GPU run's JSON (links[0] = DRAM, links[1] = disk if measured).

    ``disk_from``: another run's JSON to take the disk link from, when ``path`` measured none.
    """
    try:
        rt = runtime.CostModel.load(path)
        disk = rt.links[1] if len(rt.links) > 1 else (runtime.CostModel.load(disk_from).links[1] if disk_from else None)
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"cost model {path}: cannot read measured figures ({exc})") from exc
    links = dict(DEFAULT_LINKS)
    links["dram"] = Link(bandwidth_Bps=rt.links[0].bandwidth_Bps, latency_s=rt.links[0].latency_s)
    if disk is not None:
        links["disk"] = Link(bandwidth_Bps=disk.bandwidth_Bps, latency_s=disk.latency_s)
    source = Path(path).name + (f" (disk link: {Path(disk_from).name})" if disk_from and len(rt.links) < 2 else "")
    return CostModel(shape=shape, links=links, prefill=rt.prefill, stages=rt.stages, source=source)


def newest_measured(results: str | Path, shape: ModelShape, *, gpu: str = "h200") -> CostModel:
    """The newest ``<gpu>_run<N>_*cost_model.json`` in ``results`` (by N); its disk link, if it
    measured none, from the newest run that did."""
    runs = sorted(((int(m.group(1)), p) for p in Path(results).glob(f"{gpu}_run*cost_model.json")
                   if (m := re.match(rf"{gpu}_run(\d+)_", p.name))), key=lambda np_: np_[0])
    if not runs:
        raise ConfigError(f"no {gpu}_run*_cost_model.json in {results}")
    with_disk = [p for _, p in runs if len(runtime.CostModel.load(p).links) > 1]
    return measured(runs[-1][1], shape, disk_from=with_disk[-1] if with_disk else None)
