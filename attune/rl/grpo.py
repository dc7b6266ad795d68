"""Group Relative Policy Optimization and its variants: advantages from groups of completions
of the same prompt, and the clipped objectives of GRPO, DAPO, Dr. GRPO, BNPO and GSPO.

A prompt is answered ``num_generations`` times; each completion's advantage is its reward
against its group's mean (:func:`group_advantages`), with no value model. The policy loss is
PPO's clipped surrogate per response token with asymmetric bounds (DAPO's "clip-higher",
``1 - epsilon_low`` to ``1 + epsilon_high``), an optional KL to the reference weighted by
``beta``, and one of five aggregations (:data:`LOSS_TYPES`):

- ``grpo`` (Shao et al., 2024): each completion's tokens averaged, then the completions.
- ``dapo`` (Yu et al., 2025): every token of the optimizer step's completions weighs the same
  (the sum over tokens divided by the step's token count, on all processes).
- ``dr_grpo`` (Liu et al., 2025): sums over tokens divided by a constant, completions times
  ``max_new_tokens``; its advantages are not divided by the group's standard deviation.
- ``bnpo``: the token mean of each micro-batch, averaged over micro-batches (TRL's ``bnpo``:
  it depends on how a step is split into micro-batches and processes; the others do not).
- ``gspo`` (Zheng et al., 2025): one importance ratio per completion, the geometric mean of
  its tokens' ratios, clipped as a whole; completions averaged.

Every loss here is a sum over its units (completions, tokens or micro-batches; see
:meth:`GRPOSettings.units`) so that :func:`attune.training.accumulated_backward` divides by the
step's units on every process, as the other recipes do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from attune.distributed import all_ranks_sums
from attune.errors import ConfigError
from attune.rl.ppo import KLEstimator, kl_penalty

LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo", "gspo"]
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "gspo")
ScaleRewards = Literal["group", "batch", "none"]
STD_EPSILON = 1e-4  # added to a standard deviation before dividing by it, as TRL does


@dataclass
class GRPOSettings:
    """The ``grpo`` config section.

    Args:
        num_generations: completions sampled per prompt (a group); at least 2.
        loss_type: the objective's aggregation, one of :data:`LOSS_TYPES`.
        scale_rewards: divide advantages by the ``group``'s reward standard deviation, the
            whole ``batch``'s, or ``none``; None: ``none`` for ``dr_grpo``, ``group`` otherwise.
        epsilon_low: the ratio's lower clip bound is ``1 - epsilon_low``.
        epsilon_high: its upper bound is ``1 + epsilon_high`` (None: ``epsilon_low``; DAPO uses
            0.28 with 0.2).
        beta: the weight of the per-token KL to the reference (0: no reference model kept).
        kl_estimator: ``k1`` (``log p - log p_ref``), ``k2`` (``(log p - log p_ref)^2 / 2``) or
            ``k3`` (``p_ref / p - 1 - log(p_ref / p)``, TRL's and the GRPO paper's).
        num_iterations: passes over each generated batch (GRPO's mu); from the second on, the
            ratio is against the log-probabilities kept from generation time.
        minibatch_size: completions per optimizer step, per process (None: the whole batch,
            ``batch_size * num_generations``: one step per pass). Must divide the batch.
        micro_batch_size: completions per forward pass within an optimizer step (None: the
            whole minibatch); gradients accumulate token-exact, so it bounds memory without
            changing the update (but ``bnpo``'s, which is per micro-batch).
        mask_truncated_completions: completions that never stopped count for nothing in the
            loss (DAPO).
        overlong_buffer: DAPO's soft overlong penalty: completions longer than
            ``max_new_tokens - overlong_buffer`` lose up to ``overlong_penalty`` of reward,
            linearly, reaching it at ``max_new_tokens`` (None: no penalty).
        overlong_penalty: the largest penalty.
        dynamic_sampling: drop groups whose rewards are all equal (they teach nothing) and
            generate for more prompts until the batch is full (DAPO).
        max_sampling_rounds: the most generation rounds per step with ``dynamic_sampling``;
            a batch still short after them is filled with dropped groups (logged).
    """

    num_generations: int = 8
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards | None = None
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    num_iterations: int = 1
    minibatch_size: int | None = None
    micro_batch_size: int | None = None
    mask_truncated_completions: bool = False
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4

    def __post_init__(self) -> None:
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low
        if self.scale_rewards is None:
            self.scale_rewards = "none" if self.loss_type == "dr_grpo" else "group"
        checks = (
            ("num_generations", self.num_generations >= 2,
             "at least 2 (advantages compare completions of the same prompt)"),
            ("loss_type", self.loss_type in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
            ("scale_rewards", self.scale_rewards in ("group", "batch", "none"),
             "group, batch or none"),
            ("epsilon_low", 0 <= self.epsilon_low < 1, "in [0, 1)"),
            ("epsilon_high", self.epsilon_high >= self.epsilon_low,
             f">= epsilon_low ({self.epsilon_low}): the upper bound widens the clip, not narrows "
             "it"),
            ("beta", self.beta >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in ("k1", "k2", "k3"), "k1, k2 or k3"),
            ("num_iterations", self.num_iterations >= 1, "a positive integer"),
            ("minibatch_size", self.minibatch_size is None or self.minibatch_size >= 1,
             "a positive integer or null"),
            ("micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1,
             "a positive integer or null"),
            ("overlong_buffer", self.overlong_buffer is None or self.overlong_buffer >= 1,
             "a positive integer or null"),
            ("overlong_penalty", self.overlong_penalty >= 0, ">= 0"),
            ("max_sampling_rounds", self.max_sampling_rounds >= 1, "a positive integer"),
        )  # fmt: skip
        for name, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"grpo.{name} must be {wanted}, got {getattr(self, name)}")

    def minibatches(self, completions: int) -> int:
        """Optimizer steps per pass over a generated batch of ``completions`` rows (per
        process). A minibatch holds whole groups, so that on any number of processes the
        ``j``-th minibatches together hold the same groups (:func:`group_minibatch_rows`)."""
        size = self.minibatch_size or completions
        if completions % size or size % self.num_generations:
            raise ConfigError(
                f"grpo.minibatch_size={size} must divide the {completions} completions of a "
                f"batch (batch_size x num_generations) and be a multiple of num_generations="
                f"{self.num_generations} (whole groups); pick such a size"
            )
        return completions // size

    def reuses_old_logprobs(self, minibatches: int) -> bool:
        """Whether an update can see a policy that already moved since generation (so the
        log-probabilities at generation time are kept): several passes or minibatches."""
        return self.num_iterations > 1 or minibatches > 1

    def units(self, loss_mask: torch.Tensor) -> int:
        """What the loss of a batch of completions (``loss_mask``: ``[batch, response_len]``)
        is a sum of: completions, tokens (``dapo``) or one micro-batch (``bnpo``)."""
        if self.loss_type == "dapo":
            return int(loss_mask.sum())
        if self.loss_type == "bnpo":
            return 1
        return int(loss_mask.shape[0])


def group_minibatch_rows(
    completions: int, passes: int, minibatches: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The rows of each optimizer step over a generated batch: the batch cut into
    ``minibatches`` consecutive parts of whole groups, taken in a fresh order each of the
    ``passes`` (the order drawn from ``generator``, seeded alike on every process).

    A process's groups are the global batch's ``k * world_size + rank``-th, in order, so its
    ``j``-th part and every other process's ``j``-th part hold together the global batch's
    ``j``-th part on one process: any number of processes takes the same optimizer steps. (A
    permutation of rows, as PPO's minibatches draw, would not.)
    """
    parts = torch.arange(completions).chunk(minibatches)
    for _ in range(passes):
        for index in torch.randperm(minibatches, generator=generator).tolist():
            yield parts[index]


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: ScaleRewards = "group",
    all_ranks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's reward against its group's mean, optionally divided by a standard
    deviation (unbiased, plus :data:`STD_EPSILON`).

    Args:
        rewards: ``[groups * num_generations]`` fp32, a group's completions consecutive.
        num_generations: completions per group.
        scale: ``group`` (each group's std), ``batch`` (the std of every reward of the batch,
            on every process when ``all_ranks``) or ``none``.
        all_ranks: the batch spans the processes of the default group (a collective).

    Returns:
        ``([groups * num_generations] advantages, [groups] bool: the group's rewards are all
        equal)``.
    """
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(-1, keepdim=True)
    group_std = grouped.std(-1, keepdim=True)
    uniform = torch.isclose(group_std, torch.zeros_like(group_std)).squeeze(-1)
    if scale == "group":
        centred = centred / (group_std + STD_EPSILON)
    elif scale == "batch":
        # two passes (the mean, then the squares about it), in double: a sum of squares less
        # count x mean² loses every digit when the rewards sit far from 0
        local = [rewards.numel(), float(rewards.double().sum())]
        count, total = all_ranks_sums(local) if all_ranks else local
        mean = total / max(count, 1)
        local_squares = [float(((rewards.double() - mean) ** 2).sum())]
        (squares,) = all_ranks_sums(local_squares) if all_ranks else local_squares
        centred = centred / ((squares / max(count - 1, 1)) ** 0.5 + STD_EPSILON)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r} (group, batch or none)")
    return centred.reshape(-1), uniform


def overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment, ``[batch]`` (0 or negative): 0 up to
    ``max_new_tokens - buffer`` tokens, then falling linearly to ``-penalty`` at
    ``max_new_tokens``."""
    start = max_new_tokens - buffer
    excess = (lengths.float() - start).clamp(min=0) / buffer
    return -penalty * excess.clamp(max=1.0)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    settings: GRPOSettings,
    max_new_tokens: int,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family objective of a batch of completions, summed over its units.

    Args:
        logprobs: ``[batch, response_len]`` fp32, the policy's log-probabilities of the sampled
            tokens (with gradient).
        old_logprobs: the same at generation time (no gradient).
        advantages: ``[batch]`` each completion's advantage.
        loss_mask: ``[batch, response_len]`` the tokens that count.
        settings: the objective's settings.
        max_new_tokens: the generation length bound (``dr_grpo``'s constant).
        ref_logprobs: the reference's log-probabilities (needed when ``settings.beta > 0``).

    Returns:
        The loss summed over :meth:`GRPOSettings.units`, and statistics summed over the masked
        tokens (detached): ``clip_low`` (ratio under its bound where the advantage is
        negative), ``clip_high`` (over it where positive), ``kl`` when ``beta > 0``, and
        ``policy_loss`` (the loss without the KL term, summed as the loss is).
    """
    mask = loss_mask.to(logprobs.dtype)
    advantage = advantages[:, None]
    log_ratio = logprobs - old_logprobs
    if settings.loss_type == "gspo":  # one ratio per completion: its tokens' geometric mean
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_ratio)
    epsilon_high = settings.epsilon_high if settings.epsilon_high is not None else 0.0
    clipped = torch.clamp(ratio, 1.0 - settings.epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    per_token = per_token.expand_as(mask)
    stats: dict[str, torch.Tensor] = {
        "clip_low": (((ratio < 1.0 - settings.epsilon_low) & (advantage < 0)) * mask).sum(),
        "clip_high": (((ratio > 1.0 + epsilon_high) & (advantage > 0)) * mask).sum(),
    }
    total = per_token
    if settings.beta > 0:
        if ref_logprobs is None:
            raise ValueError("grpo.beta > 0 needs the reference's log-probabilities")
        kl = kl_penalty(logprobs, ref_logprobs, settings.kl_estimator)
        total = per_token + settings.beta * kl
        stats["kl"] = (kl * mask).sum()
    loss, surrogate = (_aggregate(values, mask, settings, max_new_tokens)
                       for values in (total, per_token))  # fmt: skip
    stats["policy_loss"] = surrogate
    return loss, {name: value.detach() for name, value in stats.items()}


def _aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, settings: GRPOSettings, max_new_tokens: int
) -> torch.Tensor:
    summed = (per_token * mask).sum(-1)  # [batch]
    if settings.loss_type in ("grpo", "gspo"):
        return (summed / mask.sum(-1).clamp(min=1.0)).sum()
    if settings.loss_type == "dr_grpo":
        return summed.sum() / max_new_tokens
    if settings.loss_type == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1.0)
    return summed.sum()  # dapo: divided by the step's tokens by the caller
