#!/usr/bin/env bash
# Nsight Compute on one DoRA training step (why a target is missed), per kernel.
#   bash scripts/ncu_step.sh RESULTS_DIR [profile_step.py options, e.g. --sizes 8192]
# Runs scripts/profile_step.py --ncu under ncu (only the step inside the profiler range is
# measured; clocks not locked, so durations are what a training run sees) and writes
# RESULTS_DIR/ncu_raw.csv and RESULTS_DIR/ncu_step.md: per kernel its duration and its compute
# (SM) and DRAM throughput in % of the GPU's peak, in launch order, fused and eager tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/ncu_step.sh RESULTS_DIR [profile_step.py options]" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
METRICS=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed
"$NCU" --profile-from-start off --clock-control none --metrics "$METRICS" --csv --page raw \
  python3 scripts/profile_step.py "$OUT/profile_step.txt" --ncu "$@" > "$OUT/ncu_stdout.txt"
# ncu prints the program's own output first; the CSV starts at the header line.
sed -n '/^"ID"/,$p' "$OUT/ncu_stdout.txt" > "$OUT/ncu_raw.csv"
python3 - "$OUT/ncu_raw.csv" "$OUT/ncu_step.md" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rows = [r for r in rows if r.get("ID", "").isdigit()]  # the second header line holds units
lines = ["| # | kernel | µs | SM % | DRAM % |", "|---|---|---|---|---|"]
total = 0.0
for r in rows:
    ns = float(r["gpu__time_duration.sum"].replace(",", ""))
    total += ns
    lines.append(f"| {r['ID']} | {r['Kernel Name'][:80]} | {ns / 1e3:.1f} | "
                 f"{r['sm__throughput.avg.pct_of_peak_sustained_elapsed']} | "
                 f"{r['dram__throughput.avg.pct_of_peak_sustained_elapsed']} |")
lines.append(f"\n{len(rows)} kernels, {total / 1e3:.1f} µs of kernel time in all (the steps of every size and tier "
             "in scripts/profile_step.py's order: fused, then eager, per size)")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
