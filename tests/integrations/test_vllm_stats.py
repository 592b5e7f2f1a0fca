"""kvtier's connector stats on Prometheus, built the way vLLM builds them.

``KVConnectorProm`` is what vLLM's ``PrometheusStatLogger`` creates (with its labels
``model_name``/``engine`` and prometheus_client's ``Counter``/``Gauge``); it finds
``KVTierConnector`` by the kv-transfer config and calls its ``build_prom_metrics``. Each
``observe`` below is one engine step's stats dict, as the scheduler hands it to the front end.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

from prometheus_client import REGISTRY, generate_latest
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

from kvtier.integrations.vllm_stats import EXPORTS, KVTierConnectorStats, KVTierPromMetrics

LABELNAMES = ["model_name", "engine"]  # vLLM's PrometheusStatLogger
ENGINES: dict[int, list[object]] = {0: ["tiny", "0"], 1: ["tiny", "1"]}


@pytest.fixture(scope="module")
def vllm_config() -> Any:
    return VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm", kv_role="kv_both"))


@pytest.fixture
def prom(vllm_config: Any) -> KVConnectorProm:
    """A fresh set of metrics (building it drops the previous test's kvtier metrics)."""
    prom = KVConnectorProm(vllm_config, LABELNAMES, ENGINES)
    assert isinstance(prom.prom_metrics, KVTierPromMetrics)
    return prom


def value(name: str, engine: int = 0, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model_name": "tiny", "engine": str(engine), **labels})


def test_counters_add_up_per_engine(prom: KVConnectorProm) -> None:
    assert value("kvtier_save_chunks_total") == 0  # registered at start, before any step
    prom.observe({"save_chunks": 2, "save_bytes": 524288, "save_s": 0.25}, 0)
    prom.observe({"save_chunks": 1, "save_bytes": 262144, "save_s": 0.5, "load_chunks": 2, "load_tokens": 256,
                  "load_bytes": 524288, "load_s": 0.125, "hit_tokens_dram": 128, "hit_tokens_disk": 128}, 0)
    prom.observe({"load_chunks": 1, "hit_tokens_redis": 128, "load_failed_chunks": 1}, 1)
    assert value("kvtier_save_chunks_total") == 3
    assert value("kvtier_save_bytes_total") == 786432
    assert value("kvtier_save_seconds_total") == pytest.approx(0.75)
    assert value("kvtier_load_chunks_total") == 2
    assert value("kvtier_load_tokens_total") == 256
    assert value("kvtier_load_bytes_total") == 524288
    assert value("kvtier_load_seconds_total") == 0.125
    assert value("kvtier_hit_tokens_total", tier="dram") == 128
    assert value("kvtier_hit_tokens_total", tier="disk") == 128
    assert value("kvtier_hit_tokens_total", tier="redis") is None  # engine 1's
    assert value("kvtier_load_chunks_total", engine=1) == 1
    assert value("kvtier_hit_tokens_total", engine=1, tier="redis") == 128
    assert value("kvtier_load_failed_chunks_total", engine=1) == 1
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE kvtier_hit_tokens_total counter" in text
    assert 'kvtier_hit_tokens_total{engine="0",model_name="tiny",tier="dram"} 128.0' in text
    for export in EXPORTS.values():  # every known counter is on /metrics
        assert f"# TYPE {export.metric}_total counter" in text


def test_corrupt_running_total_is_a_counter_of_its_growth(prom: KVConnectorProm) -> None:
    prom.observe({"corrupt_disk": 3}, 0)  # the tier's total so far, not a step's delta
    prom.observe({"corrupt_disk": 3, "corrupt_redis": 1}, 0)
    assert value("kvtier_corrupt_chunks_total", tier="disk") == 3
    prom.observe({"corrupt_disk": 2}, 0)  # a step without one worker's report: never goes down
    assert value("kvtier_corrupt_chunks_total", tier="disk") == 3
    prom.observe({"corrupt_disk": 5}, 0)
    assert value("kvtier_corrupt_chunks_total", tier="disk") == 5
    assert value("kvtier_corrupt_chunks_total", tier="redis") == 1
    assert "# TYPE kvtier_corrupt_chunks_total counter" in generate_latest(REGISTRY).decode()


def test_inflight_gauges_keep_the_last_value(prom: KVConnectorProm) -> None:
    prom.observe({"inflight_loads": 4, "inflight_saves": 2}, 0)
    prom.observe({"inflight_loads": 1}, 0)
    assert value("kvtier_inflight_loads") == 1
    assert value("kvtier_inflight_saves") == 2
    prom.observe({"inflight_saves": 0}, 0)
    assert value("kvtier_inflight_saves") == 0
    assert "# TYPE kvtier_inflight_loads gauge" in generate_latest(REGISTRY).decode()


def test_workers_summed_by_vllm_then_observed(prom: KVConnectorProm) -> None:
    """vLLM sums the workers' ``KVTierConnectorStats`` (``aggregate``) and observes ``to_dict()``."""
    step = KVTierConnectorStats(data={"save_chunks": 2, "inflight_saves": 1})
    step.aggregate(KVTierConnectorStats(data={"save_chunks": 1, "inflight_saves": 3}))
    prom.observe(step.to_dict(), 0)
    assert value("kvtier_save_chunks_total") == 3
    assert value("kvtier_inflight_saves") == 4


def test_unknown_and_bad_names_never_crash(prom: KVConnectorProm) -> None:
    stats = {"novel_chunks": 2, "novel_s": 0.5, "bad-name": 1, "load_chunks": "x", "save_chunks": -1,
             "hit_tokens": 7, "pinned_chunks": 1}
    prom.observe(stats, 0)
    prom.observe(stats, 0)
    assert value("kvtier_novel_chunks_total") == 4  # a new worker counter: a generic counter
    assert value("kvtier_novel_seconds_total") == 1.0
    assert value("kvtier_load_chunks_total") == 0  # not a number
    assert value("kvtier_save_chunks_total") == 0  # a counter cannot go down
    assert value("kvtier_hit_tokens_total") is None  # would clash with the tier-labelled counter
    assert value("kvtier_pinned_chunks_total") == 2  # the rest of the step still counts
    assert "bad" not in generate_latest(REGISTRY).decode()


def test_a_second_stats_logger_starts_fresh(vllm_config: Any, prom: KVConnectorProm) -> None:
    prom.observe({"save_chunks": 5, "inflight_loads": 2, "novel_chunks": 1}, 0)
    again = KVConnectorProm(vllm_config, LABELNAMES, {0: ["tiny", "0"]})  # no "Duplicated timeseries"
    again.observe({"save_chunks": 1}, 0)
    assert value("kvtier_save_chunks_total") == 1
    assert value("kvtier_inflight_loads") is None
    assert value("kvtier_novel_chunks_total") is None
