"""Retention a request asks for: a priority and a time to keep its chunks.  Keys only, never bytes.

A request may say how much its chunks matter (``priority``) and how long they must stay at least
(``ttl_s``).  The eviction policy turns the two into one **rank** per chunk::

    rank = 2 x priority + (1 while the ttl runs, else 0)

and evicts the lowest rank first; within a rank its own order decides (``AgentPolicy``: the chunk
due last).  So a chunk kept by a ttl outlives every chunk of its priority without one, but not
one of a higher priority: "keep at least this long, unless pressure from higher priority".
When the ttl ends the chunk falls back to its priority's rank.  A priority sticks to a chunk until
a later request that names one uses it; a ttl only ever extends.  Unlike a pin, retention never
refuses a store: when every chunk outranks the newcomer, the newcomer is not admitted.

``Retention.parse`` reads the user's values (the vLLM connector's ``kv_transfer_params``) with a
one-line error naming the field.  The other hint about a chunk's future is what a request's answer
waits for (``AWAITS``, told by ``observe_end``): when its session will be back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvtier.errors import ArgumentTypeError, ArgumentValueError

AWAITS = ("tool", "user")  # what an answer waits for (``observe_end``): a tool's result, or a human
PRIORITIES = {"low": -1, "normal": 0, "high": 1}  # names a request may use; any int in the bounds too
MAX_PRIORITY = 100  # |priority| at most this: ranks stay small ints


@dataclass(frozen=True, slots=True)
class Retention:
    """What one request asks for its chunks; None fields ask nothing."""

    priority: int | None = None  # higher outlives lower under pressure; None: leave the chunk's as it is
    ttl_s: float | None = None  # keep at least this long (unless a higher priority needs the room)

    @staticmethod
    def parse(priority: object = None, ttl_s: object = None, *, where: str = "") -> Retention:
        """From user values: ``priority`` "low" | "normal" | "high" or an int in
        [-MAX_PRIORITY, MAX_PRIORITY]; ``ttl_s`` a finite number of seconds > 0.  ``where``
        prefixes the field's name in errors (``kv_transfer_params['kvtier']``)."""
        return Retention(priority_arg(priority, f"{where}['priority']" if where else "priority"),
                         seconds_arg(ttl_s, f"{where}['ttl_s']" if where else "ttl_s"))


def priority_arg(value: object, name: str = "priority") -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRIORITIES:
            raise ArgumentValueError(f"{name} must be one of {', '.join(PRIORITIES)} or an int, got {value!r}")
        return PRIORITIES[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be one of {', '.join(PRIORITIES)} or an int, got {value!r}")
    if abs(value) > MAX_PRIORITY:
        raise ArgumentValueError(f"{name} must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {value}")
    return value


def seconds_arg(value: object, name: str = "ttl_s") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentTypeError(f"{name} must be a positive number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ArgumentValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def rank(priority: int, keep_until: float, now: float) -> int:
    """A chunk's eviction rank (lowest evicted first): see the module docstring."""
    return 2 * priority + (1 if keep_until > now else 0)
