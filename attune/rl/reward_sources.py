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

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from attune.config import Expects
from attune.errors import CheckpointError, ConfigError, RewardError
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

    @property
    def name(self) -> str:
        """The function's name (a ``functools.partial``'s function's), for messages and metrics."""
        function = getattr(self.function, "func", self.function)
        return getattr(function, "__name__", type(function).__name__)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load."""

    def _failing_row(
        self, prompts: Sequence[str], completions: Sequence[str], by_name: dict[str, list]
    ) -> int | None:
        """The first row the function raises on alone (None if every row passes alone)."""
        for row in range(len(completions)):
            columns = {name: [values[row]] for name, values in by_name.items()}
            try:
                self.function(prompts=[prompts[row]], completions=[completions[row]], **columns)
            except Exception:
                return row
        return None

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
        try:
            scores = self.function(prompts=list(prompts), completions=list(completions), **by_name)
        except Exception as error:  # the user's function: say which one and where, once
            row = self._failing_row(prompts, completions, by_name)
            where = f"on row {row} (prompt {prompts[row]!r:.80})" if row is not None else ""
            raise RewardError(
                f"reward function {self.name} raised {type(error).__name__}: {error} {where}; "
                "fix the function or that row"
            ) from None
        if hasattr(scores, "tolist"):  # a tensor or a numpy array
            scores = scores.tolist()
        if not isinstance(scores, Sequence) or len(scores) != len(completions):
            count = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
            raise RewardError(
                f"reward function {self.name} returned {count} scores for {len(completions)} "
                "completions; return one number per completion"
            )
        for row, score in enumerate(scores):
            # numbers.Real takes numpy's scalars too; NaN and infinities would surface later as
            # a non-finite gradient, blamed on training
            if isinstance(score, bool) or not isinstance(score, numbers.Real):
                problem = f"returned {score!r}"
            elif not math.isfinite(score):
                problem = f"returned {score}"
            else:
                continue
            raise RewardError(
                f"reward function {self.name} {problem} for row {row} (prompt "
                f"{prompts[row]!r:.80}); return a finite number for every completion"
            )
        scores = [float(score) for score in scores]
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


class Rewards:
    """Several reward sources, weighted and summed: GRPO's ``reward`` with more than one
    function (a correctness reward and a format reward, say), each also reported alone.

    Args:
        sources: reward sources (:class:`FunctionReward`, :class:`ModelReward`, ...).
        weights: each source's weight in the sum (None: 1 each).
    """

    def __init__(self, sources: Sequence[Any], weights: Sequence[float] | None = None):
        self.sources = list(sources)
        if not self.sources:
            raise ConfigError("reward.sources is empty; give at least one reward source")
        self.weights = [1.0] * len(self.sources) if weights is None else list(weights)
        if len(self.weights) != len(self.sources):
            raise ConfigError(
                f"reward.weights has {len(self.weights)} numbers for {len(self.sources)} "
                "sources; give one weight per source"
            )

    @classmethod
    def of(cls, reward: Any) -> Rewards:
        """``reward`` itself when it is a :class:`Rewards`, else one source of weight 1."""
        return reward if isinstance(reward, Rewards) else cls([reward])

    @property
    def names(self) -> list[str]:
        """One name per source (its function's, or its class's), made unique by a suffix."""
        names: list[str] = []
        for source in self.sources:
            name = getattr(source, "name", None) or type(source).__name__
            names.append(name if name not in names else f"{name}_{len(names)}")
        return names

    @property
    def model(self) -> torch.nn.Module | None:
        """The sources' reward models together (what an offloading caller moves), if any."""
        models = [source.model for source in self.sources if getattr(source, "model", None)]
        return torch.nn.ModuleList(models) if models else None

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        for source in self.sources:
            source.prepare(device, dtype)

    def scores(
        self,
        rollout: Rollout,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: Sequence[Mapping[str, Any]],
        precision: Precision | None = None,
    ) -> torch.Tensor:
        """``[sources, batch]`` fp32: each source's scores, unweighted."""
        return torch.stack(
            [source(rollout, prompts, completions, columns, precision) for source in self.sources]
        )

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """``[batch]``: the weighted sum of :meth:`scores`."""
        weights = torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)
        return (weights[:, None] * scores).sum(0)

    def __call__(
        self,
        rollout: Rollout,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: Sequence[Mapping[str, Any]],
        precision: Precision | None = None,
    ) -> torch.Tensor:
        """``[batch]`` the weighted sum (a reward source like the others, for PPO)."""
        return self.total(self.scores(rollout, prompts, completions, columns, precision))
