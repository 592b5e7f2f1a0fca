"""The copy engine's store path: device chunks straight into reserved DRAM slots (no staging)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.errors import IntegrationError  # noqa: E402
from kvtier.tiers.cuda import CopyEngine  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402
from tests.conftest import make_keys  # noqa: E402
from tests.tiers.test_cuda import DEVICES, LAYOUT, random_kv  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
def test_copy_to_host_writes_reserved_slots_in_place(device: str) -> None:
    dram = DramTier(LAYOUT, capacity_bytes=8 * LAYOUT.chunk_bytes)
    engine = CopyEngine(LAYOUT, device, pool=dram.pool, staging_bytes=2 * LAYOUT.chunk_bytes)
    kv = random_kv(6 * LAYOUT.tokens_per_chunk, device, seed=2)
    keys = make_keys(LAYOUT, 6)
    chunks, event = engine.gather(kv, 0, 6)  # more chunks than the staging holds: no staging used
    want = list(chunks.cpu().numpy().copy())  # the reference bytes, chunk by chunk

    dram.put(keys[5], want[5])  # slot 0 taken: the reserved slots are 1, 2, 3, 4
    slots = dram.reserve(keys[:4])
    assert slots is not None
    plain = np.full(LAYOUT.chunk_bytes, 7, np.uint8)  # a destination outside the pool
    dests: list[np.ndarray | None] = [slots[0], slots[1], None, plain, slots[2], slots[3]]
    done = engine.copy_to_host(chunks, event, dests)
    engine.wait(done)
    dram.commit(keys[:4])
    assert [dram.slot_of(k) for k in keys[:4]] == [1, 2, 3, 4]  # two runs: 1-2 and 3-4
    for i, dest in enumerate(dests):
        if dest is not None:
            np.testing.assert_array_equal(dest, want[i])
    out = np.empty(LAYOUT.chunk_bytes, np.uint8)
    for key, chunk in zip(keys[:4], [want[0], want[1], want[4], want[5]], strict=True):
        assert dram.get_into(key, out)
        np.testing.assert_array_equal(out, chunk)
    with pytest.raises(IntegrationError, match="destinations"):
        engine.copy_to_host(chunks, None, dests[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copy_to_host_is_asynchronous_until_waited() -> None:
    dram = DramTier(LAYOUT, capacity_bytes=4 * LAYOUT.chunk_bytes)
    engine = CopyEngine(LAYOUT, "cuda", pool=dram.pool)
    keys = make_keys(LAYOUT, 4)
    slots = dram.reserve(keys)
    assert slots is not None and dram.pinned
    chunks, event = engine.gather(random_kv(4 * LAYOUT.tokens_per_chunk, "cuda"), 0, 4)
    done = engine.copy_to_host(chunks, event, slots)
    assert done is not None  # an event on the store stream: the caller waits, then commits
    engine.wait(done)
    dram.commit(keys)
    assert dram.used_bytes == 4 * LAYOUT.chunk_bytes
