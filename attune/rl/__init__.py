"""Preference optimisation and RL pieces: preference losses, completion log-probabilities,
and the reference model (live or precomputed)."""

from attune.rl.logprobs import PairLogprobs, pair_logprobs, sequence_logprobs, token_logprobs
from attune.rl.objective import STATISTICS, PreferenceObjective, mean_statistics
from attune.rl.preference_losses import (
    PREFERENCE_LOSSES,
    IPOLoss,
    ORPOLoss,
    PreferenceLoss,
    PreferenceLossOutput,
    RobustDPOLoss,
    SigmoidDPOLoss,
    SimPOLoss,
)
from attune.rl.reference import (
    ReferenceLogprobs,
    reference_fingerprint,
    reference_scorer,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "STATISTICS",
    "IPOLoss",
    "ORPOLoss",
    "PairLogprobs",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "PreferenceObjective",
    "ReferenceLogprobs",
    "RobustDPOLoss",
    "SigmoidDPOLoss",
    "SimPOLoss",
    "mean_statistics",
    "pair_logprobs",
    "reference_fingerprint",
    "reference_scorer",
    "sequence_logprobs",
    "token_logprobs",
]
