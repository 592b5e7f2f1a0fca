"""The disk tier in a root it cannot trust: FIFOs, symlinks, directories where files belong,
deep nesting, loose permissions, stray temp files of a writer that came back with the same pid."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.config import DiskConfig, KVTierConfig
from kvtier.errors import ConfigFieldError, TierError
from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier, PinFiles, chunk_path, layout_root
from kvtier.tiers.disk_files import STRAY_AGE_S
from tests.conftest import make_keys, make_payloads

DEADLINE_S = 30.0  # generous: only a hang (the bug) takes this long


def _buf(layout: KVLayout) -> np.ndarray:
    return np.zeros(layout.chunk_bytes, dtype=np.uint8)


def _returns(fn: Callable[[], object], fifo: Path) -> object:
    """``fn()``'s result, or fail if it does not return within DEADLINE_S (blocked on ``fifo``)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():  # release the reader blocked in open(), then fail
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(DEADLINE_S)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return result[0] if result else None


def _tier(layout: KVLayout, root: Path, **kw: object) -> DiskTier:
    return DiskTier(layout, path=root, capacity_bytes=1 << 20, fsync=False, **kw)  # type: ignore[arg-type]


# --- item 4: a FIFO is never opened blocking ---------------------------------------------------
def test_a_fifo_at_a_chunk_path_is_a_miss_not_a_hang(small_layout: KVLayout, tmp_path: Path) -> None:
    (key, other), (payload, _) = make_keys(small_layout, 2), make_payloads(small_layout, 2)
    first = _tier(small_layout, tmp_path)
    first.put(other, payload)
    fifo = first.path_of(key)
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    first.close()
    tier = _returns(lambda: _tier(small_layout, tmp_path), fifo)  # the index rebuild reads every file
    assert isinstance(tier, DiskTier) and set(tier.keys()) == {other}
    assert _returns(lambda: tier.get_into(key, _buf(small_layout)), fifo) is False
    assert not tier.contains(key) and tier.stats.errors == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not ours to remove
    tier.close()


def test_a_fifo_at_a_pin_record_path_is_not_a_pin_nor_a_hang(small_layout: KVLayout, tmp_path: Path) -> None:
    (key, other) = make_keys(small_layout, 2)
    pins = PinFiles(tmp_path / "pins")
    pins.pin([other])
    fifo = tmp_path / "pins" / f"{key.hex()}.pin"
    os.mkfifo(fifo)
    assert _returns(lambda: key in pins, fifo) is False
    assert _returns(pins.records, fifo) == {other: None}


# --- item 5: private by default ------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(tier: DiskTier, key: ChunkKey) -> dict[str, int]:
    chunk = tier.path_of(key)
    pin = tier.root / "pins" / f"{key.hex()}.pin"
    paths = {"root": tier.root.parent, "layout": tier.root, "fanout1": chunk.parent.parent,
             "fanout2": chunk.parent, "chunk": chunk, "pins": pin.parent, "pin": pin}
    return {name: stat.S_IMODE(os.lstat(p).st_mode) for name, p in paths.items()}


@pytest.mark.parametrize(("mode", "umask", "file_mode", "dir_mode"),
                         [("private", 0o022, 0o600, 0o700), ("private", 0o000, 0o600, 0o700),
                          ("group", 0o077, 0o640, 0o2770)])
def test_files_and_directories_get_the_configured_mode_whatever_the_umask(
        small_layout: KVLayout, tmp_path: Path, mode: str, umask: int, file_mode: int, dir_mode: int) -> None:
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    with _umask(umask):
        tier = _tier(small_layout, tmp_path / "root", **({} if mode == "private" else {"mode": mode}))
        assert tier.put(key, payload)
        tier.pin_files.pin([key])
    modes = _modes(tier, key)
    tier.close()
    assert modes == {"root": dir_mode, "layout": dir_mode, "fanout1": dir_mode, "fanout2": dir_mode,
                     "chunk": file_mode, "pins": dir_mode, "pin": file_mode}


def test_disk_mode_is_a_config_field() -> None:
    assert DiskConfig().mode == "private"
    with pytest.raises(ConfigFieldError, match="mode"):
        DiskConfig(mode="world")  # type: ignore[arg-type]


def test_a_root_others_may_write_to_is_warned_about_once(small_layout: KVLayout, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, 0o777)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.disk"):
        _tier(small_layout, root).close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "world-writable" in warnings[0].getMessage()
    caplog.clear()
    os.chmod(root, 0o700)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.disk"):
        _tier(small_layout, root).close()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def _chunk_dir(layout: KVLayout, root: Path, key: ChunkKey) -> Path:
    return chunk_path(layout_root(root, layout), key).parent


# --- item 8: stray temp files, pid reuse, capacity ------------------------------------------------
def test_a_stray_of_an_earlier_process_with_this_pid_is_removed(small_layout: KVLayout, tmp_path: Path) -> None:
    """PID 1 of a restarted container: the stray's pid is ours, its writer is gone (no lock held)."""
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    _tier(small_layout, tmp_path).put(key, payload)
    stray = _chunk_dir(small_layout, tmp_path, key) / f".tmp.{os.getpid()}.0123456789abcdef"
    stray.write_bytes(b"x" * 4096)
    before = time.time() - 10 * STRAY_AGE_S  # written before the crash
    os.utime(stray, (before, before))
    tier = _tier(small_layout, tmp_path)
    assert not stray.exists()
    assert tier.capacity_bytes == 1 << 20
    tier.close()


def test_a_stray_that_stays_takes_room(small_layout: KVLayout, tmp_path: Path) -> None:
    """A temp file nobody writes (no lock) but too young to be sure of stays, and is counted."""
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    _tier(small_layout, tmp_path).put(key, payload)
    young = _chunk_dir(small_layout, tmp_path, key) / f".tmp.{os.getpid()}.fedcba9876543210"
    young.write_bytes(b"x" * 4096)
    tier = _tier(small_layout, tmp_path)
    assert young.exists()
    assert tier.capacity_bytes == (1 << 20) - 4096
    tier.close()


def test_a_temp_file_a_live_writer_holds_is_never_removed(small_layout: KVLayout, tmp_path: Path) -> None:
    """The lock, not the pid, says a writer is alive (its pid may be of another pid namespace)."""
    (key,), (payload,) = make_keys(small_layout, 1), make_payloads(small_layout, 1)
    _tier(small_layout, tmp_path).put(key, payload)
    live = _chunk_dir(small_layout, tmp_path, key) / ".tmp.999999999.0000000000000000"
    live.write_bytes(b"partial")
    old = time.time() - 10 * STRAY_AGE_S
    os.utime(live, (old, old))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _tier(small_layout, tmp_path).close()
        assert live.exists()
    _tier(small_layout, tmp_path).close()  # the writer is gone now
    assert not live.exists()


# --- item 9: symlinks are never followed ---------------------------------------------------------
def _key_and_fanout(layout: KVLayout) -> tuple[ChunkKey, np.ndarray, str]:
    (key,), (payload,) = make_keys(layout, 1, seed=5), make_payloads(layout, 1, seed=5)
    return key, payload, key.hex()[:2]


def test_a_symlinked_fanout_directory_is_never_followed(small_layout: KVLayout, tmp_path: Path) -> None:
    key, payload, fanout = _key_and_fanout(small_layout)
    elsewhere = _tier(small_layout, tmp_path / "elsewhere")
    assert elsewhere.put(key, payload)  # a valid chunk file outside the root
    target = elsewhere.path_of(key)
    tier = _tier(small_layout, tmp_path / "root")
    (tier.root / fanout).symlink_to(target.parent.parent)
    assert not tier.contains(key)
    assert not tier.get_into(key, _buf(small_layout))  # not served
    tier.delete(key)
    assert target.exists()  # not deleted
    assert not tier.put(key, payload)  # not written
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    tier.close()
    elsewhere.close()


def test_a_symlinked_chunk_is_never_served(small_layout: KVLayout, tmp_path: Path) -> None:
    key, payload, _ = _key_and_fanout(small_layout)
    elsewhere = _tier(small_layout, tmp_path / "elsewhere")
    assert elsewhere.put(key, payload)
    tier = _tier(small_layout, tmp_path / "root")
    link = tier.path_of(key)
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere.path_of(key))
    assert not tier.contains(key)
    assert not tier.get_into(key, _buf(small_layout))
    again = _tier(small_layout, tmp_path / "root")
    assert list(again.keys()) == []  # nor indexed at open
    again.close()
    tier.close()
    elsewhere.close()


def test_symlinked_fanout_directories_are_not_walked_at_open(small_layout: KVLayout, tmp_path: Path) -> None:
    key, payload, fanout = _key_and_fanout(small_layout)
    elsewhere = _tier(small_layout, tmp_path / "elsewhere")
    assert elsewhere.put(key, payload)
    tier = _tier(small_layout, tmp_path / "root")
    (tier.root / fanout).symlink_to(elsewhere.root / fanout)
    again = _tier(small_layout, tmp_path / "root")
    assert list(again.keys()) == []
    assert not again.get_into(key, _buf(small_layout))
    again.close()
    tier.close()


def test_a_symlinked_pins_directory_is_never_written_through(small_layout: KVLayout, tmp_path: Path) -> None:
    (key,) = make_keys(small_layout, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    tier = _tier(small_layout, tmp_path / "root")
    (tier.root / "pins").symlink_to(outside)
    with pytest.raises(TierError):
        tier.pin_files.pin([key])
    assert not any(outside.iterdir())
    (outside / f"{key.hex()}.pin").write_text("never\n")  # a record planted through the link
    assert key not in tier.pin_files and tier.pin_files.records() == {}
    tier.close()


# --- item 10: an unusable root, deep nesting, a directory where a chunk belongs -------------------
def test_a_root_that_cannot_be_created_names_disk_path(small_layout: KVLayout, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = KVTierConfig(tiers=("disk",), disk=DiskConfig(path=tmp_path / "a-file" / "chunks"))
    with pytest.raises(ConfigFieldError, match=r"^disk\.path: .*a-file/chunks"):
        ContextMemory.open(small_layout, config)


def test_deep_nesting_under_the_root_is_not_walked(small_layout: KVLayout, tmp_path: Path) -> None:
    key, payload, _ = _key_and_fanout(small_layout)
    tier = _tier(small_layout, tmp_path)
    assert tier.put(key, payload)
    tier.close()
    top = os.open(tier.path_of(key).parent, os.O_RDONLY | os.O_DIRECTORY)
    fds = [top]
    try:  # 1,100 levels, made one at a time (os.makedirs would recurse too)
        for _ in range(1100):
            os.mkdir("n", dir_fd=fds[-1])
            fds.append(os.open("n", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        again = _tier(small_layout, tmp_path)
        assert set(again.keys()) == {key}
        again.close()
    finally:
        for parent, fd in zip(reversed(fds[:-1]), reversed(fds[1:]), strict=True):
            os.close(fd)
            os.rmdir("n", dir_fd=parent)
        os.close(top)


def test_a_directory_at_a_chunk_path_is_not_a_hit(small_layout: KVLayout, tmp_path: Path) -> None:
    key, _, _ = _key_and_fanout(small_layout)
    tier = _tier(small_layout, tmp_path)
    tier.path_of(key).mkdir(parents=True)
    assert not tier.contains(key)
    assert not tier.get_into(key, _buf(small_layout))
    tier.close()
