"""Proximal Policy Optimization pieces, as in InstructGPT (Ouyang et al., 2022) and the
"N implementation details of RLHF with PPO" that TRL follows.

Per response token ``t`` of a rollout: the reward is ``-kl_coef * KL_t`` (the policy against the
frozen reference, :func:`kl_penalty`), plus the sequence's score at its last token;
:func:`gae` turns rewards and the value model's estimates into advantages and returns;
:func:`clipped_policy_loss` and :func:`clipped_value_loss` are PPO's two objectives. Every
function works on ``[batch, response_len]`` tensors with a mask of the real response tokens,
and the losses return sums over tokens, so a step can divide by the tokens of all its
micro-batches and ranks (token-exact accumulation, as the other recipes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from attune.distributed import all_ranks_sum
from attune.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]


@dataclass
class PPOSettings:
    """The ``ppo`` config section.

    Args:
        epochs: passes over each rollout batch.
        minibatch_size: rollouts per optimizer step, per process (None: the whole batch, one
            step per epoch). Must divide ``batch_size``.
        clip_ratio: the policy ratio's clip range, ``1 +- clip_ratio``.
        value_clip: the value's clip range around its rollout-time estimate.
        value_coef: the value loss's weight in the total loss.
        gamma: the discount factor.
        lam: GAE's lambda.
        whiten_advantages: normalise advantages over the batch's response tokens.
        kl_coef: the per-token KL penalty's coefficient (the starting one, with ``kl_target``).
        kl_estimator: ``k1`` (``log p - log p_ref``), ``k2`` (``(log p - log p_ref)^2 / 2``)
            or ``k3`` (``r - 1 - log r``, ``r = p_ref / p``; unbiased and never negative).
        kl_target: adapt ``kl_coef`` so each response's KL to the reference stays near this
            (Ziegler et al., 2019); None keeps ``kl_coef`` fixed.
        kl_horizon: the adaptive controller's horizon, in rollouts.
        kl_limit: a bound on each response's KL to the reference (see :class:`KLLimit`); None
            for no bound.
        no_stop_penalty: subtracted from the score of a response that never produced a stop
            token (None: no penalty).
    """

    epochs: int = 4
    minibatch_size: int | None = None
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    kl_estimator: KLEstimator = "k1"
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_limit: float | None = None
    no_stop_penalty: float | None = None

    def __post_init__(self) -> None:
        checks = (
            ("epochs", self.epochs >= 1, "a positive integer"),
            ("minibatch_size", self.minibatch_size is None or self.minibatch_size >= 1,
             "a positive integer or null"),
            ("clip_ratio", self.clip_ratio > 0, "> 0"),
            ("value_clip", self.value_clip > 0, "> 0"),
            ("value_coef", self.value_coef >= 0, ">= 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in ("k1", "k2", "k3"), "k1, k2 or k3"),
            ("kl_target", self.kl_target is None or self.kl_target > 0, "> 0 or null"),
            ("kl_horizon", self.kl_horizon >= 1, "a positive integer"),
            ("kl_limit", self.kl_limit is None or self.kl_limit > 0, "> 0 or null"),
        )  # fmt: skip
        for name, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"ppo.{name} must be {wanted}, got {getattr(self, name)}")

    def minibatches(self, batch_size: int) -> int:
        """Optimizer steps per epoch over a rollout batch of ``batch_size`` rows."""
        size = self.minibatch_size or batch_size
        if batch_size % size:
            raise ConfigError(
                f"ppo.minibatch_size={size} does not divide batch_size={batch_size}; pick a divisor"
            )
        return batch_size // size


def minibatch_rows(
    batch_size: int, epochs: int, minibatches: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The rows of each PPO minibatch of a rollout batch: ``epochs`` fresh permutations of the
    ``batch_size`` rows, each cut into ``minibatches`` equal parts."""
    for _ in range(epochs):
        yield from torch.randperm(batch_size, generator=generator).chunk(minibatches)


def _summed(values: list[torch.Tensor], all_ranks: bool) -> list[torch.Tensor]:
    """Scalars summed over the processes of the default group when ``all_ranks``."""
    if not all_ranks:
        return values
    return list(all_ranks_sum(torch.stack(values)).unbind())


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_ranks: bool = False
) -> torch.Tensor:
    """``values`` scaled to unit variance over the masked entries (unbiased variance), and
    centred unless ``shift_mean`` is False; 0 outside the mask. ``all_ranks``: the mean and
    variance are those of the masked entries of every process (a collective)."""
    mask = mask.to(values.dtype)
    count, total = _summed([mask.sum(), masked_sum(values, mask)], all_ranks)
    mean = total / count.clamp(min=1)
    (squares,) = _summed([masked_sum((values - mean) ** 2, mask)], all_ranks)
    variance = squares / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities:
    ``k1 = log p - log p_ref``; ``k2 = (log p - log p_ref)^2 / 2``; ``k3 = (r - 1) - log r``
    with ``r = p_ref / p`` (Schulman, "Approximating KL divergence")."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """``[batch, response_len]`` rewards: ``-kl_coef * kl`` on every response token, plus each
    sequence's score on its last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` is 0 past a response's end) and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns are ``A_t + V_t``.

    Args:
        rewards: ``[batch, response_len]`` per-token rewards.
        values: ``[batch, response_len]`` the value model's estimates.
        mask: ``[batch, response_len]`` the real response tokens (a prefix of each row).
        gamma, lam: the discount and GAE's lambda.

    Returns:
        ``(advantages, returns)``, each ``[batch, response_len]``, 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` with
    ``r = exp(log p - log p_old)``, summed over the masked tokens.

    Returns:
        The summed loss, and summed statistics (detached): ``clip_fraction`` (tokens where
        the clipped term was the larger) and ``approx_kl`` (``0.5 * (log r)^2``).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_sum(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_sum((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_sum(0.5 * log_ratio.detach() ** 2, mask),
    }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss, ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with ``V_clip`` the
    new value kept within ``value_clip`` of the rollout's, summed over the masked tokens.

    Returns:
        The summed loss, and ``value_clip_fraction`` summed (tokens where the clipped term
        was the larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_fraction": masked_sum((clipped > unclipped).float(), mask).detach()}


class KLController:
    """The KL penalty's coefficient: fixed, or adapted toward a target KL per response
    (Ziegler et al., 2019: the coefficient grows by up to 20% of ``rollouts / horizon`` while
    the KL is above target, and shrinks likewise below it).

    Args:
        kl_coef: the (starting) coefficient.
        target: the KL per response to hold, or None for a fixed coefficient.
        horizon: how many rollouts the adaptation takes to act.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, rollouts: int) -> None:
        """After a batch of ``rollouts`` responses whose mean KL to the reference was ``kl``."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * rollouts / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["kl_coef"]


@dataclass
class KLLimit:
    """A bound on the policy's KL to the reference per response, kept by the policy's updates
    themselves (an adaptive coefficient acts through the reward, rollouts late, and
    overshoots): an update whose minibatch finds the policy past the limit, as it is before
    the update, spends itself moving back; its policy loss is that KL instead of PPO's
    surrogate (the value model trains as usual). The KL is the exact one over the vocabulary
    at the minibatch's response positions (:func:`attune.rl.response_kl`), whose gradient
    moves every token's probability, not only the sampled ones'. The KL can pass the limit by
    one update's step (and the sampling noise) before it is pulled back.

    Args:
        limit: the KL per response to stay under (nats), or None for no bound.
    """

    limit: float | None = None

    def restores(self, kl_per_response: float) -> bool:
        """Whether an update whose policy is at ``kl_per_response`` moves back instead."""
        return self.limit is not None and kl_per_response > self.limit
