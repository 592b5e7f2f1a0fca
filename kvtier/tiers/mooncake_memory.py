"""Memory the Mooncake tier moves bytes through, and the workers whose calls touch it.

Mooncake's transfer engine reads and writes only memory registered with the store
(``register_buffer``, ~0.5 ms each), so the tier registers two kinds once and reuses them.  The
one rule for both: memory is released only once no call can touch it any more.

* ``StagingArena``: whole slots of header + chunk in one array, registered at set-up.  A get
  lands in a slot and is validated there before it is copied out; a put writes its header (and,
  when the payload's memory is not registered, the payload) into a slot.  A slot is handed out
  again only once the call using it has really ended, so late bytes of a call that overran
  never land in memory given to someone else.
* ``CallerMemory``: caller allocations (the top-level array a payload is a view of, e.g. a DRAM
  pool) registered for zero-copy puts, when they hold at least ``min_bytes``.  Registering runs
  on a worker and is never waited for; it ends when the array is freed (a ``weakref.finalize``)
  or the tier closes.  An allocation the store refuses (it overlaps another registration) is
  remembered and copied from then on.
* ``Workers``: every store call runs on a small pool (the client can block for seconds), and the
  pool remembers the calls still running, so that ``close`` unregisters memory only after the
  last of them has ended, however late.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np

# The tier's logger: what is said about the store stays under one name, ``kvtier.tiers.mooncake``.
log = logging.getLogger("kvtier.tiers.mooncake")

T = TypeVar("T")
INVALID_PARAMS = -600  # register_buffer: overlaps another registration (on a get: larger than the buffer)


class Workers:
    """The tier's worker pool; it remembers the calls still running (``close`` waits for them)."""

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvtier-mooncake")
        self._running: set[Future[Any]] = set()  # calls submitted and not ended
        self._lock = threading.Lock()  # not the tier's: ``_connect`` holds that one when it starts a set-up

    def spawn(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the pool."""
        future = self._pool.submit(fn, *args)
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._ended)
        return future

    def _ended(self, future: Future[Any]) -> None:
        with self._lock:
            self._running.discard(future)

    def shutdown(self) -> None:
        """Take no more calls; queued ones are cancelled, running ones go on."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def after_running(self, timeout: float, release: Callable[[], None]) -> None:
        """Run ``release`` once every running call has ended: now, when they end within ``timeout``,
        else from the done-callback of the last one to end."""
        with self._lock:
            running = list(self._running)
        late = wait(running, timeout=timeout).not_done
        if not late:
            release()
            return
        log.warning("Mooncake close: %d calls still running after %.1fs; memory is released when they end",
                    len(late), timeout)
        left = [len(late)]
        lock = threading.Lock()

        def one_ended(_f: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                release()

        for future in late:
            future.add_done_callback(one_ended)


class StagingArena:
    """``num_slots`` slots of ``slot_bytes`` in one array (register ``array`` with the store once)."""

    def __init__(self, slot_bytes: int, num_slots: int) -> None:
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.array = np.empty(num_slots * slot_bytes, dtype=np.uint8)  # (slots * slot_bytes,)
        self._free = list(range(num_slots))
        self._cv = threading.Condition()

    def take(self, want: int, timeout: float) -> list[int]:
        """Up to ``want`` free slots (at least one), waiting at most ``timeout``; [] if none."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._free, timeout=timeout):
                return []
            got, self._free = self._free[:want], self._free[want:]
            return got

    def give(self, slots: list[int]) -> None:
        with self._cv:
            self._free.extend(slots)
            self._cv.notify_all()

    def give_when_done(self, future: Future[Any] | None, slots: list[int]) -> None:
        """Free ``slots`` once the call using them has really ended (late bytes land there)."""
        if future is None:
            self.give(slots)
        else:
            future.add_done_callback(lambda _f: self.give(slots))

    def slot(self, s: int) -> np.ndarray:
        return self.array[s * self.slot_bytes:(s + 1) * self.slot_bytes]

    def ptr(self, s: int) -> int:
        return int(self.array.ctypes.data) + s * self.slot_bytes


class CallerMemory:
    """Caller allocations registered with the store for zero-copy puts; see the module docstring."""

    def __init__(self, *, min_bytes: int, max_registered: int, spawn: Callable[..., Future[Any]]) -> None:
        self.min_bytes = min_bytes  # smaller allocations are copied: registering costs more
        self.max_registered = max_registered  # allocations registered at once; the rest are copied
        self._spawn = spawn  # runs a function on the tier's worker pool
        # id(root array) -> (address, finalizer); allocations that cannot be registered (overlap
        # another registration, ...) -> weakref
        self.regs: dict[int, tuple[int, weakref.finalize[..., np.ndarray]]] = {}
        self.unregistrable: dict[int, weakref.ReferenceType[np.ndarray]] = {}
        self._registering: dict[int, Future[None]] = {}  # registrations under way
        self._lock = threading.RLock()  # finalizers run in whichever thread drops the array
        self._closed = False

    def registered(self, root: np.ndarray, store: Any) -> bool:
        """True when caller allocation ``root`` is registered with the store; False means copy.

        An unregistered allocation worth registering is registered with ``store`` on a worker
        (None: not now, the store is not set up or not healthy), never waited for (on a hung
        master that could take seconds): the caller copies meanwhile, later calls go zero-copy.
        """
        rid = id(root)
        with self._lock:
            if rid in self.regs:
                return True
            if (rid in self.unregistrable or rid in self._registering or self._closed
                    or not root.flags.c_contiguous or root.nbytes < self.min_bytes
                    or len(self.regs) + len(self._registering) >= self.max_registered or store is None):
                return False
            self._registering[rid] = self._spawn(self._register, store, root)
        return False

    def _register(self, store: Any, root: np.ndarray) -> None:
        """On a worker: register ``root``'s memory; unregistered again when ``root`` is freed."""
        rid, ptr = id(root), int(root.ctypes.data)
        try:
            rc = int(store.register_buffer(ptr, root.nbytes))
        except Exception as exc:  # a client torn down meanwhile
            log.info("Mooncake register_buffer: %s", exc)
            rc = None
        with self._lock:  # one critical section: the root is never seen neither pending nor done
            self._registering.pop(rid, None)
            if rc == 0 and not self._closed:
                finalizer = weakref.finalize(root, _forget_registration, weakref.ref(self), store, rid, ptr)
                finalizer.atexit = False  # at exit the client tears itself down
                self.regs[rid] = (ptr, finalizer)
                return
            if rc == INVALID_PARAMS:  # overlaps another registration: never worth retrying
                self.unregistrable[rid] = weakref.ref(root, lambda _r: self.unregistrable.pop(rid, None))
        if rc == 0:  # closed meanwhile
            store.unregister_buffer(ptr)
        elif rc is not None and rc != INVALID_PARAMS:  # e.g. the metadata server is down: try again later
            log.info("Mooncake register_buffer of %d bytes failed: %s", root.nbytes, rc)

    def close(self) -> list[int]:
        """Register nothing more; the addresses still registered, for the caller to unregister."""
        with self._lock:
            self._closed = True
            regs, self.regs = list(self.regs.values()), {}
        for _ptr, finalizer in regs:
            finalizer.detach()
        return [ptr for ptr, _ in regs]


def _forget_registration(memory_ref: weakref.ReferenceType[CallerMemory], store: Any, rid: int, ptr: int) -> None:
    """Finalizer of a registered caller array: unregister its memory before it is freed."""
    memory = memory_ref()
    if memory is not None:
        with memory._lock:
            if memory.regs.pop(rid, None) is None:
                return  # closed: close() unregistered it
    try:
        store.unregister_buffer(ptr)
    except Exception as exc:
        log.info("Mooncake unregister_buffer: %s", exc)
