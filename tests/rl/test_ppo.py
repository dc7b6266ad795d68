"""PPO's pieces against direct implementations of their published formulas, on fixed tensors."""

import math

import pytest
import torch

from attune import rl
from attune.errors import ConfigError

# two responses of 4 and 2 tokens, padded to 4
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
REWARDS = torch.tensor([[0.1, -0.2, 0.05, 1.0], [0.3, -0.5, 0.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.2, 0.9], [-0.1, 0.3, 7.0, 7.0]])  # junk past the end


def test_gae_is_the_discounted_sum_of_td_errors():
    gamma, lam = 0.9, 0.8
    advantages, returns = rl.gae(REWARDS, VALUES, MASK, gamma, lam)
    for row in range(2):
        n = int(MASK[row].sum())
        r, v = REWARDS[row, :n].tolist(), [*VALUES[row, :n].tolist(), 0.0]  # V after the end: 0
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-6)
            assert returns[row, t].item() == pytest.approx(expected + v[t], abs=1e-6)
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    advantages, _ = rl.gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    to_go = REWARDS[0].flip(0).cumsum(0).flip(0)
    assert torch.allclose(advantages[0], to_go - VALUES[0], atol=1e-6)


def test_whitening_gives_zero_mean_unit_variance_over_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 99.0, 99.0]])
    whitened = rl.whiten(values, MASK)
    kept = values[MASK]
    expected = (kept - kept.mean()) / math.sqrt(kept.var(unbiased=True).item() + 1e-8)
    assert torch.allclose(whitened[MASK], expected, atol=1e-6)
    assert whitened[~MASK].abs().sum() == 0
    unshifted = rl.whiten(values, MASK, shift_mean=False)
    assert torch.allclose(unshifted[MASK], expected + kept.mean(), atol=1e-5)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    assert torch.allclose(rl.kl_penalty(logp, ref, "k1"), logp - ref)
    ratio = torch.exp(ref - logp)  # p_ref / p
    expected_k3 = (ratio - 1) - torch.log(ratio)
    k3 = rl.kl_penalty(logp, ref, "k3")
    assert torch.allclose(k3, expected_k3, atol=1e-6)
    assert (k3 >= 0).all() and k3[2] == 0
    # k3 is unbiased for KL(p || p_ref) when tokens are sampled from p
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = rl.kl_penalty(p.log()[samples], q.log()[samples], "k3").mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 9.0, 9.0]])
    rewards = rl.token_rewards(torch.tensor([2.0, -1.0]), kl, MASK, kl_coef=0.1)
    expected = -0.1 * kl * MASK
    expected[0, 3] += 2.0
    expected[1, 1] += -1.0
    assert torch.allclose(rewards, expected)


def test_clipped_policy_loss():
    logp = torch.tensor([[-1.0, -0.2, -3.0, -0.7], [-0.4, -2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.3, -0.2, -2.0, -0.75], [-0.1, -2.5, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -0.5, 2.0, -1.0], [0.7, -2.0, 5.0, 5.0]])
    eps = 0.2
    loss, stats = rl.clipped_policy_loss(logp, old, adv, MASK, eps)
    expected, clipped_count, approx = 0.0, 0, 0.0
    for row in range(2):
        for t in range(int(MASK[row].sum())):
            r = math.exp(logp[row, t].item() - old[row, t].item())
            a = adv[row, t].item()
            term1, term2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            expected += max(term1, term2)
            clipped_count += term2 > term1
            approx += 0.5 * (logp[row, t].item() - old[row, t].item()) ** 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"].item() == clipped_count
    assert stats["approx_kl"].item() == pytest.approx(approx, abs=1e-6)
    loss.backward()
    assert logp.grad[1, 2:].abs().sum() == 0  # padding gets no gradient


def test_clipped_value_loss():
    values = torch.tensor([[0.9, 0.1, -0.4, 2.0], [0.3, 0.35, 0.0, 0.0]])
    old = torch.tensor([[0.5, 0.2, -0.1, 1.0], [0.3, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.2, 1.1], [0.1, 0.6, 3.0, 3.0]])
    clip = 0.2
    loss, stats = rl.clipped_value_loss(values, old, returns, MASK, clip)
    expected, clipped_count = 0.0, 0
    for row in range(2):
        for t in range(int(MASK[row].sum())):
            v, o, ret = values[row, t].item(), old[row, t].item(), returns[row, t].item()
            v_clip = o + min(max(v - o, -clip), clip)
            expected += 0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2)
            clipped_count += (v_clip - ret) ** 2 > (v - ret) ** 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["value_clip_fraction"].item() == clipped_count


def test_adaptive_kl_controller_moves_toward_the_target():
    control = rl.KLController(0.1, target=6.0, horizon=100)
    control.update(12.0, rollouts=10)  # error clipped to +0.2
    assert control.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    control.update(3.0, rollouts=10)  # error clipped to -0.2
    assert control.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = rl.KLController(0.1)
    fixed.update(100.0, rollouts=10)
    assert fixed.value == 0.1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"clip_ratio": 0.0}, "ppo.clip_ratio must be > 0"),
        ({"kl_estimator": "k4"}, "ppo.kl_estimator must be k1, k2 or k3"),
        ({"gamma": 1.5}, "ppo.gamma must be in [0, 1]"),
    ],
)
def test_bad_settings_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rl.PPOSettings(**setting)


def test_minibatch_size_must_divide_the_batch():
    assert rl.PPOSettings(minibatch_size=4).minibatches(16) == 4
    with pytest.raises(ConfigError, match="does not divide batch_size=10"):
        rl.PPOSettings(minibatch_size=4).minibatches(10)
