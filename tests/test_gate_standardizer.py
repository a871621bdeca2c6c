"""The gate's feature standardizer: exact pooled statistics, training-only updates, and why it exists."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from prism_lightning.model.gate_mlp import FeatureStandardizer, GateMLP


def test_running_statistics_equal_the_whole_sets_whatever_the_batches():
    x = torch.randn(37, 5) * torch.tensor([1.0, 10.0, 100.0, 0.1, 3.0]) + 7
    norm = FeatureStandardizer(5).train()
    with torch.enable_grad():
        for chunk in (x[:1], x[1:4], x[4:20], x[20:]):
            norm(chunk)
    assert int(norm.count) == 37
    torch.testing.assert_close(norm.mean.float(), x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((norm.m2 / 36).sqrt().float(), x.std(0), rtol=1e-5, atol=1e-5)
    out = norm.eval()(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-5, rtol=0)


def test_no_grad_and_eval_calls_never_move_the_statistics():
    norm = FeatureStandardizer(3).train()
    with torch.no_grad():
        norm(torch.randn(8, 3))  # a routing call during training (GatedModel.gate_outputs is no-grad)
    assert int(norm.count) == 0
    norm.eval()
    norm(torch.randn(8, 3))
    assert int(norm.count) == 0


def test_a_gate_on_features_with_a_few_huge_dimensions_learns_when_standardized():
    """Layer-0 states look like this: two dimensions ~100x the rest; the label lives in the small ones."""
    g = torch.Generator().manual_seed(0)
    n, h = 400, 64
    y = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.randn(n, h, generator=g) * 0.3
    x[:, :8] += (y[:, None] - 0.5) * 0.6  # the signal
    x[:, 60:] = torch.randn(n, 4, generator=g) * 30 + 20  # huge, uninformative

    def trained(standardize: bool) -> float:
        torch.manual_seed(0)
        gate = GateMLP(h, standardize=standardize).train()
        opt = torch.optim.AdamW(gate.parameters(), lr=1e-2)
        for _ in range(2):
            for b in range(0, 300, 4):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(gate(x[b:b + 4]), y[b:b + 4])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return float(binary_auroc(gate.eval()(x[300:]), y[300:].long()))

    assert trained(True) > 0.9  # the huge dimensions are scaled down to the rest: the signal stays readable


def test_exports_without_a_standardizer_still_load_their_gate():
    old = GateMLP(16, (8,))
    new = GateMLP(16, (8,), standardize=True)
    assert set(new.state_dict()) - set(old.state_dict()) == {"norm.count", "norm.mean", "norm.m2"}
    GateMLP(16, (8,)).load_state_dict(old.state_dict())
    with pytest.raises(RuntimeError):
        GateMLP(16, (8,)).load_state_dict(new.state_dict())  # a mismatch is loud, never silent
