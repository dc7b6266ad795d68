"""What every training recipe reads from its config and builds the same way: the keys of a run,
the model prepared for training, the optimizer and its schedule, and the loop.

A recipe's schema is :data:`TRAINING_KEYS` plus its own keys::

    SCHEMA = {**training.TRAINING_KEYS, "loss": config.Component(required=False), ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from attune import config
from attune.errors import ConfigError
from attune.peft import LoraSettings, load_adapter
from attune.quantization import QuantizationScheme
from attune.tokenizer import Tokenizer
from attune.training.checkpointer import Checkpointer
from attune.training.data import BatchStream
from attune.training.loop import TrainingLoop, total_steps
from attune.training.metrics import METRIC_LOGGER
from attune.training.model_setup import (
    apply_activation_checkpointing,
    compile_layers,
    describe_counts,
    trainable_parameters,
)
from attune.training.optim import OPTIMIZER, build_optimizer
from attune.training.run import Run, resume_point, setup_model

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
    "lora": config.Component(required=False),
    "dataset": config.Component(provided=("tokenizer",)),
    "optimizer": config.Component(provided=("params",), expects=OPTIMIZER),
    "lr_scheduler": config.Component(required=False, provided=("optimizer", "num_training_steps")),
    "checkpointer": config.Component(provided=("output_dir",)),
    "metric_logger": config.Component(required=False, expects=METRIC_LOGGER),
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

VALIDATION_KEYS = {
    "eval_every_n_steps": config.Field(int | None, required=False, minimum=1),
    "validation_dataset": config.Component(required=False, provided=("tokenizer",)),
}
"""The keys of a recipe that measures held-out data as it trains."""


def model_to_use(
    cfg: Any, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, LoraSettings | None]:
    """The ``model`` component in eval mode, with the peft adapter folder ``adapter`` applied
    when the config names one (and that adapter's settings, else None)."""
    model = config.instantiate(cfg.model, dtype=dtype, device=device)
    lora = load_adapter(model, cfg.adapter) if cfg.get("adapter") else None
    model.eval()
    return model, lora


class TrainingSetup(NamedTuple):
    """What a training recipe starts from (see :func:`setup_training`)."""

    tokenizer: Tokenizer
    lora: LoraSettings | None
    checkpointer: Checkpointer
    resumed_from: Path | None
    model: torch.nn.Module


def setup_training(
    cfg: Any, run: Run, fake_quantization: QuantizationScheme | None = None
) -> TrainingSetup:
    """The config's tokenizer, LoRA settings and checkpointer, the checkpoint to resume from
    (with ``resume_from_checkpoint``), and the model prepared for training
    (:func:`prepare_model`), fake-quantized under ``fake_quantization`` for QAT."""
    tokenizer = config.instantiate(cfg.tokenizer)
    lora = config.instantiate(cfg.get("lora"))
    if fake_quantization is not None and lora is not None and lora.quantize_base:
        raise ConfigError(
            "lora.quantize_base (QLoRA's NF4 base) and quantization (QAT) both quantize the "
            "base weights; keep one of them"
        )
    checkpointer = config.instantiate(cfg.checkpointer, output_dir=run.output_dir)
    checkpointer.tokenizer = tokenizer  # checkpoints carry its chat template and stop tokens
    resumed_from = resume_point(checkpointer, cfg.get("resume_from_checkpoint"))
    model = prepare_model(cfg, run, lora, resumed_from, fake_quantization)
    return TrainingSetup(tokenizer, lora, checkpointer, resumed_from, model)


def prepare_model(
    cfg: Any,
    run: Run,
    lora: LoraSettings | None,
    resumed_from: Path | None,
    fake_quantization: QuantizationScheme | None = None,
) -> torch.nn.Module:
    """The ``model`` component built for this run (sharded under torchrun, with ``lora``'s
    adapters and ``fake_quantization``'s fake quantizers, from the resumed checkpoint's weights
    for a full run), with activation checkpointing and ``torch.compile`` when the config asks
    for them."""
    model = setup_model(
        cfg.model,
        run,
        lora,
        weights=resumed_from if lora is None else None,
        cpu_offload=cfg.get("cpu_offload", False),
        fake_quantization=fake_quantization,
    )
    if cfg.get("enable_activation_checkpointing"):
        apply_activation_checkpointing(model)
    if cfg.get("compile"):
        compile_layers(model)
    run.print(describe_counts(model))
    return model


def training_loop(
    cfg: Any,
    run: Run,
    model: torch.nn.Module,
    stream: BatchStream,
    checkpointer: Checkpointer,
    lora: LoraSettings | None,
    companions: Mapping[str, torch.nn.Module] | None = None,
    updates_per_step: int = 1,
) -> TrainingLoop:
    """The optimizer over ``model``'s trainable parameters (and its ``companions'``), its
    schedule, and the loop over ``stream`` for the config's epochs and steps.

    Args:
        updates_per_step: optimizer steps the recipe takes per step of the loop (PPO's
            epochs times minibatches); the schedule counts optimizer steps.
    """
    epochs = cfg.get("epochs", 1)
    steps = total_steps(stream, epochs, cfg.get("max_steps"))
    params = list(trainable_parameters(model))
    for companion in (companions or {}).values():
        params += list(trainable_parameters(companion))
    optimizer = build_optimizer(cfg.optimizer, params)
    scheduler = config.instantiate(
        cfg.get("lr_scheduler"), optimizer=optimizer, num_training_steps=steps * updates_per_step
    )
    return TrainingLoop(
        run,
        model,
        params,
        optimizer,
        scheduler,
        stream,
        checkpointer,
        lora,
        total_steps=steps,
        epochs=epochs,
        log_every=cfg.get("log_every_n_steps", 1),
        metric_logger=config.instantiate(cfg.get("metric_logger")),
        companions=companions,
    )


def reference_model(
    cfg: Any, run: Run, policy: torch.nn.Module, lora: LoraSettings | None
) -> tuple[torch.nn.Module, bool]:
    """The frozen reference of preference and RL training: for a LoRA run the policy itself,
    to run with its adapters off (no second copy of the weights); otherwise a frozen copy of
    the starting ``model`` (sharded like the policy). Returns the model and whether its
    adapters are to be switched off."""
    if lora is not None:
        return policy, True
    reference = setup_model(cfg.model, run, cpu_offload=cfg.get("cpu_offload", False))
    reference.requires_grad_(False)
    return reference, False
