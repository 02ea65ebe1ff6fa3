#!/usr/bin/env bash
# Lint: ruff for Python (pyproject.toml), clang-format for the C++ (.clang-format). Changes nothing;
# fails on any finding. Fix with `ruff check --fix .` and `clang-format -i <files>`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
git ls-files 'csrc/*.cpp' 'csrc/*.h' 'cpp/*.cpp' 'cpp/*.h' 'examples/*.cpp' 'tests/*.cpp' | xargs clang-format --dry-run --Werror
echo "lint: clean"
