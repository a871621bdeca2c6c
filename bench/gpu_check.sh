#!/usr/bin/env bash
# GPU check (issue #10): the GPU-marked tests, then the quickstart fit in bf16 on one GPU under `ddp` and
# `deepspeed_stage_2`, with training tokens/s (Lightning's ThroughputMonitor) and bootstrap generation tokens/s
# (the corpus's answer tokens over the stage's seconds). Budget: under 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh            # from the repository root, with the project installed (scripts/install.sh)
#
# Figures go to bench/results/gpu_check.json and the terminal; copy them into bench/README.md with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${GPU_CHECK_DIR:-runs/gpu_check}
export PYTHONUNBUFFERED=1 TERM=dumb

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

echo "== GPU-marked tests"
timeout 240 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider

rm -rf "$OUT"
for strategy in ddp deepspeed_stage_2; do
  echo "== quickstart fit, bf16, 1 GPU, $strategy"
  # The corpus is shared: the first fit bootstraps it (its generation is timed), the second reuses it.
  timeout 200 "$PYTHON" -m prism_lightning.cli fit --config configs/quickstart.yaml \
    --trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.strategy "$strategy" \
    --trainer.default_root_dir "$OUT/$strategy" --data.corpus_dir "$OUT/corpus" \
    --trainer.callbacks+=lightning.pytorch.callbacks.ThroughputMonitor \
    --trainer.callbacks.batch_size_fn=prism_lightning.training.throughput.batch_rows \
    --trainer.callbacks.length_fn=prism_lightning.training.throughput.batch_tokens \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$OUT/$strategy/logs"
done

"$PYTHON" bench/gpu_report.py "$OUT" ddp deepspeed_stage_2
