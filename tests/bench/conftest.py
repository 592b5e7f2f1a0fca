"""Fixtures of the benchmark tests: the shared traces (skipped when absent) and tiny traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"


@pytest.fixture
def shared_traces() -> Path:
    if not (TRACES / "mooncake_synthetic_trace.jsonl").exists():
        pytest.skip(f"shared traces not found at {TRACES}")
    return TRACES


def write_mooncake(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_mooncake(tmp_path: Path) -> Path:
    """Six requests: two share a 3-block prefix, one repeats exactly, one is partial."""
    return write_mooncake(tmp_path / "tiny.jsonl", [
        {"timestamp": 0, "input_length": 1536, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 100, "input_length": 2000, "output_length": 5, "hash_ids": [0, 1, 2, 3]},
        {"timestamp": 250, "input_length": 1000, "output_length": 5, "hash_ids": [7, 8]},
        {"timestamp": 400, "input_length": 1536, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 900, "input_length": 2048, "output_length": 5, "hash_ids": [0, 1, 9, 10]},
        {"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [7, 8]},
    ])
