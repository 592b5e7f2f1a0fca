#!/usr/bin/env bash
# kvtier's main job: a multi-turn conversation in vLLM with kvtier embedded (DRAM + disk, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvtier demo "$@"
