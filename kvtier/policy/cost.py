"""Fetch or recompute: how many leading cached chunks are worth loading, from figures alone.

Payload-free: this module sees tier levels, byte counts and token counts, never KV bytes, so
the same code runs inside an engine and in a simulator.

Model (all figures measured once on the serving box, or configured):

* bringing ``nbytes`` from tier level ``t`` to the accelerator costs
  ``links[t].latency_s + nbytes / links[t].bandwidth_Bps`` (the link figure is end to end:
  for disk it includes the read, the checksum and the host-to-device copy);
* prefilling ``n`` new tokens after ``p`` cached ones costs
  ``fixed_s + n * per_token_s + n * (p + n / 2) * per_token_ctx_s``
  (linear work plus causal attention over the context, which grows with ``p + n/2``);
* with layer-wise pipelining (``stages = num_layers``) loading and computing overlap:
  ``total = max(load, compute) + min(load, compute) / stages``; with ``stages = 1`` they add.

For a hit whose chunks sit at levels ``tiers[0..K)``, ``plan`` evaluates every ``k`` in
``0..K`` (load chunks ``[0, k)``, recompute the rest) and picks the cheapest, so it can load
a DRAM-resident head and recompute a disk-resident tail.  Ties go to loading (less compute
on a shared accelerator).  O(K), with or without the split below.  Each decision is logged at
DEBUG on ``kvtier.policy.cost`` (an engine plans every request; benchmarks turn it on).

Compute + load split (``plan(..., split=True)``; the idea of Cake, "Compute or Load KV Cache?
Why Not Both?", 2024): for a hit in a slow tier the accelerator idles while the disk reads,
and the disk idles while the accelerator recomputes.  So the leading ``c`` chunks are
recomputed (they need no loaded KV) *while* chunks ``[c, k)`` stream in, then the suffix:

    total = max(prefill(0, c*T), load(c, k)) + prefill(k*T, total - k*T)

``prefill(0, c*T)`` grows with ``c`` (faster than linearly: attention), ``load(c, k)`` shrinks,
so for each ``k`` the best ``c`` is where they cross (both finish together); the crossing
only moves right as ``k`` grows, so one pointer finds it for every ``k``.  ``c = 0`` is the
pure load above, ``c = k`` pure recompute; a split is chosen only when it beats the best
pure decision by ``split_margin``.  The engine that executes the split may move the meeting
point at run time (``kvtier.integrations.hf_split``); ``c`` is the estimate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from kvtier._fs import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkCost:
    """Time to bring bytes from one tier to the accelerator."""

    bandwidth_Bps: float  # sustained bytes per second, end to end
    latency_s: float = 0.0  # fixed cost per request (round trip, first byte)

    def __post_init__(self) -> None:
        if self.bandwidth_Bps <= 0 or self.latency_s < 0:
            raise ValueError(f"LinkCost needs bandwidth > 0 and latency >= 0, got {self}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps if nbytes else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillCost:
    """Prefill time of ``n`` new tokens after ``p`` cached: see the module docstring."""

    fixed_s: float = 0.0  # per forward call (launches, sampling)
    per_token_s: float  # linear layers
    per_token_ctx_s: float = 0.0  # attention: per new token per context token

    def seconds(self, past: int, new: int) -> float:
        if new <= 0:
            return 0.0
        return self.fixed_s + new * self.per_token_s + new * (past + new / 2) * self.per_token_ctx_s

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> PrefillCost:
        """Least-squares fit to ``(past, new, seconds)`` samples (at least 3, varied lengths).

        Coefficients are clamped at zero: a negative one would promise free tokens.
        """
        import numpy as np

        if len(samples) < 3:
            raise ValueError("PrefillCost.fit needs at least 3 samples")
        a = np.array([[1.0, n, n * (p + n / 2)] for p, n, _ in samples])
        y = np.array([s for _, _, s in samples])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        fixed, per_tok, per_ctx = (max(float(c), 0.0) for c in coef)
        if per_tok == 0.0 and per_ctx == 0.0:
            raise ValueError(f"samples {samples} do not grow with tokens: cannot fit a prefill cost")
        return cls(fixed_s=fixed, per_token_s=per_tok, per_token_ctx_s=per_ctx)


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """The decision for one request."""

    load_chunks: int  # chunks [compute_chunks, load_chunks) are loaded; every token after is computed
    cached_chunks: int  # chunks the hit offered (after capping so at least one token is computed)
    est_load_s: float
    est_compute_s: float  # suffix prefill, plus the head's with a split
    est_total_s: float
    est_recompute_s: float  # the estimate for loading nothing, for comparison
    compute_chunks: int = 0  # a split: chunks [0, compute_chunks) are recomputed while the rest load

    @property
    def speedup(self) -> float:
        return self.est_recompute_s / self.est_total_s if self.est_total_s > 0 else 1.0

    @property
    def is_split(self) -> bool:
        return self.compute_chunks > 0

    @property
    def loaded_chunks(self) -> int:
        """Chunks the plan reads from kvtier."""
        return self.load_chunks - self.compute_chunks


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Measured or configured figures of one model on one box; ``plan`` decides per request."""

    links: tuple[LinkCost, ...]  # one per tier level, top (fastest) first
    prefill: PrefillCost
    stages: int = 1  # pipeline depth of load vs compute: num_layers when loads are layer-wise
    # a split must beat the best plan without one by this share of its time: running the GPU and
    # the loader at once costs what the estimate does not see (the loader's checksums and copies
    # compete with the forward's launches); H200 run 10 with a warm page cache: splits that won by
    # 15-20% on paper took 1.1-1.9x the pure load, cold ones that won by 40-55% were 1.2-1.75x faster
    split_margin: float = 0.25

    def __post_init__(self) -> None:
        if not self.links or self.stages < 1:
            raise ValueError("CostModel needs at least one link and stages >= 1")
        if not 0 <= self.split_margin < 1:
            raise ValueError(f"CostModel split_margin must be in [0, 1), got {self.split_margin}")

    def plan(self, tiers: Sequence[int], *, total_tokens: int, tokens_per_chunk: int,
             chunk_bytes: int, split: bool = False) -> FetchPlan:
        """Choose how many leading chunks of a hit (levels ``tiers``) to load for a prompt.

        At most ``(total_tokens - 1) // tokens_per_chunk`` chunks are loadable: the model must
        compute at least one token to produce logits.  ``split``: also consider recomputing a
        head of the hit while its tail loads (an engine that can run both at once).
        """
        usable = min(len(tiers), max(total_tokens - 1, 0) // tokens_per_chunk)
        if any(t >= len(self.links) for t in tiers[:usable]):
            raise ValueError(f"hit names tier level {max(tiers[:usable])}, the cost model knows "
                             f"{len(self.links)} link(s)")
        loads = self._load_sums(tiers[:usable], chunk_bytes)
        recompute = self.prefill.seconds(0, total_tokens)
        best = _Choice(total=recompute, c=0, k=0, load=0.0, compute=recompute)
        suffixes = [recompute]  # per k: prefill of the tokens after chunk k
        for k in range(1, usable + 1):
            past = k * tokens_per_chunk
            suffix = self.prefill.seconds(past, total_tokens - past)
            suffixes.append(suffix)
            load = loads(0, k)
            total = self._combine(load, suffix)
            if total <= best.total:  # ties go to loading
                best = _Choice(total=total, c=0, k=k, load=load, compute=suffix)
        if split:
            best_split = self._best_split(loads, suffixes, tokens_per_chunk, beat=(1 - self.split_margin) * best.total)
            if best_split is not None:
                best = best_split
        plan = FetchPlan(load_chunks=best.k, cached_chunks=usable, est_load_s=best.load,
                         est_compute_s=best.compute, est_total_s=best.total, est_recompute_s=recompute,
                         compute_chunks=best.c)
        if log.isEnabledFor(logging.DEBUG):  # an engine plans every request: no formatting unless asked
            log.debug("fetch-or-recompute: %d tokens, %d cached chunks (levels %s): %sload %d, recompute %d "
                      "tokens; est %.1f ms (load %.1f + compute %.1f) vs recompute-all %.1f ms",
                      total_tokens, usable, _levels(tiers[:usable]),
                      f"split: compute {best.c} chunks while loading, " if best.c else "", best.k - best.c,
                      total_tokens - best.k * tokens_per_chunk + best.c * tokens_per_chunk,
                      best.total * 1e3, best.load * 1e3, best.compute * 1e3, recompute * 1e3)
        return plan

    def _best_split(self, loads: Callable[[int, int], float], suffixes: Sequence[float], tokens_per_chunk: int,
                    *, beat: float) -> _Choice | None:
        """The cheapest split estimated under ``beat`` seconds, or None.

        For each end ``k`` the best ``c`` in ``[1, k)`` is where ``head(c)`` (growing with ``c``)
        crosses ``load(c, k)`` (shrinking with ``c``, growing with ``k``), so the crossing never
        moves left as ``k`` grows: one pointer walks it for every ``k``, O(K) in all.  An end whose
        suffix plus the smallest head, ``head(1)``, is already ``beat`` or more is skipped: no split
        ending there can win.  So a hit that loads much faster than it computes (every chunk in
        DRAM, say) costs a pass over the ends and nothing else.
        """
        def head(c: int) -> float:
            return self.prefill.seconds(0, c * tokens_per_chunk)

        def meet(c: int, k: int) -> float:
            return max(head(c), loads(c, k))

        head1, c = head(1), 1
        best: _Choice | None = None
        for k in range(2, len(suffixes)):
            if suffixes[k] + head1 >= beat:
                continue
            while c < k - 1 and head(c) < loads(c, k):  # the first c where the head takes longer
                c += 1
            at = c - 1 if c > 1 and meet(c - 1, k) <= meet(c, k) else c
            total = meet(at, k) + suffixes[k]
            if total < beat and (best is None or total < best.total):
                best = _Choice(total=total, c=at, k=k, load=loads(at, k), compute=head(at) + suffixes[k])
        return best

    def _load_sums(self, tiers: Sequence[int], chunk_bytes: int) -> Callable[[int, int], float]:
        """``loads(c, k)``: seconds to load chunks ``[c, k)``; a run of one tier pays its latency once."""
        per = [chunk_bytes / self.links[t].bandwidth_Bps for t in tiers]
        starts = [0.0] * (len(tiers) + 1)  # prefix sums of bandwidth time + latency of each run started
        for i, level in enumerate(tiers):
            new_run = i == 0 or tiers[i - 1] != level
            starts[i + 1] = starts[i] + per[i] + (self.links[level].latency_s if new_run else 0.0)

        def loads(c: int, k: int) -> float:
            if c >= k:
                return 0.0
            # chunk c opens a run of its own even when its left neighbour is of the same tier
            rejoin = c > 0 and tiers[c - 1] == tiers[c]
            return starts[k] - starts[c] + (self.links[tiers[c]].latency_s if rejoin else 0.0)

        return loads

    def _combine(self, load: float, compute: float) -> float:
        if self.stages == 1:
            return load + compute
        return max(load, compute) + min(load, compute) / self.stages

    # --- measured once, cached on disk ------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"links": [asdict(x) for x in self.links], "prefill": asdict(self.prefill),
                           "stages": self.stages, "split_margin": self.split_margin}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        try:
            data = json.loads(text)
            return cls(links=tuple(LinkCost(**x) for x in data["links"]), prefill=PrefillCost(**data["prefill"]),
                       stages=int(data.get("stages", 1)), split_margin=float(data.get("split_margin", 0.25)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a cost model: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically and durably (``kvtier._fs``): a reader never sees half a file, and a
        crash after the call never leaves an empty one (``load`` would refuse it)."""
        atomic_write(path, self.to_json().encode(), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        with open(path) as f:
            return cls.from_json(f.read())


@dataclass(frozen=True, slots=True, kw_only=True)
class _Choice:
    total: float
    c: int  # chunks recomputed while loading (0: no split)
    k: int  # end of the loaded range
    load: float
    compute: float


def _levels(tiers: Sequence[int]) -> str:
    """Run-length text of tier levels: ``0x12,1x4``."""
    out: list[str] = []
    for level in tiers:
        if out and out[-1].startswith(f"{level}x"):
            out[-1] = f"{level}x{int(out[-1].split('x')[1]) + 1}"
        else:
            out.append(f"{level}x1")
    return ",".join(out) or "-"
