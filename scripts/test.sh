#!/usr/bin/env bash
# Install, then run the test suite (CPU; GPU-marked tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
