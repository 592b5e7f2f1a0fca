"""A store in progress (``Mover.reserve``): where each chunk's bytes go, and the caller's handle on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvtier.keys import ChunkKey
from kvtier.validate import count_arg

if TYPE_CHECKING:
    from kvtier.mover import Mover


@dataclass(slots=True)
class _Reservation:
    """Where the bytes of each of ``keys`` go (from ``Mover.reserve``); lists hold positions."""

    keys: list[ChunkKey]
    views: list[np.ndarray | None]  # a reserved top-tier slot, a spill buffer, or None (held already)
    slotted: list[int] = field(default_factory=list)  # reserved slots, pending until published
    spilled: list[int] = field(default_factory=list)  # no slot: the bytes wait in a plain buffer
    present: list[int] = field(default_factory=list)  # held already (or repeated): nothing to write
    dropped: list[int] = field(default_factory=list)  # no slot and no spill (``spill=False``): not stored

    def buffer(self, i: int) -> np.ndarray:
        view = self.views[i]
        assert view is not None
        return view

    def cut(self, upto: int) -> _Reservation:
        """Keep ``keys[:upto]``; return the slots reserved past it (to give back)."""
        tail = _Reservation(self.keys, self.views, [i for i in self.slotted if i >= upto])
        self.slotted = [i for i in self.slotted if i < upto]
        self.spilled = [i for i in self.spilled if i < upto]
        self.present = [i for i in self.present if i < upto]
        self.dropped = [i for i in self.dropped if i < upto]
        return tail

class InPlaceStore:
    """Chunks being written in place by the caller; from ``ContextMemory.store_in_place``.

    ``views[i]`` is where chunk ``keys[i]``'s bytes go: a reserved slot of the top DRAM tier, a
    plain host buffer (no slot: the top tier has no slots, or full of pinned, pending or held
    chunks, or its policy refused the chunk; the commit places it as ``store`` would), or None:
    write nothing (the hierarchy holds the chunk already, or, with ``wait_below=False``, the chunk
    got no slot and is not stored; ``num_dropped`` counts those).  Either ``commit`` once every
    write is done, or ``abort``; as a ``with`` block it commits on a normal exit and aborts on an
    exception.  The views must not be used after either.
    """

    def __init__(self, mover: Mover, reservation: _Reservation) -> None:
        self.mover = mover
        self.keys = reservation.keys
        self.views = reservation.views
        self.num_in_place = len(reservation.slotted)  # chunks written straight into top-tier slots
        self.num_dropped = len(reservation.dropped)  # no slot, not spilled: not stored
        self.stored: int | None = None  # chunks stored, once committed
        self._reservation = reservation
        self._open = True

    def commit(self, upto: int | None = None) -> int:
        """Publish the chunks (their bytes must all be written); returns how many were stored.

        ``upto``: publish only ``keys[:upto]`` (the rest were not written: dropped, as ``abort``).
        """
        if not self._open:
            raise RuntimeError("this in-place store was committed or aborted already")
        if upto is not None:
            upto = count_arg(upto, "upto", upper=len(self.keys))
        self._open = False
        if upto is not None:
            self.mover.finish(self._reservation.cut(upto), publish=False)
        self.stored = self.mover.commit(self._reservation)
        return self.stored

    def abort(self) -> None:
        """Drop the reservations: nothing is stored (victims demoted to make room stay demoted)."""
        if self._open:
            self._open = False
            self.mover.finish(self._reservation, publish=False)

    def __enter__(self) -> InPlaceStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.commit()
