"""Distillation loss math: top-k KL × T², masked means and response-logit gathering."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.training.losses import kl_divergence, response_logits

N, V = 6, 300


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * scale


def _manual_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) × T² per row, written out term by term."""
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    q = torch.softmax(student.double() / temperature, dim=-1)
    return (p * (p.log() - q.log())).sum(-1) * temperature ** 2


@pytest.mark.parametrize("top_k", [64, 0, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_of_a_distribution_with_itself_is_zero(top_k, temperature):
    p = _logits(0)
    kl = kl_divergence(p, p.clone(), temperature, top_k)
    assert kl.shape == (N,)
    torch.testing.assert_close(kl, torch.zeros(N), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [64, 0])
def test_kl_is_positive_for_different_logits(top_k):
    kl = kl_divergence(_logits(0), _logits(1), 2.0, top_k)
    assert kl.shape == (N,)
    assert (kl > 1e-3).all()


@pytest.mark.parametrize("top_k", [64, 0])
def test_gradient_reaches_student_logits(top_k):
    teacher = _logits(0)
    student = _logits(1).requires_grad_(True)
    kl_divergence(teacher, student, 2.0, top_k).mean().backward()
    grad = student.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    if top_k:
        # Only the teacher's top-k support carries gradient; every row has exactly k non-zero entries there.
        support = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, teacher.topk(top_k, -1).indices, True)
        assert (grad[~support] == 0).all()
        assert (grad[support] != 0).sum() > 0


def test_teacher_gets_no_gradient_role():
    """The loss is KL(teacher ‖ student): swapping the arguments gives a different value."""
    t, s = _logits(0), _logits(1)
    assert not torch.allclose(kl_divergence(t, s, 1.0, 0), kl_divergence(s, t, 1.0, 0), atol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_matches_manual_computation_with_t_squared(temperature):
    t, s = _logits(2), _logits(3)
    got = kl_divergence(t, s, temperature, top_k=0)
    torch.testing.assert_close(got.double(), _manual_kl(t, s, temperature), atol=1e-5, rtol=1e-5)


def test_temperature_scaling_is_t_squared_times_the_tempered_kl():
    t, s = _logits(4), _logits(5)
    kl1 = kl_divergence(t, s, 1.0, 0).double()
    kl2 = kl_divergence(t, s, 2.0, 0).double()
    # T=2 is 4 × KL of the softened distributions, not the plain KL of the softened distributions.
    softened = _manual_kl(t / 2, s / 2, 1.0)
    torch.testing.assert_close(kl2, 4 * softened, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kl2, softened, atol=1e-3)
    torch.testing.assert_close(kl1, _manual_kl(t, s, 1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_renormalises_both_distributions_on_the_teacher_support(temperature):
    t, s = _logits(6), _logits(7)
    k = 16
    index = t.topk(k, dim=-1).indices
    expected = _manual_kl(t.gather(-1, index), s.gather(-1, index), temperature)
    got = kl_divergence(t, s, temperature, top_k=k)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # The top-k value is a different quantity from the full-vocabulary one (the cut matters).
    assert not torch.allclose(got, kl_divergence(t, s, temperature, top_k=0), atol=1e-3)


def test_top_k_larger_than_vocabulary_is_the_full_vocabulary():
    t, s = _logits(8), _logits(9)
    torch.testing.assert_close(kl_divergence(t, s, 2.0, top_k=V * 4), kl_divergence(t, s, 2.0, top_k=0))


def test_low_precision_inputs_are_computed_in_float32():
    t, s = _logits(10), _logits(11)
    got = kl_divergence(t.bfloat16(), s.bfloat16(), 2.0, 0)
    assert got.dtype == torch.float32
    expected = _manual_kl(t.bfloat16().float(), s.bfloat16().float(), 2.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_response_logits_gathers_the_predicting_rows():
    b, t_len, v = 3, 9, 5
    logits = torch.arange(b * t_len * v, dtype=torch.float32).view(b, t_len, v)
    positions = torch.tensor([[2, 3, 4, 5], [0, 1, 2, 2], [7, 8, 8, 8]])
    out = response_logits(logits, positions)
    assert out.shape == (b, 4, v)
    for row in range(b):
        for step in range(4):
            assert torch.equal(out[row, step], logits[row, positions[row, step]])


def test_response_logits_keeps_the_graph():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    positions = torch.tensor([[1, 2], [3, 4]])
    response_logits(logits, positions).sum().backward()
    touched = (logits.grad.abs().sum(-1) > 0)
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, [1, 2]] = True
    expected[1, [3, 4]] = True
    assert torch.equal(touched, expected)


# --------------------------------------------------------------------------- the training path: top-k, chunked head
from prism_lightning.training.losses import chunked_topk_kl, rows_at, teacher_topk  # noqa: E402


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_head_kl_equals_the_definition_in_value_and_gradient(chunk):
    """Student logits built chunk by chunk from hidden states (checkpointed when there are several chunks) give
    kl_divergence's values and the same gradients, and the head never sees more than ``chunk`` tokens."""
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(N, 16, generator=g, requires_grad=True)
    teacher = _logits(0)
    seen = []

    def counted(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return head(h)

    reference = kl_divergence(teacher, head(hidden), 2.0, 64)
    ref_grads = torch.autograd.grad(reference.mean(), [hidden, head.weight])
    values, index = teacher_topk(teacher, 2.0, 64)
    kl = chunked_topk_kl(counted, hidden, values, index, 2.0, chunk)
    grads = torch.autograd.grad(kl.mean(), [hidden, head.weight])
    torch.testing.assert_close(kl, reference, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert max(seen) == min(chunk, N)


def test_teacher_topk_keeps_low_precision_logits_until_the_k_values():
    logits = _logits(0).to(torch.bfloat16)
    values, index = teacher_topk(logits, 2.0, 8)
    assert values.dtype == torch.float32 and index.shape == (N, 8)
    torch.testing.assert_close(values, logits.float().topk(8, -1).values / 2.0)


def test_rows_at_reads_the_masked_response_positions_in_row_major_order():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    positions = torch.tensor([[1, 2, 3], [0, 1, 4]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    expected = response_logits(hidden, positions)[mask]
    torch.testing.assert_close(rows_at(hidden, positions, mask), expected)


def test_extra_empty_chunks_change_nothing_and_an_empty_input_gives_an_empty_result():
    """Under ZeRO-3 a rank runs as many head chunks as the busiest rank: the extra ones are empty."""
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(N, 16, generator=g)
    values, index = teacher_topk(_logits(0), 2.0, 64)
    calls = []

    def counted(h):
        calls.append(h.shape[0])
        return head(h)

    exact = chunked_topk_kl(head, hidden, values, index, 2.0, 4)
    padded = chunked_topk_kl(counted, hidden, values, index, 2.0, 4, chunks=5)
    torch.testing.assert_close(padded, exact)
    assert calls == [4, 2, 0, 0, 0]
    empty = chunked_topk_kl(head, hidden[:0], values[:0], index[:0], 2.0, 4, chunks=2)
    assert empty.shape == (0,)
