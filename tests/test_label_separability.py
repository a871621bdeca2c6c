"""bench/label_separability.py's probes: they find a signal where there is one and none where there is none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "label_separability.py"
spec = importlib.util.spec_from_file_location("label_separability", SCRIPT)
probes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probes)


def _data(signal: float, n: int = 200, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += signal * (2 * y - 1)
    return x, y


def test_the_probe_reads_a_label_carried_by_one_feature():
    x, y = _data(signal=2.0)
    scores = probes.logistic_probe(x[:150], y[:150], x[150:])
    assert float(binary_auroc(scores, y[150:])) > 0.9
    assert float(binary_auroc(probes.cross_validated(x, y), y)) > 0.9


def test_the_probe_stays_near_chance_on_labels_nothing_predicts():
    x, y = _data(signal=0.0)
    auroc = probes.row("cv", probes.cross_validated(x, y), y)
    assert auroc["ci95"][0] < 0.5 < auroc["ci95"][1] and auroc["n"] == 200
