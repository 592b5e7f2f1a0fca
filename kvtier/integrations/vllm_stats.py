"""The connector's counters, exported through vLLM's connector-stats hook and a one-line log.

``ConnectorCounters`` is plain data (ints and floats by name) kept by the worker side:

    load_chunks / load_tokens / load_bytes / load_s   chunks read from kvtier into vLLM blocks
    hit_tokens_<tier>                                 tokens read from each tier (whole chunks)
    load_failed_chunks                                planned loads that missed or were corrupt
    save_chunks / save_bytes / save_s                 chunks copied out of vLLM blocks into kvtier
    save_dropped_chunks                               chunks not saved: DRAM refused them (eviction policy's
                                                      admission) or had no free slot; never copied
    corrupt_<tier>                                    chunks a tier found corrupt (never served)
    pinned_chunks / unpinned_chunks                   prompt chunks pinned/unpinned on request
    prefetch_chunks / prefetch_used_chunks /         chunks prefetched into DRAM during tool pauses, and of
      prefetch_wasted_chunks / prefetch_cancelled      them read / evicted unread; prefetches cut by pressure
    prefetch_skipped                                  tool pauses not prefetched: recent prefetched chunks
                                                      mostly went unread (the prefetcher's back-off)
    answers_awaiting_<tool|user>                      finished answers told to the eviction policy
    fetch_<load_all|load_head|recompute>              cost-model decisions of lookups that found chunks
    fetch_skipped_chunks                              cached chunks left to recompute (faster than loading)
    kv_events_<stored|removed|dropped|forgotten|errors>  the scheduler's KV events for routers
                                                      (``vllm_events``): published, over the cap, mapping dropped
    wait_<flush|save|load>_s / wait_<...>_long        seconds the step's thread blocked on kvtier (``vllm_timing``):
                                                      a preempted request's jobs, a hit still being saved,
                                                      the step's DRAM loads; waits of 0.1 s or more
    report_errors                                     stats reports (the stats file) that failed: counted
                                                      and logged, never raised into the engine

vLLM collects ``KVTierConnectorStats`` from the worker after each step, sums them
(``aggregate``) in the engine and logs them with its own stats when ``log_stats`` is on; the
worker also logs ``summary()`` every ``log_interval_s`` and can rewrite a JSON file of the
cumulative counters (``stats_file``) for scripts and tests.

On vLLM's Prometheus ``/metrics`` (``build_prom_metrics``; vLLM calls it in the front-end process
and ``observe`` with each step's stats, summed over the workers) the counters become, labelled
with vLLM's ``model_name`` and ``engine`` like vLLM's own metrics:

    kvtier_load_chunks_total, kvtier_load_tokens_total, kvtier_load_bytes_total,
    kvtier_load_seconds_total, kvtier_load_failed_chunks_total, kvtier_save_chunks_total,
    kvtier_save_bytes_total, kvtier_save_seconds_total, kvtier_pinned_chunks_total,
    kvtier_unpinned_chunks_total, kvtier_async_loads_total, kvtier_uncacheable_requests_total,
    kvtier_prefetch_chunks_total, kvtier_prefetch_used_chunks_total, kvtier_prefetch_wasted_chunks_total,
    kvtier_prefetch_cancelled_total, kvtier_prefetch_skipped_total,
    kvtier_report_errors_total, kvtier_kv_events_<stored|removed|dropped|forgotten|errors>_total
    kvtier_hit_tokens_total{tier}          from hit_tokens_<tier>
    kvtier_corrupt_chunks_total{tier}      from corrupt_<tier> (see below)
    kvtier_answers_total{awaits}           from answers_awaiting_<tool|user> (``tool_call_tokens``)
    kvtier_fetch_decisions_total{decision} from fetch_<load_all|load_head|recompute> (cost model)
    kvtier_inflight_<what> (gauges)        from inflight_<what>: queue depth at the last step

``EXPORTS`` and ``FAMILIES`` below hold the whole mapping. A name in neither is exported as
the counter ``kvtier_<name>_total`` (``_s`` read as ``_seconds``), so a new worker counter shows
up without a change here; a name Prometheus cannot carry, or a value that is not a number (or a
negative counter step), is skipped with one warning per name.

``corrupt_<tier>`` is the tier's own running total, not a step delta, so it is exported as a
counter that grows by the amount the reported total exceeds the highest total seen so far: a
counter (``rate``/``increase`` work, as for every other count of events) that a step missing
one worker's report cannot make go down.  Gauges keep their last value until a step reports
them again, so the worker reports an ``inflight_*`` value of 0 once a queue drains.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

logger = logging.getLogger("vllm.kvtier")


class Kind(enum.Enum):
    COUNTER = "counter"  # the worker reports what happened in the step: Counter.inc(value)
    GAUGE = "gauge"  # the worker reports a current level: Gauge.set(value), last value wins
    RUNNING_TOTAL = "running_total"  # the worker reports its total so far: a counter of the growth


@dataclass(frozen=True, slots=True)
class Export:
    metric: str  # Prometheus name ("{}": a family's suffix); the client appends "_total" to counters
    doc: str
    kind: Kind = Kind.COUNTER
    label: str | None = None  # a family's label that takes the suffix (hit_tokens_dram -> tier="dram")


EXPORTS: dict[str, Export] = {  # worker counter name -> metric
    "load_chunks": Export("kvtier_load_chunks", "Chunks loaded from kvtier into vLLM's KV blocks."),
    "load_tokens": Export("kvtier_load_tokens", "Prompt tokens loaded from kvtier instead of computed."),
    "load_bytes": Export("kvtier_load_bytes", "Bytes of KV loaded from kvtier into vLLM's KV blocks."),
    "load_s": Export("kvtier_load_seconds", "Seconds spent loading chunks from kvtier."),
    "load_failed_chunks": Export("kvtier_load_failed_chunks",
                                 "Planned chunk loads that missed or were corrupt (vLLM recomputed them)."),
    "save_chunks": Export("kvtier_save_chunks", "Chunks copied from vLLM's KV blocks into kvtier."),
    "save_bytes": Export("kvtier_save_bytes", "Bytes of KV copied from vLLM's KV blocks into kvtier."),
    "save_s": Export("kvtier_save_seconds", "Seconds spent saving chunks into kvtier."),
    "save_dropped_chunks": Export("kvtier_save_dropped_chunks",
                                  "Chunks not saved: refused by the eviction policy or no free DRAM slot."),
    "pinned_chunks": Export("kvtier_pinned_chunks", "Prompt chunks pinned on request (token warehousing)."),
    "unpinned_chunks": Export("kvtier_unpinned_chunks", "Prompt chunks unpinned on request."),
    "async_loads": Export("kvtier_async_loads", "Chunk loads run asynchronously, off the step."),
    "uncacheable_requests": Export("kvtier_uncacheable_requests", "Requests kvtier could not cache."),
    "fetch_skipped_chunks": Export("kvtier_fetch_skipped_chunks",
                                   "Cached chunks the cost model left to vLLM to recompute (faster than loading)."),
    "prefetch_chunks": Export("kvtier_prefetch_chunks", "Chunks prefetched into DRAM during tool pauses."),
    "prefetch_used_chunks": Export("kvtier_prefetch_used_chunks", "Prefetched chunks read from DRAM."),
    "prefetch_wasted_chunks": Export("kvtier_prefetch_wasted_chunks", "Prefetched chunks evicted unread."),
    "prefetch_cancelled": Export("kvtier_prefetch_cancelled", "Prefetches cut short by DRAM pressure."),
    "prefetch_skipped": Export("kvtier_prefetch_skipped",
                               "Tool pauses not prefetched: recent prefetched chunks mostly went unread (back-off)."),
    "report_errors": Export("kvtier_report_errors", "kvtier stats reports (the stats file) that failed; "
                            "the engine went on."),
    "kv_events_stored": Export("kvtier_kv_events_stored", "BlockStored KV events published (chunk x medium)."),
    "kv_events_removed": Export("kvtier_kv_events_removed", "BlockRemoved KV events published (chunk x medium)."),
    "kv_events_dropped": Export("kvtier_kv_events_dropped", "KV events not published: over the queue's cap."),
    "kv_events_forgotten": Export("kvtier_kv_events_forgotten", "Announced chunks whose block hashes were dropped "
                                  "(kv_events_max_chunks): published as removed."),
    "kv_events_errors": Export("kvtier_kv_events_errors", "KV event failures (logged; the engine went on)."),
}
FAMILIES: dict[str, Export] = {  # worker counter name prefix -> metric; the rest of the name goes into it
    "hit_tokens_": Export("kvtier_hit_tokens", "Tokens loaded from kvtier, by the tier that held them.",
                          label="tier"),
    "corrupt_": Export("kvtier_corrupt_chunks", "Chunks a tier found corrupt (dropped, never served), by tier.",
                       Kind.RUNNING_TOTAL, label="tier"),
    "answers_awaiting_": Export("kvtier_answers", "Finished answers told to the eviction policy, by what they "
                                "wait for (tool, user).", label="awaits"),
    "fetch_": Export("kvtier_fetch_decisions", "Fetch-or-recompute decisions of lookups that found chunks, by "
                     "decision (load_all, load_head, recompute).", label="decision"),
    "inflight_": Export("kvtier_inflight_{}", "kvtier's {} in flight at the last step, summed over workers.",
                        Kind.GAUGE),
}

_PROM_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # no ":" (reserved for recording rules)


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    """vLLM's stats container for this connector: ``data`` maps counter name -> number."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data)
        self.data = dict(merged)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


def resolve(name: str) -> tuple[Export, str | None]:
    """Where the worker counter ``name`` goes: the metric, and the value of its label if it has one."""
    if name in EXPORTS:
        return EXPORTS[name], None
    for prefix, family in FAMILIES.items():
        suffix = name.removeprefix(prefix)
        if suffix and suffix != name:
            if family.label is not None:
                return family, suffix
            return Export(family.metric.format(suffix), family.doc.format(suffix.replace("_", " ")),
                          family.kind), None
    metric = f"kvtier_{name.removesuffix('_s')}_seconds" if name.endswith("_s") else f"kvtier_{name}"
    return Export(metric, f"kvtier worker counter {name!r} (not described in kvtier.integrations.vllm_stats)."), None


class KVTierPromMetrics(KVConnectorPromMetrics):
    """kvtier's counters on vLLM's ``/metrics``; vLLM builds it in the front-end process and calls
    ``observe`` there with every step's ``KVTierConnectorStats.data``, summed over the workers."""

    def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_kvtier_metrics()
        self._families: dict[str, tuple[Export, Any]] = {}  # Prometheus name -> (export, metric)
        self._children: dict[tuple[int, str, str | None], Any] = {}  # (engine, name, label value) -> child
        self._highest: dict[tuple[int, str, str | None], float] = {}  # running totals: highest seen
        self._skipped: set[str] = set()  # worker names that cannot be exported (warned once)
        self._warned: set[str] = set()
        for family in FAMILIES.values():
            if family.label is not None:
                self._family(family)
        for engine_idx in per_engine_labelvalues:  # known counters read 0 from the start
            for export in EXPORTS.values():
                self._child(engine_idx, export, None)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if name in self._skipped:
                continue
            export, label = resolve(name)
            child = self._child(engine_idx, export, label)
            if child is None:
                self._skip(name, f"no usable Prometheus metric {export.metric!r}")
            elif not isinstance(value, int | float):
                self._warn_once(name, f"value {value!r} is not a number")
            elif export.kind is Kind.GAUGE:
                child.set(value)
            elif export.kind is Kind.RUNNING_TOTAL:
                key = (engine_idx, export.metric, label)
                highest = self._highest.get(key, 0)
                if value > highest:
                    child.inc(value - highest)
                    self._highest[key] = value
            elif value >= 0:
                child.inc(value)
            else:
                self._warn_once(name, f"counter step {value!r} is negative")

    def _child(self, engine_idx: int, export: Export, label: str | None) -> Any:
        key = (engine_idx, export.metric, label)
        if key not in self._children:
            family = self._family(export)
            if family is None:
                return None
            labelvalues = self.per_engine_labelvalues[engine_idx] + ([] if label is None else [label])
            self._children[key] = family.labels(*labelvalues)
        return self._children[key]

    def _family(self, export: Export) -> Any:
        """The metric for ``export``, registered on first use; None if Prometheus cannot take it."""
        if export.metric in self._families:
            known, family = self._families[export.metric]
            # an unknown name that lands on a known metric of another kind or label is not mixed in
            return family if (known.kind, known.label) == (export.kind, export.label) else None
        if not _PROM_NAME.fullmatch(export.metric):
            return None
        kwargs: dict[str, Any] = {"name": export.metric, "documentation": export.doc,
                                  "labelnames": self._labelnames + ([] if export.label is None else [export.label])}
        if export.kind is Kind.GAUGE:
            kwargs["multiprocess_mode"] = "mostrecent"  # as vLLM's own gauges
        metric_cls: Any = self._gauge_cls if export.kind is Kind.GAUGE else self._counter_cls
        try:
            family = metric_cls(**kwargs)
        except ValueError as exc:  # the name is taken in the registry (by a metric that is not kvtier's)
            logger.warning("kvtier: metric %s not registered: %s", export.metric, exc)
            return None
        self._families[export.metric] = (export, family)
        return family

    def _skip(self, name: str, reason: str) -> None:
        self._skipped.add(name)
        self._warn_once(name, reason)

    def _warn_once(self, name: str, reason: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("kvtier: connector stat %r not exported to Prometheus: %s", name, reason)


def _unregister_kvtier_metrics() -> None:
    """Drop kvtier metrics of an earlier stats logger from prometheus_client's default registry.

    vLLM does the same for its ``vllm:`` names (``unregister_vllm_metrics``) before each
    ``PrometheusStatLogger`` registers its metrics; without it a second engine in one process
    (tests, a restarted ``AsyncLLM``) would fail on "Duplicated timeseries".
    """
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith("kvtier_"):
            REGISTRY.unregister(collector)


def build_prom_metrics(vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                       per_engine_labelvalues: dict[int, list[object]]) -> KVTierPromMetrics:
    """``KVTierConnector.build_prom_metrics``: kvtier's metrics, with vLLM's labels and metric classes."""
    return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
