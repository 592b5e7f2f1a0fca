from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier
from tests.conftest import make_keys, make_payloads

ROOT = Path(__file__).resolve().parents[1]
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


SECRET = "s3cret-Pa55"


def _kvtier(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command in a fresh interpreter (this checkout's kvtier, no inherited KVTIER_*)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, cwd=ROOT, timeout=120)


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}\n')
    return path


@pytest.mark.parametrize(("args", "env", "message"), [
    (["config"], {"KVTIER_DRAMM__CAPACITY": "1GiB"}, "KVTIER_DRAMM__CAPACITY: unknown config key(s) ['dramm']"),
    (["config"], {"KVTIER_DRAM__CAPACITY": "banana"}, "KVTIER_DRAM__CAPACITY: cannot read 'banana' as a size"),
    (["config"], {"KVTIER_TIERS": "disk,dram"}, "KVTIER_TIERS: 'dram' must come before 'disk'"),
    (["config", "--file", "/nonexistent/kvtier.toml"], {}, "cannot read config file /nonexistent/kvtier.toml"),
    (["pins"], {"KVTIER_DISK__IO_THREADS": "0"}, "KVTIER_DISK__IO_THREADS: must be at least 1, got 0"),
    (["bench", "trace", "/nonexistent.jsonl"], {}, "no such trace: /nonexistent.jsonl"),
    (["bench", "trace", "--policy", "mru", "TRACE"], {}, "unknown policy 'mru'"),
    (["bench", "trace", "--model", "gpt-17", "TRACE"], {}, "unknown model 'gpt-17'"),
    (["bench", "tiers", "--quick", "--dir", "/etc/passwd/x"], {}, "--dir '/etc/passwd/x': cannot make a directory"),
    (["config"], {"KVTIER_DISK__PATH": "/proc/kvtier"}, "disk.path: cannot create '/proc/kvtier' or write in it"),
    (["config"], {"KVTIER_DRAM__CAPACITY": "100TiB"}, "dram.capacity: 109951162777600 bytes is more than this "
                                                      "machine's memory"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], env: dict[str, str],
                                            message: str) -> None:
    out = _kvtier([str(_trace(tmp_path)) if a == "TRACE" else a for a in args], env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"kvtier: error: {out.stderr.partition('kvtier: error: ')[2].strip()}"]
    assert message in out.stderr and "Traceback" not in out.stderr and out.stdout == ""


def test_config_checks_what_open_needs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = _kvtier(["config"], {"KVTIER_DISK__PATH": str(tmp_path / "file" / "chunks")})
    assert out.returncode == 2 and "disk.path: cannot create" in out.stderr and "not a writable directory" in out.stderr
    out = _kvtier(["config"], {"KVTIER_DISK__PATH": str(tmp_path / "new" / "chunks")})
    assert out.returncode == 0 and json.loads(out.stdout)["disk"]["path"] == str(tmp_path / "new" / "chunks")
    assert not (tmp_path / "new").exists()  # checked, not created


def test_config_warns_once_when_redis_does_not_answer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as spare:  # a free port nobody listens on once closed
        url = f"redis://127.0.0.1:{spare.getsockname()[1]}/0"
    for cluster in ("false", "true"):
        out = _kvtier(["config"], {"KVTIER_TIERS": "dram,redis", "KVTIER_REDIS__URL": url,
                                   "KVTIER_REDIS__CLUSTER": cluster})
        assert out.returncode == 0 and json.loads(out.stdout)["redis"]["url"] == url  # valid: printed
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"kvtier: warning: Redis {'Cluster ' * (cluster == 'true')}at {url} unreachable")


def test_config_never_prints_secrets(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text(f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n")
    cert = tmp_path / "client.crt"
    cert.write_text("certificate")
    toml = tmp_path / "kvtier.toml"
    toml.write_text(f'[redis]\npassword = "{SECRET}"\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    from_file = _kvtier(["config", "--file", str(toml)])
    from_env = _kvtier(["config"], {"KVTIER_REDIS__URL": f"redis://admin:{SECRET}@127.0.0.1:6379/0",
                                    "KVTIER_MOONCAKE__METADATA_SERVER": f"http://u:{SECRET}@127.0.0.1:1/m"})
    for out in (from_file, from_env):
        assert out.returncode == 0, out.stderr
        assert SECRET not in out.stdout + out.stderr
        assert json.loads(out.stdout)["redis"]["password"] == "***"
    assert json.loads(from_file.stdout)["redis"]["tls_key_file"] == str(key)  # the path, never the contents
    assert json.loads(from_env.stdout)["redis"]["url"] == "redis://admin@127.0.0.1:6379/0"
    bad = _kvtier(["config"], {"KVTIER_REDIS__URL": f"redis://admin:{SECRET}@127.0.0.1:99999/0"})
    assert bad.returncode == 2 and "admin:***@127.0.0.1" in bad.stderr and SECRET not in bad.stderr


def test_a_missing_optional_package_names_its_extra(tmp_path: Path) -> None:
    """``rich`` and PyYAML are extras now: without them the command says which extra to install."""
    for name in ("rich", "yaml"):  # shadow the installed package with one that is "not installed"
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('No module named ' + {name!r}, name={name!r})\n")
    (tmp_path / "kvtier.yaml").write_text("chunk_tokens: 128\n")
    env = {"PYTHONPATH": f"{tmp_path / 'absent'}{os.pathsep}{ROOT}"}
    out = _kvtier(["bench", "tiers", "--quick"], env)
    assert out.returncode == 2 and out.stderr == "kvtier: error: this command needs rich: pip install 'kvtier[bench]'\n"
    out = _kvtier(["config", "--file", str(tmp_path / "kvtier.yaml")], env)
    assert out.returncode == 2 and "YAML config files need PyYAML: pip install 'kvtier[yaml]'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _kvtier(["config", "--file", str(tmp_path / "kvtier.yaml")])  # with PyYAML
    assert out.returncode == 0 and json.loads(out.stdout)["chunk_tokens"] == 128


BENCHMARKS = "{agentic,g4,mixes,node,opinions,tiers,tight,trace,vllm}"


def _usage(text: str) -> str:
    """argparse's usage with its line wrapping undone."""
    return " ".join(text.split())


def test_bench_and_demo_run_the_checkouts_bench_package_from_anywhere(tmp_path: Path) -> None:
    """``kvtier bench``/``kvtier demo`` run ``bench/`` (not in the wheel) of the checkout kvtier came from."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "kvtier").symlink_to(ROOT / "kvtier")  # kvtier from elsewhere; bench/ only beside the real one
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")} | {"PYTHONPATH": str(site)}

    def kvtier(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    out = kvtier("bench", "-h")
    assert out.returncode == 0 and _usage(out.stdout).startswith(f"usage: kvtier bench [-h] {BENCHMARKS}"), out.stderr
    out = kvtier("bench", "tight", "-h")
    assert out.returncode == 0 and out.stdout.startswith("usage: kvtier bench tight"), out.stderr
    out = kvtier("demo", "--turns", "0")
    assert out.returncode == 2 and "kvtier demo: error: argument --turns: expected a positive integer" in out.stderr
    out = subprocess.run([sys.executable, "-m", "bench", "-h"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _usage(out.stdout).startswith(f"usage: python -m bench [-h] {BENCHMARKS}")


def test_bench_without_a_checkout_is_one_line(tmp_path: Path) -> None:
    """An installed wheel has no benchmarks: ``kvtier bench`` says where they are."""
    shutil.copytree(ROOT / "kvtier", tmp_path / "site" / "kvtier", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")} | {"PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "tiers"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("kvtier: error: `kvtier bench` and `kvtier demo` run from a kvtier checkout")
