"""``vllm_runner``'s engine settings: the CPU defaults the end-to-end tests use, and the GPU ones
(``dtype``, CUDA graphs, memory, backend, dummy weights) and connectors a benchmark names."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench.harness.vllm_runner import engine_args, kv_transfer_config


def test_cpu_defaults_are_unchanged() -> None:
    args = engine_args({"model": "m", "connector": "kvtier", "stats_file": "/tmp/s.json"})
    assert {k: v for k, v in args.items() if k != "kv_transfer_config"} == dict(
        model="m", dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=4096, block_size=128,
        enable_prefix_caching=False, gpu_memory_utilization=0.3, max_num_batched_tokens=4096,
        num_gpu_blocks_override=None, seed=0, tensor_parallel_size=1)
    assert args["kv_transfer_config"].kv_connector_extra_config == {"stats_file": "/tmp/s.json"}


def test_gpu_settings_reach_the_engine() -> None:
    args = engine_args({"model": "m", "dtype": "bfloat16", "enforce_eager": False, "gpu_memory_utilization": 0.85,
                        "attention_backend": "FLASH_ATTN", "load_format": "dummy", "max_num_seqs": 32,
                        "max_num_batched_tokens": 256, "block_size": 16, "max_model_len": 131072})
    assert (args["dtype"], args["enforce_eager"], args["gpu_memory_utilization"]) == ("bfloat16", False, 0.85)
    assert (args["attention_backend"], args["load_format"], args["max_num_seqs"]) == ("FLASH_ATTN", "dummy", 32)
    assert (args["max_num_batched_tokens"], args["block_size"], args["kv_transfer_config"]) == (256, 16, None)


def test_vllm_offloading_and_lmcache_connectors() -> None:
    offload = kv_transfer_config("offload", None, offload_cpu_gib=8)
    assert (offload.kv_connector, offload.kv_role) == ("OffloadingConnector", "kv_both")
    assert offload.kv_connector_extra_config == {"cpu_bytes_to_use": 8 * 2**30}
    own = kv_transfer_config("offload", {"cpu_bytes_to_use": 123, "block_size": 256})
    assert own.kv_connector_extra_config == {"cpu_bytes_to_use": 123, "block_size": 256}
    lmcache = kv_transfer_config("lmcache", None)
    assert (lmcache.kv_connector, lmcache.kv_role, lmcache.kv_connector_module_path) == (
        "LMCacheConnectorV1", "kv_both", None)
    with pytest.raises(ValueError, match="connector must be one of"):
        kv_transfer_config("nixl", None)
