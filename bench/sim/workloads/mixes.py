"""Node-like replays: many kv-cache-tester conversations sharing one cache, arriving over time.

The full kv-cache-tester set (callanjfox/kv-cache-tester, ``traces/``, Apache-2.0: 739
anonymised Claude Code conversations) is read from a local checkout, never copied into this
repository::

    git clone https://github.com/callanjfox/kv-cache-tester ../kv-cache-tester
    kvtier bench mixes ../kv-cache-tester/traces ...

**Split.** The conversation files, sorted by name, are shuffled with ``random.Random(seed)``
(``SPLIT_SEED`` by default) and cut in two: the first ``tuning_share`` are the *tuning* set
(policies may be tuned on mixes drawn from it), the rest the *held-out* set (reported, never
tuned on).  The split depends on the seed and on the list of files: a checkout with other files
splits differently, so every mix's files are listed in the benchmark's JSON (and replay alike from
any checkout that has them).

**A mix** of ``count`` conversations is drawn from one set with ``random.Random((seed, mix))``;
conversation ``i`` starts at the ``i``-th arrival of a Poisson process of mean gap
``mean_gap_s`` (a node where sessions open at a steady rate and overlap: with the set's
median conversation of about an hour, a 300 s mean gap keeps about a dozen open at once).
Each conversation keeps its own timing, sub-agents included (``load_kvtester``), and its own
id scope, so conversations share no blocks (``hash_id_scope: "local"``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.sim.workloads.kvtester import load_kvtester
from bench.sim.workloads.stream import Request, merge
from kvtier.errors import ConfigError

SPLIT_SEED = 27  # the seed of the tuning / held-out split (issue 27)
TUNING_SHARE = 0.5


def conversation_files(folder: str | Path) -> list[Path]:
    """Every ``*.json`` conversation of ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of kv-cache-tester conversations")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ConfigError(f"{folder}: no *.json conversations")
    return files


def split(files: Sequence[Path], *, seed: int = SPLIT_SEED,
          tuning_share: float = TUNING_SHARE) -> tuple[list[Path], list[Path]]:
    """(tuning, held-out): a seeded shuffle of the files sorted by name, cut at ``tuning_share``."""
    if not 0 < tuning_share < 1:
        raise ConfigError(f"tuning_share must be in (0, 1), got {tuning_share}")
    order = sorted(files, key=lambda p: p.name)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * tuning_share)
    return sorted(order[:cut]), sorted(order[cut:])


@dataclass(frozen=True, slots=True)
class Mix:
    """Which conversations a mix replays and when each starts."""

    name: str
    files: tuple[Path, ...]
    starts_s: tuple[float, ...]

    def load(self) -> list[Request]:
        return merge(load_kvtester(f, offset_s=t) for f, t in zip(self.files, self.starts_s, strict=True))


def draw(files: Sequence[Path], *, count: int, mix: int, mean_gap_s: float, set_name: str,
         seed: int = SPLIT_SEED) -> Mix:
    """Mix number ``mix``: ``count`` conversations of ``files`` (a set), Poisson arrivals."""
    if count < 1 or count > len(files):
        raise ConfigError(f"a mix of {count} conversations from a set of {len(files)}")
    if not mean_gap_s >= 0:
        raise ConfigError(f"mean_gap_s must be >= 0, got {mean_gap_s}")
    rng = random.Random(f"{seed}/{set_name}/{count}/{mix}")
    chosen = rng.sample(sorted(files, key=lambda p: p.name), count)
    starts, t = [], 0.0
    for _ in chosen:
        starts.append(t)
        t += rng.expovariate(1.0 / mean_gap_s) if mean_gap_s > 0 else 0.0
    return Mix(name=f"{set_name} mix {mix}: {count} conversations, mean gap {mean_gap_s:g} s",
               files=tuple(chosen), starts_s=tuple(starts))
