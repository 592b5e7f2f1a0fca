"""The one narrow interface every storage tier implements.

A tier stores whole chunk payloads (1-D uint8 arrays of exactly ``layout.chunk_bytes``) under
16-byte keys.  It enforces its byte capacity by *refusing* a put that does not fit; it never
chooses what to evict.  Choosing victims, demoting them and promoting hits is the hierarchy's
job (``kvtier.hierarchy`` with ``kvtier.policy``), so the same policy code can run payload-free
in the trace simulator.

Contract for callers:

* ``get_into`` copies a chunk into a caller-owned buffer and returns False on a miss.  A miss
  includes a chunk that failed validation (it is deleted and counted in ``stats.corrupt``) and a
  remote tier that is down (counted in ``stats.errors``).  A tier never serves bad bytes.
* ``put`` returns False when the chunk was not stored (no room, disk full, server down); the
  caller's payload is untouched, so nothing is lost.
* Batch variants take and return lists in the same order; tiers that can pipeline or run I/O
  in parallel override them.
* All methods may be called from several threads.

What a tier can do beyond that is declared by its class as ``capabilities``
(``TierCapabilities``), and what it can hand out by two accessors, None by default: ``pool`` (the
host memory of its slots, which a device copies into and out of) and ``shared_root()`` (a directory
other processes fill too: surveyed, and home of the persistent pins).  Callers ask those, never
the tier's class, so an out-of-tree tier that declares ``slots`` gets the in-place store path
exactly as DRAM does, and one that offers a ``shared_root()`` is surveyed as the disk tier is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from kvtier.errors import TierError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout

if TYPE_CHECKING:
    from kvtier.tiers.disk_pins import PinFiles


@dataclass(frozen=True, slots=True, kw_only=True)
class TierCapabilities:
    """What a tier class can do beyond the narrow interface; every flag off by default."""

    slots: bool = False  # reserve/commit/abort: producers write chunks in place, unseen until commit
    zero_copy_borrow: bool = False  # borrow() yields a view of the tier's own memory (no read, no copy)
    authoritative_contains: bool = False  # contains() is exact and local (memory, one stat): cheap under a lock
    persistent: bool = False  # chunks survive a restart of this process
    shared: bool = False  # other processes may add chunks: lookups must ask the tier


@dataclass(frozen=True, slots=True)
class RootSurvey:
    """What a shared root holds now (``SharedRoot.survey``): one layout's chunks and everything else."""

    chunks: frozenset[ChunkKey]  # this layout's chunk files, by name
    other_bytes: int  # every other file: other layouts' chunks, temp files, pin records


class SharedRoot(Protocol):
    """A directory that other processes fill too and that a tier's capacity bounds (the disk
    tier's root): the hierarchy re-reads it every so often (``survey``) and keeps pins there."""

    root: Path  # this layout's subtree; its parent is the configured path
    pin_files: PinFiles  # persistent pins, node-wide

    def survey_due(self) -> bool: ...

    def survey(self) -> RootSurvey: ...

    def has_file(self, key: ChunkKey) -> bool: ...

    def forget(self, keys: Sequence[ChunkKey]) -> None: ...


@dataclass(slots=True)
class TierStats:
    """Counters of one tier; the hierarchy adds hits/misses/evictions, the tier the rest."""

    hits: int = 0  # chunks served from this tier
    misses: int = 0  # lookups that reached this tier and did not find the chunk
    bytes_read: int = 0  # payload bytes copied out of the tier
    bytes_written: int = 0  # payload bytes stored into the tier
    evictions: int = 0  # chunks removed to make room (demoted or dropped)
    demotions: int = 0  # evicted chunks written to the next tier down
    promotions: int = 0  # chunks copied into this tier because of a hit below
    corrupt: int = 0  # chunks that failed validation: deleted, never served
    errors: int = 0  # failed operations (I/O error, server down), turned into misses
    extra: dict[str, float] = field(default_factory=dict)  # tier-specific counters

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Tier(ABC):
    """Storage for chunk payloads of one layout. See the module docstring for the contract."""

    name: ClassVar[str]
    capabilities: ClassVar[TierCapabilities] = TierCapabilities()
    # Mirrors of ``capabilities.persistent`` / ``.shared``, set per class by ``__init_subclass__``.
    persistent: ClassVar[bool] = False
    shared: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Keep ``persistent``/``shared`` equal to ``capabilities``; a subclass that still sets
        them as plain class attributes (the older way, out-of-tree tiers) has them folded in."""
        super().__init_subclass__(**kwargs)
        own = {flag: bool(cls.__dict__[flag]) for flag in ("persistent", "shared") if flag in cls.__dict__}
        if own:
            cls.capabilities = replace(cls.capabilities, **own)
        cls.persistent = cls.capabilities.persistent
        cls.shared = cls.capabilities.shared

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.stats = TierStats()

    # --- capacity -------------------------------------------------------------------------
    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Payload bytes this tier may hold."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Payload bytes held now (as far as this process knows)."""

    def has_room(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    # --- what a tier hands out beyond bytes: None unless it has one -------------------------
    @property
    def pool(self) -> Any:
        """The host memory that ``reserve`` and ``borrow`` hand out views of, for engines that copy
        straight between it and a device (a pinned torch tensor when pinned, else a numpy array)."""
        return None

    def shared_root(self) -> SharedRoot | None:
        """The directory this tier shares with other processes (see ``SharedRoot``)."""
        return None

    # --- single-chunk operations ----------------------------------------------------------
    @abstractmethod
    def put(self, key: ChunkKey, payload: np.ndarray) -> bool:
        """Store a payload; False if it was not stored. Overwriting an existing key is allowed."""

    @abstractmethod
    def get_into(self, key: ChunkKey, out: np.ndarray) -> bool:
        """Copy the chunk into ``out`` (``layout.chunk_bytes`` uint8); False on any miss."""

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Whether a get of this key would probably hit (without validating the payload)."""

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool:
        """Remove a chunk; False if it was not there."""

    @abstractmethod
    def keys(self) -> Iterator[ChunkKey]:
        """Every key this tier holds (for a local tier: those this process can see)."""

    def borrow(self, key: ChunkKey) -> AbstractContextManager[np.ndarray | None]:
        """A read-only view of a chunk (None on a miss), valid inside the ``with`` block.

        This default reads into a fresh buffer (nothing to release after); tiers in process
        memory yield zero-copy views.
        """
        out = np.empty(self.layout.chunk_bytes, dtype=np.uint8)
        return nullcontext(out if self.get_into(key, out) else None)

    # --- in-place writes: only tiers whose ``capabilities.slots`` is set -------------------------
    def reserve(self, keys: Sequence[ChunkKey]) -> list[np.ndarray] | None:
        """Writable views of one slot per key, unseen by readers until ``commit``; None if they
        do not fit (nothing reserved)."""
        raise TierError(f"the {self.name} tier has no slots to reserve (capabilities.slots is off)")

    def commit(self, keys: Sequence[ChunkKey]) -> None:
        """Publish reserved slots (their bytes are written)."""
        raise TierError(f"the {self.name} tier has no slots to commit (capabilities.slots is off)")

    def abort(self, keys: Sequence[ChunkKey]) -> None:
        """Give reserved slots back, unpublished."""
        raise TierError(f"the {self.name} tier has no slots to abort (capabilities.slots is off)")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, connections, memory)."""

    # --- batch operations: override where the backend can do better ------------------------
    def put_many(self, keys: Sequence[ChunkKey], payloads: Sequence[np.ndarray]) -> list[bool]:
        return [self.put(k, p) for k, p in zip(keys, payloads, strict=True)]

    def get_many_into(self, keys: Sequence[ChunkKey], outs: Sequence[np.ndarray]) -> list[bool]:
        return [self.get_into(k, o) for k, o in zip(keys, outs, strict=True)]

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def delete_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.delete(k) for k in keys]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(used={self.used_bytes}/{self.capacity_bytes} bytes, "
                f"layout={self.layout.model})")
