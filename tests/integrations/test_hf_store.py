"""KVTierLM's background store: device KV copied straight into reserved DRAM slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.hf import KVTierLM  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402
from tests.integrations.hf_helpers import C, open_memory, prompt, reference  # noqa: E402


def test_store_writes_in_place_and_demotes(model: Any, layout: Any, tmp_path: Path) -> None:
    ids = prompt(7 * C + 3, seed=21)
    dram = DramTier(layout, capacity_bytes=3 * layout.chunk_bytes)
    mem = ContextMemory(layout, [dram, DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30, fsync=False)],
                        write_through=False)
    try:
        with KVTierLM(model, mem, staging_bytes=2 * layout.chunk_bytes, cost="off") as lm:  # 4 groups of <= 2
            with torch.no_grad():
                assert lm.prefill(ids).loaded_tokens == 0
            lm.flush()
            keys = mem.keys_for(ids.numpy())
            assert dram.stats.bytes_written == 7 * layout.chunk_bytes  # every chunk written in place
            assert dram.stats.evictions == 4 and dram.stats.demotions == 4
            assert mem.lookup(keys).tiers == (1, 1, 1, 1, 0, 0, 0)
            assert not dram._reserved and mem.directory.settled()
            with torch.no_grad():
                result = lm.prefill(ids)
        assert result.loaded_tokens == 7 * C
        ref_logits, _ = reference(model, ids)
        assert (result.logits - ref_logits[:, 7 * C:]).abs().max().item() < 1e-4
    finally:
        mem.close()


def test_store_writes_through_after_commit(model: Any, layout: Any, tmp_path: Path) -> None:
    ids = prompt(5 * C + 3, seed=24)
    mem = open_memory(layout, tmp_path)
    try:
        with KVTierLM(model, mem, staging_bytes=2 * layout.chunk_bytes) as lm, torch.no_grad():
            lm.prefill(ids)
        mem.flush()
        keys = mem.keys_for(ids.numpy())
        assert mem.lookup(keys).tiers == (0,) * 5
        assert mem.tiers[0].stats.bytes_written == 5 * layout.chunk_bytes
        assert all(mem.tiers[1].contains(k) for k in keys)
    finally:
        mem.close()
    mem = open_memory(layout, tmp_path)  # a restart finds every chunk on disk
    try:
        assert mem.lookup(mem.keys_for(ids.numpy())).tiers == (1,) * 5
    finally:
        mem.close()


def test_failed_store_leaves_no_reservation(model: Any, layout: Any, tmp_path: Path) -> None:
    ids = prompt(6 * C + 1, seed=22)
    mem = open_memory(layout, tmp_path)
    try:
        with KVTierLM(model, mem, staging_bytes=2 * layout.chunk_bytes) as lm:
            calls = [0]
            real = lm.engine.copy_to_host

            def flaky(*args: Any) -> Any:
                calls[0] += 1
                if calls[0] == 3:
                    raise RuntimeError("device copy failed")
                return real(*args)

            lm.engine.copy_to_host = flaky  # type: ignore[method-assign]
            with torch.no_grad():
                lm.prefill(ids)
            with pytest.raises(RuntimeError, match="device copy failed"):
                lm.flush()
        mem.flush()
        keys = mem.keys_for(ids.numpy())
        assert mem.lookup(keys).num_chunks == 2  # the first group was committed, the second aborted
        dram = mem.tiers[0]
        assert isinstance(dram, DramTier)
        assert not dram._reserved and mem.directory.settled() and dram.used_bytes == 2 * layout.chunk_bytes
    finally:
        mem.close()


def test_store_without_a_dram_top_tier(model: Any, layout: Any, tmp_path: Path) -> None:
    ids = prompt(3 * C + 2, seed=23)
    mem = ContextMemory(layout, [DiskTier(layout, path=tmp_path, capacity_bytes=1 << 30, fsync=False)])
    try:
        with KVTierLM(model, mem, cost="off") as lm:
            with torch.no_grad():
                lm.prefill(ids)
            lm.flush()
            with torch.no_grad():
                result = lm.prefill(ids)
        assert result.loaded_tokens == 3 * C
    finally:
        mem.close()


def test_a_failed_store_is_logged_and_not_dropped_by_later_stores(model: Any, layout: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import concurrent.futures
    import logging

    mem = open_memory(layout, tmp_path)
    try:
        with KVTierLM(model, mem, staging_bytes=2 * layout.chunk_bytes) as lm:
            real = lm.engine.copy_to_host
            lm.engine.copy_to_host = lambda *args: (_ for _ in ()).throw(RuntimeError("device copy failed"))
            with torch.no_grad(), caplog.at_level(logging.ERROR, logger="kvtier.integrations.hf"):
                lm.prefill(prompt(2 * C + 1, seed=23))
                concurrent.futures.wait(list(lm._stores))  # it failed ...
                lm.engine.copy_to_host = real  # type: ignore[method-assign]
                lm.prefill(prompt(2 * C + 1, seed=24))  # ... before the next store pruned the list
            assert sum("background store into kvtier failed" in r.getMessage() for r in caplog.records) == 1
            with pytest.raises(RuntimeError, match="device copy failed"):
                lm.flush()
            lm.flush()  # raised once
    finally:
        mem.close()
