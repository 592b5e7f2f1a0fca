"""The ``kvtier`` command.

    kvtier demo                 a multi-turn conversation through the default hierarchy
    kvtier bench tiers          tier put/get throughput vs raw baselines
    kvtier bench <name> ...     every module kvtier.bench.<name> with add_arguments() and run()
    kvtier config               print the effective configuration
    kvtier pins [--clear]       the disk tier's persistent pins (token warehouse), per model layout

Each benchmark module defines ``add_arguments(parser)`` and ``run(args) -> int``; the CLI finds
them by name, so adding a benchmark needs no change here.

A user error (a bad config value, a missing trace, an unknown policy: any ``KVTierError``) is one
line on stderr, ``kvtier: error: <message>``, and exit status 2, as argparse does for bad options;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import kvtier.bench
from kvtier.errors import KVTierError

if TYPE_CHECKING:
    from kvtier.config import KVTierConfig

# optional modules -> the extra that installs them (pyproject.toml)
EXTRAS = {"rich": "bench", "matplotlib": "bench", "vllm": "vllm", "redis": "redis", "mooncake": "mooncake",
          "torch": "torch", "transformers": "hf", "yaml": "yaml"}


def _bench_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(kvtier.bench.__path__)
                  if not m.name.startswith("_") and not m.ispkg and m.name not in ("common",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache memory for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="check the effective configuration and print it as JSON (secrets as ***)")
    cfg.add_argument("--file", type=Path, default=None, help="TOML or YAML config file")

    pins = sub.add_parser("pins", help="list (or --clear) the persistent pins of the configured disk tier")
    pins.add_argument("--file", type=Path, default=None, help="TOML or YAML config file")
    pins.add_argument("--clear", action="store_true", help="remove every pin record (chunks stay cached)")

    demo = sub.add_parser("demo", help="run the main end-to-end demo")
    demo.add_argument("args", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench", help="benchmarks (each compares against its baseline in the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name in _bench_modules():
        module = importlib.import_module(f"kvtier.bench.{name}")
        if not hasattr(module, "add_arguments"):
            continue
        p = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"kvtier: error: this command needs {exc.name}: pip install 'kvtier[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvtier: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # argparse's REMAINDER does not take options ("--turns 3") before a positional
        return int(importlib.import_module("kvtier.demo").main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        from kvtier.config import check_openable, load_config, redacted

        config = load_config(args.file)
        check_openable(config)
        print(json.dumps(redacted(config), indent=2))
        if "redis" in config.tiers:  # valid, but say so when its chunks would all be misses
            _warn_unreachable_redis(config)
        return 0
    if args.command == "pins":
        from kvtier.config import load_config

        return _pins(load_config(args.file).disk.path, clear=args.clear)
    if args.command == "demo":
        demo = importlib.import_module("kvtier.demo")
        return int(demo.main(args.args))
    return int(args._run(args))


def _warn_unreachable_redis(config: KVTierConfig) -> None:
    from kvtier.layout import KVLayout
    from kvtier.tiers.redis import RedisTier

    tier = RedisTier(KVLayout(model="kvtier-config-probe", num_layers=1, num_kv_heads=1, head_dim=1), config.redis)
    try:
        problem = tier.probe()
    finally:
        tier.close()
    if problem is not None:
        print(f"kvtier: warning: {problem}; its chunks are misses until it answers", file=sys.stderr)


def _pins(root: Path, *, clear: bool) -> int:
    """One line per model layout under the disk root: pinned chunks, how many are on disk, bytes."""
    import time

    from kvtier.tiers.disk import PinFiles, chunk_path

    root = root.expanduser()
    layouts = sorted(p.parent for p in root.glob("*/pins") if p.is_dir())
    if not layouts:
        print(f"no pins under {root}")
        return 0
    now = time.time()
    for layout_dir in layouts:
        pins = PinFiles(layout_dir / "pins")
        records = pins.records()
        sizes = [path.stat().st_size for key in records if (path := chunk_path(layout_dir, key)).exists()]
        lapse = [t for t in records.values() if t is not None]
        until = f", {len(lapse)} lapse within {max(lapse) - now:.0f} s" if lapse else ""
        print(f"{root}/{layout_dir.name}: {len(records)} pinned chunks, {len(sizes)} on disk "
              f"({sum(sizes) / 2**20:.1f} MiB){until}")
        if clear:
            pins.unpin(list(records))
            print(f"  cleared {len(records)} pin records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
