from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier
from tests.conftest import make_keys, make_payloads

LAYOUT = KVLayout(model="test/cli", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", tokens_per_chunk=4)


def test_pins_lists_and_clears_the_warehouse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "kvtier.toml"
    config.write_text(f'[disk]\npath = "{tmp_path / "chunks"}"\n')
    assert main(["pins", "--file", str(config)]) == 0
    assert "no pins" in capsys.readouterr().out

    tier = DiskTier(LAYOUT, path=tmp_path / "chunks", capacity_bytes=1 << 20, fsync=False)
    keys = make_keys(LAYOUT, 3)
    tier.put_many(keys[:2], make_payloads(LAYOUT, 2))
    tier.pin_files.pin(keys)  # the third is pinned ahead of its chunk
    tier.pin_files.pin(keys[:1], ttl_s=None)
    assert main(["pins", "--file", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{LAYOUT.fingerprint:016x}: 3 pinned chunks, 2 on disk" in out

    assert main(["pins", "--file", str(config), "--clear"]) == 0
    assert "cleared 3 pin records" in capsys.readouterr().out
    assert tier.pin_files.records() == {}
    assert sorted(tier.keys()) == sorted(keys[:2])  # the chunks stay cached
    tier.close()
