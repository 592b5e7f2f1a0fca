"""The fetch-or-recompute figures both engine integrations use: measured at start-up, refined online.

One implementation for the vLLM connector (``kvtier.integrations.vllm_cost``: two processes, a
calibration file between them) and ``KVTierLM`` (``kvtier.integrations.hf_cost``: one process).
Payload-free and engine-free: no vLLM or transformers import, torch only inside the functions
that time the device.  The decision itself is ``kvtier.policy.cost.CostModel.plan``.

* **links** (one per tier, top first; end to end: bytes from the tier into the engine's KV).
  The DRAM link is the engine's own timed copy (each integration measures it: a scatter into
  vLLM's blocks, a copy into a prompt's KV).  The disk link is a cold read of two chunk files
  written in the disk tier's own format with their pages dropped from the page cache
  (``measure_disk``: ``posix_fadvise DONTNEED`` after ``fsync``, as after a restart); a disk hit
  reads into DRAM, then copies: the two rates in series (``in_series``).  G4 (Redis, Mooncake) has
  no cheap honest probe at start-up: a conservative 1 GB/s and 1 ms per request (``G4_LINK``).
  ``default_links``: a tier's fixed figure (vLLM's ``link_rates``) is never measured, never refined.
* **prefill**: FLOPs from the model's shape (``ModelShape``: linear layers ``2 * params`` per
  token, attention ``4 * layers * heads * head_dim`` per token pair) over a device throughput
  measured with a matmul of the model's MLP shape (``measure_matmul``).  Attention is counted at
  half that throughput; no fixed cost (it cancels out of load-vs-recompute: both compute a suffix).
* **online** (``OnlineCost``): timed loads (``LoadSample``) and prefill forwards
  (``ForwardSample``).  Each tier's bandwidth is an exponentially weighted ratio of bytes over
  seconds, the prefill a weighted ratio of measured over predicted seconds applied to the prior's
  coefficients (the shape of the cost comes from FLOPs; a free 3-term fit to a live mix of batches
  is ill-conditioned).  Both start from the start-up figure as a pseudo-sample that decays away.

Asymmetry of errors: loading a hit that is slower than recomputing it loses time; recomputing a
hit that was faster to load loses only the hit.  So defaults err on fast compute and slow links.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier._fs import atomic_write
from kvtier.layout import KVLayout
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost

# The vLLM connector's logger, which vLLM prints; KVTierLM's calibration logs here too (as before
# these helpers moved out of ``vllm_cost``).
logger = logging.getLogger("vllm.kvtier")

DEFAULT_DRAM_BPS = {"cuda": 10e9, "cpu": 5e9}  # copy from DRAM into the engine's KV, when not measured
DEFAULT_DISK_BPS = 1.5e9  # a cold NVMe read with checksum, when not measured
DEFAULT_FLOPS = {"cuda": 1e15, "cpu": 1e12}  # fast on purpose: see the module doc
G4_LINK = LinkCost(bandwidth_Bps=1e9, latency_s=1e-3)
ATTENTION_EFFICIENCY = 0.5  # attention reaches about half the throughput of a large matmul


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the prefill's FLOPs depend on (one worker's share under tensor parallelism)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_hf_config(cls, hf: Any, tp: int = 1) -> ModelShape:
        """From a transformers config (vLLM's ``model_config.hf_text_config``)."""
        hidden = int(hf.hidden_size)
        heads = int(hf.num_attention_heads)
        head_dim = int(getattr(hf, "head_dim", None) or hidden // heads)
        kv = int(getattr(hf, "num_key_value_heads", None) or heads)
        inter = int(getattr(hf, "intermediate_size", None) or 4 * hidden)
        return cls(num_layers=int(hf.num_hidden_layers), hidden=hidden, num_heads=max(1, heads // tp),
                   num_kv_heads=max(1, kv // tp), head_dim=head_dim, intermediate=max(1, inter // tp))

    def linear_flops_per_token(self) -> float:
        attn = self.hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)  # q, o; k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return 2.0 * self.num_layers * (attn + mlp)

    def attention_flops_per_pair(self) -> float:
        return 4.0 * self.num_layers * self.num_heads * self.head_dim  # QK^T and PV


def prefill_prior(shape: ModelShape, flops_per_s: float) -> PrefillCost:
    return PrefillCost(fixed_s=0.0, per_token_s=shape.linear_flops_per_token() / flops_per_s,
                       per_token_ctx_s=shape.attention_flops_per_pair() / (flops_per_s * ATTENTION_EFFICIENCY))


def in_series(*bandwidths: float) -> float:
    """One byte crosses every link in turn: the bandwidth of the whole path."""
    return 1.0 / sum(1.0 / b for b in bandwidths)


# --- start-up measurements -------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """What was measured at start-up (bytes per second; None: not measured)."""

    device: str  # "cuda" or "cpu"
    dram_Bps: float | None = None  # DRAM slot -> the engine's KV (end to end)
    disk_Bps: float | None = None  # a cold read of a chunk file, checksum verified (into DRAM)
    flops_per_s: float | None = None  # matmul of the model's MLP shape in the model's dtype
    seconds: float = 0.0  # what calibrating cost

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        return cls(device=str(data["device"]), dram_Bps=_positive(data.get("dram_Bps")),
                   disk_Bps=_positive(data.get("disk_Bps")), flops_per_s=_positive(data.get("flops_per_s")),
                   seconds=float(data.get("seconds", 0.0)))

    def save(self, path: Path) -> None:
        # atomic, not durable: the reader takes it at once; a crash loses nothing (``take``
        # reads an unreadable file as none: defaults until measured online)
        atomic_write(path, self.to_json().encode(), fsync=False)

    @classmethod
    def take(cls, path: Path) -> Calibration | None:
        """Read and remove a saved calibration; None if there is none or it is unreadable."""
        try:
            calibration = cls.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.debug("kvtier: no start-up calibration at %s (%s): defaults until measured online", path, exc)
            return None
        with contextlib.suppress(OSError):
            path.unlink()
        return calibration


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def flops_or_default(calibration: Calibration | None, device: str) -> float:
    """The measured device throughput, else the (fast on purpose) default of ``device``'s kind."""
    return (calibration.flops_per_s if calibration else None) or DEFAULT_FLOPS.get(device, DEFAULT_FLOPS["cuda"])


def sync_device(device: Any) -> None:
    """Wait for the work queued on ``device`` if it is a CUDA device (CPU work is done on return)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], object], *, repeats: int = 3, device: Any = None) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``run`` after a warm one (untimed).

    ``device``: a device whose queued work each call is timed to the end of (``sync_device``
    before and after); None: ``run`` returns once its work is done."""
    best = float("inf")
    for i in range(repeats + 1):
        if device is not None:
            sync_device(device)
        t0 = time.perf_counter()
        run()
        if device is not None:
            sync_device(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul(shape: ModelShape, dtype: Any, device: Any, *, tokens: int | None = None) -> float:
    """FLOP/s of ``(tokens, hidden) @ (hidden, intermediate)`` on ``device``: best of 3 after a warm one."""
    import torch

    tokens = tokens or (1024 if torch.device(device).type == "cuda" else 128)
    a = torch.randn(tokens, shape.hidden, dtype=dtype, device=device)
    b = torch.randn(shape.hidden, shape.intermediate, dtype=dtype, device=device)
    best = best_seconds(lambda: a @ b, repeats=3, device=device)  # a and b are freed on return
    return 2.0 * tokens * shape.hidden * shape.intermediate / max(best, 1e-9)


def measure_disk(layout: KVLayout, root: Path, *, num_chunks: int = 2) -> float | None:
    """Bytes/s of cold reads of chunk files in the disk tier's format (``DiskTier``), or None.

    The files are written under ``root/.calibrate-<random>`` with fsync, their pages dropped
    (``posix_fadvise DONTNEED``: clean pages leave the page cache), read back with the tier's
    verified read, and removed.  On a memory-backed file system (tmpfs) the pages are the
    storage: the rate read is the tier's real one there too."""
    from kvtier.keys import ChunkKey
    from kvtier.tiers.disk import DiskTier

    scratch = root / f".calibrate-{secrets.token_hex(4)}"
    tier: DiskTier | None = None
    try:
        tier = DiskTier(layout, path=scratch, capacity_bytes=(num_chunks + 1) * layout.chunk_bytes, fsync=True)
        payload = np.random.default_rng(0).integers(0, 255, layout.chunk_bytes, dtype=np.uint8)
        keys = [ChunkKey(secrets.token_bytes(16)) for _ in range(num_chunks)]
        for key in keys:
            if not tier.put(key, payload):
                return None
            _drop_cached(tier.path_of(key))
        out = np.empty(layout.chunk_bytes, np.uint8)
        t0 = time.perf_counter()
        for key in keys:
            if not tier.get_into(key, out):
                return None
        seconds = time.perf_counter() - t0
        return num_chunks * layout.chunk_bytes / max(seconds, 1e-9)
    except OSError as exc:
        logger.info("kvtier: disk read not measured (%s): %.1f GB/s assumed until measured online", exc,
                    DEFAULT_DISK_BPS / 1e9)
        return None
    finally:
        if tier is not None:
            tier.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _drop_cached(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def calibrate(*, dram_Bps: float | None, layout: KVLayout, disk_root: Path | None, shape: ModelShape | None,
              dtype: Any, device: Any) -> Calibration:
    """The start-up measurements (``dram_Bps``: the engine's own timed copy into its KV)."""
    t0 = time.perf_counter()
    disk = measure_disk(layout, disk_root) if disk_root is not None else None
    flops = None
    if shape is not None:
        try:
            flops = measure_matmul(shape, dtype, device)
        except (RuntimeError, TypeError, ValueError) as exc:  # out of memory, a dtype the device lacks
            logger.info("kvtier: device throughput not measured (%s): a fast default until measured online", exc)
    kind = str(getattr(device, "type", device))
    return Calibration(device=kind, dram_Bps=dram_Bps, disk_Bps=disk, flops_per_s=flops,
                       seconds=time.perf_counter() - t0)


# --- samples measured while serving, and the model they refine ---------------------------------
@dataclass(frozen=True, slots=True)
class LoadSample:
    level: int  # the lowest tier the loaded chunks came from
    nbytes: int  # bytes read from that tier
    seconds: float  # the whole load, end to end (an upper bound when a DRAM head came along)


@dataclass(frozen=True, slots=True)
class ForwardSample:
    new_tokens: int  # tokens computed in the forward, all requests
    ctx_pairs: float  # sum over requests of new * (past + new / 2): the attention's work
    seconds: float


class _Ratio:
    """An exponentially weighted ratio ``sum(w * num) / sum(w * den)``, seeded with a prior."""

    __slots__ = ("decay", "den", "num")

    def __init__(self, prior: float, weight: float, decay: float) -> None:
        self.decay = decay
        self.num, self.den = prior * weight, weight

    def add(self, num: float, den: float) -> None:
        self.num = self.decay * self.num + num
        self.den = self.decay * self.den + den

    @property
    def value(self) -> float:
        return self.num / self.den


class OnlineCost:
    """A cost model refined by samples: start-up figures as decaying priors (see the module doc).

    ``model`` is rebuilt only after new samples (once per step at most), so a request's
    decision stays ``CostModel.plan``: O(chunks)."""

    def __init__(self, links: Sequence[LinkCost], prefill: PrefillCost, *, fixed: Sequence[bool] = (),
                 chunk_bytes: int, decay: float = 0.8) -> None:
        self._latency = [link.latency_s for link in links]
        self._fixed = list(fixed) or [False] * len(links)
        # a link's prior weighs as much as 4 chunks read; a sample of one chunk moves it by ~1/5
        self._bw = [_Ratio(link.bandwidth_Bps, 4 * chunk_bytes / link.bandwidth_Bps, decay) for link in links]
        self._prefill = prefill
        reference = max(prefill.seconds(0, 2048), 1e-9)  # the prior weighs as one 2K-token prefill
        self._scale = _Ratio(1.0, reference, decay)
        self._model: CostModel | None = None

    def observe_load(self, sample: LoadSample) -> None:
        level = sample.level
        if level >= len(self._bw) or self._fixed[level] or sample.nbytes <= 0:
            return
        seconds = sample.seconds - self._latency[level]
        if seconds > 0:
            self._bw[level].add(sample.nbytes, seconds)
            self._model = None

    def observe_forward(self, sample: ForwardSample) -> None:
        p = self._prefill
        predicted = p.fixed_s + sample.new_tokens * p.per_token_s + sample.ctx_pairs * p.per_token_ctx_s
        if predicted > 0 and sample.seconds > 0:
            self._scale.add(sample.seconds, predicted)
            self._model = None

    @property
    def model(self) -> CostModel:
        if self._model is None:
            links = tuple(LinkCost(bandwidth_Bps=bw.value, latency_s=lat)
                          for bw, lat in zip(self._bw, self._latency, strict=True))
            s, p = self._scale.value, self._prefill
            prefill = PrefillCost(fixed_s=p.fixed_s * s, per_token_s=p.per_token_s * s,
                                  per_token_ctx_s=p.per_token_ctx_s * s)
            self._model = CostModel(links=links, prefill=prefill)
        return self._model


def default_links(tiers: Sequence[str], calibration: Calibration | None, *, device: str,
                  fixed: Mapping[str, float]) -> tuple[list[LinkCost], list[bool]]:
    """One link per tier (top first) and which of them are fixed by the user (``fixed``: bytes/s)."""
    dram = (calibration.dram_Bps if calibration else None) or DEFAULT_DRAM_BPS.get(device, DEFAULT_DRAM_BPS["cuda"])
    links: list[LinkCost] = []
    for name in tiers:
        if name in fixed:
            links.append(LinkCost(bandwidth_Bps=fixed[name]))
        elif name == "dram":
            links.append(LinkCost(bandwidth_Bps=dram))
        elif name == "disk":
            disk = (calibration.disk_Bps if calibration else None) or DEFAULT_DISK_BPS
            links.append(LinkCost(bandwidth_Bps=in_series(disk, dram)))
        else:
            links.append(LinkCost(bandwidth_Bps=in_series(G4_LINK.bandwidth_Bps, dram), latency_s=G4_LINK.latency_s))
    return links, [name in fixed for name in tiers]


def describe(model: CostModel, tiers: Sequence[str]) -> str:
    links = ", ".join(f"{name} {link.bandwidth_Bps / 1e9:.2f} GB/s" for name, link in zip(tiers, model.links,
                                                                                            strict=False))
    p = model.prefill
    return (f"links {links}; prefill {p.per_token_s * 1e6:.2f} us/token + {p.per_token_ctx_s * 1e9:.3f} ns "
            f"per token pair (8K tokens: {p.seconds(0, 8192) * 1e3:.0f} ms)")
