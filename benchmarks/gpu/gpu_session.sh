#!/usr/bin/env bash
# One warm GPU session of issue 24 (vLLM 0.26 on an H100/H200), stage by stage; each `device` call runs
# some stages, calls back to back (the machine keeps /opt/stage, /tmp/site and /tmp/keep only while warm):
#
#   LIMIT=60  bash benchmarks/gpu/gpu_session.sh part1                carry .gpu/part1
#   LIMIT=590 bash benchmarks/gpu/gpu_session.sh install exact plain  carry .gpu/part2 .gpu/bin .gpu-lmcache .traces
#   (PROFILE=1 and .gpu-tools in the carry: py-spy samples every engine; see spy_watch)
#   LIMIT=590 bash benchmarks/gpu/gpu_session.sh connectors
#   LIMIT=590 bash benchmarks/gpu/gpu_session.sh serve
#
# Or, short of device time: LIMIT=590 EXACT_S=300 bash benchmarks/gpu/gpu_session.sh install exact single
# install: vLLM 0.26.0 (../shared/gpu-vllm) and LMCache 0.5.3 into /tmp/site, /tmp/site-lmc.
# exact: benchmarks/gpu/vllm_exact_gpu.py (every scenario).  plain: the single-request table's plain
# engine (recompute, vllm), kept in /tmp/keep for `connectors`, which runs kvtier, kvtier-disk,
# vllm-offload, lmcache, lmcache-disk against it.  serve: agentic replay + no reuse.
# Each stage's budget is what LIMIT leaves; logs and JSON land in $OUT.
set -uo pipefail
t0=$SECONDS
left() { echo $(( ${LIMIT:-590} - (SECONDS - t0) - 20 )); }
export PYTHONPATH=/tmp/site:/tmp/site-lmc:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_USE_DEEP_GEMM=0
mkdir -p /tmp/keep
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
# PROFILE=1 (install carries .gpu-tools/ with a py-spy wheel): every vLLM EngineCore process that starts
# is sampled by py-spy until it exits (collapsed stacks of all threads, idle included, in $OUT/pyspy_<pid>.txt;
# the engine's mode is in the log by time), to find what blocks the step.
spy_watch() {
  local spy=/tmp/spy/bin/py-spy seen=" "
  [ -x "$spy" ] || { echo "PROFILE: no py-spy (carry .gpu-tools)"; return; }
  while true; do
    for pid in $(pgrep -f 'EngineCore' || true); do
      case "$seen" in *" $pid "*) continue ;; esac
      seen="$seen$pid "
      "$spy" record --pid "$pid" --rate 100 --threads --idle --nonblocking --format raw \
        -o "$OUT/pyspy_$pid.txt" > "$OUT/pyspy_$pid.log" 2>&1 &
    done
    sleep 1
  done
}
if [ "${PROFILE:-0}" = 1 ]; then
  [ -d .gpu-tools ] && pip install -q --no-deps --target /tmp/spy .gpu-tools/py_spy-*.whl > /dev/null 2>&1
  spy_watch & SPY=$!
  trap 'kill $SPY 2>/dev/null' EXIT
fi
SINGLE=(--part single --contexts "${CONTEXTS:-8192,32768}" --executor uni)
for stage in "$@"; do
  case "$stage" in
    part1) mkdir -p /opt/stage && cp -r .gpu/part1 /opt/stage/ && du -sh /opt/stage/* ;;
    install)
      cp -r .gpu/part2 /opt/stage/ && PYTHONPATH='' bash .gpu/bin/install.sh /opt/stage /tmp/site > "$OUT/install.log" 2>&1 \
        && PYTHONPATH=/tmp/site bash .gpu-lmcache/install.sh /tmp/site-lmc >> "$OUT/install.log" 2>&1
      echo "install rc=$? at $((SECONDS - t0)) s"; tail -3 "$OUT/install.log" ;;
    exact)
      timeout "$(( $(left) < ${EXACT_S:-430} ? $(left) : ${EXACT_S:-430} ))" python3 benchmarks/gpu/vllm_exact_gpu.py \
        --json "$OUT/exact.json" --workdir /tmp/exact ${SCENARIOS:+--scenarios "$SCENARIOS"} > "$OUT/exact.log" 2>&1
      echo "exact rc=$? at $((SECONDS - t0)) s"; grep -E '^\[|^\{' "$OUT/exact.log" | tail -30 ;;
    plain)
      python3 benchmarks/gpu/vllm_serving.py "${SINGLE[@]}" --modes recompute,vllm --budget-s "$(left)" \
        --json "$OUT/single_plain_vllm_serving.json" --log "$OUT/single_plain.log" > "$OUT/single_plain.out" 2>&1
      echo "plain rc=$? at $((SECONDS - t0)) s"; cp "$OUT/single_plain_vllm_serving.json" /tmp/keep/; tail -12 "$OUT/single_plain.out" ;;
    single)  # every mode in one call, as far as the budget goes
      python3 benchmarks/gpu/vllm_serving.py "${SINGLE[@]}" --modes "${MODES:-recompute,vllm,kvtier,kvtier-disk,vllm-offload,lmcache}" \
        --budget-s "$(left)" --json "$OUT/single_vllm_serving.json" --log "$OUT/single.log" > "$OUT/single.out" 2>&1
      echo "single rc=$? at $((SECONDS - t0)) s"; cp "$OUT/single_vllm_serving.json" /tmp/keep/single_plain_vllm_serving.json
      tail -25 "$OUT/single.out" ;;
    connectors)
      ref=/tmp/keep/single_plain_vllm_serving.json
      python3 benchmarks/gpu/vllm_serving.py "${SINGLE[@]}" --modes "${MODES:-kvtier,kvtier-disk,vllm-offload,lmcache}" \
        $([ -f $ref ] && echo --reference $ref) --budget-s "$(left)" \
        --json "$OUT/single_conn_vllm_serving.json" --log "$OUT/single_conn.log" > "$OUT/single_conn.out" 2>&1
      echo "connectors rc=$? at $((SECONDS - t0)) s"; tail -25 "$OUT/single_conn.out" ;;
    serve)
      python3 benchmarks/gpu/vllm_serving.py --part "${PARTS:-agentic,noreuse}" --modes "${SERVE_MODES:-vllm,kvtier,vllm-offload,lmcache}" \
        --sessions "${SESSIONS:-16}" --max-context "${MAX_CONTEXT:-16384}" --turns "${TURNS:-4}" --traces .traces/kv-cache-tester --executor uni \
        --budget-s "$(left)" --json "$OUT/serve${TAG:-}_vllm_serving.json" --log "$OUT/serve${TAG:-}.log" > "$OUT/serve${TAG:-}.out" 2>&1
      echo "serve rc=$? at $((SECONDS - t0)) s"; tail -25 "$OUT/serve${TAG:-}.out" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
