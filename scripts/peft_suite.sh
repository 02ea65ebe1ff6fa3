#!/usr/bin/env bash
# PEFT's own DoRA tests, unchanged, with every LoRA layer they build routed through dora_ext
# (DESIGN.md §6: a drop-in is judged by the peer's tests).
#
#   bash scripts/peft_suite.sh [OUT_DIR]            # accelerated run (default OUT_DIR: peft_suite_results)
#   MODE=stock bash scripts/peft_suite.sh OUT_DIR   # the same tests on stock PEFT (baseline)
#   MODE=both  bash scripts/peft_suite.sh OUT_DIR   # both, one after the other, and a comparison
#
# Fetches the source release (sdist) of the *installed* peft version with pip into a cache
# (PEFT_SUITE_CACHE, default ~/.cache/dora_ext/peft_suite), unpacks its tests/, and runs
# tests/test_custom_models.py and tests/test_lora_variants.py selected with -k "$PEFT_SUITE_K"
# (default "dora", case-insensitive: every DoRA test of both files) through the plugin
# tests/peft_suite/dora_ext_peft_plugin.py. Offline (HF_HUB_OFFLINE=1): tests that need the model
# hub are reported as skipped "needs the model hub", in both modes.
#
# Machines without network (the GPU device): fetch here, then carry the cache folder, e.g.
#   FETCH_ONLY=1 PEFT_VERSION=0.21.0 PEFT_SUITE_CACHE=.peft_suite_cache bash scripts/peft_suite.sh
#   (device) PEFT_SUITE_CACHE=.peft_suite_cache MODE=both bash scripts/peft_suite.sh OUT
# PEFT_VERSION must be the version installed where the tests run (they test that peft).
#
# Writes OUT_DIR/<mode>.log (pytest output), OUT_DIR/<mode>.json (per-test outcomes and how often
# dora_ext ops / PEFT's own DoRA forward ran), OUT_DIR/<mode>.xml (JUnit). Exit status: pytest's
# (of the accelerated run in MODE=both); with MODE=both also non-zero when a test that passes on
# stock PEFT does not pass accelerated.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-peft_suite_results}" && cd "${1:-peft_suite_results}" && pwd)"
MODE="${MODE:-accelerate}"
CACHE="$(mkdir -p "${PEFT_SUITE_CACHE:-$HOME/.cache/dora_ext/peft_suite}" && cd "${PEFT_SUITE_CACHE:-$HOME/.cache/dora_ext/peft_suite}" && pwd)"
K="${PEFT_SUITE_K:-dora}"
PY="${PYTHON:-python3}"

VERSION="${PEFT_VERSION:-$("$PY" -c 'import peft; print(peft.__version__)')}"
SRC="$CACHE/peft-$VERSION"
if [[ ! -f "$SRC/tests/test_custom_models.py" ]]; then
  mkdir -p "$CACHE"
  "$PY" -m pip download "peft==$VERSION" --no-binary :all: --no-deps -q -d "$CACHE"
  tar -xzf "$CACHE/peft-$VERSION.tar.gz" -C "$CACHE"
  if [[ ! -f "$SRC/tests/test_custom_models.py" || ! -f "$SRC/tests/test_lora_variants.py" ]]; then
    echo "peft_suite: the sdist of peft $VERSION has no tests/test_custom_models.py + test_lora_variants.py" >&2
    exit 2
  fi
fi
if [[ "${FETCH_ONLY:-0}" == 1 ]]; then echo "peft_suite: peft $VERSION tests in $SRC"; exit 0; fi
echo "peft_suite: peft $VERSION tests from $SRC, -k '$K', results in $OUT"

# An installed dora_ext (pip install .) is used as it is; otherwise the checkout (built in place).
PYPATH="$ROOT/tests/peft_suite"
if ! (cd / && "$PY" -c "import dora_ext.ops" >/dev/null 2>&1); then PYPATH="$PYPATH:$ROOT"; fi

run() {  # $1 = accelerate | stock
  local mode="$1"
  # The tests import peft from site-packages (the installed version), not the sdist's src/.
  # --import-mode=importlib: PEFT's tests/ is not a package but uses relative imports.
  # -o addopts="": PEFT's pyproject asks for pytest-cov options.
  (cd "$SRC" && HF_HUB_OFFLINE=1 PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest -o addopts="" -p no:cacheprovider -p dora_ext_peft_plugin --import-mode=importlib \
      --rootdir "$SRC" -q -rfE --dora-ext-mode "$mode" --dora-ext-report "$OUT/$mode.json" \
      --junitxml "$OUT/$mode.xml" -k "$K" tests/test_custom_models.py tests/test_lora_variants.py) \
    >"$OUT/$mode.log" 2>&1
}

status=0
case "$MODE" in
  accelerate|stock)
    run "$MODE" || status=$?
    tail -n 8 "$OUT/$MODE.log"
    ;;
  both)
    run stock || true
    run accelerate || status=$?
    tail -n 8 "$OUT/accelerate.log"
    "$PY" - "$OUT" <<'EOF' || status=1
import json, sys
out = sys.argv[1]
stock = json.load(open(f"{out}/stock.json"))["tests"]
acc = json.load(open(f"{out}/accelerate.json"))["tests"]
regressed = sorted(n for n, t in stock.items()
                   if t["outcome"] == "passed" and acc.get(n, {}).get("outcome") not in ("passed", "intended_deviation"))
for name, data in (("stock", stock), ("accelerated", acc)):
    counts = {}
    for t in data.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    print(f"peft_suite {name}: {dict(sorted(counts.items()))}")
print(f"peft_suite: {len(regressed)} test(s) pass on stock PEFT but not accelerated")
for n in regressed:
    print("  ", n, acc.get(n, {}).get("outcome"))
sys.exit(1 if regressed else 0)
EOF
    ;;
  *) echo "peft_suite: MODE must be accelerate, stock or both" >&2; exit 2 ;;
esac
exit "$status"
