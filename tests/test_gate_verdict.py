"""The plain-words gate verdict: AUROC interval, probability spread, calibration clamp."""

from __future__ import annotations

import torch

from prism_lightning.training.calibration import fit_temperature
from prism_lightning.training.gate_verdict import auroc_interval, gate_verdict


def test_auroc_interval_is_the_wider_of_hanley_mcneil_and_wilson():
    """Checked against both formulas by hand on 90 items per class."""
    from prism_lightning.utils.stats import wilson_interval

    probs = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.9] * 30)
    labels = torch.tensor([0, 0, 1, 1, 0, 1] * 30)
    auroc, low, high = auroc_interval(probs, labels)
    # Pairs (pos, neg): 0.35 beats 0.1 only; 0.8 and 0.9 beat all three -> 7 of 9 (no pos/neg ties).
    assert abs(auroc - 7 / 9) < 1e-6
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = ((a * (1 - a) + 89 * (q1 - a * a) + 89 * (q2 - a * a)) / 90 ** 2) ** 0.5
    w_low, w_high = wilson_interval(70, 90)
    assert abs(low - min(a - 1.96 * se, w_low)) < 1e-9 and abs(high - max(a + 1.96 * se, w_high)) < 1e-9
    assert low < a < high


def test_auroc_interval_with_unequal_classes_uses_each_class_size_where_it_belongs():
    """20 positives, 70 negatives: Hanley-McNeil weighs Q1 by n_pos - 1 and Q2 by n_neg - 1 (swapping them gives
    another interval), and the Wilson floor uses the smaller class (20)."""
    from prism_lightning.utils.stats import wilson_interval

    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1] * 20 + [0] * 70)
    probs = torch.where(labels.bool(), torch.rand(90, generator=g) * 0.7 + 0.3, torch.rand(90, generator=g) * 0.7)
    auroc, low, high = auroc_interval(probs, labels)
    pos, neg = probs[labels.bool()], probs[~labels.bool()]
    a = float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())
    assert abs(auroc - a) < 1e-6
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = ((a * (1 - a) + 19 * (q1 - a * a) + 69 * (q2 - a * a)) / (20 * 70)) ** 0.5
    swapped = ((a * (1 - a) + 69 * (q1 - a * a) + 19 * (q2 - a * a)) / (20 * 70)) ** 0.5
    assert abs(se - swapped) > 1e-3  # the test can tell the two weightings apart
    w_low, w_high = wilson_interval(round(a * 20), 20)
    assert abs(low - max(0.0, min(a - 1.96 * se, w_low))) < 1e-9
    assert abs(high - min(1.0, max(a + 1.96 * se, w_high))) < 1e-9


def test_one_item_per_class_is_not_certainty():
    """Hanley-McNeil alone gives [1, 1] for a perfect split of two items; the interval must include chance."""
    auroc, low, high = auroc_interval(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]))
    assert auroc == 1.0 and low < 0.5 and high == 1.0
    assert not gate_verdict(torch.tensor([-1.0, 1.0]), torch.tensor([0, 1])).informative


def test_a_separating_gate_is_called_informative():
    logits = torch.cat([torch.linspace(-4, -1, 30), torch.linspace(1, 4, 30)])
    labels = torch.cat([torch.zeros(30), torch.ones(30)])
    verdict = gate_verdict(logits, labels)
    assert verdict.informative and verdict.low > 0.5
    assert "better than chance" in verdict.text and "no better" not in verdict.text


def test_the_quickstart_gate_is_called_chance_and_says_what_to_change():
    """What issue #8 measured: AUROC 0.33, every probability within 1e-4, temperature at its clamp."""
    generator = torch.Generator().manual_seed(0)
    logits = -0.0131 + 1e-4 * torch.randn(12, generator=generator)
    labels = torch.tensor([1, 0] * 6)
    temperature = fit_temperature(logits, labels)
    verdict = gate_verdict(logits, labels, temperature)
    assert not verdict.informative
    assert "no better than chance" in verdict.text and "data.judge.model" in verdict.text
    assert "within" in verdict.text  # probabilities that differ in the 4th decimal are named as such


def test_temperature_fit_works_under_inference_mode():
    """`prism validate` runs callbacks under inference mode; the fit must still find T (it crashed before)."""
    logits = torch.tensor([4.0, -4.0, 3.0, -3.0, 2.0, -2.5])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    expected = fit_temperature(logits, labels)
    with torch.inference_mode():
        inside = fit_temperature(torch.tensor([4.0, -4.0, 3.0, -3.0, 2.0, -2.5]), torch.tensor([1, 0, 0, 1, 1, 0]))
    assert inside == expected and inside > 1.0  # overconfident logits get softened
