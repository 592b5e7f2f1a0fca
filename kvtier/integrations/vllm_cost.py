"""The connector's default fetch-or-recompute model: calibrated at start-up, refined while serving.

``kvtier.policy.cost.CostModel`` decides per request how many leading cached chunks are worth
loading; this module gives the connector one without a configured JSON (``cost_model: "auto"``,
the default; ``"off"`` loads every chunk kvtier holds; a path is a fixed, measured model).

Where each figure comes from:

* **links** (one per tier, top first; end to end: bytes from the tier into vLLM's blocks).
  The worker times the one thing a DRAM hit does, a scatter of two chunks from pinned host
  memory into vLLM's blocks (``PagedKV.scatter``; its first call is the warm-up that takes the
  lazy start-up costs off the first hit), and a read of two chunk files written in the disk
  tier's own format with their pages dropped from the page cache (``posix_fadvise``
  ``DONTNEED`` after ``fsync``: a cold read, as after a restart).  A disk hit reads into DRAM,
  then scatters: the two rates in series.  G4 (Redis, Mooncake) has no cheap honest probe at
  start-up: a conservative 1 GB/s and 1 ms per request (``G4_LINK``).  ``link_rates`` in the
  connector's config fixes a tier's figure (never measured, never refined).
* **prefill**: FLOPs from the model's shape (``ModelShape``: linear layers ``2 * params`` per
  token, attention ``4 * layers * heads * head_dim`` per token pair) over a device throughput
  the worker measures with a matmul of the model's MLP shape.  Attention is counted at half that
  throughput; no fixed cost (it cancels out of load-vs-recompute: both compute a suffix).
* **online** (``OnlineCost``, scheduler side): the worker times every load it can time on the
  host (``LoadSample``: loads off the step and CPU loads; a CUDA DRAM hit is queued on side
  streams and not timed) and every prefill-heavy forward without a synchronous load
  (``ForwardSample``: CUDA events around the forward, ``start_load_kv`` -> ``wait_for_save``),
  and sends them with its per-step report.  Each tier's bandwidth is an exponentially weighted
  ratio of bytes over seconds, the prefill a weighted ratio of measured over predicted seconds
  applied to the prior's coefficients (the shape of the cost comes from FLOPs; a free 3-term fit
  to a live mix of batches is ill-conditioned).  Both start from the start-up figure as a
  pseudo-sample that decays away.

How the two processes meet: vLLM builds the worker (``register_kv_caches``) before the
scheduler (``EngineCore``: ``_initialize_kv_caches``, then ``Scheduler``), so the worker writes
its calibration to ``calibration_path(engine_id)`` and the scheduler reads it when it is built;
online samples travel in ``WorkerReport``, the channel the index mirror already uses.  A
scheduler that finds no file (another host) starts from ``DEFAULT_*`` and learns online.

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
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier._fs import atomic_write
from kvtier.layout import KVLayout
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost

logger = logging.getLogger("vllm.kvtier")

DEFAULT_DRAM_BPS = {"cuda": 10e9, "cpu": 5e9}  # scatter from DRAM into the blocks, when not measured
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


# --- the worker's start-up calibration ------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """What the worker measured at start-up (bytes per second; None: not measured)."""

    device: str  # "cuda" or "cpu"
    dram_Bps: float | None = None  # DRAM slot -> vLLM blocks (scatter, end to end)
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
        # atomic, not durable: the scheduler takes it at once; a crash loses nothing (``take``
        # reads an unreadable file as none: defaults until measured online)
        atomic_write(path, self.to_json().encode(), fsync=False)

    @classmethod
    def take(cls, path: Path) -> Calibration | None:
        """Read and remove the worker's file; None if there is none or it is unreadable."""
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


def calibration_path(engine_id: str) -> Path:
    """Where the worker leaves its calibration for the scheduler of the same engine."""
    safe = "".join(c for c in engine_id if c.isalnum() or c in "-_")[:64] or "engine"
    return Path(tempfile.gettempdir()) / f"kvtier-{safe}.calibration.json"


def measure_matmul(shape: ModelShape, dtype: Any, device: Any, *, tokens: int | None = None) -> float:
    """FLOP/s of ``(tokens, hidden) @ (hidden, intermediate)`` on ``device``: best of 3 after a warm one."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    tokens = tokens or (1024 if on_cuda else 128)
    a = torch.randn(tokens, shape.hidden, dtype=dtype, device=device)
    b = torch.randn(shape.hidden, shape.intermediate, dtype=dtype, device=device)
    best = float("inf")
    for i in range(4):
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if on_cuda:
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    del a, b
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


# --- samples the worker sends, and the scheduler's model ---------------------------------------
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
    """The scheduler's cost model: start-up figures refined by the worker's samples.

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
    """One link per tier (top first) and which of them are fixed by the user's ``link_rates``."""
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


# --- the two ends, as the connector calls them ---------------------------------------------------
def calibrate(*, dram_Bps: float | None, layout: KVLayout, disk_root: Path | None, shape: ModelShape | None,
              dtype: Any, device: Any) -> Calibration:
    """The worker's start-up measurements (``dram_Bps``: its warm-up's timed copy)."""
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


def scheduler_cost(tiers: Sequence[str], calibration: Calibration | None, *, device: str, shape: ModelShape,
                   chunk_bytes: int, fixed: Mapping[str, float]) -> OnlineCost:
    """The scheduler's starting model: the worker's calibration, else defaults; ``fixed``: ``link_rates``."""
    links, is_fixed = default_links(tiers, calibration, device=device, fixed=fixed)
    flops = (calibration.flops_per_s if calibration else None) or DEFAULT_FLOPS.get(device, DEFAULT_FLOPS["cuda"])
    online = OnlineCost(links, prefill_prior(shape, flops), fixed=is_fixed, chunk_bytes=chunk_bytes)
    logger.info("kvtier: fetch or recompute (%s): %s", "measured at start-up" if calibration else "defaults",
                describe(online.model, tiers))
    return online
