#!/usr/bin/env bash
# Multi-GPU check of dora_ext on a machine with >= 2 GPUs (NCCL), one command:
#   bash scripts/fsdp_check.sh [results-dir]          (default: fsdp_results)
# 1. scripts/fsdp_check.py under torchrun on 2 GPUs: a tiny Llama with DoRA adapters (dora_ext.nn and
#    PEFT + dora_ext.peft) trained under FSDP2 and FSDP1 (fp32, bf16, mixed precision) against one
#    GPU on the same global batch; once with the dispatcher's own tier choice, once forced fused.
# 2. tests/dist_row_norm_worker.py on CUDA: dora_ext.distributed.row_norm with NCCL.
# 3. tests/test_multi_gpu.py (fused kernels on cuda:1 after cuda:0) and tests/test_fsdp.py (CPU/gloo).
# Builds dora_ext first if it is not importable. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-fsdp_results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0

nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$RESULTS/gpus.txt"
(cd tests && python3 -c "import dora_ext") 2>/dev/null || \
  python3 -m pip install --no-build-isolation --no-deps . > "$RESULTS/build.log" 2>&1 || { tail -50 "$RESULTS/build.log"; exit 1; }

rc=0
for tier in auto fused; do
  torchrun --standalone --nproc_per_node 2 scripts/fsdp_check.py "$RESULTS/$tier" --tier "$tier" 2>&1 \
    | grep -v "^W[0-9]" | tee "$RESULTS/fsdp_check_$tier.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
# dora_ext.distributed.row_norm on CUDA DTensors (NCCL) against the float64 dense norm
torchrun --standalone --nproc_per_node 2 tests/dist_row_norm_worker.py "$RESULTS/row_norm_cuda.json" cuda 2>&1 \
  | grep -v "^W[0-9]" | tee "$RESULTS/row_norm_cuda.log"
python3 - "$RESULTS/row_norm_cuda.json" <<'PY' || rc=1
import json, sys
cases = json.load(open(sys.argv[1]))
bad = [c for c in cases if not c["ok"]]
print(f"distributed row_norm on CUDA: {len(cases) - len(bad)}/{len(cases)} cases ok")
for c in bad:
    print("  FAILED", c)
sys.exit(1 if bad or not cases else 0)
PY
(cd tests && python3 -m pytest -q -rs -p no:cacheprovider --rootdir=. test_multi_gpu.py test_fsdp.py 2>&1) \
  | tee "$RESULTS/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "fsdp_check.sh: $([ $rc -eq 0 ] && echo PASSED || echo FAILED) (results in $RESULTS)"
exit $rc
