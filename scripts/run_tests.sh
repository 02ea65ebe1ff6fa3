#!/usr/bin/env bash
# The test command: install what the tests need, build dora_ext in place
# against the installed torch, run the whole suite (CUDA tests skip cleanly
# without a GPU). Fails on any failed test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt
python3 setup.py -q build_ext --inplace
python3 -m pytest -q -rs tests "$@"
