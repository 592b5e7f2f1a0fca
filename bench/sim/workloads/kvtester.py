"""Parse kv-cache-tester traces (anonymised Claude Code conversations) into a request stream.

Format: one JSON object per conversation file::

    {"id": "trace_0001", "block_size": 64, "hash_id_scope": "local", "tool_tokens": 12974,
     "system_tokens": 4243,
     "requests": [{"t": 0.0, "type": "n", "in": 71175, "out": 169, "hash_ids": [1, 2, ...]},
                  {"t": 95.0, "type": "subagent", "agent_id": "a1", "requests": [...]}, ...]}

``t`` is seconds since the conversation started; ``hash_ids`` are ``block_size``-token blocks of
the input, in order; ``stop`` is the API's stop reason (``tool_use``: the answer calls a tool, so
the agent calls back once it ran; ``end_turn``: the user's turn), kept as ``Request.awaits``, and
``api_time`` how long the answer took (``Request.answer_s``: when the end is known).
A ``"subagent"`` entry has no ids of its own but nests a conversation (``requests[]``,
``agent_id``) that runs as its own session and may nest further.

Scopes: with ``hash_id_scope: "local"`` ids mean something only inside one conversation, so
each conversation gets its own scope (``kvtester:<id>``) and shares no block with another
conversation; its sub-agents (at any depth) share that scope, because one conversation's ids
are one id space: sibling sub-agents that start from the same prompt share its blocks (the
four Explore agents of ``trace_0010`` share their first ~10K tokens).  Each sub-agent is still
a session of its own (``<id>/<agent_id>``).  With ``"global"`` every conversation of every file
shares one scope.

Sub-agent timing: the nested ``t`` values are taken as seconds since the sub-agent started
(at its entry's ``t``, or at the preceding parent request when the entry has none), unless the
first nested ``t`` is already at or past that start, in which case they are read as times of
the parent conversation.  Conversations of a folder all start at 0 plus ``offset_s``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.sim.workloads.stream import Request
from kvtier.errors import ConfigError


def load_kvtester(path: str | Path, *, offset_s: float = 0.0) -> list[Request]:
    """Read one conversation file (sub-agents included), sorted by arrival."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read as a kv-cache-tester trace ({exc})") from exc
    return parse_conversation(doc, name=str(doc.get("id", path.stem)), offset_s=offset_s, where=str(path))


def load_kvtester_dir(paths: Iterable[str | Path], *, stagger_s: float = 0.0) -> list[Request]:
    """Several conversations replayed at once; conversation i starts at ``i * stagger_s``."""
    out: list[Request] = []
    for i, path in enumerate(sorted(Path(p) for p in paths)):
        out += load_kvtester(path, offset_s=i * stagger_s)
    out.sort(key=lambda r: r.time_s)
    return out


_AWAITS = {"tool_use": "tool", "end_turn": "user"}  # the API's stop reason: what the answer waits for


def _seconds(value: Any) -> float | None:
    """A non-negative number of seconds, else None (absent or malformed: not known)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    return float(value)


def parse_conversation(doc: dict[str, Any], *, name: str, offset_s: float = 0.0,
                       where: str = "<trace>") -> list[Request]:
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise ConfigError(f"{where}: a kv-cache-tester trace is an object with a 'requests' list")
    block = int(doc.get("block_size", 64))
    scope_kind = doc.get("hash_id_scope", "local")
    if scope_kind not in ("local", "global"):
        raise ConfigError(f"{where}: unknown hash_id_scope {scope_kind!r}")
    out: list[Request] = []
    _walk(doc["requests"], session=name, block=block, global_scope=scope_kind == "global",
          start_s=offset_s, out=out, where=where)
    out.sort(key=lambda r: r.time_s)
    return out


def _walk(entries: Sequence[Any], *, session: str, block: int, global_scope: bool, start_s: float,
          out: list[Request], where: str, scope: str | None = None) -> None:
    scope = scope or ("kvtester:global" if global_scope else f"kvtester:{session}")
    last_t = 0.0
    for n, rec in enumerate(entries):
        try:
            if rec.get("type") == "subagent":
                agent = str(rec.get("agent_id", f"sa{n}"))
                sub_start = float(rec.get("t", last_t))
                nested = rec.get("requests") or []
                first_t = float(nested[0].get("t", 0.0)) if nested else 0.0
                base = start_s if nested and first_t >= sub_start > 0 else start_s + sub_start
                _walk(nested, session=f"{session}/{agent}", block=block, global_scope=global_scope,
                      start_s=base, out=out, where=where, scope=scope)
                continue
            last_t = float(rec["t"])
            out.append(Request(time_s=start_s + last_t, session=session, scope=scope,
                               hash_ids=tuple(int(h) for h in rec["hash_ids"]), block_tokens=block,
                               input_tokens=int(rec["in"]), output_tokens=int(rec.get("out", 0)),
                               awaits=_AWAITS.get(rec.get("stop")), answer_s=_seconds(rec.get("api_time"))))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{where}: request {n} of {session} is malformed ({exc!r})") from exc
