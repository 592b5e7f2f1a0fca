"""kvtier as a vLLM KV connector (``KVConnectorBase_V1``), loaded with one flag, no patch to vLLM::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_tokens": 256, "dram": {"capacity": "8GiB"}}}'

or ``LLM(..., kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector",
kv_connector_module_path="kvtier.integrations.vllm", kv_role="kv_both"))``.

Who does what (one class, two roles, as vLLM requires; both halves are vLLM-free modules):

* scheduler role (EngineCore process): ``kvtier.integrations.vllm_plan`` — lookups
  (``get_num_new_matched_tokens``: DRAM hits load synchronously, lower-tier hits
  asynchronously), load/save planning (``update_state_after_alloc``, ``build_connector_meta``),
  and the directory of what the worker holds, fed by the worker's reports
  (``update_connector_output``): one owner of what is cached, the worker.
* worker role (the process that owns the KV tensors): ``kvtier.integrations.vllm_worker`` —
  the engine's one ``ContextMemory`` and a mover thread that runs loads, saves and pins off the
  step, with ``kvtier.integrations.vllm_paged`` for the block copies.  Saves are submitted in
  ``wait_for_save`` and never block the step; a finished request's blocks are held until its
  saves are copied out (``request_finished`` -> True, released through ``get_finished``); a
  preempted request's jobs are waited for in ``handle_preemptions``, before vLLM reuses its
  blocks.  Async loads are reported through ``get_finished``; vLLM keeps stepping the other
  requests meanwhile (``WAITING_FOR_REMOTE_KVS``).

A load that fails (chunk evicted, corrupt, server down) is reported by block id and vLLM recomputes those
tokens: output stays correct.  Keys fold in the LoRA adapter, multimodal inputs and ``cache_salt``
(``vllm_keys``).  Tensor parallelism: each rank stores its shard of heads under its own layout
(``tp<rank>of<size>`` in the layout's model id), while chunk keys are the same on every rank; a chunk is a hit
only where every rank holds it.  Configuration: ``vllm_config``.  Counters: ``vllm_stats`` (also on vLLM's
``/metrics``).  KV events for routers (``take_events``): ``vllm_events``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from kvtier.config.schema import check_openable, read_tenant_secret
from kvtier.errors import IntegrationError, KVTierError
from kvtier.hierarchy import ContextMemory
from kvtier.integrations import vllm_compat
from kvtier.integrations.calibrate import Calibration, ModelShape, calibrate
from kvtier.integrations.vllm_config import PagedGeometry, load_cost_model, make_layout, parse_extra_config
from kvtier.integrations.vllm_cost import calibration_path, scheduler_cost
from kvtier.integrations.vllm_counters import ConnectorCounters
from kvtier.integrations.vllm_directory import ChunkDirectory
from kvtier.integrations.vllm_events import open_events
from kvtier.integrations.vllm_jobs import StepPlan
from kvtier.integrations.vllm_keys import check_supported
from kvtier.integrations.vllm_paged import PagedKV, geometry_of
from kvtier.integrations.vllm_plan import Planner
from kvtier.integrations.vllm_stats import KVTierConnectorStats
from kvtier.integrations.vllm_worker import WorkerCore, WorkerReport
from kvtier.keys import namespace_key
from kvtier.layout import KVLayout
from kvtier.tiers import make_tier
from kvtier.tiers.disk_files import layout_root

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

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class KVTierWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: index changes and chunks that failed (all TP ranks)."""

    report: WorkerReport = field(default_factory=WorkerReport)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMeta):
            self.report.merge(other.report)
        return self


def _geometry_from_config(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> PagedGeometry:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise IntegrationError(f"KVTierConnector supports models with one KV cache group, got {len(groups)} "
                               "(hybrid/sliding-window models are not supported yet)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise IntegrationError("KVTierConnector does not support pipeline parallelism (tensor parallelism is fine)")
    spec: Any = groups[0].kv_cache_spec  # an AttentionSpec for the models we support
    if not hasattr(spec, "num_kv_heads"):
        raise IntegrationError(f"KVTierConnector supports attention KV caches, got {type(spec).__name__}")
    mla = type(spec).__name__.startswith("MLA")  # one latent per token (MLAAttentionSpec)
    if not mla and getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise IntegrationError("KVTierConnector needs equal K and V head sizes")
    return PagedGeometry(num_layers=len(groups[0].layer_names), num_kv_heads=1 if mla else spec.num_kv_heads,
                         head_dim=spec.head_size, dtype=str(spec.dtype).removeprefix("torch."),
                         block_size=spec.block_size, parts=1 if mla else 2)


def _model_id(vllm_config: VllmConfig) -> str:
    """What names the weights in chunk keys: the model, plus whatever else changes its KV when set."""
    mc = vllm_config.model_config
    parts = [str(mc.model)]
    for name in ("revision", "quantization", "hf_overrides"):
        value = getattr(mc, name, None)
        if value:  # defaults add nothing: keys of earlier runs stay valid
            parts.append(f"{name}={json.dumps(value, sort_keys=True, default=str)}")
    return "|".join(parts)


_REPORT_ERROR_LOG_S = 60.0  # at most one log line a minute about failed stats reports


@contextlib.contextmanager
def _said_at_error() -> Iterator[None]:
    """Log a start-up error's one line (naming the field) at ERROR before it propagates: vLLM then prints
    60-80 traceback frames ending in its generic "Engine core initialization failed"."""
    try:
        yield
    except (KVTierError, OSError) as exc:
        logger.error("kvtier: cannot start: %s", exc)
        raise


def rank_layout(layout: KVLayout, rank: int, world_size: int) -> KVLayout:
    """The layout one TP rank stores under: its own fingerprint, so shards never overwrite each other."""
    if world_size == 1:
        return layout
    return dataclasses.replace(layout, model=f"{layout.model}|tp{rank}of{world_size}")


class KVTierConnector(KVConnectorBase_V1):
    """kvtier's tiered KV store (DRAM -> disk -> Redis/Mooncake) behind vLLM's connector API."""

    _cache_hit_source = vllm_compat.cache_hit_source("HOST")  # 0.32+; None before (unused there)

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        vllm_compat.check_version(vllm_compat.installed_version())
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        with _said_at_error():  # kvtier's one line, above vLLM's traceback
            self._start(vllm_config, role, kv_cache_config)

    def _start(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        self.config, self.options = parse_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        check_openable(self.config)  # disk.path creatable, tier packages present: a field name, not an OSError
        # kvtier is a cache: a failed load is a miss to recompute, not a failed request.
        self._kv_transfer_config.kv_load_failure_policy = self.options.on_load_error
        self.geometry = _geometry_from_config(vllm_config, kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        self.world_size = vllm_config.parallel_config.tensor_parallel_size
        model_id = self.options.model_id or _model_id(vllm_config)
        self.layout = make_layout(self.geometry, chunk_tokens=self.config.chunk_tokens, model_id=model_id)
        # keys name the prefix, not the shard: the same on every rank (and for any TP size)
        self.namespace = namespace_key(self.layout, self.config.tenant, secret=read_tenant_secret(self.config))
        self._planner: Planner | None = None  # scheduler role
        self._worker: WorkerCore | None = None  # worker role
        self._layer_index: dict[str, int] = {}
        self._layerwise = False  # layer-wise DRAM-hit loads (worker, CUDA, ``layerwise_loads``)
        self._layers_waited: set[int] = set()  # layers whose wait_for_layer_load ran this step
        self._total = ConnectorCounters()
        self._interval = ConnectorCounters()
        self._last_log = time.monotonic()
        self._logged_total: dict[str, float] = {}  # totals at the last report
        self._report_logged = -_REPORT_ERROR_LOG_S  # when a failed report was last logged
        if role == KVConnectorRole.SCHEDULER:
            self._planner = Planner(namespace=self.namespace, tokens_per_chunk=self.layout.tokens_per_chunk,
                                    block_size=self.geometry.block_size, directory=self._directory(),
                                    async_loads=self.options.async_loads, cost=self._cost_model(),
                                    chunk_bytes=rank_layout(self.layout, 0, self.world_size).chunk_bytes,
                                    tool_call_tokens=self.options.tool_call_tokens)
        self._events = open_events(vllm_config, self.options, self._planner, self.geometry.block_size)
        logger.info("KVTierConnector (%s): %s, tiers %s, TP %d", role.name.lower(), self.layout.describe(),
                    ", ".join(self.config.tiers), self.world_size)

    def _cost_model(self) -> Any:
        """Fetch or recompute: a configured model, the default one (``vllm_cost``), or None ("off")."""
        if self.options.cost_model != "auto":
            return load_cost_model(self.options, list(self.config.tiers))
        calibration = Calibration.take(calibration_path(self._kv_transfer_config.engine_id or ""))
        return scheduler_cost(self.config.tiers, calibration, device=self._vllm_config.device_config.device_type,
                              shape=self._shape(), chunk_bytes=rank_layout(self.layout, 0, self.world_size).chunk_bytes,
                              fixed=self.options.link_rates.fixed())

    def _shape(self) -> ModelShape:
        return ModelShape.from_hf_config(self._vllm_config.model_config.hf_text_config, self.world_size)

    # ==== what newer vLLMs ask of a connector (``vllm_compat``; older ones never call these) =====
    @property
    def requires_kv_delivery(self) -> bool:
        return vllm_compat.REQUIRES_KV_DELIVERY

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        return vllm_compat.SUPPORTS_SLEEP_MODE

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
        return vllm_compat.kv_cache_access()

    def may_load_async(self, request: Request) -> bool:
        return self._planner is not None and self._planner.may_load_async(request)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        assert self._planner is not None
        return vllm_compat.hit_sources(self._planner.hit_tiers(request, num_external_tokens))

    def _directory(self) -> ChunkDirectory:
        ranks = [rank_layout(self.layout, r, self.world_size) for r in range(self.world_size)]
        disk_roots = [layout_root(self.config.disk.path, lay) for lay in ranks] if "disk" in self.config.tiers else []
        remote_names = [n for n in self.config.tiers if n not in ("dram", "disk")]
        remote = [[make_tier(n, self.config, lay) for n in remote_names] for lay in ranks] if remote_names else []
        return ChunkDirectory(self.config.tiers, world_size=self.world_size, disk_roots=disk_roots, remote=remote,
                              probe_deadline_s=self.options.probe_deadline_s)

    # ==== scheduler side =====================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._planner is not None
        return self._planner.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._planner is not None
        self._planner.allocated(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        plan = self._planner.build(scheduler_output)
        self._events.planned(plan, scheduler_output.scheduled_new_reqs)
        return KVTierConnectorMetadata(plan=plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if self._planner is not None and isinstance(meta, KVTierWorkerMeta):
            report = meta.report
            self._planner.worker_report(report.changes, report.missing, report.loads, report.forwards,
                                        unsaved=report.unsaved)
            self._events.changed(report.changes)

    def take_events(self) -> Iterable[Any]:
        return self._events.take()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._planner is not None
        return self._planner.finished(request), None

    # ==== worker side ========================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        geometry = geometry_of(kv_caches, self.geometry.block_size, parts=self.geometry.parts)
        if geometry != self.geometry:
            raise IntegrationError(f"registered KV tensors {geometry} differ from the KV cache spec {self.geometry}")
        rank = 0
        if self.world_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        layout = rank_layout(self.layout, rank, self.world_size)
        paged = PagedKV(kv_caches, geometry, layout.tokens_per_chunk)
        with _said_at_error():
            memory = ContextMemory.open(layout, self.config)
        self._worker = WorkerCore(memory, paged, rank=rank)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}  # PagedKV's layer order
        self._layerwise = self.options.layerwise_loads and paged.device.type == "cuda"
        dram_Bps, warm_s = self._worker.warm_up()  # the first hit as fast as the next ones
        if self.options.cost_model == "auto" and rank == 0:  # the scheduler reads it when vLLM builds it
            disk = Path(self.config.disk.path).expanduser() if "disk" in self.config.tiers else None
            calibration = calibrate(dram_Bps=dram_Bps, layout=layout, disk_root=disk, shape=self._shape(),
                                    dtype=paged.dtype, device=paged.device)
            calibration.save(calibration_path(self._kv_transfer_config.engine_id or ""))
            logger.info("kvtier: warm-up %.3f s, calibration %.3f s", warm_s, calibration.seconds)

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        return meta.plan

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, KVTierConnectorMetadata):
            self._worker.flush(kv_connector_metadata.plan.preempted)  # before vLLM overwrites their blocks

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, KVTierConnectorMetadata):
            plan = connector_metadata.plan  # timed from here: 0.32+ start loads after a forward without sync ones
            self._worker.forwards.starts(plan.forward if all(job.async_load for job in plan.loads) else None)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.end_step()  # normally done in wait_for_save already
        plan = self._plan()
        self._worker.hint_ends(plan.ends)  # earlier answers' ends, then the new requests
        self._worker.hint(plan.hints)  # before the loads, whose reads the policy then attributes to them
        after = self._worker.paged.record() if plan.loads else None  # CUDA: after vLLM's block zeroing
        layerwise = self._layerwise
        for job in plan.loads:
            if job.async_load:
                self._worker.load_async(job, after)
            else:  # CUDA: queued on side streams; the compute stream waits for them, the host does not
                self._worker.load_now(job, after, layerwise=layerwise)
        if not layerwise:
            self._worker.wait_loads()
        self._layers_waited.clear()

    def wait_for_layer_load(self, layer_name: str) -> None:
        index = self._layer_index.get(layer_name)
        if self._layerwise and self._worker is not None and index is not None:
            self._worker.wait_layer(index)
            self._layers_waited.add(index)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks (all layers) are saved after the forward, in the background

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata() or self._worker is None:
            return
        plan = self._plan()
        self._worker.forwards.ends()
        if self._layerwise and plan.loads and len(self._layers_waited) < len(self._layer_index):
            # a layer read its blocks without waiting (vLLM skipped the hook: a captured graph):
            # layer-wise loads are not safe with this engine's settings
            logger.warning("kvtier: vLLM called wait_for_layer_load for %d of %d layers; layer-wise loads "
                           "are off from now on", len(self._layers_waited), len(self._layer_index))
            self._layerwise = False
        self._worker.end_step()  # this step's queued loads are done: their DRAM slots are released
        after = self._worker.paged.record() if plan.saves else None  # CUDA: after this step's forward
        self._worker.save(plan.saves, after)  # submitted, not awaited: the blocks are held (module doc)
        self._worker.close_step(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        if self.has_connector_metadata():
            # a step without a forward (nothing scheduled: async loads in flight, or the empty step
            # async scheduling runs after the last request) has no wait_for_save: its finished
            # requests, pins and counts are taken here, else vLLM would hold their blocks for ever
            self._worker.close_step(self._plan())
        sending, received = self._worker.finished()
        self._report()
        return sending or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._worker.take_report() if self._worker is not None else None
        return None if report is None else KVTierWorkerMeta(report=report)

    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        self._interval.merge(self._events.take_counters())  # scheduler side: the KV events' counters
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

    def _report(self) -> None:
        """Counters for vLLM's stats, the stats file after each step that changed something, a log line
        every log_interval_s.  Never raises: metrics and logs must not stop the engine; a failure
        is counted (``report_errors``, also on ``/metrics``) and logged at most once a minute."""
        try:
            self._report_now()
        except Exception as exc:
            self._report_failed(exc)

    def _report_now(self) -> None:
        worker = self._worker
        if worker is None:
            return
        step = worker.take_counters()
        self._interval.merge(step)
        self._total.merge(step)
        inflight = worker.inflight()  # a gauge: the last value wins
        self._interval.values["inflight_jobs"] = self._total.values["inflight_jobs"] = inflight
        tier_stats = worker.memory.stats()
        for name, s in tier_stats.items():  # cumulative already: assign, not add
            self._total.values[f"corrupt_{name}"] = s.corrupt
            if s.corrupt:  # a running total (vllm_stats exports its growth)
                self._interval.values[f"corrupt_{name}"] = s.corrupt
        snapshot: dict[str, float] = dict(self._total.values)
        if snapshot == self._logged_total:
            return
        self._logged_total = snapshot  # a failed write below is retried at the next change
        if self.options.stats_file is not None:
            extra = {"tiers": {name: s.as_dict() for name, s in tier_stats.items()},
                     "layout": worker.memory.layout.describe()}
            try:
                self._total.write_json(self.options.stats_file, extra, rank=worker.rank)
            except Exception as exc:  # a full or read-only disk, a directory removed: count, log, go on
                self._report_failed(exc)
        now = time.monotonic()
        if self.options.log_interval_s and now - self._last_log >= self.options.log_interval_s:
            logger.info("%s", self._total.summary())
            self._last_log = now

    def _report_failed(self, exc: Exception) -> None:
        for counters in (self._interval, self._total):
            counters.add(report_errors=1)
        now = time.monotonic()
        if now - self._report_logged >= _REPORT_ERROR_LOG_S:
            self._report_logged = now
            total = int(self._total.values["report_errors"])
            with contextlib.suppress(Exception):
                logger.warning("kvtier: stats report failed (%d so far; the engine goes on): %s: %s", total,
                               type(exc).__name__, exc)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()  # finishes every job, flushes write-through
            self._report()
            logger.info("%s", self._total.summary())
            self._worker = None
        if self._planner is not None:
            self._planner.directory.close()
