#!/usr/bin/env bash
# Install, then run the test suite (CPU; GPU-marked tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. .venv/bin/activate
# Two workers, one test file each (module fixtures stay shared), files in the order tests/conftest.py sets (longest
# first); PRISM_TEST_WORKERS=0 runs in one process.
python -m pytest -q -n "${PRISM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
