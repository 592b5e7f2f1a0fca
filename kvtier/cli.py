"""The ``kvtier`` command.

    kvtier config               print the effective configuration
    kvtier pins [--clear]       the disk tier's persistent pins (token warehouse), per model layout
    kvtier serve [--socket ...] one process per node owning the DRAM pool every engine shares (docs/node.md)
    kvtier demo                 a multi-turn conversation through the default hierarchy
    kvtier bench <name> ...     the benchmark bench/<name>.py (``kvtier bench -h`` lists them)

``demo`` and ``bench`` run the checkout's top-level ``bench`` package (``python -m bench ...``): the
benchmarks, the demo and their harness are not in the wheel, and nothing else in ``kvtier`` imports
them.

A user error (a bad config value, a missing trace, an unknown policy: any ``KVTierError``) is one
line on stderr, ``kvtier: error: <message>``, and exit status 2, as argparse does for bad options;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.errors import KVTierError

if TYPE_CHECKING:
    from kvtier.config.schema import KVTierConfig

# optional modules -> the extra that installs them (pyproject.toml)
EXTRAS = {"rich": "bench", "matplotlib": "bench", "vllm": "vllm", "redis": "redis", "mooncake": "mooncake",
          "torch": "torch", "transformers": "hf", "yaml": "yaml"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache memory for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="check the effective configuration and print it as JSON (secrets as ***)")
    cfg.add_argument("--file", type=Path, default=None, help="TOML or YAML config file")

    pins = sub.add_parser("pins", help="list (or --clear) the persistent pins of the configured disk tier")
    pins.add_argument("--file", type=Path, default=None, help="TOML or YAML config file")
    pins.add_argument("--clear", action="store_true", help="remove every pin record (chunks stay cached)")

    serve = sub.add_parser(
        "serve", help="serve this node's shared DRAM pool to every engine process on it (the `node` tier)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=SERVE_HELP)
    serve.add_argument("--socket", type=Path, default=None,
                       help="Unix socket to listen on (default: the config's node.url)")
    serve.add_argument("--dram", default=None, help="pool size, e.g. 64GiB (default: the config's dram.capacity)")
    serve.add_argument("--config", type=Path, default=None, help="TOML or YAML config file (its [node] and [dram])")
    serve.add_argument("--no-prefault", action="store_true", help="do not populate the pool's pages at start")

    demo = sub.add_parser("demo", help="run the main end-to-end demo")
    demo.add_argument("args", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench", help="benchmarks (each compares against its baseline in the same run)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


SERVE_HELP = """\
One process per node that owns a DRAM pool in shared memory and its index, so a chunk one engine
process stores is a DRAM hit in every other (and outlives the engine).  Engines use it by naming the
`node` tier in place of `dram`:  KVTIER_TIERS=node,disk  (and node.url if not the default socket).

The pool is a memfd handed to each client over the socket (SCM_RIGHTS); the socket is 0600.  A slot
is readable only after its writer committed it: a client killed mid-copy publishes nothing, and its
reservations and pins are reclaimed when its connection closes.  Eviction: LRU.  A second
`kvtier serve` on the same socket fails; a stale socket file is replaced.  SIGTERM stops it.
"""


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def guarded(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """``command(argv)``, a user error as one line on stderr and exit status 2 (see above)."""
    try:
        return command(argv)
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
    # argparse's REMAINDER does not take options ("--turns 3", "-h") before a positional
    if argv[:1] == ["demo"]:
        return _bench_run(argv)
    if argv[:1] == ["bench"]:
        return _bench_run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        from kvtier.config.loader import load_config
        from kvtier.config.schema import check_openable, redacted

        config = load_config(args.file)
        check_openable(config)
        print(json.dumps(redacted(config), indent=2))
        if "redis" in config.tiers:  # valid, but say so when its chunks would all be misses
            _warn_unreachable_redis(config)
        return 0
    if args.command == "pins":
        from kvtier.config.loader import load_config

        return _pins(load_config(args.file).disk.path, clear=args.clear)
    if args.command == "serve":
        return _serve(args.socket, args.dram, args.config, prefault=not args.no_prefault)
    raise AssertionError(f"unhandled command {args.command!r}")


def _bench_run(argv: list[str]) -> int:
    """``python -m bench ARGV`` in this process, from the checkout this ``kvtier`` was imported from."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "bench" / "__main__.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    elif importlib.util.find_spec("bench") is None:
        raise KVTierError("`kvtier bench` and `kvtier demo` run from a kvtier checkout (the benchmarks and the demo "
                          "are not in the wheel): git clone the repository, then `python -m bench ...` there")
    bench_main = importlib.import_module("bench.__main__")
    return int(bench_main.run(argv, prog="kvtier bench"))


def _serve(sock: Path | None, dram: str | None, file: Path | None, *, prefault: bool) -> int:
    import logging

    from kvtier.config import load_config, parse_size
    from kvtier.config_node import socket_path
    from kvtier.node.server import run

    config = load_config(file)
    path = sock if sock is not None else socket_path(config.node.url)
    capacity = parse_size(dram, "--dram") if dram is not None else config.dram.capacity
    logging.basicConfig(level=logging.INFO, format="kvtier serve: %(levelname)s %(message)s", stream=sys.stderr)
    return run(path.expanduser().absolute(), capacity, prefault=prefault)


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

    from kvtier.tiers.disk_files import chunk_path
    from kvtier.tiers.disk_pins import PinFiles

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
