#!/usr/bin/env bash
# HF vs vLLM at Llama-3.1-8B's shape on one GPU (issue #27): generation, teacher top-64 and judge scoring, each
# engine alone on the card (bench/gpu_vllm.py), then `prism serve` on both engines at 16 clients on the embedded
# model's export. Needs an environment with CUDA torch and vLLM, e.g.
#
#   PRISM_TORCH=torch==2.14.0 PRISM_VLLM=vllm==0.34.0 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     scripts/install-vllm.sh
#   bash bench/gpu_vllm.sh            # from the repository root; budget: about 6 minutes on one H100
#
# Figures go to bench/results/gpu_vllm.json and serve_load_engines.json; copy them into bench/README.md with the
# card's name and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv-vllm/bin/python ] && echo .venv-vllm/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 TERM=dumb

"$PYTHON" - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "bench/gpu_vllm.sh needs a CUDA GPU"
print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| vllm", vllm.__version__)
PY

echo "== HF vs vLLM at the 8B shape"
timeout 300 "$PYTHON" bench/gpu_vllm.py

echo "== prism serve, HF vs vLLM, 16 clients (embedded model)"
timeout 240 "$PYTHON" bench/serve_load.py --engines hf vllm --reps 1 --requests 64 --max-tokens 64
