"""Preference optimisation and RL pieces: preference losses, completion log-probabilities,
the reference model (live or precomputed), reward-model training, rollouts with the KV cache,
reward sources and PPO's losses."""

from attune.rl.logprobs import PairLogprobs, pair_logprobs, sequence_logprobs, token_logprobs
from attune.rl.objective import STATISTICS, PreferenceObjective, mean_statistics
from attune.rl.ppo import (
    KLController,
    PPOSettings,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalty,
    masked_mean,
    token_rewards,
    whiten,
)
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
from attune.rl.reward_model import (
    BradleyTerryLoss,
    RewardObjective,
    pair_rewards,
    sequence_end_positions,
)
from attune.rl.reward_sources import FunctionReward, ModelReward
from attune.rl.rollout import (
    Rollout,
    generate_rollout,
    response_logprobs,
    response_values,
    sequence_end_scores,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "STATISTICS",
    "BradleyTerryLoss",
    "FunctionReward",
    "IPOLoss",
    "KLController",
    "ModelReward",
    "ORPOLoss",
    "PPOSettings",
    "PairLogprobs",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "PreferenceObjective",
    "ReferenceLogprobs",
    "RewardObjective",
    "RobustDPOLoss",
    "Rollout",
    "SigmoidDPOLoss",
    "SimPOLoss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "generate_rollout",
    "kl_penalty",
    "masked_mean",
    "mean_statistics",
    "pair_logprobs",
    "pair_rewards",
    "reference_fingerprint",
    "reference_scorer",
    "response_logprobs",
    "response_values",
    "sequence_end_positions",
    "sequence_end_scores",
    "sequence_logprobs",
    "token_logprobs",
    "token_rewards",
    "whiten",
]
