"""What a request asks of kvtier: its ``kv_transfer_params['kvtier']`` entry, read for the planner.

``{"kvtier": {"pin": true, "ttl_s": 3600}}`` / ``{"unpin": true}`` (``parse_pin_request``: a
malformed entry is a ValueError, and the request is not pinned); ``session``, ``priority``,
``ttl_s`` and ``awaits`` (``request_hints``: each malformed field is one line and is ignored, the
request runs).  The session falls back to the request's ``cache_salt``.  ``answer_awaits`` guesses
what a finished request's answer waits for from its output when the request did not say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvtier.policy.retention import AWAITS, Retention, priority_arg, seconds_arg

KNOWN_KEYS = ("pin", "unpin", "ttl_s", "session", "priority", "awaits")  # of kv_transfer_params['kvtier']
ENTRY = "kv_transfer_params['kvtier']"  # how messages name a request's kvtier entry


def answer_awaits(request: Any, tool_call_tokens: frozenset[int]) -> str | None:
    """What a finished request's answer waits for: "tool" when its output holds a tool-call token,
    "user" when it stopped without one (end of sequence, a stop string); None when not told
    (no ``tool_call_tokens``) or cut short (length, abort: the caller may go on at once)."""
    if not tool_call_tokens or getattr(request.status, "name", "") != "FINISHED_STOPPED":
        return None
    return "tool" if any(t in tool_call_tokens for t in request.output_token_ids) else "user"


@dataclass(frozen=True, slots=True)
class PinRequest:
    unpin: bool = False
    ttl_s: float | None = None


def parse_pin_request(params: Any) -> PinRequest | None:
    """The ``kvtier`` entry of a request's ``kv_transfer_params``; ValueError when malformed."""
    if not isinstance(params, dict) or "kvtier" not in params:
        return None
    spec = params["kvtier"]
    if not isinstance(spec, dict):
        raise ValueError(f"kv_transfer_params['kvtier'] must be an object, got {type(spec).__name__}")
    unknown = set(spec) - set(KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown kv_transfer_params['kvtier'] keys {sorted(unknown)}; "
                         f"known: {', '.join(KNOWN_KEYS)}")
    pin, unpin, ttl = spec.get("pin", False), spec.get("unpin", False), spec.get("ttl_s")
    if not isinstance(pin, bool) or not isinstance(unpin, bool):
        raise ValueError("kv_transfer_params['kvtier']: 'pin' and 'unpin' must be true or false")
    if pin and unpin:
        raise ValueError("kv_transfer_params['kvtier']: 'pin' and 'unpin' together")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                            or not math.isfinite(ttl) or ttl <= 0):
        raise ValueError(f"kv_transfer_params['kvtier']['ttl_s'] must be a positive number of seconds, got {ttl!r}")
    if unpin and ttl is not None:
        raise ValueError("kv_transfer_params['kvtier']: 'ttl_s' goes with 'pin', not 'unpin'")
    if not pin and not unpin:
        return None
    return PinRequest(unpin=unpin, ttl_s=None if ttl is None else float(ttl))


@dataclass(frozen=True, slots=True)
class RequestHints:
    """What a request tells the eviction policy, from its ``kv_transfer_params['kvtier']``."""

    session: str | None = None  # see ``request_session``
    retention: Retention | None = None  # ``priority`` and ``ttl_s``; None: neither given
    awaits: str | None = None  # what its answer will wait for: "tool" or "user"; None: not said


def request_hints(request: Any) -> tuple[RequestHints, list[str]]:
    """The hints a request gives, and one line per malformed field (that field is ignored)."""
    problems: list[str] = []
    try:
        session = request_session(request)
    except ValueError as exc:
        session = None
        problems.append(f"{exc}; no session")
    params = getattr(request, "kv_transfer_params", None)
    spec = params.get("kvtier") if isinstance(params, dict) else None
    if not isinstance(spec, dict):
        return RequestHints(session), problems
    priority = ttl = awaits = None
    try:
        priority = priority_arg(spec.get("priority"), f"{ENTRY}['priority']")
    except (TypeError, ValueError) as exc:
        problems.append(f"{exc}; normal priority")
    try:
        ttl = seconds_arg(spec.get("ttl_s"), f"{ENTRY}['ttl_s']")
    except (TypeError, ValueError) as exc:
        problems.append(f"{exc}; no ttl")
    if spec.get("awaits") is not None:
        if spec["awaits"] in AWAITS:
            awaits = spec["awaits"]
        else:
            problems.append(f"{ENTRY}['awaits'] must be one of {', '.join(AWAITS)}, got {spec['awaits']!r}; ignored")
    retention = None if priority is None and ttl is None else Retention(priority, ttl)
    return RequestHints(session, retention, awaits), problems


def request_session(request: Any) -> str | None:
    """The session a request belongs to, for the eviction policy's predictions (see the module doc).

    ``kv_transfer_params['kvtier']['session']`` (a non-empty string), else ``cache_salt``, else None;
    ValueError when the session given is not a non-empty string.
    """
    params = getattr(request, "kv_transfer_params", None)
    spec = params.get("kvtier") if isinstance(params, dict) else None
    if isinstance(spec, dict) and "session" in spec:
        session = spec["session"]
        if not isinstance(session, str) or not session:
            raise ValueError(f"kv_transfer_params['kvtier']['session'] must be a non-empty string, got {session!r}")
        return session
    salt = getattr(request, "cache_salt", None)
    return salt if isinstance(salt, str) and salt else None

