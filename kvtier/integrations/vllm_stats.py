"""The connector's counters, exported through vLLM's connector-stats hook and a one-line log.

``ConnectorCounters`` is plain data (ints and floats by name) kept by the worker side:

    load_chunks / load_tokens / load_bytes / load_s   chunks read from kvtier into vLLM blocks
    hit_tokens_<tier>                                 tokens read from each tier (whole chunks)
    load_failed_chunks                                planned loads that missed or were corrupt
    save_chunks / save_bytes / save_s                 chunks copied out of vLLM blocks into kvtier
    corrupt_<tier>                                    chunks a tier found corrupt (never served)
    pinned_chunks / unpinned_chunks                   prompt chunks pinned/unpinned on request

vLLM collects ``KVTierConnectorStats`` from the worker after each step, sums them
(``aggregate``) in the engine and logs them with its own stats when ``log_stats`` is on; the
worker also logs ``summary()`` every ``log_interval_s`` and can rewrite a JSON file of the
cumulative counters (``stats_file``) for scripts and tests.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


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
                f"{int(v['save_chunks'])} chunks in {v['save_s']:.3f}s [{save_gbps:.2f} GB/s]")

    def write_json(self, path: Path, extra: dict[str, Any]) -> None:
        """Atomically replace ``path`` with the counters (temp file + rename)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"counters": dict(self.values), **extra}, indent=1, default=str))
        os.replace(tmp, path)


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    """vLLM's stats container for this connector: ``data`` maps counter name -> number."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data)
        self.data = dict(merged)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


def build_prom_metrics(vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                       per_engine_labelvalues: dict[int, list[object]]) -> Any:
    """Placeholder: implemented by the metrics work (returns None: no Prometheus metrics yet)."""
    return None
