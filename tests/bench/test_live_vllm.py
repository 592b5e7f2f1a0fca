"""Live mode against a real vLLM server (CPU, tiny random-weight model) with the kvtier connector.

The server is started by the test on a free loopback port and stopped afterwards.  vLLM's own
KV cache is cut to 80 blocks of 32 tokens so that eight interleaved agent sessions overflow it
and the kvtier connector must serve the rest: vLLM's hits plus the connector's must then add up
to the infinite-cache ideal computed from the trace, which checks that the synthesised token
ids carry exactly the trace's prefix structure, end to end through a real engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.cli import main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("vllm")
    from tests.integrations.vllm_helpers import build_tiny_model

    tmp = tmp_path_factory.mktemp("live-vllm")
    model = build_tiny_model(tmp / "model")
    connector = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                 "kv_role": "kv_both", "kv_connector_extra_config": {
                     # cost_model off: the test adds up hits, which the default fetch-or-recompute model
                     # would trim (a disk hit of this tiny model is estimated slower than recomputing it)
                     "chunk_tokens": 64, "dram": {"capacity": "64MiB"}, "cost_model": "off",
                     "disk": {"path": str(tmp / "disk"), "capacity": "256MiB", "fsync": False}}}
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "tiny", "--dtype", "float32", "--skip-tokenizer-init", "--enforce-eager",
         "--max-model-len", "2048", "--block-size", "32", "--num-gpu-blocks-override", "80",
         "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(connector)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vLLM did not start:\n" + (tmp / "server.log").read_text()[-4000:]) from None
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_agentic_live_hits_add_up_to_the_ideal(vllm_server: str, tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    rc = main(["bench", "agentic", "--sessions", "8", "--turns", "6", "--system-tokens", "640", "--task-tokens", "200",
               "--tool-tokens", "250", "--output-tokens", "20", "--subagent-prob", "0", "--context-cap", "1900",
               "--start-spread", "1", "--mode", "live", "--endpoint", vllm_server, "--vocab", "2048",
               "--max-output", "4", "--time-scale", "0.2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["requests"] == 48 and doc["errors"] == 0
    assert 0 < doc["ttft_p50_s"] < 10
    c = doc["engine_prefix_cache"]
    assert c["external_prefix_cache_hits"] > 0  # vLLM's 2,560-token cache overflowed: kvtier served the rest
    served = (c["prefix_cache_hits"] + c["external_prefix_cache_hits"]) / c["prefix_cache_queries"]
    assert served == pytest.approx(doc["ideal_hit_rate_tokens"], abs=0.02)
