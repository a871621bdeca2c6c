#!/usr/bin/env bash
# GPU memory check (issue #11, item 6): one PRISM step on a random Llama-3.1-8B-shaped model (32 layers, hidden
# 4096, vocabulary 128,256; built from a config, no weights downloaded) in bf16 at 4 × 2048 tokens — peak CUDA memory
# and tokens/s without and with gradient checkpointing, and with the cached teacher. Under 8 minutes on an H100.
#
#   bash bench/gpu_memory.sh     # from the repository root, with the project installed (scripts/install.sh)
#
# Figures go to bench/results/memory.json and the terminal; copy them into bench/README.md with card and date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PRISM_CACHE_DIR=${PRISM_CACHE_DIR:-/tmp/prismcache}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA GPU'; print(torch.cuda.get_device_name(0))"
# `before` holds two [4, 2048, 128256] logit tensors and their fp32 copies (~20 GiB more): included for the ratio.
timeout 450 "$PYTHON" bench/memory.py --model llama3-8b --device cuda --dtype bfloat16 --rows 4 --tokens 2048 \
  --variants after,after+gc,cached+gc,before
