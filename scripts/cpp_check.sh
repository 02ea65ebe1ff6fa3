#!/usr/bin/env bash
# One command on a GPU machine for the C++ path: build and install the library with
# CUDA (cubins for this GPU's arch) through CMake, build examples/cpp against the
# installed package, run it on CUDA (adapter with precomputed norms, 4 threads, and
# an AOTInductor package), compare with Python and time both.
#   bash scripts/cpp_check.sh [results-dir]          (default: cpp_results)
# Environment: CPP_CHECK_DIMS (make_example.py size flags; default below),
# SKIP_TESTS=1 to skip tests/test_cpp_example.py (run on the library installed here),
# CPP_CHECK_AOTI=0 to skip the AOTInductor package (its compile takes a minute per dtype).
# Writes under results-dir: env.txt, build.log, build_times.txt, example_*.json (one JSON
# line per run: C++ and Python median ms), compare.json (relative errors), tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
RESULTS="$(realpath -m "${1:-cpp_results}")"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
DIMS="${CPP_CHECK_DIMS:---tokens 256 --d-model 1024 --d-hidden 4096 --d-out 1024 --blocks 2}"
AOTI_FLAG=$([ "${CPP_CHECK_AOTI:-1}" = "1" ] && echo --aoti || true)

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  c++ --version | head -1; } | tee "$RESULTS/env.txt"

if ! command -v cmake >/dev/null; then  # the device has no network: a carried wheel (.whl/) or fail
  python3 -m pip install -q --no-index --find-links "$ROOT/.whl" cmake || { echo "cpp_check: no cmake" >&2; exit 1; }
fi
cmake --version | head -1 | tee -a "$RESULTS/env.txt"
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
# dora_ext for Python (the export and the reference): installed, else built in place for this arch.
if ! (cd /tmp && python3 -c "import dora_ext" 2>/dev/null); then
  DORA_EXT_CUDA_ARCHS="$ARCH" python3 setup.py -q build_ext --inplace > "$RESULTS/python_build.log" 2>&1
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
WORK="$RESULTS/work"
rm -rf "$WORK" && mkdir -p "$WORK"
step() {  # name, command...: run, log, time
  local name="$1"; shift
  local start
  start=$(date +%s%N)
  "$@" >> "$RESULTS/build.log" 2>&1 || { tail -60 "$RESULTS/build.log"; exit 1; }
  echo "$name: $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a "$RESULTS/build_times.txt"
}
: > "$RESULTS/build.log"; : > "$RESULTS/build_times.txt"
step "configure library (CUDA, sm_$ARCH)" cmake -S . -B "$WORK/build" -DDORA_EXT_CUDA_ARCHS="$ARCH" \
  -DCMAKE_INSTALL_PREFIX="$WORK/prefix" -DPython3_EXECUTABLE="$(command -v python3)"
step "build library" cmake --build "$WORK/build" -j "$(nproc)"
step "install library" cmake --install "$WORK/build"
step "configure example" cmake -S examples/cpp -B "$WORK/example" -DCMAKE_PREFIX_PATH="$WORK/prefix"
step "build example" cmake --build "$WORK/example" -j "$(nproc)"
EXE="$WORK/example/dora_mlp"
ldd "$EXE" | grep -E "dora_ext|torch|stdc\+\+|cudart|nvrtc" | tee -a "$RESULTS/env.txt"

for DTYPE in float32 bfloat16; do
  DATA="$WORK/data_$DTYPE"
  # shellcheck disable=SC2086
  python3 examples/cpp/make_example.py --out "$DATA" --dtype "$DTYPE" --device cuda $AOTI_FLAG --bench 200 $DIMS \
    | tee "$RESULTS/example_$DTYPE.json"
  "$EXE" --base "$DATA/base.pt" --adapter "$DATA/adapter.pt" --input "$DATA/input.pt" \
    --out "$DATA/cpp.pt" --device cuda --threads 4 --iters 200 | tee -a "$RESULTS/example_$DTYPE.json"
  if [ -n "$AOTI_FLAG" ]; then
    "$EXE" --aoti "$DATA/model.pt2" --input "$DATA/input.pt" --out "$DATA/aoti.pt" \
      --device cuda --threads 2 --iters 200 | tee -a "$RESULTS/example_$DTYPE.json"
  fi
done

# from /tmp: the installed (or PYTHONPATH) dora_ext, not the checkout's sources without their library
(cd /tmp && python3 - "$WORK" "$RESULTS/compare.json") <<'EOF'
import json, sys
from pathlib import Path
from dora_ext.export import load_tensors
work, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for data in sorted(work.glob("data_*")):
    py = load_tensors(data / "python.pt")[0]["y"].double()
    for name in [n for n in ("cpp", "aoti") if (data / f"{n}.pt").exists()]:
        outputs, meta = load_tensors(data / f"{name}.pt")
        result[f"{data.name}/{name}"] = {"tier": meta.get("tier"), **{
            k: float((v.double() - py).norm() / py.norm()) for k, v in outputs.items()}}
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
# DESIGN.md section 6: fp32 < 1e-5, bf16 < 1e-2 against Python's outputs
tol = {"data_float32": 1e-5, "data_bfloat16": 1e-2}
bad = {k: v for k, v in result.items() for name, err in v.items()
       if name != "tier" and err >= tol.get(k.split("/")[0], 1e-2)}
print("cpp_check compare:", "FAILED " + json.dumps(bad) if bad or not result else f"{len(result)} runs within tolerance")
sys.exit(1 if bad or not result else 0)
EOF

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  # reuse the library installed above instead of building it again
  (cd tests && DORA_EXT_TEST_PREFIX="$WORK/prefix" python3 -m pytest -q -rs -s -p no:cacheprovider --rootdir=. \
     test_cpp_example.py 2>&1) | tee "$RESULTS/tests.log"
fi
