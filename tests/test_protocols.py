"""Judge decision rules on constructed log-probabilities (columns A, B, TIE)."""

from __future__ import annotations

import math

import pytest
import torch

from prism_lightning.bootstrap.protocols import decide_pairwise, expected_score
from prism_lightning.model.choices import complete_answer_logprobs
from prism_lightning.utils.stats import wilson_interval


def _norm(rows) -> torch.Tensor:
    """Rows of (A, B, TIE) preferences turned into log-probs that sum to one over the choice tokens."""
    return torch.log_softmax(torch.tensor(rows, dtype=torch.float32), dim=-1)


def position_a_judge(n: int = 8):
    """A judge that always answers A, with small content-dependent nudges (towards the candidate in rows 0-3)."""
    base = torch.tensor([-0.1, -3.0, -4.0])
    nudge = torch.tensor([0.3, 0.2, 0.1, 0.05, -0.1, -0.2, -0.3, -0.05])[:n]
    first = base.repeat(n, 1)
    second = base.repeat(n, 1)
    first[:, 1] += nudge    # first order: the candidate is B
    second[:, 0] += nudge   # second order: the candidate is A
    return first, second, nudge


def test_position_biased_judge_strict_vs_debiased():
    first, second, nudge = position_a_judge()
    strict = decide_pairwise(first, second, "strict")
    debiased = decide_pairwise(first, second, "debiased", margin=0.0)

    assert strict.position_biased.all() and debiased.position_biased.all()
    assert not strict.candidate_wins_both.any()
    assert strict.label.sum() == 0  # strict: an A-always judge never lets the candidate win
    assert debiased.label.sum() > 0
    assert debiased.label.tolist() == (nudge > 0).tolist()
    # The constant position preference cancels: only the content nudge is left in the margin.
    assert torch.allclose(debiased.margin, nudge, atol=1e-6)
    assert torch.equal(strict.margin, debiased.margin)
    assert debiased.ties.sum() == 0 and not debiased.unparseable.any()


def test_debiased_margin_threshold():
    first, second, nudge = position_a_judge()
    decision = decide_pairwise(first, second, "debiased", margin=0.15)
    assert decision.label.tolist() == (nudge > 0.15).tolist()
    assert decision.label.sum() == 2


def test_content_preferring_judge_labels_true_under_both():
    first = _norm([[-3.0, -0.1, -4.0], [-2.0, -0.5, -5.0]])   # candidate (B) wins in the first order
    second = _norm([[-0.1, -3.0, -4.0], [-0.4, -2.5, -5.0]])  # candidate (A) wins in the second order
    for protocol in ("strict", "debiased"):
        d = decide_pairwise(first, second, protocol)
        assert d.label.tolist() == [True, True]
        assert d.candidate_wins_both.tolist() == [True, True]
        assert d.position_biased.tolist() == [False, False]
        assert (d.margin > 0).all()


def test_baseline_preferring_judge_labels_false_under_both():
    first = _norm([[-0.1, -3.0, -4.0]])    # baseline is A in the first order
    second = _norm([[-3.0, -0.1, -4.0]])   # baseline is B in the second order
    for protocol in ("strict", "debiased"):
        d = decide_pairwise(first, second, protocol)
        assert d.label.tolist() == [False]
        assert d.position_biased.tolist() == [False]
        assert d.margin.item() == pytest.approx(-2.9, abs=1e-5)


def test_ties_are_counted_per_order():
    first = torch.tensor([[-3.0, -2.0, -0.1], [-3.0, -2.0, -0.1], [-0.1, -3.0, -4.0]])
    second = torch.tensor([[-3.0, -2.0, -0.1], [-0.1, -3.0, -4.0], [-0.1, -3.0, -4.0]])
    d = decide_pairwise(first, second, "debiased")
    assert d.ties.tolist() == [2, 1, 0]
    # Both orders answering TIE is not a position bias; both answering A is.
    assert d.position_biased.tolist() == [False, False, True]


def test_min_choice_mass_marks_unparseable_and_never_labels_it():
    first = torch.tensor([[-6.0, -3.0, -7.0], [-3.0, -0.1, -4.0], [-3.0, -0.1, -4.0]])
    second = torch.tensor([[-3.0, -6.0, -7.0], [-0.1, -3.0, -4.0], [-5.0, -6.0, -7.0]])
    # Row 0: the candidate wins both orders, but with ~5 % mass in either; row 2: low mass in the second order.
    for protocol in ("strict", "debiased"):
        loose = decide_pairwise(first, second, protocol, min_choice_mass=0.0)
        strict_mass = decide_pairwise(first, second, protocol, min_choice_mass=0.5)
        assert not loose.unparseable.any()
        assert loose.label[0] and loose.label[1]
        assert strict_mass.unparseable.tolist() == [True, False, True]
        assert strict_mass.label.tolist() == [False, True, False]
        assert not (strict_mass.label & strict_mass.unparseable).any()
        assert torch.equal(strict_mass.candidate_wins_both, loose.candidate_wins_both)


@pytest.mark.parametrize("protocol", ["pointwise", "STRICT", "", "majority"])
def test_invalid_protocol_raises(protocol):
    first, second, _ = position_a_judge()
    with pytest.raises(ValueError, match="protocol"):
        decide_pairwise(first, second, protocol)


# ------------------------------------------------------------------------------- expected_score
def _digits(mass_on: dict[int, float], rest: float = 1e-4) -> torch.Tensor:
    probs = [mass_on.get(d, rest) for d in range(1, 10)]
    return torch.tensor([probs]).log()


def _grades(digits: torch.Tensor, ten: torch.Tensor) -> torch.Tensor:
    """Grade log-probs [n, 10] from first-token log-probs of "1".."9" and log P("1", "0") (SmolLM2-like "10"),
    through the choice reader's prefix rule: the grade 10 is taken out of the grade 1."""
    sequences = torch.cat([digits, ten[:, None]], dim=-1)
    return complete_answer_logprobs(sequences, ((9,),) + ((),) * 9).logprobs


def test_expected_score_concentrated_on_seven():
    digits = _digits({7: 0.97})
    score, mass = expected_score(_grades(digits, torch.tensor([math.log(1e-6)])))
    assert score.item() == pytest.approx(7.0, abs=0.02)
    assert mass.item() == pytest.approx(0.97 + 8e-4, rel=1e-4)


def test_expected_score_ten_takes_most_of_the_one_mass():
    digits = _digits({1: 0.95})
    ten = torch.tensor([math.log(0.94)])  # P("1") * P("0" | "1"): most of the "1" mass is the grade 10
    score, mass = expected_score(_grades(digits, ten))
    assert score.item() == pytest.approx(10.0, abs=0.15)
    assert score.item() > 9.8
    # Splitting "1" into grades 1 and 10 keeps the total: the mass is that of the nine digits.
    assert mass.item() == pytest.approx(digits.exp().sum().item(), rel=1e-5)
    # Without the "10" continuation the same distribution is a grade of 1.
    low, _ = expected_score(_grades(digits, torch.tensor([math.log(1e-9)])))
    assert low.item() == pytest.approx(1.0, abs=0.02)


def test_expected_score_mixture_and_batch():
    grades = torch.tensor([[0.05, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 0.05],
                           [0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0]]).clamp_min(1e-12).log()
    score, mass = expected_score(grades)
    # Row 0: 0.05 * 1 + 0.2 * 5 + 0.3 * 8 + 0.05 * 10 over a mass of 0.6.
    assert score[0].item() == pytest.approx((0.05 + 1.0 + 2.4 + 0.5) / 0.6, rel=1e-4)
    assert mass[0].item() == pytest.approx(0.6, rel=1e-4)
    assert score[1].item() == pytest.approx(5.5, rel=1e-4)
    assert mass[1].item() == pytest.approx(0.5, rel=1e-4)


def test_expected_score_of_nothing_readable_is_finite():
    score, mass = expected_score(torch.full((1, 10), -1.0e4))
    assert math.isfinite(score.item()) and mass.item() == 0.0


# ------------------------------------------------------------------------------- wilson_interval
@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (6, 10), (10, 10), (95, 100), (500, 1000)])
def test_wilson_interval_contains_p_and_stays_in_unit_range(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert low < high


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(6, 10)
    assert low < 0.5 < high
    assert (low, high) == pytest.approx((0.3127, 0.8318), abs=1e-3)
    low, high = wilson_interval(95, 100)
    assert not (low <= 0.5 <= high)
    assert (low, high) == pytest.approx((0.8882, 0.9785), abs=1e-3)


def test_wilson_interval_narrows_with_n():
    small = wilson_interval(6, 10)
    large = wilson_interval(600, 1000)
    assert large[1] - large[0] < small[1] - small[0]
