"""DPO loss and log-prob helpers against hand-derived numbers."""

import math

import pytest
import torch

from mva_lightning.training.losses import (
    dpo_loss,
    split_chosen_rejected,
    sum_by_sequence,
    token_logps,
)


def test_dpo_loss_hand_derived():
    # pair 0: chosen logratio = -1 - (-2) = 1, rejected logratio = -3 - (-2) = -1
    #   logits = 0.1 * (1 - (-1)) = 0.2 ; loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    # pair 1: chosen logratio = 0, rejected logratio = 1 -> logits = -0.1
    out = dpo_loss(
        torch.tensor([-1.0, -5.0]),
        torch.tensor([-3.0, -4.0]),
        torch.tensor([-2.0, -5.0]),
        torch.tensor([-2.0, -5.0]),
        beta=0.1,
    )
    expected = [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.1))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1], abs=1e-6)
    m = out.metrics()
    assert m["rewards/margins"].item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)


def test_dpo_loss_equal_policy_and_reference_is_ln2():
    x = torch.randn(5)
    out = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_dpo_margin_and_label_smoothing():
    # logits = 0.5 * (2 - 0) - 0.4 = 0.6
    z = torch.zeros(1)
    out = dpo_loss(torch.tensor([2.0]), z, z, z, beta=0.5, margin=torch.tensor([0.4]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.6)), abs=1e-6)
    smooth = dpo_loss(torch.tensor([2.0]), z, z, z, beta=0.5, label_smoothing=0.25)
    want = 0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.exp(1.0))
    assert smooth.loss.item() == pytest.approx(want, abs=1e-6)


def test_gradient_sign_pushes_chosen_up():
    pc = torch.zeros(1, requires_grad=True)
    pr = torch.zeros(1, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1)).loss.backward()
    # d/dpc of -log sigmoid(beta (pc - pr)) at 0 = -beta/2
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_token_logps_matches_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 1])
    want = torch.log_softmax(logits, -1)[[0, 1], [2, 1]]
    assert torch.allclose(token_logps(logits, targets), want)
    assert token_logps(logits, targets)[1].item() == pytest.approx(-math.log(3))


def test_sum_by_sequence_and_split():
    sums = sum_by_sequence(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 2]), 4)
    assert sums.tolist() == [3.0, 0.0, 3.0, 0.0]
    c, r = split_chosen_rejected(torch.arange(4.0))
    assert c.tolist() == [0.0, 1.0] and r.tolist() == [2.0, 3.0]
