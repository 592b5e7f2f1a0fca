"""Parse Mooncake traces (FAST'25 release) into a request stream.

Format: JSON Lines, one request per line::

    {"timestamp": 0, "input_length": 40160, "output_length": 6, "hash_ids": [0, 1, ...]}

``timestamp`` is milliseconds since the trace start; ``hash_ids`` are remapped prefix hashes of
512-token blocks, global to the file (so one scope per file, every request sharing it); the
last block may be partial.  Mooncake traces carry no session ids: each request is its own
session (``<scope>#<line>``).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.sim.workloads.stream import Request
from kvtier.errors import ConfigError

MOONCAKE_BLOCK_TOKENS = 512


def load_mooncake(path: str | Path, *, scope: str | None = None, limit: int | None = None,
                  block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[Request]:
    """Read a Mooncake JSONL trace; raises ConfigError naming the line of any bad record."""
    path = Path(path)
    scope = scope or f"mooncake:{path.name}"
    requests: list[Request] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(requests) >= limit:
                break
            try:
                rec = json.loads(line)
                hash_ids = tuple(int(h) for h in rec["hash_ids"])
                req = Request(time_s=float(rec["timestamp"]) / 1000.0, session=f"{scope}#{lineno}",
                              scope=scope, hash_ids=hash_ids, block_tokens=block_tokens,
                              input_tokens=int(rec["input_length"]), output_tokens=int(rec["output_length"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{lineno}: not a Mooncake trace record ({exc!r})") from exc
            if req.input_tokens < 0 or len(hash_ids) * block_tokens < req.input_tokens - block_tokens + 1:
                raise ConfigError(f"{path}:{lineno}: input_length {req.input_tokens} does not fit "
                                  f"{len(hash_ids)} blocks of {block_tokens} tokens")
            requests.append(req)
    requests.sort(key=lambda r: r.time_s)
    return requests
