"""kvtier._fs: the one atomic write, and the callers that moved onto it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvtier._fs as fs
from kvtier.integrations.calibrate import Calibration
from kvtier.integrations.vllm_counters import ConnectorCounters
from kvtier.policy.cost import CostModel, LinkCost, PrefillCost
from kvtier.tiers.disk import PinFiles
from tests.conftest import make_keys
from tests.test_hierarchy import LAYOUT


def test_atomic_write_replaces_the_file_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    fs.atomic_write(path, [b"he", memoryview(b"llo")], mode=0o600)
    assert path.read_bytes() == b"hello" and path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f.json"]


def _writers(tmp_path: Path) -> dict[str, object]:
    model = CostModel(links=(LinkCost(bandwidth_Bps=1e10),), prefill=PrefillCost(per_token_s=1e-4))
    return {"cost model": lambda p: model.save(p),
            "calibration": lambda p: Calibration(device="cpu").save(p),
            "stats file": lambda p: ConnectorCounters().write_json(p, {})}


@pytest.mark.parametrize("what", ["cost model", "calibration", "stats file"])
def test_a_failed_write_leaves_no_temp_file(tmp_path: Path, what: str) -> None:
    target = tmp_path / "out.json"
    target.mkdir()  # the rename onto a directory fails
    with pytest.raises(OSError):
        _writers(tmp_path)[what](target)  # type: ignore[operator]
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_pin_record_is_fsynced_before_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a crash can leave an empty record, which reads as pinned for good."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(*args: object, **kwargs: object) -> None:
        events.append("replace")
        real_replace(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pins = PinFiles(tmp_path / "pins")
    pins.pin(make_keys(LAYOUT, 2))
    pins.close()
    assert events == ["fsync file", "replace", "fsync file", "replace", "fsync dir"]
