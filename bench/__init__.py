"""kvtier's benchmarks, the demo and the engine harness: in a checkout, not in the wheel.

    python -m bench NAME ...    (or ``kvtier bench NAME ...`` from a checkout; ``kvtier demo``)

``bench/NAME.py`` with ``add_arguments(parser)`` and ``run(args) -> int`` is a benchmark; ``harness/``
starts servers and engines (Redis, Mooncake, vLLM, random-weight models); ``sim/`` is the trace
simulator with its workloads; ``demo.py`` is the README's first command.  Nothing in ``kvtier/``
imports this package (tests/test_architecture.py).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the checkout on PYTHONPATH, so that a child started as
    ``python -m bench....`` finds this package from any working directory (appended: entries the
    caller put there keep their order)."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    return env
