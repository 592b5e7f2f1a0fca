"""Live mode against a small streaming OpenAI-compatible HTTP server started by the test.

The server is ours (stdlib ``http.server``): it checks what we send and streams chunks with a
set delay, so these tests check the client's request format, token synthesis, TTFT
measurement and error handling.  It is not an engine: test_live_vllm.py replays
against a real vLLM server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from bench.harness.live import replay_live, served_model, synthesize_tokens
from bench.sim.workloads.mooncake import load_mooncake
from bench.sim.workloads.stream import Request
from kvtier.cli import main

DELAY_S = 0.05


class _Handler(BaseHTTPRequestHandler):
    prompts: ClassVar[list[list[int]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            body = json.dumps({"data": [{"id": "tiny-test"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["stream"] is True and body["model"] == "tiny-test"
        assert all(isinstance(t, int) for t in body["prompt"])
        type(self).prompts.append(body["prompt"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(DELAY_S)  # "prefill"
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.prompts = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _req(ids: tuple[int, ...], n: int, t: float = 0.0, scope: str = "s") -> Request:
    return Request(time_s=t, session="x", scope=scope, hash_ids=ids, block_tokens=4, input_tokens=n, output_tokens=3)


def test_token_synthesis_follows_hash_ids() -> None:
    a = synthesize_tokens(_req((1, 2, 3), 12))
    b = synthesize_tokens(_req((1, 2, 9), 12))
    c = synthesize_tokens(_req((5, 2, 3), 12))
    assert len(a) == 12 and a[:8] == b[:8] and a[8:] != b[8:]
    assert a[:4] != c[:4] and a[4:8] != c[4:8]  # prefix semantics: a different first block changes all
    assert synthesize_tokens(_req((1, 2, 3), 12, scope="other"))[:4] != a[:4]
    assert synthesize_tokens(_req((1, 2), 10)) == a[:8] + synthesize_tokens(_req((1, 2), 10))[8:]
    assert len(synthesize_tokens(_req((1, 2, 3), 12), max_tokens=5)) == 5
    assert min(a) >= 100 and max(a) < 32_000


def test_replay_measures_ttft_and_keeps_timing(server: str) -> None:
    assert served_model(server) == "tiny-test"
    reqs = [_req((1, 2), 8, 0.0), _req((1, 2, 3), 12, 0.2), _req((1, 2, 3, 4), 16, 0.4)]
    started = time.perf_counter()
    results = replay_live(reqs, server, model="tiny-test", max_output=2)
    assert time.perf_counter() - started >= 0.4 + DELAY_S
    assert [r.error for r in results] == [None] * 3
    for r in results:
        assert DELAY_S <= r.ttft_s <= r.e2e_s < 5 and r.chunks == 2
    p = _Handler.prompts
    assert len(p) == 3 and p[1][:8] == p[0] and p[2][:12] == p[1]


def test_server_down_is_an_error_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = replay_live([_req((1,), 4)], f"http://127.0.0.1:{port}", model="m", timeout_s=2)
    assert len(results) == 1 and results[0].error is not None


def test_live_cli(server: str, tiny_mooncake: Path, tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    rc = main(["bench", "trace", str(tiny_mooncake), "--mode", "live", "--endpoint", server, "--time-scale", "0.2",
               "--max-output", "2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "live" and doc["requests"] == 6 and doc["errors"] == 0
    assert doc["ttft_p50_s"] >= DELAY_S
    assert len(_Handler.prompts) == 6 and [len(x) for x in _Handler.prompts] == [
        r.input_tokens for r in load_mooncake(tiny_mooncake)]
    assert _Handler.prompts[3] == _Handler.prompts[0]  # same hash ids -> same tokens
