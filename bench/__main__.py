"""``python -m bench NAME ...``: every module ``bench.NAME`` with ``add_arguments()`` and ``run()``.

    python -m bench demo ...    a multi-turn conversation through the default hierarchy (bench/demo.py)
    python -m bench tiers       tier put/get throughput vs raw baselines
    python -m bench NAME ...    the others; ``python -m bench -h`` lists them

``kvtier bench NAME`` and ``kvtier demo`` run this from a checkout.  Each benchmark module defines
``add_arguments(parser)`` and ``run(args) -> int``; they are found by name, so adding a benchmark
needs no change here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path


def bench_modules() -> list[str]:
    """The benchmark modules' names (``bench/NAME.py``; packages and ``_private`` ones are not)."""
    here = [str(Path(__file__).parent)]
    return sorted(m.name for m in pkgutil.iter_modules(here)
                  if not m.name.startswith("_") and not m.ispkg and m.name != "demo")


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="kvtier's benchmarks (each compares against its "
                                     "baseline in the same run); `demo ...` runs the demo")
    bench_sub = parser.add_subparsers(dest="bench", required=True)
    for name in bench_modules():
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "add_arguments"):
            continue
        p = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def run(argv: Sequence[str], prog: str = "python -m bench") -> int:
    """Run ``NAME ARGS...`` (or ``demo ARGS...``): a benchmark's exit status."""
    argv = list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        return int(importlib.import_module("bench.demo").main(argv[1:]))
    args = build_parser(prog).parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    from kvtier.cli import guarded

    sys.exit(guarded(run, sys.argv[1:]))
