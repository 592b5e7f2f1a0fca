#!/usr/bin/env bash
# kvtier's main job on its embedded default hierarchy (DRAM + disk, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvtier bench tiers --quick "$@"
