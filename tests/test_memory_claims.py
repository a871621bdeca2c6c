"""The memory figures quoted in configs/models/*.yaml are the ones bench/memory_estimate.py recorded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "bench" / "results" / "memory_estimate.json").read_text())["configs"]


@pytest.mark.parametrize("row", RECORDED, ids=lambda r: r["config"])
def test_a_config_quotes_the_recorded_estimate_and_enables_what_it_assumes(row):
    path = ROOT / "configs" / "models" / row["config"]
    text = path.read_text()
    quoted = re.search(r"≈ ([\d.]+) GiB with gradient checkpointing.*?≈ (\d+) GiB\s*# without\); the bootstrap ≈ "
                       r"([\d.]+) GiB", text, re.S)
    assert quoted, f"{path}: no memory line"
    train, without, boot = quoted.groups()
    assert float(train) == row["train_gc"]["total"] and float(boot) == row["bootstrap"]
    assert int(without) == round(row["train_no_gc_total"])
    config = yaml.safe_load(text)
    assert config["model"]["init_args"]["gradient_checkpointing"] is True  # the figure assumes it
    assert (config["data"]["batch_size"], config["data"]["max_length"]) == (row["rows"], row["tokens"])
