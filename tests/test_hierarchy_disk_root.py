"""Disk capacity is for the root: several processes sharing one root keep it under the capacity."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np

from kvtier.hierarchy import ContextMemory
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads
from tests.test_hierarchy import LAYOUT

DISK_CHUNKS = 16
PROCESSES = 3
_SURVEY = {"survey_s": 0.0}  # re-read the root before every put: the bound below is exact


def _writer(root: str, seed: int, barrier: Barrier) -> None:
    tiers = [DramTier(LAYOUT, capacity_bytes=2 * LAYOUT.chunk_bytes),
             DiskTier(LAYOUT, path=root, capacity_bytes=DISK_CHUNKS * LAYOUT.chunk_bytes, fsync=False, **_SURVEY)]
    keys, payloads = make_keys(LAYOUT, 40, seed=seed), make_payloads(LAYOUT, 40, seed=seed)
    with ContextMemory(LAYOUT, tiers) as mem:  # type: ignore[arg-type]
        barrier.wait()
        for key, payload in zip(keys, payloads, strict=True):
            mem.store([key], [payload])  # written through to the disk on the writer thread
            mem.flush()
        outs = [np.zeros(LAYOUT.chunk_bytes, np.uint8)]
        assert mem.load(keys[-1:], outs) == 1 and (outs[0] == payloads[-1]).all()  # in DRAM: no put


def test_processes_sharing_a_root_keep_it_under_the_capacity(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), seed, barrier)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    on_disk = len(list(tmp_path.rglob("*.kvc")))
    # each put leaves room for what it saw; only the puts of the other processes that were in
    # flight (two threads each: the caller's demotions, the write-through) can add to it
    assert on_disk <= DISK_CHUNKS + 2 * (PROCESSES - 1), on_disk
