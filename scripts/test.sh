#!/usr/bin/env bash
# The whole test suite, set-up included: lint, types, then every test (real Redis, Mooncake, vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check kvtier bench tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
