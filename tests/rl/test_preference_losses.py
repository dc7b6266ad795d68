"""Preference losses equal their papers' formulas, written again here with ``math`` element by
element on fixed log-probabilities, independently of the library code."""

import math

import pytest
import torch

from attune.rl import (
    PREFERENCE_LOSSES,
    IPOLoss,
    ORPOLoss,
    RobustDPOLoss,
    SigmoidDPOLoss,
    SimPOLoss,
)

# Five pairs of summed completion log-probs. Every value is a multiple of 1/4, so exact in
# float32 and the comparison measures only the library's float32 arithmetic. The margins
# h = (pc - rc) - (pr - rr) are 1.25, -4.0, 2.25, -0.5 and 0.0.
POLICY_CHOSEN = [-2.25, -40.5, -5.75, -88.0, -20.0]
POLICY_REJECTED = [-14.0, -35.25, -9.5, -80.5, -20.0]
REFERENCE_CHOSEN = [-3.0, -38.0, -6.5, -86.0, -21.5]
REFERENCE_REJECTED = [-13.5, -36.75, -8.0, -79.0, -21.5]
# Mean per-token log-probs fall on both sides of -ln 2 (ORPO's two numerical branches).
CHOSEN_LENGTHS = [7, 23, 3, 51, 12]
REJECTED_LENGTHS = [9, 18, 5, 44, 40]

TOLERANCE = 1e-6
ALL_LOSSES = [SigmoidDPOLoss, RobustDPOLoss, IPOLoss, SimPOLoss, ORPOLoss]
REFERENCE_LOSSES = [SigmoidDPOLoss, RobustDPOLoss, IPOLoss]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def margins() -> list[float]:
    return [
        (pc - rc) - (pr - rr)
        for pc, pr, rc, rr in zip(
            POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, strict=True
        )
    ]


def call(loss, *, reference: bool = True, length_dtype: torch.dtype = torch.float32):
    def t(values):
        return torch.tensor(values, dtype=torch.float32)

    return loss(
        t(POLICY_CHOSEN),
        t(POLICY_REJECTED),
        t(REFERENCE_CHOSEN) if reference else None,
        t(REFERENCE_REJECTED) if reference else None,
        torch.tensor(CHOSEN_LENGTHS, dtype=length_dtype),
        torch.tensor(REJECTED_LENGTHS, dtype=length_dtype),
    )


def assert_matches(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    torch.testing.assert_close(
        actual.double(),
        torch.tensor(expected, dtype=torch.float64),
        rtol=TOLERANCE,
        atol=TOLERANCE,
    )


def assert_dpo_rewards(out, beta: float) -> None:
    assert_matches(
        out.chosen_rewards,
        [beta * (pc - rc) for pc, rc in zip(POLICY_CHOSEN, REFERENCE_CHOSEN, strict=True)],
    )
    assert_matches(
        out.rejected_rewards,
        [beta * (pr - rr) for pr, rr in zip(POLICY_REJECTED, REFERENCE_REJECTED, strict=True)],
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_and_cdpo_match_formula(beta, eps):
    out = call(SigmoidDPOLoss(beta=beta, label_smoothing=eps))
    expected = [
        -(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h))
        for h in margins()
    ]
    assert_matches(out.losses, expected)
    assert_dpo_rewards(out, beta)


@pytest.mark.parametrize("loss_class", [SigmoidDPOLoss, RobustDPOLoss])
def test_zero_label_smoothing_is_plain_dpo(loss_class):
    beta = 0.1
    out = call(loss_class(beta=beta, label_smoothing=0.0))
    assert_matches(out.losses, [-math.log(sigmoid(beta * h)) for h in margins()])
    assert_dpo_rewards(out, beta)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_rdpo_matches_formula(beta, eps):
    out = call(RobustDPOLoss(beta=beta, label_smoothing=eps))
    expected = [
        ((1 - eps) * -math.log(sigmoid(beta * h)) - eps * -math.log(sigmoid(-beta * h)))
        / (1 - 2 * eps)
        for h in margins()
    ]
    assert_matches(out.losses, expected)
    assert_dpo_rewards(out, beta)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_formula(beta):
    out = call(IPOLoss(beta=beta))
    assert_matches(out.losses, [(h - 1 / (2 * beta)) ** 2 for h in margins()])
    assert_dpo_rewards(out, beta)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4), (1.0, 0.0)])
@pytest.mark.parametrize("length_dtype", [torch.float32, torch.int64])
def test_simpo_matches_formula(beta, gamma, length_dtype):
    out = call(SimPOLoss(beta=beta, gamma=gamma), reference=False, length_dtype=length_dtype)
    expected = []
    for pc, pr, lc, lr in zip(
        POLICY_CHOSEN, POLICY_REJECTED, CHOSEN_LENGTHS, REJECTED_LENGTHS, strict=True
    ):
        expected.append(-math.log(sigmoid(beta * pc / lc - beta * pr / lr - gamma)))
    assert_matches(out.losses, expected)
    assert_length_normalised_rewards(out, beta)


def assert_length_normalised_rewards(out, beta: float) -> None:
    """SimPO's and ORPO's rewards: beta times each completion's mean token log-prob."""
    assert_matches(
        out.chosen_rewards,
        [beta * pc / lc for pc, lc in zip(POLICY_CHOSEN, CHOSEN_LENGTHS, strict=True)],
    )
    assert_matches(
        out.rejected_rewards,
        [beta * pr / lr for pr, lr in zip(POLICY_REJECTED, REJECTED_LENGTHS, strict=True)],
    )


def orpo_reference(pc: float, pr: float, lc: float, lr: float, beta: float) -> float:
    """ORPO's loss from the paper's definitions: odds(y) = P(y) / (1 - P(y)) with P(y) the
    geometric-mean token probability, loss = L_SFT - lambda * log sigmoid(log odds ratio)."""
    p_chosen = math.exp(pc / lc)
    p_rejected = math.exp(pr / lr)
    odds_chosen = p_chosen / (1 - p_chosen)
    odds_rejected = p_rejected / (1 - p_rejected)
    log_odds_ratio = math.log(odds_chosen / odds_rejected)
    return -pc / lc - beta * math.log(sigmoid(log_odds_ratio))


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("length_dtype", [torch.float32, torch.int64])
def test_orpo_matches_formula(beta, length_dtype):
    out = call(ORPOLoss(beta=beta), reference=False, length_dtype=length_dtype)
    expected = [
        orpo_reference(pc, pr, lc, lr, beta)
        for pc, pr, lc, lr in zip(
            POLICY_CHOSEN, POLICY_REJECTED, CHOSEN_LENGTHS, REJECTED_LENGTHS, strict=True
        )
    ]
    assert_matches(out.losses, expected)
    assert_length_normalised_rewards(out, beta)


def test_orpo_accurate_for_near_certain_completions():
    # Mean log-probs of -1e-7 and -1e-6: float32 log1p(-exp(a)) is off by ~20% in 1 - exp(a)
    # here; the loss must still match the formula.
    policy_chosen = torch.tensor([-1e-6], requires_grad=True)
    policy_rejected = torch.tensor([-1e-5], requires_grad=True)
    lengths = torch.tensor([10])
    out = ORPOLoss(beta=1.0)(policy_chosen, policy_rejected, None, None, lengths, lengths)
    expected = orpo_reference(policy_chosen.item(), policy_rejected.item(), 10, 10, 1.0)
    assert_matches(out.losses, [expected])
    out.losses.sum().backward()
    assert torch.isfinite(policy_chosen.grad).all()
    assert torch.isfinite(policy_rejected.grad).all()


def test_dpo_loss_is_ln2_when_policy_is_reference():
    logps_chosen = torch.tensor(REFERENCE_CHOSEN)
    logps_rejected = torch.tensor(REFERENCE_REJECTED)
    lengths = torch.tensor(CHOSEN_LENGTHS)
    out = SigmoidDPOLoss(beta=0.1)(
        logps_chosen, logps_rejected, logps_chosen, logps_rejected, lengths, lengths
    )
    assert_matches(out.losses, [math.log(2)] * len(REFERENCE_CHOSEN))
    assert torch.equal(out.chosen_rewards, torch.zeros(len(REFERENCE_CHOSEN)))
    assert torch.equal(out.rejected_rewards, torch.zeros(len(REFERENCE_CHOSEN)))


@pytest.mark.parametrize("loss_class", [SimPOLoss, ORPOLoss])
def test_reference_free_losses_accept_no_reference(loss_class):
    assert loss_class.uses_reference is False
    out = call(loss_class(), reference=False)
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("loss_class", REFERENCE_LOSSES)
def test_reference_losses_reject_missing_reference(loss_class):
    assert loss_class.uses_reference is True
    with pytest.raises(ValueError, match="reference"):
        call(loss_class(), reference=False)


@pytest.mark.parametrize("loss_class", ALL_LOSSES)
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_invalid_beta_rejected(loss_class, beta):
    with pytest.raises(ValueError, match="beta"):
        loss_class(beta=beta)


@pytest.mark.parametrize("loss_class", [SigmoidDPOLoss, RobustDPOLoss])
@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_invalid_label_smoothing_rejected(loss_class, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_class(label_smoothing=eps)


@pytest.mark.parametrize("loss_class", ALL_LOSSES)
def test_gradients_reach_policy_and_rewards_are_detached(loss_class):
    loss = loss_class()
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    policy_rejected = torch.tensor(POLICY_REJECTED, requires_grad=True)
    reference = loss_class.uses_reference
    out = loss(
        policy_chosen,
        policy_rejected,
        torch.tensor(REFERENCE_CHOSEN) if reference else None,
        torch.tensor(REFERENCE_REJECTED) if reference else None,
        torch.tensor(CHOSEN_LENGTHS),
        torch.tensor(REJECTED_LENGTHS),
    )
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    for grad in (policy_chosen.grad, policy_rejected.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert (grad != 0).all()


@pytest.mark.parametrize("loss_class", ALL_LOSSES)
def test_low_precision_inputs_computed_in_float32(loss_class):
    def t(values):
        return torch.tensor(values, dtype=torch.bfloat16)

    reference = loss_class.uses_reference
    out = loss_class()(
        t(POLICY_CHOSEN),
        t(POLICY_REJECTED),
        t(REFERENCE_CHOSEN) if reference else None,
        t(REFERENCE_REJECTED) if reference else None,
        torch.tensor(CHOSEN_LENGTHS),
        torch.tensor(REJECTED_LENGTHS),
    )
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert tensor.dtype == torch.float32


def test_registry():
    expected = {
        "dpo": SigmoidDPOLoss,
        "rdpo": RobustDPOLoss,
        "ipo": IPOLoss,
        "simpo": SimPOLoss,
        "orpo": ORPOLoss,
    }
    assert dict(PREFERENCE_LOSSES) == expected
