"""The connector's counters as plain data (no vLLM import: the worker core keeps them).

Names and meanings: ``kvtier.integrations.vllm_stats``, which exports them to vLLM.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier._fs import atomic_write

PREFETCH_COUNTERS = {  # ``PrefetchStats`` field -> the worker's counter of it (its step deltas)
    "prefetched": "prefetch_chunks", "used": "prefetch_used_chunks", "wasted": "prefetch_wasted_chunks",
    "cancelled": "prefetch_cancelled", "skipped": "prefetch_skipped",
}


@dataclass
class ConnectorCounters:
    values: Counter[str] = field(default_factory=Counter)  # name -> int or float total

    def add(self, **deltas: float) -> None:
        for name, delta in deltas.items():
            if delta:
                self.values[name] += delta  # type: ignore[assignment]

    def merge(self, other: ConnectorCounters) -> None:
        self.values.update(other.values)

    def summary(self) -> str:
        v = self.values
        hits = ", ".join(f"{k.removeprefix('hit_tokens_')}={int(n)}" for k, n in sorted(v.items())
                         if k.startswith("hit_tokens_"))
        load_gbps = v["load_bytes"] / v["load_s"] / 1e9 if v["load_s"] else 0.0
        save_gbps = v["save_bytes"] / v["save_s"] / 1e9 if v["save_s"] else 0.0
        return (f"kvtier: loaded {int(v['load_tokens'])} tokens ({hits or 'no hits'}) in {v['load_s']:.3f}s "
                f"[{load_gbps:.2f} GB/s], failed chunks {int(v['load_failed_chunks'])}; saved "
                f"{int(v['save_chunks'])} chunks in {v['save_s']:.3f}s [{save_gbps:.2f} GB/s], not taken "
                f"{int(v['save_dropped_chunks'])}")

    def write_json(self, path: Path, extra: dict[str, Any], *, rank: int = 0) -> None:
        """Atomically replace ``path`` with the counters (``kvtier._fs``); not fsynced: it is
        rewritten after every step, and a crash loses only numbers the next run starts over.  One
        file per TP rank: ``<name>.rank<r><suffix>`` past rank 0."""
        if rank:
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        atomic_write(path, json.dumps({"counters": dict(self.values), **extra}, indent=1, default=str).encode(),
                     fsync=False)
