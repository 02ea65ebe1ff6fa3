#!/usr/bin/env bash
# Which workload makes racecheck fail? (debugging aid for scripts/sanitize.sh; see racecheck_probe.py)
#   bash scripts/racecheck_probe.sh RESULTS_DIR
# Runs each probe of scripts/racecheck_probe.py under compute-sanitizer's racecheck, the dora_ext
# ones unfiltered (plus aot_norm once with a --kernel-name filter), RACECHECK_TIMEOUT seconds each (default 120), and writes
# RESULTS_DIR/probe.md: exit code, whether the sanitizer reported an internal error, and its hazard
# summary, per run.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/racecheck_probe.sh RESULTS_DIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
echo "| probe | kernels instrumented | rc | internal error | summary |" > "$OUT/probe.md"
echo "|---|---|---|---|---|" >> "$OUT/probe.md"
run() {  # probe, kernel filter ("" = all)
  local probe=$1 filter=$2 log="$OUT/${1}_${2:-all}.log"
  local args=(--tool racecheck --racecheck-report all)
  [ -n "$filter" ] && args+=(--kernel-name "kns=$filter")
  (cd tests && timeout "${RACECHECK_TIMEOUT:-120}" "$SAN" "${args[@]}" python3 ../scripts/racecheck_probe.py "$probe") > "$log" 2>&1
  local rc=$?
  local internal; internal=$(grep -c "Internal Sanitizer Error" "$log")
  local summary; summary=$(grep -o "RACECHECK SUMMARY: .*" "$log" | tail -1)
  echo "| $probe | ${filter:-all} | $rc | $internal | ${summary:-none} |" | tee -a "$OUT/probe.md"
}
for probe in cublas cublas_gram jit_add jit_dot jit_loop1 jit_loop3 jit_norm_nowsq_a16 jit_norm_wsq_a16 jit_norm_nowsq_any \
    jit_norm_wsq_any; do
  run "$probe" ""
done
run aot_norm ""
run aot_norm_fp32 ""
# The same workload with a --kernel-name filter: this is what made compute-sanitizer 2025.3 fail
# ("Internal Sanitizer Error", then error 700 at the next module load) on the H100, 2026-11-28.
run aot_norm dora_norm_partials_kernel
run aot_scale ""
run aot_decode ""
run aot_backward ""
run aot_delta ""
