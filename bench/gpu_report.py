"""Read the runs of bench/gpu_check.sh: training tokens/s per strategy and bootstrap generation tokens/s.

    python bench/gpu_report.py runs/gpu_check ddp deepspeed_stage_2
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from _common import RESULTS_DIR, environment


def training_rate(run: Path) -> dict:
    """Cumulative tokens and seconds of training steps (validation excluded) from ThroughputMonitor's last row."""
    rows = [r for path in sorted(run.glob("logs/**/metrics.csv")) for r in csv.DictReader(path.open())
            if r.get("train/lengths")]
    if not rows:
        raise SystemExit(f"{run}: no ThroughputMonitor rows in logs/**/metrics.csv")
    last = rows[-1]
    tokens, seconds = float(last["train/lengths"]), float(last["train/time"])
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def generation_rate(corpus: Path) -> dict:
    """Answer tokens generated in stage 2 over its recorded seconds (both answer sets: persona and base)."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    stage = next((corpus / "stages").glob("answers-*.jsonl"))
    tokens = sum(json.loads(line).get("new_tokens", 0) for line in stage.open())
    seconds = manifest["seconds"]["answers"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": round(tokens / seconds, 1)}


def main(out: str, *strategies: str) -> None:
    """Print the table and write bench/results/gpu_check.json."""
    import torch

    root = Path(out)
    result = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "environment": environment(), "generation": generation_rate(root / "corpus"),
              "training": {s: training_rate(root / s) for s in strategies}}
    print(f"card: {result['card']}")
    print(f"bootstrap generation (answers stage): {result['generation']['tokens_per_s']} tokens/s "
          f"({result['generation']['tokens']} tokens in {result['generation']['seconds']} s)")
    for strategy, rate in result["training"].items():
        print(f"training, {strategy}: {rate['tokens_per_s']} tokens/s ({rate['tokens']:.0f} student+teacher "
              f"tokens in {rate['seconds']} s of training steps)")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
