"""Bad input at the public API fails at the call, naming the argument, and changes nothing;
a failed background write-through is raised once and never wedges flush() or close()."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.errors import ArgumentTypeError, ArgumentValueError, KVTierError, LayoutError, TierError
from kvtier.hierarchy import ContextMemory
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from tests.conftest import make_keys, make_payloads

LAYOUT = KVLayout(model="test/tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", tokens_per_chunk=4)
CB = LAYOUT.chunk_bytes


@pytest.fixture
def mem(tmp_path: Path) -> Iterator[ContextMemory]:
    tiers = [DramTier(LAYOUT, capacity_bytes=4 * CB),
             DiskTier(LAYOUT, path=tmp_path, capacity_bytes=16 * CB, fsync=False)]
    with ContextMemory(LAYOUT, tiers) as m:  # type: ignore[arg-type]
        yield m


def _unchanged(mem: ContextMemory) -> None:
    mem.flush()
    assert all(len(ix) == 0 for ix in mem.indexes) and mem.directory.settled()
    assert list(mem.tiers[0].keys()) == [] and list(mem.tiers[1].keys()) == []


KEYS = make_keys(LAYOUT, 2)
GOOD = make_payloads(LAYOUT, 2)

BAD_STORES = [  # (keys, payloads, error class, words the message must contain)
    (KEYS[:1], [b"short"], ArgumentTypeError, "payloads[0]"),
    (KEYS[:1], [bytes(CB)], ArgumentTypeError, "payloads[0]"),
    (KEYS[:1], [list(range(8))], ArgumentTypeError, "payloads[0]"),
    (KEYS[:1], [None], ArgumentTypeError, "payloads[0]"),
    (KEYS[:1], None, ArgumentTypeError, "payloads"),
    (KEYS[:1], GOOD[0], ArgumentValueError, "payloads"),  # one array, not a list of them
    (KEYS, GOOD[:1], ArgumentValueError, "1 payloads for 2 keys"),
    (KEYS[:1], GOOD, ArgumentValueError, "2 payloads for 1 keys"),
    (KEYS[:1], [GOOD[0][:-1]], LayoutError, "payloads[0]"),
    (KEYS[:1], [GOOD[0].view(np.int8)], LayoutError, "dtype=int8"),
    (KEYS[:1], [np.zeros((2, CB // 2), np.uint8)], LayoutError, "shape=(2,"),
    (KEYS[:1], [np.zeros(2 * CB, np.uint8)[::2]], LayoutError, "contiguous"),
    (["a" * 16], GOOD[:1], ArgumentTypeError, "keys[0]"),
    ([KEYS[0], 7], GOOD, ArgumentTypeError, "keys[1]"),
    ([b"x" * 15], GOOD[:1], ArgumentValueError, "keys[0]"),
    (KEYS[0], GOOD[:1], ArgumentTypeError, "keys"),  # one key, not a list of them
]


@pytest.mark.parametrize(("keys", "payloads", "error", "words"), BAD_STORES)
def test_bad_store_fails_at_the_call_and_stores_nothing(mem: ContextMemory, keys: object, payloads: object,
                                                        error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        mem.store(keys, payloads)  # type: ignore[arg-type]
    _unchanged(mem)
    assert mem.store(KEYS, GOOD) == 2  # and the hierarchy works on
    mem.close()  # closes cleanly: nothing left pending or failing in the background


def test_every_argument_error_is_a_kvtier_error_and_a_python_one() -> None:
    assert issubclass(ArgumentTypeError, KVTierError) and issubclass(ArgumentTypeError, TypeError)
    assert issubclass(ArgumentValueError, KVTierError) and issubclass(ArgumentValueError, ValueError)
    assert issubclass(LayoutError, ValueError)


def test_bad_load_buffers(mem: ContextMemory) -> None:
    mem.store(KEYS, GOOD)
    mem.flush()
    cases: list[tuple[object, type[Exception], str]] = [
        ([np.zeros(CB, np.uint8)], ArgumentValueError, "1 buffers for 2 keys"),
        ([np.zeros(CB, np.uint8), np.zeros(CB - 1, np.uint8)], LayoutError, r"outs\[1\]"),
        ([np.zeros(CB, np.uint8), bytearray(CB)], ArgumentTypeError, r"outs\[1\]"),
        ([np.zeros(CB, np.uint8), np.zeros(CB, np.float32)], LayoutError, "float32"),
        ([np.zeros(CB, np.uint8), np.zeros(CB, np.uint8)[:0]], LayoutError, r"outs\[1\]"),
        (None, ArgumentTypeError, "outs"),
    ]
    readonly = np.zeros(CB, np.uint8)
    readonly.flags.writeable = False
    cases.append(([np.zeros(CB, np.uint8), readonly], ArgumentValueError, "read-only"))
    for outs, error, words in cases:
        with pytest.raises(error, match=words):
            mem.load(KEYS, outs)  # type: ignore[arg-type]
    assert mem.directory.settled()
    outs = [np.zeros(CB, np.uint8) for _ in range(3)]  # more buffers than keys: the rest unused
    assert mem.load(KEYS, outs) == 2 and (outs[1] == GOOD[1]).all() and not outs[2].any()


def test_lookup_takes_any_iterable_and_refuses_bad_keys(mem: ContextMemory) -> None:
    mem.store(KEYS, GOOD)
    assert mem.lookup(k for k in KEYS).num_chunks == 2  # a generator
    assert mem.lookup(iter(KEYS)).num_chunks == 2
    assert mem.lookup(tuple(KEYS)).num_chunks == 2
    with pytest.raises(ArgumentTypeError, match=r"keys\[1\]"):
        mem.lookup([KEYS[0], KEYS[1].hex()])  # type: ignore[list-item]
    with pytest.raises(ArgumentTypeError, match="keys"):
        mem.lookup(KEYS[0])
    with pytest.raises(ArgumentTypeError, match="keys"):
        mem.lookup(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [[1.0, 2.0, 3.0, 4.0], np.arange(8) + 0.5, ["1", "2", "3", "4"], [True] * 4])
def test_keys_for_refuses_non_integer_token_ids(mem: ContextMemory, tokens: object) -> None:
    with pytest.raises(ArgumentTypeError, match="token_ids"):
        mem.keys_for(tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [[-1, 2, 3, 4], [2**31, 0, 0, 0], [[1, 2, 3, 4]]])
def test_keys_for_refuses_token_ids_out_of_range_or_shape(mem: ContextMemory, tokens: object) -> None:
    with pytest.raises(ArgumentValueError, match="token_ids"):
        mem.keys_for(tokens)  # type: ignore[arg-type]


def test_keys_for_takes_ints_of_any_width(mem: ContextMemory) -> None:
    ids = list(range(12))
    want = mem.keys_for(ids)
    assert len(want) == 3 and mem.keys_for([]) == []
    for dtype in (np.int32, np.int64, np.uint16):
        assert mem.keys_for(np.asarray(ids, dtype=dtype)) == want


@pytest.mark.parametrize(("ttl", "error"), [(-1, ArgumentValueError), (0, ArgumentValueError),
                                            (float("nan"), ArgumentValueError), (float("inf"), ArgumentValueError),
                                            ("10", ArgumentTypeError), (True, ArgumentTypeError)])
def test_bad_pins(mem: ContextMemory, ttl: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="ttl_s"):
        mem.pin(KEYS, ttl)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="persist"):
        mem.pin(KEYS, persist="yes")  # type: ignore[arg-type]
    assert not any(mem.pinned(k) for k in KEYS)


def test_every_keyed_method_checks_its_keys(mem: ContextMemory) -> None:
    bad: list[object] = [KEYS[0], b"short"]
    for call in (mem.pin, mem.unpin, mem.delete, mem.store_in_place, mem.lookup):
        with pytest.raises(ArgumentValueError, match=r"keys\[1\]"):
            call(bad)  # type: ignore[operator]
    with pytest.raises(ArgumentValueError, match=r"keys\[1\]"):
        mem.borrow_prefix(bad)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="key"):
        mem.pinned("k")  # type: ignore[arg-type]
    _unchanged(mem)


def test_in_place_commit_upto_is_checked(mem: ContextMemory) -> None:
    op = mem.store_in_place(KEYS)
    with pytest.raises(ArgumentValueError, match="upto"):
        op.commit(3)
    with pytest.raises(ArgumentTypeError, match="upto"):
        op.commit(1.5)  # type: ignore[arg-type]
    for view, payload in zip(op.views, GOOD, strict=True):
        assert view is not None
        view[:] = payload
    assert op.commit(1) == 1  # still open after the refused calls
    assert mem.lookup(KEYS).num_chunks == 1


# --- background write-through failures -------------------------------------------------------
class _BrokenDisk(DiskTier):
    """A disk tier with a bug: every put raises (an error no tier is supposed to raise)."""

    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        raise RuntimeError("disk bug")


def test_a_failed_write_through_is_logged_raised_once_and_closes(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    disk = _BrokenDisk(LAYOUT, path=tmp_path, capacity_bytes=16 * CB, fsync=False)
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=4 * CB), disk])
    with caplog.at_level(logging.ERROR, logger="kvtier.hierarchy"):
        assert mem.store(KEYS, GOOD) == 2
        with pytest.raises(TierError, match="disk bug"):
            mem.flush()
    assert sum("write-through of 2 chunks failed" in r.getMessage() for r in caplog.records) == 1
    assert mem.directory.settled() and KEYS[0] not in mem.indexes[1]  # not left pending in the disk index
    mem.flush()  # raised once: not again
    assert mem.load(KEYS, [np.zeros(CB, np.uint8) for _ in KEYS]) == 2  # DRAM still serves them
    mem.store(make_keys(LAYOUT, 2, seed=9), make_payloads(LAYOUT, 2))  # fails again in the background
    closed: list[str] = []
    disk.close = lambda: closed.append("disk")  # type: ignore[method-assign]
    with pytest.raises(TierError):
        mem.close()
    assert closed == ["disk"]  # the tiers were closed all the same


def test_a_demotion_that_raises_leaves_nothing_pending(tmp_path: Path) -> None:
    disk = _BrokenDisk(LAYOUT, path=tmp_path, capacity_bytes=16 * CB, fsync=False)
    mem = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=2 * CB), disk], write_through=False)
    assert mem.store(KEYS, GOOD) == 2
    with pytest.raises(RuntimeError, match="disk bug"):
        mem.store(make_keys(LAYOUT, 1, seed=9), make_payloads(LAYOUT, 1))  # DRAM full: a victim goes down
    assert mem.directory.settled()
    assert set(mem.tiers[0].keys()) == set(mem.indexes[0].sizes) and len(mem.indexes[0]) == 1
    mem.close()
