"""Run vLLM (offline ``LLM``) on a JSON spec in a fresh process; used by tests, benchmark, demo.

A fresh process per engine keeps runs independent (vLLM start-up state, the KV cache, the
connector's DRAM pool) and lets a "second process" share the first one's disk tier for real.
::

    python -m bench.harness.vllm_runner SPEC.json OUT.json

SPEC: ``{"model": path, "connector": "kvtier" | "example" | "offload" | "lmcache" | null, "extra_config": {...},
"prefix_caching": bool, "block_size": int, "max_model_len": int, "max_tokens": int,
"kv_cache_gib": float, "num_gpu_blocks": int | null, "batch": bool, "reset_prefix_cache": bool,
"tensor_parallel_size": int, "stop_token_ids": [int] (an answer stops at any of them; else only at
``max_tokens``), "handshake_dir": path | null (before each phase after the first: write
``phase-N.ready`` there and wait for ``phase-N.go``),
"phases": [[prompt, ...], ...], "stats_file": path | null}``, a prompt being ``[token ids]`` or
``{"tokens": [token ids], "kv_transfer_params": {...}, "cache_salt": str, "abort_after_steps": int}``
(per-request connector parameters, e.g. kvtier's ``{"kvtier": {"pin": true}}``; vLLM's per-tenant
cache salt; in a ``batch`` phase, abort the request after that many engine steps: its output is
``[]``).
Engine settings (defaults: the CPU settings the tests use): ``dtype`` ("float32"), ``enforce_eager``
(true), ``gpu_memory_utilization`` (0.3), ``attention_backend`` (vLLM's choice), ``load_format``
(vLLM's; "dummy": random weights from the model's config), ``max_num_seqs`` (vLLM's),
``async_scheduling`` (vLLM's), ``logprobs`` (k: each phase also returns ``logprobs``, per prompt
and output position ``[[token, logprob], ...]`` best first),
``max_num_batched_tokens`` (``max_model_len``), ``kv_events_endpoint`` (none: vLLM's KV events off; else
published over ZMQ there, e.g. ``ipc:///tmp/kv.sock``, which vLLM binds), ``offload_cpu_gib`` (8: the
CPU space of vLLM's own ``OffloadingConnector``, connector "offload", unless ``extra_config`` sets
``cpu_bytes_to_use``).
Connector "lmcache" is ``LMCacheConnectorV1`` (configured by its ``LMCACHE_*`` environment).
Prompts of a phase run one at a time (TTFT per prompt = wall time of a 1-token generate when
``max_tokens`` is 1), or all in one ``generate`` call with ``batch`` (one time for the phase).
``num_gpu_blocks`` caps vLLM's KV blocks (to force preemption).
OUT: ``{"startup_s": s, "phases": [{"outputs": [[ids]], "seconds": [s], "stats": {...} | null}]}``,
stats being the connector's ``stats_file`` after that phase.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import child_env

CONNECTORS = ("kvtier", "example", "offload", "lmcache")


def kv_transfer_config(connector: str | None, extra: dict[str, Any] | None, *, offload_cpu_gib: float = 8) -> Any:
    """vLLM's ``KVTransferConfig`` for one of ``CONNECTORS`` (None: no connector)."""
    from vllm.config import KVTransferConfig

    if connector is None:
        return None
    if connector == "kvtier":
        return KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm",
                                kv_role="kv_both", kv_connector_extra_config=extra or {})
    if connector == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config=extra or {})
    if connector == "offload":  # vLLM's own CPU offloading (vllm/v1/kv_offload/cpu/spec.py)
        return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                kv_connector_extra_config={"cpu_bytes_to_use": int(offload_cpu_gib * 2**30),
                                                           **(extra or {})})
    if connector == "lmcache":
        return KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both",
                                kv_connector_extra_config=extra or {})
    raise ValueError(f"connector must be one of {', '.join(CONNECTORS)} or null, got {connector!r}")


def engine_args(spec: dict[str, Any]) -> dict[str, Any]:
    """``LLM(...)``'s keyword arguments for ``spec`` (the module doc's keys; CPU settings by default)."""
    extra = dict(spec.get("extra_config") or {})
    if spec.get("stats_file") and spec.get("connector") == "kvtier":
        extra["stats_file"] = spec["stats_file"]
    args: dict[str, Any] = dict(
        model=spec["model"], dtype=spec.get("dtype", "float32"), skip_tokenizer_init=True,
        enforce_eager=spec.get("enforce_eager", True), max_model_len=spec.get("max_model_len", 4096),
        block_size=spec.get("block_size", 128), enable_prefix_caching=spec.get("prefix_caching", False),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", spec.get("max_model_len", 4096)),
        kv_transfer_config=kv_transfer_config(spec.get("connector"), extra,
                                              offload_cpu_gib=spec.get("offload_cpu_gib", 8)),
        num_gpu_blocks_override=spec.get("num_gpu_blocks"), seed=0,
        tensor_parallel_size=spec.get("tensor_parallel_size", 1))
    for key in ("attention_backend", "load_format", "max_num_seqs", "async_scheduling"):  # vLLM's defaults unless set
        if spec.get(key) is not None:
            args[key] = spec[key]
    if spec.get("kv_events_endpoint"):
        from vllm.config import KVEventsConfig

        args["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                  endpoint=spec["kv_events_endpoint"])
    return args


class _NoChatWarmupNoise(logging.Filter):
    """vLLM warms up chat templates at start-up and logs a traceback when there is no tokenizer
    (``skip_tokenizer_init=True``, as with our random-weight models): expected here, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


def quiet_chat_warmup() -> None:
    """Drop vLLM's start-up traceback about chat templates of tokenizer-less models (idempotent)."""
    logger = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _NoChatWarmupNoise) for f in logger.filters):
        logger.addFilter(_NoChatWarmupNoise())


def make_llm(spec: dict[str, Any]) -> Any:
    quiet_chat_warmup()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 1)))
    from vllm import LLM

    return LLM(**engine_args(spec))


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = make_llm(spec)
    startup = time.perf_counter() - t0
    top = spec.get("logprobs")  # top-k logprobs per output token, to tell a near-tie from a wrong KV byte
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, detokenize=False,
                            ignore_eos=True, stop_token_ids=spec.get("stop_token_ids"), logprobs=top)
    stats_file = spec.get("stats_file")
    phases = []
    for i, prompts in enumerate(spec["phases"]):
        if i and spec.get("handshake_dir"):  # let the caller act between phases (e.g. stop a server)
            _handshake(Path(spec["handshake_dir"]), i)
        if i and spec.get("reset_prefix_cache"):
            reset_prefix_cache(llm)  # later phases cannot hit in vLLM's own cache
        outputs, seconds, logprobs = [], [], []
        for batch in [prompts] if spec.get("batch") else [[p] for p in prompts]:
            inputs = [_engine_input(p) for p in batch]
            per_prompt = [_with_transfer_params(params, p.get("kv_transfer_params")) if isinstance(p, dict)
                          else params for p in batch]
            aborts = [p.get("abort_after_steps") if isinstance(p, dict) else None for p in batch]
            t = time.perf_counter()
            if any(a is not None for a in aborts):
                outputs += _generate_with_aborts(llm, inputs, per_prompt, aborts)
            else:
                results = llm.generate(inputs, per_prompt, use_tqdm=False)
                outputs += [list(r.outputs[0].token_ids) for r in results]
                if top:
                    logprobs += [_top_logprobs(r.outputs[0].logprobs) for r in results]
            seconds.append(time.perf_counter() - t)
        stats = json.loads(Path(stats_file).read_text()) if stats_file and Path(stats_file).exists() else None
        phase: dict[str, Any] = {"outputs": outputs, "seconds": seconds, "stats": stats}
        if top:
            phase["logprobs"] = logprobs
        phases.append(phase)
    return {"startup_s": startup, "phases": phases}


def _top_logprobs(per_token: Any) -> list[list[list[float]]]:
    """Per output position, ``[[token, logprob], ...]`` best first (vLLM adds the sampled token)."""
    out = []
    for position in per_token or []:
        ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)
        out.append([[int(token), float(lp.logprob)] for token, lp in ranked])
    return out


def reset_prefix_cache(llm: Any, timeout_s: float = 120) -> None:
    """Empty vLLM's prefix cache.  vLLM refuses while a connector still holds blocks it is saving
    (it frees them when the worker reports the save, at a later step): step the engine with a
    1-token request and try again; raise if it still refuses after ``timeout_s``."""
    from vllm import SamplingParams

    deadline = time.monotonic() + timeout_s
    while not llm.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM refused reset_prefix_cache for {timeout_s} s: blocks still held")
        llm.generate([{"prompt_token_ids": [1]}], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        time.sleep(0.05)


def _handshake(directory: Path, phase: int, timeout_s: float = 120) -> None:
    """Write ``phase-N.ready``, wait for the caller's ``phase-N.go``."""
    (directory / f"phase-{phase}.ready").touch()
    deadline = time.monotonic() + timeout_s
    while not (directory / f"phase-{phase}.go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no phase-{phase}.go in {directory} after {timeout_s} s")
        time.sleep(0.05)


def _engine_input(prompt: Any) -> dict[str, Any]:
    if not isinstance(prompt, dict):
        return {"prompt_token_ids": prompt}
    data: dict[str, Any] = {"prompt_token_ids": prompt["tokens"]}
    if prompt.get("cache_salt") is not None:
        data["cache_salt"] = prompt["cache_salt"]
    return data


def _generate_with_aborts(llm: Any, inputs: list[dict[str, Any]], params: list[Any],
                          aborts: list[int | None]) -> list[list[int]]:
    """Step the engine by hand, aborting requests after their number of steps (output ``[]``)."""
    engine = llm.llm_engine
    ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(inputs))]
    for rid, prompt, p in zip(ids, inputs, params, strict=True):
        engine.add_request(rid, prompt, p)
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        due = [rid for rid, n in zip(ids, aborts, strict=True) if n is not None and n == steps and rid not in done]
        if due:
            engine.abort_request(due)
            done.update({rid: [] for rid in due})
    return [done.get(rid, []) for rid in ids]


def _with_transfer_params(params: Any, transfer: dict[str, Any] | None) -> Any:
    if transfer is None:
        return params
    clone = params.clone()
    clone.extra_args = {**(clone.extra_args or {}), "kv_transfer_params": transfer}
    return clone


class VllmRunFailed(RuntimeError):
    """The vLLM process exited with an error; ``str(exc)`` holds its output."""


def run_in_subprocess(spec: dict[str, Any], workdir: Path, name: str, timeout: float = 600,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``spec`` in a fresh ``python -m bench.harness.vllm_runner`` process; its result."""
    import subprocess

    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    full_env = {**child_env(), "VLLM_CPU_KVCACHE_SPACE": str(spec.get("kv_cache_gib", 1)),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "bench.harness.vllm_runner", str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise VllmRunFailed(proc.stdout + proc.stderr)
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
