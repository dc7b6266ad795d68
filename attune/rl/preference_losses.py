"""Preference losses: DPO and its relatives, on pairs of chosen and rejected completions.

Every loss here takes, for each pair, the summed log-probability of the chosen and the
rejected completion (completion tokens only, prompt excluded) under the policy, the same two
numbers under the frozen reference model (``None`` for the reference-free losses, SimPO and
ORPO) and the number of completion tokens of each sequence (used by the losses that average
per token). It returns a :class:`PreferenceLossOutput` with one loss per pair and the implicit
rewards the loss assigns to each completion, for logging.

The losses are returned unreduced: a recipe sums them over its micro-batches and divides by
the number of pairs of the whole optimizer step, so that gradient accumulation gives the same
gradient as one large batch. A per-micro-batch mean would weight a short last micro-batch
more than the others.

All arithmetic is in float32, whatever the dtype of the log-probabilities passed in.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from attune.config import Expects
from attune.errors import ConfigError

_LN2 = math.log(2.0)


@dataclass
class PreferenceLossOutput:
    """What a preference loss returns for a batch of pairs.

    Attributes:
        losses: ``[pairs]`` float32, the loss of each pair, not reduced (the recipe sums and
            divides by the pairs of the whole step).
        chosen_rewards: ``[pairs]`` float32, detached, the implicit reward of each chosen
            completion.
        rejected_rewards: ``[pairs]`` float32, detached, the same for each rejected completion.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class PreferenceLoss(Protocol):
    """The interface every preference loss follows (see the module docstring)."""

    uses_reference: ClassVar[bool]

    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        reference_chosen: torch.Tensor | None,
        reference_rejected: torch.Tensor | None,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> PreferenceLossOutput: ...


PREFERENCE_LOSS = Expects(
    "a preference loss (attune.rl.SigmoidDPOLoss, IPOLoss, SimPOLoss, ORPOLoss, ...)",
    attributes=("uses_reference",),
    positional=6,
)
"""What the ``loss`` slot of the DPO recipe takes."""


class PreferenceLossError(ConfigError, ValueError):
    """A preference loss configured with a value outside its range."""


def _check_beta(beta: float) -> float:
    # `not beta > 0` also rejects NaN.
    if not beta > 0:
        raise PreferenceLossError(f"loss.beta must be > 0, got {beta}; set a positive beta")
    return float(beta)


def _check_label_smoothing(label_smoothing: float) -> float:
    # At 0.5 the labels carry no information: cDPO's loss no longer depends on which completion
    # is chosen, and rDPO divides by 1 - 2 * eps = 0.
    if not 0.0 <= label_smoothing < 0.5:
        raise PreferenceLossError(
            f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}; set a value in "
            "that range (0 for plain DPO)"
        )
    return float(label_smoothing)


def _log_ratios(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(y) - log pi_ref(y)`` for the chosen and the rejected completions, float32."""
    if reference_chosen is None or reference_rejected is None:
        raise ValueError(
            f"{name} needs the reference model's log-probabilities, but reference_chosen or "
            "reference_rejected is None; compute them with the reference model, or use a "
            "reference-free loss (simpo, orpo)"
        )
    chosen = policy_chosen.float() - reference_chosen.float()
    rejected = policy_rejected.float() - reference_rejected.float()
    return chosen, rejected


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate over the whole range (Maechler 2012).

    ``log1p(-exp(a))`` loses everything when ``a`` is near 0 (``exp(a)`` rounds to 1 in
    float32 for ``a > -6e-8``, giving -inf); ``log(-expm1(a))`` is exact there but inaccurate
    for very negative ``a``. The switch at ``-ln 2`` takes the accurate one on each side. Each
    branch sees its input clamped to its own side, so the branch not taken never produces an
    inf whose zero-weighted gradient would turn into NaN.
    """
    near_zero = a > -_LN2
    small = torch.log(-torch.expm1(a.clamp(min=-_LN2)))
    large = torch.log1p(-torch.exp(a.clamp(max=-_LN2)))
    return torch.where(near_zero, small, large)


class _ReferenceMarginLoss(abc.ABC):
    """The losses of the log-ratio margin ``h = (pc - rc) - (pr - rr)``: DPO, cDPO, rDPO, IPO.
    A subclass gives :meth:`margin_loss`; the rewards are DPO's, ``beta`` times each
    completion's log-ratio."""

    uses_reference: ClassVar[bool] = True
    beta: float

    @abc.abstractmethod
    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        """``[pairs]`` margins -> ``[pairs]`` losses."""

    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        reference_chosen: torch.Tensor | None,
        reference_rejected: torch.Tensor | None,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> PreferenceLossOutput:
        """Per-pair losses; every tensor is ``[pairs]``, lengths are unused."""
        chosen, rejected = _log_ratios(
            type(self).__name__,
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
        )
        return PreferenceLossOutput(
            self.margin_loss(chosen - rejected),
            (self.beta * chosen).detach(),
            (self.beta * rejected).detach(),
        )


class SigmoidDPOLoss(_ReferenceMarginLoss):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), with optional
    label smoothing, which makes it conservative DPO (cDPO, Mitchell 2023).

    With ``pc, pr`` the summed log-probs of the chosen and rejected completion under the policy
    and ``rc, rr`` the same under the reference::

        h    = (pc - rc) - (pr - rr)
        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    ``eps = 0`` is the paper's DPO loss. cDPO treats each label as flipped with probability
    ``eps`` and takes the expected loss under the noisy label.

    Rewards (the implicit reward DPO's policy defines): ``beta * (pc - rc)`` for the chosen,
    ``beta * (pr - rr)`` for the rejected completion.

    Args:
        beta: inverse temperature; how far the policy may move from the reference. Must be > 0.
        label_smoothing: ``eps``, the assumed probability that a label is flipped, in [0, 0.5).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        self.beta = _check_beta(beta)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.beta * h
        eps = self.label_smoothing
        return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


class RobustDPOLoss(_ReferenceMarginLoss):
    """Robust DPO (rDPO; Chowdhury et al. 2024, arXiv:2403.00409): an unbiased estimate of the
    DPO loss when each preference label is flipped with a known probability ``eps``.

    With ``h`` as in :class:`SigmoidDPOLoss`::

        loss = ((1 - eps) * -logsigmoid(beta * h) - eps * -logsigmoid(-beta * h)) / (1 - 2 * eps)

    Unlike cDPO, the flipped-label term is subtracted, so that in expectation over the label
    noise the loss equals DPO's loss on the clean labels. A single pair's loss can be negative.
    ``eps = 0`` is DPO.

    Rewards: ``beta * (pc - rc)`` and ``beta * (pr - rr)``, as in DPO.

    Args:
        beta: inverse temperature, > 0.
        label_smoothing: ``eps``, the label-flip rate, in [0, 0.5).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1):
        self.beta = _check_beta(beta)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.beta * h
        eps = self.label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (
            1.0 - 2.0 * eps
        )


class IPOLoss(_ReferenceMarginLoss):
    """Identity Preference Optimization (Azar et al. 2023, arXiv:2310.12036).

    With ``h`` as in :class:`SigmoidDPOLoss`, on the summed log-probs as in the paper::

        loss = (h - 1 / (2 * beta)) ** 2

    It regresses the log-ratio margin to a fixed target ``1 / (2 * beta)`` instead of pushing
    it to infinity, so it does not overfit deterministic preferences. TRL averages the
    log-probs over tokens before forming ``h``; this follows the paper and uses the sums, so
    a ``beta`` tuned for TRL's IPO is not directly transferable.

    Rewards: ``beta * (pc - rc)`` and ``beta * (pr - rr)``, as in DPO.

    Args:
        beta: regularisation strength (the paper's tau), > 0.
    """

    def __init__(self, beta: float = 0.1):
        self.beta = _check_beta(beta)

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        return (h - 1.0 / (2.0 * self.beta)) ** 2


class _MeanLogprobLoss(abc.ABC):
    """Reference-free losses of each completion's mean per-token log-probability
    ``a = p / |y|``: SimPO, ORPO. A subclass gives :meth:`mean_loss`; the rewards are ``beta``
    times each completion's ``a``."""

    uses_reference: ClassVar[bool] = False
    beta: float

    @abc.abstractmethod
    def mean_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``[pairs]`` mean log-probs of the chosen and rejected completions -> losses."""

    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        reference_chosen: torch.Tensor | None,
        reference_rejected: torch.Tensor | None,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> PreferenceLossOutput:
        """Per-pair losses; every tensor is ``[pairs]``, lengths > 0; references are ignored."""
        chosen = policy_chosen.float() / chosen_lengths.float()
        rejected = policy_rejected.float() / rejected_lengths.float()
        return PreferenceLossOutput(
            self.mean_loss(chosen, rejected),
            (self.beta * chosen).detach(),
            (self.beta * rejected).detach(),
        )


class SimPOLoss(_MeanLogprobLoss):
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734), reference-free.

    With ``|yc|, |yr|`` the completion lengths in tokens::

        loss = -logsigmoid(beta * pc / |yc| - beta * pr / |yr| - gamma)

    The reward is the length-normalised log-likelihood, so longer completions are not
    favoured, and ``gamma`` is the target margin between the chosen and the rejected reward.

    Rewards: ``beta * pc / |yc|`` and ``beta * pr / |yr|``.

    Args:
        beta: reward scale, > 0.
        gamma: target reward margin (absolute, not divided by beta as TRL's
            ``gamma_beta_ratio`` is).
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5):
        self.beta = _check_beta(beta)
        self.gamma = float(gamma)

    def mean_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)


class ORPOLoss(_MeanLogprobLoss):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691), reference-free.

    With the mean per-token log-probs ``a_c = pc / |yc|`` and ``a_r = pr / |yr|`` and the log
    odds of a completion ``log_odds(a) = a - log(1 - exp(a))``::

        loss = -a_c + beta * -logsigmoid(log_odds(a_c) - log_odds(a_r))

    The first term is the paper's L_SFT: the chosen completion's mean per-token negative
    log-likelihood, here per pair (each sequence averaged over its own tokens), so that a
    pair's loss does not depend on the other pairs in its micro-batch. The second is the
    odds-ratio penalty, weighted by ``beta`` (the paper's lambda).

    Rewards (as TRL reports them): ``beta * a_c`` and ``beta * a_r``.

    Args:
        beta: weight of the odds-ratio term, > 0.
    """

    def __init__(self, beta: float = 0.1):
        self.beta = _check_beta(beta)

    def mean_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """The mean log-probs must be < 0 (a completion of probability 1 has infinite odds)."""
        log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
        return -chosen - self.beta * F.logsigmoid(log_odds)


PREFERENCE_LOSSES: dict[str, type[PreferenceLoss]] = {
    "dpo": SigmoidDPOLoss,
    "rdpo": RobustDPOLoss,
    "ipo": IPOLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
}
