"""Where PPO's rewards come from: a reward model, or a Python function (a verifiable reward).

Both are config components (the ``reward`` section) called the same way on a batch of
rollouts, and return one score per response::

    reward:                                  # a reward-model checkpoint
      _component_: attune.rl.ModelReward
      path: /tmp/attune/tiny_reward_model/checkpoints/step_300

    reward:                                  # a function, by dotted path
      _component_: attune.rl.FunctionReward
      function:
        _component_: my_rewards.exact_match
        _partial_: true

A reward function is called as TRL calls one: ``function(prompts=[...], completions=[...],
**columns)``, where ``prompts`` are the prompts' last messages, ``completions`` the decoded
responses (special tokens left out) and ``columns`` every other column of the prompt rows
(``answer=[...]``, say), one list item per response; it returns one number per response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from attune.config import Expects
from attune.errors import CheckpointError, ConfigError
from attune.models import TransformerDecoder
from attune.precision import Precision
from attune.rl.rollout import Rollout, sequence_end_scores

REWARD_SOURCE = Expects(
    "a reward source (attune.rl.ModelReward, attune.rl.FunctionReward or one like them, "
    "with prepare(device, dtype))",
    attributes=("prepare", "__call__"),
)
"""What PPO's ``reward`` slot takes."""


class FunctionReward:
    """Scores from a Python function (see the module docstring).

    Args:
        function: ``(prompts, completions, **columns) -> list of floats``.
        scale: multiplies every score.
    """

    def __init__(self, function: Callable[..., Sequence[float]], scale: float = 1.0):
        if not callable(function):
            raise ConfigError(
                f"reward.function must be a callable (a component with _partial_: true), got "
                f"{type(function).__name__}"
            )
        self.function = function
        self.scale = scale

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load."""

    def __call__(
        self,
        rollout: Rollout,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: Sequence[Mapping[str, Any]],
        precision: Precision | None = None,
    ) -> torch.Tensor:
        """``[batch]`` fp32 scores, on the rollout's device."""
        names = {name for row in columns for name in row}
        by_name = {name: [row.get(name) for row in columns] for name in sorted(names)}
        scores = self.function(prompts=list(prompts), completions=list(completions), **by_name)
        scores = [float(score) for score in scores]
        if len(scores) != len(completions):
            name = getattr(self.function, "__name__", repr(self.function))
            raise ConfigError(
                f"reward function {name} returned {len(scores)} scores for {len(completions)} "
                "completions; return one number per completion"
            )
        return torch.tensor(scores, dtype=torch.float32, device=rollout.tokens.device) * self.scale


class ModelReward:
    """Scores from a reward model: attune's (``reward_model_*`` recipes) or any HF
    ``*ForSequenceClassification`` checkpoint of a supported family with one output, read at
    each response's last token. It must share the policy's tokenizer.

    Args:
        path: the checkpoint folder.
        scale: multiplies every score.
        bias: added to every score (after ``scale``), to centre a reward model's scores.
    """

    def __init__(self, path: str | Path, scale: float = 1.0, bias: float = 0.0):
        from attune.models import is_sequence_classifier, read_hf_config

        self.path = Path(path)
        hf_config = read_hf_config(self.path)
        if not is_sequence_classifier(hf_config):
            raise CheckpointError(
                f"{path} is not a reward model (its config.json names "
                f"{hf_config.get('architectures')}, not a *ForSequenceClassification); train "
                "one with the reward_model_single_device recipe"
            )
        labels = hf_config.get("num_labels") or len(hf_config.get("id2label") or {0: 0, 1: 1})
        if labels != 1:
            raise CheckpointError(f"{path}: a reward model has one output, this one {labels}")
        self.scale = scale
        self.bias = bias
        self.model: TransformerDecoder | None = None

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load the model (frozen, in eval mode) onto ``device`` in ``dtype``."""
        from attune.models import from_pretrained

        self.model = from_pretrained(self.path, dtype=dtype, device=device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(
        self,
        rollout: Rollout,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: Sequence[Mapping[str, Any]],
        precision: Precision | None = None,
    ) -> torch.Tensor:
        """``[batch]`` fp32 scores, on the rollout's device."""
        if self.model is None:
            raise RuntimeError("ModelReward.prepare(device, dtype) loads the model first")
        return sequence_end_scores(self.model, rollout, precision) * self.scale + self.bias
