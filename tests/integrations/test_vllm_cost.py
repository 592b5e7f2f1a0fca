"""The connector's default cost model: the scheduler's starting model and the calibration file's place."""

from __future__ import annotations

from kvtier.integrations.calibrate import DEFAULT_FLOPS, Calibration, ModelShape, prefill_prior
from kvtier.integrations.vllm_cost import calibration_path, scheduler_cost
from tests.integrations.test_calibrate import CHUNK, LLAMA_8B


def test_the_issue_24_disk_hit_is_recomputed_and_the_dram_hit_loaded() -> None:
    """H100 figures of issue 24 (8K tokens of Llama-8B: recompute 0.27 s, a cold disk hit 0.63-0.74 s)."""
    shape = ModelShape.from_hf_config(LLAMA_8B)
    model = scheduler_cost(["dram", "disk"], Calibration(device="cuda", dram_Bps=20e9, disk_Bps=1.6e9,
                                                         flops_per_s=700e12),
                           device="cuda", shape=shape, chunk_bytes=CHUNK, fixed={}).model
    disk = model.plan([1] * 32, total_tokens=8192 + 256, tokens_per_chunk=256, chunk_bytes=CHUNK)
    dram = model.plan([0] * 32, total_tokens=8192 + 256, tokens_per_chunk=256, chunk_bytes=CHUNK)
    assert disk.load_chunks == 0 and dram.load_chunks == 32


def test_a_scheduler_without_the_workers_calibration_starts_from_the_defaults() -> None:
    shape = ModelShape.from_hf_config(LLAMA_8B)
    model = scheduler_cost(["dram"], None, device="cpu", shape=shape, chunk_bytes=CHUNK, fixed={}).model
    assert model.prefill == prefill_prior(shape, DEFAULT_FLOPS["cpu"])


def test_the_calibration_file_is_named_after_the_engine_in_the_temp_dir() -> None:
    path = calibration_path("engine/../0 a")  # only letters, digits, - and _ of the id are kept
    assert path.name == "kvtier-engine0a.calibration.json"
    assert calibration_path("").name == "kvtier-engine.calibration.json"
