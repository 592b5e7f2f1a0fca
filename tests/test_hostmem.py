from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from kvtier.hostmem import populated


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_populated_is_a_zeroed_writable_buffer() -> None:
    buf = populated(3 << 20)
    assert buf.dtype == np.uint8 and buf.size == 3 << 20 and buf.flags.writeable
    assert not buf.any()
    buf[-1] = 7
    assert buf[-1] == 7
    assert populated(0).size == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAP_POPULATE and /proc are Linux")
def test_populated_pages_are_resident_before_the_first_write() -> None:
    before = _resident_bytes()
    buf = populated(64 << 20)
    assert _resident_bytes() - before >= 60 << 20  # a plain np.empty would add ~nothing here
    del buf


def test_more_than_is_available_is_not_populated(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.hostmem

    monkeypatch.setattr(kvtier.hostmem, "_available_bytes", lambda: 1 << 20)
    before = _resident_bytes()
    buf = populated(64 << 20)  # lazily backed instead: no OOM risk
    assert buf.size == 64 << 20 and _resident_bytes() - before < 32 << 20
