"""The connector's default fetch-or-recompute model: calibrated at start-up, refined while serving.

``kvtier.policy.cost.CostModel`` decides per request how many leading cached chunks are worth
loading; this module gives the connector one without a configured JSON (``cost_model: "auto"``,
the default; ``"off"`` loads every chunk kvtier holds; a path is a fixed, measured model).  The
figures, their measurement and the online model are ``kvtier.integrations.calibrate``'s (shared
with ``KVTierLM``); what is the connector's own:

* **the DRAM link** is the one thing a DRAM hit does, a scatter of two chunks from pinned host
  memory into vLLM's blocks (``PagedKV.scatter``; its first call is the warm-up that takes the
  lazy start-up costs off the first hit).  ``link_rates`` in the connector's config fixes a
  tier's figure (never measured, never refined).
* **the device throughput** is measured with a matmul of the model's MLP shape in vLLM's KV dtype,
  on one worker's share of the model under tensor parallelism (``ModelShape.from_hf_config(tp=)``).
* **online** (``OnlineCost``, scheduler side): the worker times every load it can time on the
  host (``LoadSample``: loads off the step and CPU loads; a CUDA DRAM hit is queued on side
  streams and not timed) and every prefill-heavy forward without a synchronous load
  (``ForwardSample``: CUDA events around the forward, ``bind_connector_metadata`` -> ``wait_for_save``;
  not from ``start_load_kv``, which vLLM 0.32 calls after the forward when no load is synchronous),
  and sends them with its per-step report.

How the two processes meet: vLLM builds the worker (``register_kv_caches``) before the
scheduler (``EngineCore``: ``_initialize_kv_caches``, then ``Scheduler``), so the worker writes
its calibration to ``calibration_path(engine_id)`` and the scheduler reads it when it is built
(``Calibration.take``); online samples travel in ``WorkerReport``, the channel the index mirror
already uses.  A scheduler that finds no file (another host) starts from ``DEFAULT_*`` and learns
online.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvtier.integrations.calibrate import (
    Calibration,
    ModelShape,
    OnlineCost,
    default_links,
    describe,
    flops_or_default,
    prefill_prior,
)

logger = logging.getLogger("vllm.kvtier")


def calibration_path(engine_id: str) -> Path:
    """Where the worker leaves its calibration for the scheduler of the same engine."""
    safe = "".join(c for c in engine_id if c.isalnum() or c in "-_")[:64] or "engine"
    return Path(tempfile.gettempdir()) / f"kvtier-{safe}.calibration.json"


def scheduler_cost(tiers: Sequence[str], calibration: Calibration | None, *, device: str, shape: ModelShape,
                   chunk_bytes: int, fixed: Mapping[str, float]) -> OnlineCost:
    """The scheduler's starting model: the worker's calibration, else defaults; ``fixed``: ``link_rates``."""
    links, is_fixed = default_links(tiers, calibration, device=device, fixed=fixed)
    online = OnlineCost(links, prefill_prior(shape, flops_or_default(calibration, device)), fixed=is_fixed,
                        chunk_bytes=chunk_bytes)
    logger.info("kvtier: fetch or recompute (%s): %s", "measured at start-up" if calibration else "defaults",
                describe(online.model, tiers))
    return online
