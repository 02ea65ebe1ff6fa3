#!/usr/bin/env bash
# One command on a GPU machine: build dora_ext against the installed torch,
# run the CUDA tests (FULL=1: the whole suite), the layer, epilogue, float32-adapter, model, generate and
# serving benchmarks.
#   bash scripts/gpu_check.sh [results-dir]        (default: gpu_results)
# Environment: DORA_EXT_CUDA_ARCHS (arch list for the build), BENCH_ARGS
# (extra arguments for scripts/bench.py), SKIP_BENCH=1 to only build and test, SKIP_NO_CUBIN=1 to
# skip the build for another architecture that tests the no-cubin fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-gpu_results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"

start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -v . > "$RESULTS/build.log" 2>&1 || { tail -50 "$RESULTS/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$RESULTS/gpu.txt"
grep "aot_build:" "$RESULTS/build.log" | tee -a "$RESULTS/gpu.txt"

# Run from tests/ so the installed package, not the source tree, is imported. By default
# the tests marked cuda (every GPU path; CI runs the CPU ones); FULL=1 runs everything.
# The C++ example has its own GPU script (scripts/cpp_check.sh, it needs cmake).
tests_rc=0
select=(-m cuda)
[ "${FULL:-0}" = "1" ] && select=()
(cd tests && python3 -m pytest -q -rs -p no:cacheprovider --rootdir=. --ignore=test_cpp_example.py "${select[@]}" . 2>&1) \
  | tee "$RESULTS/tests.log" || tests_rc=$?

# A build without cubins for this GPU must run every op eagerly and say so (tests/test_no_cubin.py):
# a copy of the sources built for another architecture only, installed into a scratch directory.
if [ "${SKIP_NO_CUBIN:-0}" != "1" ]; then
  arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
  other=$([ "$arch" -ge 90 ] && echo 80 || echo 90)
  scratch=$(mktemp -d)
  mkdir -p "$scratch/src"
  tar --exclude=./build --exclude='*.so' --exclude=./.git -cf - . | tar -xf - -C "$scratch/src"
  if DORA_EXT_CUDA_ARCHS="$other" python3 -m pip install --no-build-isolation --no-deps --target "$scratch/site" \
       "$scratch/src" > "$RESULTS/no_cubin_build.log" 2>&1; then
    (cd tests && PYTHONPATH="$scratch/site" python3 -m pytest -q -rs -p no:cacheprovider --rootdir=. \
       test_no_cubin.py 2>&1) | tee "$RESULTS/no_cubin_tests.log" || tests_rc=1
  else
    tail -30 "$RESULTS/no_cubin_build.log"; tests_rc=1
  fi
  rm -rf "$scratch"
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  # shellcheck disable=SC2086
  python3 scripts/bench.py --out "$RESULTS" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log"
  python3 scripts/bench_model.py --out "$RESULTS/model" 2>&1 | tee "$RESULTS/bench_model.log"
  # float32 adapters on a bf16 layer: the exact-parts route vs fp32 GEMMs by token count
  python3 scripts/bench_fp32_adapters.py --out "$RESULTS/fp32_adapters" 2>&1 | tee "$RESULTS/bench_fp32_adapters.log"
  # the forward designs side by side: cuBLAS + pass, one Triton GEMM, the decode kernel
  python3 scripts/bench_epilogue.py --out "$RESULTS/epilogue" 2>&1 | tee "$RESULTS/bench_epilogue.log"
  # model.generate with one adapter (both adapter dtypes), and many adapters in one batch
  python3 scripts/bench_generate.py --out "$RESULTS/generate" 2>&1 | tee "$RESULTS/bench_generate.log"
  python3 scripts/bench_serving.py --out "$RESULTS/serving" 2>&1 | tee "$RESULTS/bench_serving.log"
fi
exit "$tests_rc"
