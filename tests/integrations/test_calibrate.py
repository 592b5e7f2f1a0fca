"""The fetch-or-recompute figures both integrations share: the model's FLOPs, the links, the
start-up measurements and the calibration file, the online fit, the timing helpers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvtier.integrations.calibrate import (
    DEFAULT_DISK_BPS,
    DEFAULT_FLOPS,
    Calibration,
    ForwardSample,
    LoadSample,
    ModelShape,
    OnlineCost,
    best_seconds,
    default_links,
    flops_or_default,
    in_series,
    measure_disk,
    measure_matmul,
    prefill_prior,
    sync_device,
)
from kvtier.layout import KVLayout
from kvtier.policy.cost import LinkCost, PrefillCost

CHUNK = 32 << 20  # bytes of one 256-token chunk of Llama-3.1-8B (bf16)
LLAMA_8B = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           intermediate_size=14336, num_hidden_layers=32)


def test_model_shape_counts_the_flops_of_llama_8b() -> None:
    shape = ModelShape.from_hf_config(LLAMA_8B)
    # 6.98e9 parameters outside the embeddings, 2 FLOPs each per token
    assert shape.linear_flops_per_token() == pytest.approx(2 * 6.98e9, rel=0.01)
    assert shape.attention_flops_per_pair() == 4 * 32 * 32 * 128
    half = ModelShape.from_hf_config(LLAMA_8B, tp=2)  # each rank computes half the heads and the MLP
    assert half.num_heads == 16 and half.intermediate == 7168
    # 8K tokens at 700 TFLOP/s: ~0.2 s, as vLLM's prefill on an H100 (0.27 s measured with overheads)
    assert 0.15 < prefill_prior(shape, 700e12).seconds(0, 8192) < 0.3


def test_disk_and_g4_links_include_the_copy_into_the_blocks() -> None:
    calibration = Calibration(device="cuda", dram_Bps=20e9, disk_Bps=3e9)
    links, fixed = default_links(["dram", "disk", "redis"], calibration, device="cuda", fixed={})
    assert links[0].bandwidth_Bps == 20e9
    assert links[1].bandwidth_Bps == pytest.approx(in_series(3e9, 20e9)) == pytest.approx(1 / (1 / 3e9 + 1 / 20e9))
    assert links[2].latency_s > 0 and links[2].bandwidth_Bps < 1e9
    assert fixed == [False, False, False]
    links, fixed = default_links(["dram", "disk"], None, device="cuda", fixed={"disk": 1e3})
    assert links[1].bandwidth_Bps == 1e3 and fixed == [False, True]
    links, _ = default_links(["dram", "disk"], None, device="cuda", fixed={})
    assert links[1].bandwidth_Bps < DEFAULT_DISK_BPS  # the unmeasured default, in series with DRAM


def test_online_loads_move_a_link_to_what_is_measured() -> None:
    online = OnlineCost([LinkCost(bandwidth_Bps=20e9), LinkCost(bandwidth_Bps=3e9)], PrefillCost(per_token_s=1e-5),
                        fixed=[False, False], chunk_bytes=CHUNK)
    for _ in range(30):  # the disk turns out to read at 0.5 GB/s
        online.observe_load(LoadSample(1, 4 * CHUNK, 4 * CHUNK / 0.5e9))
    assert online.model.links[1].bandwidth_Bps == pytest.approx(0.5e9, rel=0.01)
    assert online.model.links[0].bandwidth_Bps == 20e9  # untouched
    online.observe_load(LoadSample(1, CHUNK, 0.0))  # a zero time teaches nothing (and divides by nothing)
    online.observe_load(LoadSample(5, CHUNK, 1.0))  # a level the model does not know: ignored
    assert online.model.links[1].bandwidth_Bps == pytest.approx(0.5e9, rel=0.01)


def test_one_sample_moves_a_link_only_part_of_the_way() -> None:
    online = OnlineCost([LinkCost(bandwidth_Bps=4e9)], PrefillCost(per_token_s=1e-5), chunk_bytes=CHUNK)
    online.observe_load(LoadSample(0, CHUNK, CHUNK / 1e9))  # one chunk at 1 GB/s against a prior of 4
    assert 1e9 < online.model.links[0].bandwidth_Bps < 4e9


def test_a_fixed_link_is_not_refined() -> None:
    online = OnlineCost([LinkCost(bandwidth_Bps=1e3)], PrefillCost(per_token_s=1e-5), fixed=[True],
                        chunk_bytes=CHUNK)
    for _ in range(10):
        online.observe_load(LoadSample(0, CHUNK, CHUNK / 1e9))
    assert online.model.links[0].bandwidth_Bps == 1e3


def test_online_forwards_scale_the_prefill_keeping_its_shape() -> None:
    prior = PrefillCost(per_token_s=1e-5, per_token_ctx_s=1e-9)
    online = OnlineCost([LinkCost(bandwidth_Bps=1e9)], prior, chunk_bytes=CHUNK)
    for new, past in ((2048, 0), (512, 4096), (4096, 1024)) * 10:  # every forward takes 3x the prior
        pairs = new * (past + new / 2)
        online.observe_forward(ForwardSample(new, pairs, 3 * prior.seconds(past, new)))
    got = online.model.prefill
    assert got.per_token_s == pytest.approx(3e-5, rel=0.01)
    assert got.per_token_ctx_s == pytest.approx(3e-9, rel=0.01)


def test_calibration_travels_through_a_file_read_once(tmp_path: Path) -> None:
    path = tmp_path / "kvtier-e.calibration.json"
    calibration = Calibration(device="cpu", dram_Bps=5e9, disk_Bps=None, flops_per_s=2e11, seconds=0.1)
    calibration.save(path)
    assert Calibration.take(path) == calibration
    assert not path.exists()
    assert Calibration.take(path) is None  # none: the scheduler starts from defaults
    path.write_text('{"device": 3')
    assert Calibration.take(path) is None


def test_measure_disk_reads_chunk_files_and_leaves_nothing(tmp_path: Path) -> None:
    layout = KVLayout(model="m", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", tokens_per_chunk=128)
    rate = measure_disk(layout, tmp_path)
    assert rate is not None and rate > 0
    assert list(tmp_path.iterdir()) == []


def test_measure_disk_on_a_root_it_cannot_write_is_none(tmp_path: Path) -> None:
    layout = KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=64, dtype="float32", tokens_per_chunk=16)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert measure_disk(layout, blocker) is None


def test_measure_matmul_gives_a_throughput() -> None:
    torch = pytest.importorskip("torch")
    shape = ModelShape(num_layers=2, hidden=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate=512)
    assert measure_matmul(shape, torch.float32, "cpu", tokens=64) > 1e6



def test_the_measured_throughput_else_the_default_of_the_device() -> None:
    assert flops_or_default(Calibration(device="cpu", flops_per_s=3e11), "cpu") == 3e11
    assert flops_or_default(Calibration(device="cpu"), "cpu") == DEFAULT_FLOPS["cpu"]  # not measured
    assert flops_or_default(None, "cpu") == DEFAULT_FLOPS["cpu"]
    assert flops_or_default(None, "xpu") == DEFAULT_FLOPS["cuda"]  # an unknown kind: the fast default


def test_best_seconds_times_the_fastest_call_after_an_untimed_warm_one() -> None:
    import time

    delays = [0.0, 0.15, 0.05, 0.15]  # the warm-up is the fastest: were it timed, it would be the best
    calls: list[float] = []

    def run() -> None:
        calls.append(delays[len(calls)])
        time.sleep(calls[-1])

    best = best_seconds(run, repeats=3)
    assert calls == delays
    assert 0.05 <= best < 0.15


def test_sync_device_on_the_cpu_returns() -> None:
    torch = pytest.importorskip("torch")
    sync_device("cpu")
    sync_device(torch.device("cpu"))
    assert best_seconds(lambda: torch.ones(8) @ torch.ones(8), repeats=1, device="cpu") > 0
