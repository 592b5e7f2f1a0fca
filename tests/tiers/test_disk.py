from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.codec import HEADER_BYTES
from kvtier.layout import KVLayout
from kvtier.testing import TierConformance
from kvtier.tiers.disk import DiskTier
from tests.conftest import FORGERIES, forgery, make_keys, make_payloads

_TINY = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)


class TestDiskTier(TierConformance):
    @pytest.fixture
    def tier(self, layout: KVLayout, tmp_path: Path) -> Iterator[DiskTier]:
        t = DiskTier(layout, path=tmp_path, capacity_bytes=64 * layout.chunk_bytes, fsync=True)
        yield t
        t.close()


def _buf(layout: KVLayout) -> np.ndarray:
    return np.zeros(layout.chunk_bytes, dtype=np.uint8)


def test_layout_of_files_on_disk(small_layout: KVLayout, tmp_path: Path) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    tier.put(key, payload)
    h = key.hex()
    path = tmp_path / f"{small_layout.fingerprint:016x}" / h[:2] / h[2:4] / f"{h}.kvc"
    assert path == tier.path_of(key) and path.is_file()
    data = path.read_bytes()
    assert data[:4] == b"KVTC" and len(data) == HEADER_BYTES + small_layout.chunk_bytes
    assert data[HEADER_BYTES:] == payload.tobytes()


def test_capacity_refuses_without_losing_data(small_layout: KVLayout, tmp_path: Path) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=2 * small_layout.chunk_bytes)
    keys, payloads = make_keys(small_layout, 3), make_payloads(small_layout, 3)
    assert tier.put_many(keys, payloads) .count(True) == 2
    assert tier.used_bytes == 2 * small_layout.chunk_bytes
    assert sum(tier.contains_many(keys)) == 2


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty"])
def test_damaged_file_is_never_served(small_layout: KVLayout, tmp_path: Path, damage: str) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    tier.put(key, payload)
    path = tier.path_of(key)
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[HEADER_BYTES + 100] ^= 0x01
    elif damage == "flip_header":
        data[20] ^= 0x80
    elif damage == "truncate":
        data = data[: HEADER_BYTES + 37]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    out = np.full(small_layout.chunk_bytes, 0x5A, dtype=np.uint8)
    assert not tier.get_into(key, out)
    assert tier.stats.corrupt == 1
    assert not path.exists() and not tier.contains(key)  # deleted, so it is not retried


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_file_is_never_served_nor_indexed(small_layout: KVLayout, tmp_path: Path, kind: str) -> None:
    """Checksums right, but a payload of another length or non-zero reserved fields: a counted,
    deleted miss that leaves the buffer alone, and the reopen scan does not index it."""
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    keys, payloads = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    for key, payload in zip(keys, payloads, strict=True):
        tier.put(key, payload)
        tier.path_of(key).write_bytes(forgery(kind, key, small_layout, payload))
    out = np.full(small_layout.chunk_bytes, 0x5A, dtype=np.uint8)
    assert not tier.get_into(keys[0], out)
    assert (out == 0x5A).all() and tier.stats.corrupt == 1 and not tier.path_of(keys[0]).exists()
    tier.close()
    reopened = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    assert list(reopened.keys()) == [] and reopened.used_bytes == 0
    assert reopened.stats.corrupt == 1 and not reopened.path_of(keys[1]).exists()
    reopened.close()


def test_foreign_layout_chunk_is_rejected(small_layout: KVLayout, tmp_path: Path) -> None:
    other = KVLayout(model="another/model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                     tokens_per_chunk=4)
    assert other.chunk_bytes == small_layout.chunk_bytes and other.fingerprint != small_layout.fingerprint
    theirs = DiskTier(other, path=tmp_path, capacity_bytes=1 << 20)
    ours = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    theirs.put(key, payload)
    # Each layout has its own subtree: the other model's chunk is invisible, not an error.
    assert not ours.contains(key)
    # A foreign chunk planted in our subtree (a bad copy, a bug) is refused, dropped, counted.
    ours.path_of(key).parent.mkdir(parents=True, exist_ok=True)
    ours.path_of(key).write_bytes(theirs.path_of(key).read_bytes())
    assert not ours.get_into(key, _buf(small_layout))
    assert ours.stats.corrupt == 1


def test_foreign_layout_error_message_is_clear(small_layout: KVLayout) -> None:
    from kvtier.codec import decode_header, encode_header
    from kvtier.errors import ForeignLayoutError

    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    header = encode_header(key, small_layout.fingerprint, payload)
    with pytest.raises(ForeignLayoutError, match="different model, shape, dtype or chunk size"):
        decode_header(header, key=key, layout_fingerprint=small_layout.fingerprint ^ 1,
                      chunk_bytes=small_layout.chunk_bytes)


def test_restart_rebuilds_index_and_cleans_strays(small_layout: KVLayout, tmp_path: Path) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    keys, payloads = make_keys(small_layout, 5), make_payloads(small_layout, 5)
    tier.put_many(keys, payloads)
    tier.close()
    # A crash mid-write leaves a temp file of a dead writer, and a torn final file.
    stray = tier.path_of(keys[0]).parent / ".tmp.999999999.abcdef"
    stray.write_bytes(b"partial")
    torn = tier.path_of(keys[4])
    torn.write_bytes(torn.read_bytes()[:HEADER_BYTES + 10])
    again = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    assert not stray.exists()
    assert set(again.keys()) == set(keys[:4])
    assert again.stats.corrupt == 1
    assert again.used_bytes == 4 * small_layout.chunk_bytes
    out = _buf(small_layout)
    assert again.get_into(keys[2], out)
    np.testing.assert_array_equal(out, payloads[2])


def test_new_process_finds_every_committed_chunk(small_layout: KVLayout, tmp_path: Path) -> None:
    """Write in a child process that exits right after put() returns; read here."""
    script = textwrap.dedent(f"""
        import numpy as np
        from kvtier.layout import KVLayout
        from kvtier.tiers.disk import DiskTier
        from tests.conftest import make_keys, make_payloads
        layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                          tokens_per_chunk=4)
        tier = DiskTier(layout, path={str(tmp_path)!r}, capacity_bytes=1 << 20)
        assert all(tier.put_many(make_keys(layout, 20), make_payloads(layout, 20)))
        import os; os._exit(0)   # no clean shutdown: put() returning must be enough
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2])
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    keys, payloads = make_keys(small_layout, 20), make_payloads(small_layout, 20)
    for k, p in zip(keys, payloads, strict=True):
        out = _buf(small_layout)
        assert tier.get_into(k, out)
        np.testing.assert_array_equal(out, p)


def _writer_reader(root: str, seed: int, n: int, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                      tokens_per_chunk=4)
    tier = DiskTier(layout, path=root, capacity_bytes=1 << 30, fsync=False)
    mine, theirs = make_keys(layout, n, seed=seed), make_keys(layout, n, seed=1 - seed)
    shared_keys = make_keys(layout, n, seed=42)  # both write these: same key = same bytes
    barrier.wait()
    assert all(tier.put_many(mine, make_payloads(layout, n, seed=seed)))
    assert all(tier.put_many(shared_keys, make_payloads(layout, n, seed=42)))
    barrier.wait()
    found = 0
    for keys, pseed in ((theirs, 1 - seed), (shared_keys, 42)):
        for k, p in zip(keys, make_payloads(layout, n, seed=pseed), strict=True):
            out = np.zeros(layout.chunk_bytes, np.uint8)
            if tier.get_into(k, out):
                assert (out == p).all(), "served wrong bytes"
                found += 1
    results.put((seed, found))


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer_reader, args=(str(tmp_path), seed, 30, barrier, results)) for seed in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [(0, 60), (1, 60)]
    leftovers = [p for p in tmp_path.rglob(".tmp.*")]
    assert not leftovers


def test_disk_full_is_a_refused_put_not_a_crash(small_layout: KVLayout, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past a size fail with EFBIG, like a full disk (ENOSPC)."""
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from kvtier.layout import KVLayout
        from kvtier.tiers.disk import DiskTier
        from tests.conftest import make_keys, make_payloads
        layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                          tokens_per_chunk=4)
        tier = DiskTier(layout, path={str(tmp_path)!r}, capacity_bytes=1 << 30)
        keys, payloads = make_keys(layout, 2), make_payloads(layout, 2)
        assert tier.put(keys[0], payloads[0])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        assert not tier.put(keys[1], payloads[1])
        assert tier.stats.errors == 1 and not tier.contains(keys[1])
        out = np.zeros(layout.chunk_bytes, np.uint8)
        assert tier.get_into(keys[0], out) and (out == payloads[0]).all()
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK"
    assert not [p for p in tmp_path.rglob(".tmp.*")], "temp file left behind"
    assert os.path.isdir(tmp_path)


# --- persistent pins (PinFiles) -------------------------------------------------------------
def test_pin_on_a_full_disk_is_a_tier_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE 0: no file may grow (EFBIG), as on a full disk; the record written before stays."""
    script = textwrap.dedent(f"""
        import resource, signal
        from kvtier.errors import TierError
        from kvtier.layout import KVLayout
        from kvtier.tiers.disk import DiskTier
        from tests.conftest import make_keys
        layout = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                          tokens_per_chunk=4)
        tier = DiskTier(layout, path={str(tmp_path)!r}, capacity_bytes=1 << 30)
        keys = make_keys(layout, 2)
        tier.pin_files.pin(keys[:1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        try:
            tier.pin_files.pin(keys[1:])
        except TierError as exc:
            assert "pin record" in str(exc), exc
        else:
            raise AssertionError("no error")
        assert keys[0] in tier.pin_files and keys[1] not in tier.pin_files
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [make_keys(_TINY, 1)[0].hex() + ".pin"]


def test_the_pin_cache_is_bounded(small_layout: KVLayout, tmp_path: Path) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20, fsync=False)
    pins = tier.pin_files
    pins.cache_entries = 8
    keys = make_keys(small_layout, 40)
    pins.pin(keys[:1])
    assert all(key not in pins for key in keys[1:])
    assert len(pins._seen) == 8
    assert keys[0] in pins  # fell out of the cache: the record decides again
    tier.close()


def test_pin_records_survive_reopen_and_are_shared(small_layout: KVLayout, tmp_path: Path) -> None:
    keys = make_keys(small_layout, 3)
    a = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20, fsync=True)
    b = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20, fsync=False)  # another process, same root
    try:
        a.pin_files.pin(keys[:2])
        assert keys[0] in b.pin_files and keys[2] not in b.pin_files
        b.pin_files.unpin(keys[1:2])
        assert keys[1] in a.pin_files  # a's answer is cached for recheck_s (1 s) ...
        a.pin_files.recheck_s = 0
        assert keys[1] not in a.pin_files  # ... then the file decides
    finally:
        a.close()
        b.close()
    c = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20)
    try:
        assert c.pin_files.records() == {keys[0]: None}
        assert list(c.keys()) == []  # pin records are not chunks
    finally:
        c.close()


def test_pin_records_expire_and_keep_the_longest(small_layout: KVLayout, tmp_path: Path) -> None:
    now = [1000.0]
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20, fsync=False)
    pins = tier.pin_files
    pins._clock = lambda: now[0]
    keys = make_keys(small_layout, 2)
    try:
        pins.pin(keys[:1], ttl_s=10)
        pins.pin(keys[:1], ttl_s=5)  # shorter: the longer pin stays
        assert pins.expiry(keys[0]) == 1010.0
        pins.pin(keys[1:], ttl_s=5)
        pins.pin(keys[1:])  # no expiry wins
        now[0] = 1020.0
        assert keys[0] not in pins and keys[1] in pins
        assert pins.records() == {keys[1]: None}
        assert not pins._path(keys[0]).exists()  # the expired record was removed
    finally:
        tier.close()


def test_a_damaged_pin_record_still_pins(small_layout: KVLayout, tmp_path: Path) -> None:
    tier = DiskTier(small_layout, path=tmp_path, capacity_bytes=1 << 20, fsync=False)
    key = make_keys(small_layout, 1)[0]
    try:
        tier.pin_files.pin([key])
        tier.pin_files._path(key).write_text("\x00garbage")
        assert key in tier.pin_files  # losing a warehoused chunk is worse than keeping one
        tier.pin_files.unpin([key])
        assert key not in tier.pin_files
    finally:
        tier.close()
