#!/usr/bin/env bash
# compute-sanitizer over a fast subset of the CUDA tests, one run per tool:
#
#   memcheck   every kernel (ATen, cuBLAS, dora_ext): out-of-bounds and misaligned
#              accesses, with PyTorch's caching allocator off so that every tensor is
#              its own allocation and an overrun cannot land in a neighbour's block;
#   racecheck  dora_ext's kernels only (shared-memory hazards; slow, so filtered);
#   initcheck  every kernel (it must see who wrote a buffer, so no filter) on the
#              smallest subset: reads of memory nothing has written.
#
#   bash scripts/sanitize.sh RESULTS_DIR
#
# Writes RESULTS_DIR/{memcheck,memcheck-graphs,racecheck,racecheck-norm,initcheck}/*.log (one per process),
# RESULTS_DIR/sanitize.json and RESULTS_DIR/sanitize.md (errors per tool), and exits
# non-zero on any reported error, on a failed test, on a tool that did not finish
# within its time limit, or when compute-sanitizer cannot run here (exit 3).
#
# Needs dora_ext importable from tests/ (pip install, or an in-place build: built here
# with `setup.py build_ext --inplace` if the import fails) and a GPU that
# compute-sanitizer supports. Environment:
#   SANITIZE_TOOLS      tools to run (default "memcheck racecheck initcheck")
#   SANITIZE_TIMEOUT_S  limit per tool in seconds (default: memcheck 150, racecheck 75, initcheck 75)
#   COMPUTE_SANITIZER   path of the compute-sanitizer binary
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
[ $# -ge 1 ] || { echo "usage: bash scripts/sanitize.sh RESULTS_DIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

find_sanitizer() {
  local c
  for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
           "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}
SAN=$(find_sanitizer) || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" | tee "$OUT/sanitize.md"; exit 3; }
echo "sanitizer: $SAN ($("$SAN" --version | tail -1))" | tee "$OUT/sanitizer.txt"

# As tests/conftest.py does: an installed dora_ext first, else the checkout's.
if ! (cd tests && python3 -c "import sys; sys.path.append('..'); import dora_ext" 2>/dev/null); then
  echo "dora_ext not importable from tests/: building in place" | tee -a "$OUT/sanitizer.txt"
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 2; }
fi

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export DORA_EXT_PROPERTY_PROFILE=sanitize   # a handful of hypothesis examples per test
export PYTHONUNBUFFERED=1
PYTEST=(python3 -m pytest -q -rs -p no:cacheprovider --rootdir=. -m cuda)

# Test selection per tool (paths relative to tests/). The timing test of a cold
# start adds nothing here and the sanitizer would make it slow.
MEMCHECK_TESTS=(test_cuda.py test_threads.py test_properties.py test_errors.py test_norm_cache.py
                -k "not no_triton_at_run_time")
# CUDA-graph capture needs the caching allocator (a capture cannot cudaMalloc), so the graph
# tests get their own memcheck pass with it on: coarser (an overrun inside a cached block is
# not seen) but the captured and replayed kernels are still checked.
MEMCHECK_GRAPH_TESTS=(test_cuda_graphs.py)
RACECHECK_TESTS=(test_cuda.py test_properties.py
                 -k "fused_gradients_match_reference or compose_delta_fused_is_stable or (fused_forward_matches_reference and float16) or cuda-fused")
RACECHECK_NORM_TESTS=(test_cuda_norm.py -k "large_low_rank_term or cached_weight_sq_gives")
INITCHECK_TESTS=(test_cuda.py test_properties.py
                 -k "(fused_gradients_match_reference and bfloat16) or (cuda-fused and forward_backward)")

run_tool() {  # label timeout extra-sanitizer-args... -- pytest-args...   (label: tool[-suffix])
  local label=$1 limit=$2; shift 2
  local tool=${label%%-*}
  local san_args=()
  while [ "$1" != "--" ]; do san_args+=("$1"); shift; done
  shift
  local dir="$OUT/$label"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "== $label (limit ${limit}s): pytest $*"
  local start rc
  start=$(date +%s)
  (cd tests && timeout --signal=TERM --kill-after=20 "$limit" \
      "$SAN" --tool "$tool" --target-processes all --print-limit 200 --error-exitcode 86 \
      --log-file "$dir/%p.log" "${san_args[@]}" "${PYTEST[@]}" "$@") > "$dir/pytest.out" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - start ))
  tail -3 "$dir/pytest.out"
  python3 - "$label" "$dir" "$rc" "$secs" <<'EOF'
import collections, json, pathlib, re, sys
tool, d, rc, secs = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
errors, summaries, unsupported, internal_error = 0, 0, False, False
by_kernel = collections.Counter()  # the kernel each report names ("at KERNEL+0x..."), arguments dropped
for log in sorted(d.glob("*.log")):
    text = log.read_text(errors="replace")
    for m in re.finditer(r"(?:ERROR|RACECHECK) SUMMARY:\s+(\d+) (?:error|hazard)", text):
        summaries += 1
        errors += int(m.group(1))
    internal_error |= "Internal Sanitizer Error" in text
    unsupported |= "Device not supported" in text or "Target application terminated before first instrumented API call" in text
    for m in re.finditer(r"^=+\s+at (?:void )?([\w:]+(?:<[^\n(]*>)?)", text, re.M):
        by_kernel[m.group(1)[:120]] += 1
dora_hits = sum(n for k, n in by_kernel.items() if k.startswith("dora_"))
out = (d / "pytest.out").read_text(errors="replace")
# a crash (racecheck's "Fatal Python error"): the test the faulthandler trace shows
crash_at = re.findall(r'File ".*?(test_\w+\.py)", line (\d+) in (\w+)', out)
tail = [l for l in out.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", l)]
# The first distinct error headlines and failed tests travel with the summary: the
# per-process logs can be too many to bring back from a remote GPU machine.
headlines = []
for log in sorted(d.glob("*.log")):
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip("= ").strip()
        if re.match(r"(Invalid|Program hit|Race|Uninitialized|Unused|Leaked|Error|Saved host backtrace)", line) \
                and line not in headlines:
            headlines.append(line)
failed = [l for l in out.splitlines() if l.startswith(("FAILED", "ERROR"))]
rec = {"tool": tool, "rc": rc, "seconds": secs, "errors": errors, "errors_in_dora_kernels": dora_hits,
       "processes_with_summary": summaries, "internal_error": internal_error, "timed_out": rc in (124, 137), "unsupported": unsupported,
       "pytest": tail[-1] if tail else "", "first_errors": headlines[:20], "failed_tests": failed[:20],
       "reports_by_kernel": dict(by_kernel.most_common(15)), "crash_in": [":".join(c) for c in crash_at[-3:]]}
(d / "result.json").write_text(json.dumps(rec, indent=1))
print(json.dumps(rec))
EOF
}

TOOLS=${SANITIZE_TOOLS:-memcheck racecheck initcheck}
for tool in $TOOLS; do
  case $tool in
    memcheck)  run_tool memcheck "${SANITIZE_TIMEOUT_S:-150}" -- "${MEMCHECK_TESTS[@]}"
               (unset PYTORCH_NO_CUDA_MEMORY_CACHING
                run_tool memcheck-graphs "${SANITIZE_TIMEOUT_S:-150}" -- "${MEMCHECK_GRAPH_TESTS[@]}") ;;
    # The norm-partials kernel gets its own racecheck pass: on sm_90 it is built of wgmma tensor-core
    # instructions, which racecheck may fail to instrument (an "Internal Sanitizer Error", reported as
    # such below, not as a race); the other dora_ kernels are checked without it.
    racecheck) run_tool racecheck "${SANITIZE_TIMEOUT_S:-75}" --racecheck-report all --kernel-name kns=dora_ \
                 --kernel-name-exclude kns=dora_norm_partials -- "${RACECHECK_TESTS[@]}"
               run_tool racecheck-norm "${SANITIZE_TIMEOUT_S:-75}" --racecheck-report all \
                 --kernel-name kns=dora_norm_partials -- "${RACECHECK_NORM_TESTS[@]}" ;;
    initcheck) run_tool initcheck "${SANITIZE_TIMEOUT_S:-75}" -- "${INITCHECK_TESTS[@]}" ;;
    *) echo "unknown tool $tool" >&2; exit 2 ;;
  esac
done

python3 - "$OUT" $TOOLS <<'EOF'
import json, pathlib, sys
out, tools = pathlib.Path(sys.argv[1]), sys.argv[2:]
extra = {"memcheck": ["memcheck-graphs"], "racecheck": ["racecheck-norm"]}
labels = [l for t in tools for l in [t] + extra.get(t, [])]
recs = [json.loads((out / l / "result.json").read_text()) for l in labels]
(out / "sanitize.json").write_text(json.dumps(recs, indent=1))
lines = ["| tool | errors | in dora_ext kernels | processes checked | seconds | pytest | verdict |",
         "|---|---|---|---|---|---|---|"]
status = 0
for r in recs:
    if r["unsupported"]:
        verdict, code = "sanitizer cannot run on this machine", 3
    elif r["internal_error"]:
        verdict, code = "sanitizer internal error (the tool failed, not the program)", 1
    elif r["timed_out"]:
        verdict, code = "timed out", 1
    elif r["errors"] or r["rc"] == 86:
        verdict, code = "ERRORS REPORTED", 1
    elif r["processes_with_summary"] == 0:
        verdict, code = "no sanitizer summary found", 1
    elif r["rc"] != 0:
        verdict, code = f"tests failed (rc {r['rc']})", 1
    elif " passed" not in r["pytest"]:
        verdict, code = "no test ran (no GPU?)", 1
    else:
        verdict, code = "clean", 0
    status = max(status, code)
    lines.append(f"| {r['tool']} | {r['errors']} | {r['errors_in_dora_kernels']} | {r['processes_with_summary']} "
                 f"| {r['seconds']} | {r['pytest']} | {verdict} |")
for r in recs:
    if r.get("first_errors") or r.get("failed_tests"):
        lines += ["", f"**{r['tool']}**: first distinct reports and failed tests", ""]
        lines += [f"- `{e[:200]}`" for e in r.get("first_errors", []) + r.get("failed_tests", [])]
    if r.get("reports_by_kernel"):
        lines += ["", f"**{r['tool']}**: reports by kernel", ""]
        lines += [f"- {n} in `{k}`" for k, n in r["reports_by_kernel"].items()]
    if r.get("crash_in"):
        lines += ["", f"**{r['tool']}**: crashed in " + ", ".join(f"`{c}`" for c in r["crash_in"])]
(out / "sanitize.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(status)
EOF
