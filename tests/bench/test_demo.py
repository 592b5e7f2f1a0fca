"""bench/demo.py: its quieting of vLLM, checked in real processes (the demo itself runs in scripts/demo.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.demo import main

ROOT = Path(__file__).resolve().parents[2]

# An "engine process": configures logging as vLLM does (from VLLM_LOGGING_CONFIG_PATH), then says
# what vLLM and kvtier say.
ENGINE = """
import json, logging.config, os, warnings
logging.config.dictConfig(json.load(open(os.environ["VLLM_LOGGING_CONFIG_PATH"])))
logging.getLogger("vllm.platforms").warning("vLLM chatter")
logging.getLogger("vllm.engine").error("vLLM error kept")
logging.getLogger("vllm.kvtier").warning("kvtier warning kept")
logging.getLogger("vllm.kvtier").info("kvtier info (below the demo's level)")
warnings.warn("resource_tracker: There appear to be 1 leaked shared_memory objects", UserWarning)
warnings.warn("another warning kept", UserWarning)
"""

# The demo's process: quiets the engines it would start, then starts one.
DEMO = f"""
import subprocess, sys
from pathlib import Path
from bench.demo import _quiet_engines
_quiet_engines(Path(sys.argv[1]))
sys.exit(subprocess.run([sys.executable, "-c", {ENGINE!r}]).returncode)
"""


def test_engines_keep_errors_and_kvtier_lines_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTHONWARNINGS"))}
    out = subprocess.run([sys.executable, "-c", DEMO, str(tmp_path)], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "ERROR vllm.engine: vLLM error kept" in lines and "WARNING vllm.kvtier: kvtier warning kept" in lines
    assert any("another warning kept" in line for line in lines)
    assert "chatter" not in out.stderr and "resource_tracker" not in out.stderr and "info" not in out.stderr
    assert "Invalid -W option" not in out.stderr  # the PYTHONWARNINGS filters parse


def test_a_users_vllm_log_level_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.demo import _quiet_engines

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # restored after the test
    _quiet_engines(tmp_path)
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ and not (tmp_path / "vllm-logging.json").exists()
    assert os.environ["PYTHONWARNINGS"].startswith("default,ignore:") and os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"


@pytest.mark.parametrize("args", [["--turns", "0"], ["--chunk-tokens", "-256"], ["--user-tokens", "many"]])
def test_bad_demo_arguments_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
