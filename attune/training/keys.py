"""What recipes read from their configs: the keys every training recipe shares, and those of
the recipes that sample or measure held-out data. A recipe's schema is these plus its own::

    SCHEMA = {**training.TRAINING_KEYS, "loss": config.Component(required=False), ...}
"""

from __future__ import annotations

from typing import Any

from attune import config
from attune.errors import ConfigError
from attune.training.metrics import METRIC_LOGGER
from attune.training.optim import OPTIMIZER

MODEL_KEYS = {
    "seed": config.Field(int, required=False),
    "device": config.Field(str, required=False),
    "dtype": config.Field(str, required=False),
    "model": config.Component(provided=("dtype", "device")),
    "tokenizer": config.Component(),
}
"""The keys of every recipe that loads a model: its component, tokenizer, device and dtype."""

TRAINING_KEYS = {
    "output_dir": str,
    **MODEL_KEYS,
    "autocast": config.Field(str | None, required=False),
    "batch_size": config.Field(int, minimum=1),
    "gradient_accumulation_steps": config.Field(int, required=False, minimum=1),
    "epochs": config.Field(int, required=False, minimum=1),
    "max_steps": config.Field(int | None, required=False, minimum=1),
    "max_steps_per_epoch": config.Field(int | None, required=False, minimum=1),
    "clip_grad_norm": config.Field(float | None, required=False, minimum=0),
    "log_every_n_steps": config.Field(int, required=False, minimum=1),
    "resume_from_checkpoint": config.Field(bool | str, required=False),
    "compile": config.Field(bool, required=False),
    "enable_activation_checkpointing": config.Field(bool, required=False),
    "num_workers": config.Field(int, required=False, minimum=0),
    "cpu_offload": config.Field(bool, required=False),
    "expert_parallel_degree": config.Field(int, required=False, minimum=1),
    "lora": config.Component(required=False),
    "dataset": config.Component(provided=("tokenizer",)),
    "optimizer": config.Component(provided=("params",), expects=OPTIMIZER),
    "lr_scheduler": config.Component(required=False, provided=("optimizer", "num_training_steps")),
    "checkpointer": config.Component(provided=("output_dir",)),
    "metric_logger": config.Component(required=False, expects=METRIC_LOGGER),
    "metric_loggers": config.Component(required=False, expects=METRIC_LOGGER),
    "answer_check": config.Component(required=False),
}
"""The top-level keys every training recipe reads (its schema adds its own)."""

SAMPLING_KEYS = {
    "max_new_tokens": config.Field(int, required=False, minimum=1),
    "temperature": config.Field(float, required=False, minimum=0),
    "top_k": config.Field(int | None, required=False, minimum=1),
    "top_p": config.Field(float | None, required=False, minimum=0),
}
"""The keys of a recipe that samples from the model (generation, rollouts)."""


def sampling_options(cfg: Any, temperature: float) -> dict[str, Any]:
    """The sampling settings a config gives (:data:`SAMPLING_KEYS` but the length), as keyword
    arguments of :func:`attune.models.generate`; ``temperature`` when the config has none."""
    top_p = cfg.get("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(
            f"top_p={top_p} must be in (0, 1]: the share of probability mass sampled from "
            "(null: all of it)"
        )
    return {"temperature": cfg.get("temperature", temperature), "top_k": cfg.get("top_k"),
            "top_p": top_p}  # fmt: skip


VALIDATION_KEYS = {
    "eval_every_n_steps": config.Field(int | None, required=False, minimum=1),
    "validation_dataset": config.Component(required=False, provided=("tokenizer",)),
}
"""The keys of a recipe that measures held-out data as it trains."""
