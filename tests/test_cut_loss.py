"""The CUT loss against hand-computed values (DESIGN.md §7)."""

from __future__ import annotations

import math

import pytest
import torch

from server.training.cut_loss import MIN_UNLIKELY, cut_loss, likelihood_loss, token_logprobs


def logs(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64, requires_grad=True)


def test_flagged_tokens_get_unlikelihood_the_rest_likelihood() -> None:
    # ratios p_A / p_B: 1.0, 2.0, 1.0 -> only the middle token is an error at threshold 1.1
    plain, judge = logs(0.5, 0.2, 0.9), logs(0.5, 0.4, 0.9)
    out = cut_loss(judge, plain, threshold=1.1, weight_unlike=1.0)
    assert out.flagged.tolist() == [False, True, False]
    unlike = (-math.log(0.5) - math.log(1 - 0.2) - math.log(0.9)) / 3
    nll_judge = (-math.log(0.5) - math.log(0.4) - math.log(0.9)) / 3
    assert out.loss.item() == pytest.approx((nll_judge + unlike) / 2, rel=1e-12)


def test_weight_scales_only_the_unlikelihood_term() -> None:
    plain, judge = logs(0.5, 0.2), logs(0.5, 0.4)
    full = cut_loss(judge, plain, threshold=1.1, weight_unlike=1.0).loss.item()
    half = cut_loss(judge, plain, threshold=1.1, weight_unlike=0.5).loss.item()
    # the flagged token's term, averaged over 2 tokens, then halved by the final /2
    assert full - half == pytest.approx(0.5 * -math.log(0.8) / 2 / 2, rel=1e-12)


def test_threshold_is_strict() -> None:
    plain, judge = logs(0.3, 0.6), logs(0.3, 0.6)  # ratio exactly 1.0
    assert not cut_loss(judge, plain, threshold=1.0, weight_unlike=1.0).flagged.any()
    assert cut_loss(judge, plain, threshold=0.999, weight_unlike=1.0).flagged.all()


def test_gradients_push_errors_down_and_the_rest_up_without_flowing_through_the_ratio() -> None:
    plain, judge = logs(0.5, 0.2, 0.9), logs(0.5, 0.4, 0.9)
    cut_loss(judge, plain, threshold=1.1, weight_unlike=1.0).loss.backward()
    assert plain.grad is not None and judge.grad is not None
    # gradient descent lowers log p_B of the flagged token, raises the others
    assert plain.grad[1] > 0 and plain.grad[0] < 0 and plain.grad[2] < 0
    # d/dlogp_B of -log(1-p) = p/(1-p); times 1/T (mean) and 1/2
    assert plain.grad[1].item() == pytest.approx(0.2 / 0.8 / 3 / 2, rel=1e-9)
    # the judgment prompt only gets its likelihood gradient: the ratio is detached
    assert judge.grad.tolist() == pytest.approx([-1 / 3 / 2] * 3, rel=1e-12)


def test_certain_tokens_give_a_finite_loss() -> None:
    # p_B = 1 - 1e-12: 1 - p_B is below the clamp (a threshold < 1 flags it)
    plain, judge = logs(1 - 1e-12), logs(1 - 1e-12)
    out = cut_loss(judge, plain, threshold=0.5, weight_unlike=1.0)
    assert out.flagged.item()
    assert out.loss.item() == pytest.approx((1e-12 - math.log(MIN_UNLIKELY)) / 2, rel=1e-9)


def test_fine_response_is_plain_likelihood() -> None:
    plain = logs(0.5, 0.25)
    out = likelihood_loss(plain)
    assert out.loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-12)
    assert not out.flagged.any()


def test_token_logprobs_gathers_targets() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    got = token_logprobs(logits, torch.tensor([1, 0]))
    assert got.tolist() == pytest.approx([math.log(0.5), math.log(0.75)], rel=1e-6)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        cut_loss(logs(0.5), logs(0.5, 0.5), threshold=1.1, weight_unlike=1.0)
    with pytest.raises(ValueError):
        likelihood_loss(torch.tensor([]))
