"""The directory against a plain model: a dict of (tier, chunk) -> state, reader and pin counts.

A Hypothesis state machine drives ``Directory`` through every transition in any order (stores
reserved, completed and aborted, victims leaving and gone, deletes, reads held and released, pins)
and checks after each step: no pinned, STORING or (top tier) read chunk is ever a victim, the
index is exactly the STORING and PRESENT chunks (no entry without a store), ``lookup`` reports
PRESENT chunks only, and no tier holds more than its capacity.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtier.directory import Directory, KeyState
from kvtier.keys import ChunkKey
from kvtier.policy.registry import make_policies

CHUNK = 10  # bytes per chunk: the directory only counts them
KEYS = [ChunkKey(bytes([i]) * 16) for i in range(6)]
ABSENT, STORING, PRESENT, LEAVING = KeyState.ABSENT, KeyState.STORING, KeyState.PRESENT, KeyState.LEAVING

keys_st = st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)


class DirectoryMachine(RuleBasedStateMachine):
    directory: Directory
    capacities: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[tuple[int, ChunkKey], KeyState] = {}  # ABSENT when missing
        self.readers: Counter[ChunkKey] = Counter()
        self.pins: Counter[ChunkKey] = Counter()
        self.loads: list[list[ChunkKey]] = []  # prefixes held by prepare_load, not completed yet
        self.records: set[ChunkKey] = set()  # persistent pin records

    @initialize(policy=st.sampled_from(["lru", "lru-prefix", "s3fifo"]),
                capacities=st.lists(st.integers(0, 4), min_size=1, max_size=3))
    def build(self, policy: str, capacities: list[int]) -> None:
        self.capacities = capacities
        self.directory = Directory([f"t{i}" for i in range(len(capacities))], [c * CHUNK for c in capacities],
                                   make_policies(policy, len(capacities)), chunk_bytes=CHUNK,
                                   pin_records=self.records)

    # --- helpers ----------------------------------------------------------------------------
    def _at(self, level: int, key: ChunkKey) -> KeyState:
        return self.state.get((level, key), ABSENT)

    def _set(self, level: int, key: ChunkKey, state: KeyState) -> None:
        if state is ABSENT:
            self.state.pop((level, key), None)
        else:
            self.state[(level, key)] = state

    def _in(self, state: KeyState) -> list[tuple[int, ChunkKey]]:
        return sorted(k for k, s in self.state.items() if s is state)

    def _may_leave(self, level: int, key: ChunkKey) -> bool:
        return (self._at(level, key) is PRESENT and not self.pins[key] and key not in self.records
                and not (level == 0 and self.readers[key]))

    def _level(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, len(self.capacities) - 1), label="level")

    # --- store ------------------------------------------------------------------------------
    @rule(data=st.data(), keys=keys_st, room=st.booleans())
    def prepare_store(self, data: st.DataObject, keys: list[ChunkKey], room: bool) -> None:
        level = self._level(data)
        before = {k: self._at(level, k) for k in KEYS}
        plan = self.directory.prepare_store(level, keys, room=room)
        assert sorted(plan.reserved + plan.refused + plan.present) == list(range(len(keys)))
        for i in plan.present:
            assert before[keys[i]] in (STORING, PRESENT) or keys[i] in keys[:i]
        for i in plan.reserved:
            assert before[keys[i]] is ABSENT and room
            self._set(level, keys[i], STORING)
        for i in plan.refused:  # a victim of an earlier chunk of the batch is LEAVING by then
            assert before[keys[i]] in (ABSENT, LEAVING) or keys[i] in plan.victims
        assert len(set(plan.victims)) == len(plan.victims)
        for victim in plan.victims:
            assert before[victim] is PRESENT, "only PRESENT chunks are victims"
            assert self._may_leave(level, victim), "a pinned or read chunk was chosen as a victim"
            self._set(level, victim, LEAVING)

    @rule(data=st.data(), keys=keys_st)
    def store(self, data: st.DataObject, keys: list[ChunkKey]) -> None:
        """A whole store (prepare, then complete), as most are: chunks get PRESENT quickly."""
        before = set(self._in(STORING))
        self.prepare_store(data, keys, True)
        for level, key in sorted(set(self._in(STORING)) - before):
            self.directory.complete_store(level, [key])
            self._set(level, key, PRESENT)

    @precondition(lambda self: any(s is STORING for s in self.state.values()))
    @rule(data=st.data(), stored=st.booleans())
    def finish_store(self, data: st.DataObject, stored: bool) -> None:
        level, key = data.draw(st.sampled_from(self._in(STORING)))
        if stored:
            self.directory.complete_store(level, [key])
            self._set(level, key, PRESENT)
        else:
            self.directory.abort_store(level, [key])
            self._set(level, key, ABSENT)

    # --- leave ------------------------------------------------------------------------------
    @rule(data=st.data(), keys=keys_st, evictable_only=st.booleans())
    def prepare_leave(self, data: st.DataObject, keys: list[ChunkKey], evictable_only: bool) -> None:
        level = self._level(data)
        if evictable_only:
            expected = [k for k in dict.fromkeys(keys) if self._may_leave(level, k)]
        else:
            expected = [k for k in dict.fromkeys(keys) if self._at(level, k) is not STORING]
        gone, marked = self.directory.prepare_leave(level, keys, evictable_only=evictable_only)
        assert gone == expected
        assert marked == [k for k in gone if self._at(level, k) is not LEAVING]
        for key in marked:
            self._set(level, key, LEAVING)

    @precondition(lambda self: any(s is LEAVING for s in self.state.values()))
    @rule(data=st.data())
    def complete_leave(self, data: st.DataObject) -> None:
        level, key = data.draw(st.sampled_from(self._in(LEAVING)))
        self.directory.complete_leave(level, [key])
        self._set(level, key, ABSENT)

    @rule(data=st.data(), key=st.sampled_from(KEYS), there=st.booleans())
    def forget(self, data: st.DataObject, key: ChunkKey, there: bool) -> None:
        level = self._level(data)
        self.directory.forget(level, key, lambda: there)
        if self._at(level, key) is PRESENT and not there:
            self._set(level, key, ABSENT)

    # --- load -------------------------------------------------------------------------------
    @rule(keys=keys_st)
    def load(self, keys: list[ChunkKey]) -> None:
        levels = self.directory.lookup(keys)
        expected: list[int] = []
        for key in keys:
            found = [lv for lv in range(len(self.capacities)) if self._at(lv, key) is PRESENT]
            if not found:
                break
            expected.append(found[0])
        assert levels == expected, "lookup reports PRESENT chunks only, from the highest tier"
        held, held_levels = self.directory.prepare_load(keys[:len(levels)], levels)
        assert (held, held_levels) == (keys[:len(levels)], levels)
        self.readers.update(held)
        self.loads.append(held)

    @precondition(lambda self: bool(self.loads))
    @rule(data=st.data())
    def complete_load(self, data: st.DataObject) -> None:
        held = self.loads.pop(data.draw(st.integers(0, len(self.loads) - 1)))
        self.directory.complete_load(held)
        self.readers -= Counter(held)

    @rule(data=st.data(), keys=keys_st, adoptable=st.booleans())
    def record_load(self, data: st.DataObject, keys: list[ChunkKey], adoptable: bool) -> None:
        """Served chunks are touched; one another process wrote is adopted if it fits."""
        levels = [self._level(data) for _ in keys]
        self.directory.record_load(keys, levels, lambda level, key: adoptable)
        for key, level in zip(keys, levels, strict=True):
            used = sum(1 for (lv, _), s in self.state.items() if lv == level and s in (STORING, PRESENT))
            if self._at(level, key) is ABSENT and adoptable and used < self.capacities[level]:
                self._set(level, key, PRESENT)

    # --- pins -------------------------------------------------------------------------------
    @rule(keys=keys_st)
    def pin(self, keys: list[ChunkKey]) -> None:
        self.directory.pin(keys)
        self.pins.update(keys)

    @rule(keys=keys_st)
    def unpin(self, keys: list[ChunkKey]) -> None:
        self.directory.unpin(keys)
        for key in keys:
            if self.pins[key]:
                self.pins[key] -= 1

    @rule(key=st.sampled_from(KEYS))
    def toggle_record(self, key: ChunkKey) -> None:
        self.records ^= {key}

    # --- invariants -------------------------------------------------------------------------
    @invariant()
    def agrees_with_the_model(self) -> None:
        for level, index in enumerate(self.directory.indexes):
            indexed = {k for (lv, k), s in self.state.items() if lv == level and s in (STORING, PRESENT)}
            assert set(index.sizes) == indexed, "the index is the STORING and PRESENT chunks"
            assert index.used_bytes == CHUNK * len(indexed) <= index.capacity_bytes
            for key in KEYS:
                assert self.directory.state(level, key) is self._at(level, key)
        for key in KEYS:
            assert self.directory.readers(key) == self.readers[key]
            assert self.directory.pinned(key) == (self.pins[key] > 0 or key in self.records)
        settled = not self.state.keys() - {k for k, s in self.state.items() if s is PRESENT} and not +self.readers
        assert self.directory.settled() == settled


DirectoryMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestDirectory = DirectoryMachine.TestCase


def test_reconcile_adopts_listed_chunks_and_names_the_unlisted() -> None:
    directory = Directory(["disk"], [4 * CHUNK], make_policies("lru", 1), chunk_bytes=CHUNK)
    directory.prepare_store(0, KEYS[:2])
    directory.complete_store(0, KEYS[:1])  # KEYS[1] stays STORING: never named gone
    directory.prepare_leave(0, KEYS[5:6])  # LEAVING: not adopted again
    unseen = directory.reconcile(0, 3 * CHUNK, {KEYS[2], KEYS[5]})
    assert unseen == [KEYS[0]] and directory.indexes[0].capacity_bytes == 3 * CHUNK
    assert directory.state(0, KEYS[2]) is PRESENT and directory.state(0, KEYS[5]) is LEAVING
    directory.drop(0, [KEYS[0], KEYS[1]])
    assert set(directory.indexes[0].sizes) == {KEYS[1], KEYS[2]}


def test_persist_share_is_the_leading_share_and_the_pinned() -> None:
    directory = Directory(["dram", "disk"], [4 * CHUNK] * 2, make_policies("lru", 2), chunk_bytes=CHUNK)
    directory.pin([KEYS[5]])
    assert directory.persist_share(KEYS[:6], 0.25) == [KEYS[0], KEYS[1], KEYS[5]]
