#!/usr/bin/env bash
# Install, then run the whole PRISM pipeline on the embedded SmolLM2-135M-Instruct (CPU is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. .venv/bin/activate
prism fit --config configs/quickstart.yaml "$@"
