"""``kvtier bench node`` runs end to end at a tiny size (a real ``kvtier serve``) and writes its rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import node


def test_bench_node_smoke(tmp_path: Path, capsys: object) -> None:
    parser = argparse.ArgumentParser()
    node.add_arguments(parser)
    args = parser.parse_args(["--total", "8MiB", "--repeat", "1", "--calls", "20", "--json", str(tmp_path / "r.json")])
    assert node.run(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {r["path"] for r in rows} == {"embedded", "node", "python echo"}
    assert all(min(r.get("gbps", [1])) > 0 for r in rows)
