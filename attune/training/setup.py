"""Everything that builds what a training recipe trains: the model (sharded under torchrun, with
adapters, fake quantizers, activation checkpointing, compiled layers), the tokenizer and
checkpointer beside it (:func:`setup_training`, the one entry point), the optimizer, its
schedule and the loop (:func:`training_loop`), the frozen reference of preference and RL
methods, and the model of an inference recipe (:func:`inference_model`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from attune import config
from attune.config import instantiate
from attune.errors import CheckpointError, ConfigError
from attune.models import TransformerDecoder, load_weights
from attune.peft import LoraSettings, apply_lora, is_adapter_key, load_adapter
from attune.quantization import QuantizationScheme, insert_fake_quantization
from attune.tokenizer import Tokenizer
from attune.training.checkpoint_state import resume_point
from attune.training.checkpointer import Checkpointer
from attune.training.data import BatchStream
from attune.training.loop import TrainingLoop, total_steps
from attune.training.optim import build_optimizer
from attune.training.run import Run
from attune.training.runtime import resolve_dtype
from attune.training.sharding import check_expert_parallel, materialize, shard_model


def build_model(
    node: Any,
    run: Run,
    lora: LoraSettings | None = None,
    weights: str | Path | None = None,
    cpu_offload: bool = False,
    fake_quantization: QuantizationScheme | None = None,
    dtype: torch.dtype | None = None,
    expert_parallel_degree: int = 1,
) -> TransformerDecoder:
    """Build the ``model`` component for this process, with LoRA adapters when given.

    On one process the model loads as the component loads it. Under torchrun it is built on
    the meta device, sharded with FSDP2 (per layer, then the root), and each process loads
    only its shards; adapters start with the values one process would give them.

    Args:
        node: the ``model`` config component (called with ``dtype`` and ``device``).
        run: the run.
        lora: adapter settings, or None for full training.
        weights: a HF folder to load the weights from instead of the model's own (the
            checkpoint a full run resumes from).
        cpu_offload: keep sharded parameters and optimizer state on the CPU.
        fake_quantization: quantization-aware training under this scheme: fake quantizers
            go in before sharding (FSDP2 then holds the swapped layers' parameters).
        dtype: the weights' dtype, if not the run's (a distillation teacher's).
        expert_parallel_degree: split a mixture of experts' experts over groups of this many
            processes (1: none; see :func:`~attune.training.sharding.split_experts`).
    """
    distributed = run.world.distributed
    device = "meta" if distributed else run.device
    model = instantiate(node, dtype=dtype or run.dtype, device=device)
    if lora is not None:
        apply_lora(model, lora)
    if fake_quantization is not None:
        insert_fake_quantization(model, fake_quantization)
    try:
        if distributed:
            compute = resolve_dtype(run.autocast) if run.autocast else None
            shard_model(model, run.world, compute, cpu_offload, expert_parallel_degree)
            materialize(model, run.device, weights or model.config.source, lora)
        else:
            check_expert_parallel(model, 1, expert_parallel_degree)
            if weights is not None:
                load_weights(model, weights, ignore=is_adapter_key)
    except CheckpointError as error:
        if weights is None:
            raise
        # a checkpoint of another model (another hidden size, layer count...): say which
        # checkpoint, not only which tensor
        raise CheckpointError(
            f"cannot resume from {weights}: its weights do not load into this run's model "
            f"({error}); resume with the model it was trained with, or train afresh in another "
            "output_dir"
        ) from None
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = model.layers
    assert isinstance(layers, nn.ModuleList), "a decoder keeps its layers in a ModuleList"
    return layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them. The composable API leaves parameter names unchanged, so checkpoints and adapters
    keep their keys."""
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(model):
        checkpoint(layer)


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer (they share one compiled graph, since they have the
    same structure), which compiles faster than the whole model and keeps its Python loop."""
    for layer in decoder_layers(model):
        layer.compile()


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (param for param in model.parameters() if param.requires_grad)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def describe_counts(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    share = 100 * trainable / max(total, 1)
    return f"{trainable:,} of {total:,} parameters trainable ({share:.2f}%)"


def inference_model(
    cfg: Any, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, LoraSettings | None]:
    """The ``model`` component in eval mode, with the peft adapter folder ``adapter`` applied
    when the config names one (and that adapter's settings, else None)."""
    model = config.instantiate(cfg.model, dtype=dtype, device=device)
    lora = load_adapter(model, cfg.adapter) if cfg.get("adapter") else None
    model.eval()
    return model, lora


@dataclass(frozen=True)
class TrainingSetup:
    """What a training recipe starts from (see :func:`setup_training`).

    Attributes:
        tokenizer: the config's tokenizer.
        lora: the adapter settings of a LoRA run, else None.
        checkpointer: where the run's checkpoints go.
        resume_from: the checkpoint the run continues from, or None for a fresh run.
        model: the model prepared for training (sharded under torchrun, adapters in).
    """

    tokenizer: Tokenizer
    lora: LoraSettings | None
    checkpointer: Checkpointer
    resume_from: Path | None
    model: TransformerDecoder


def setup_training(
    cfg: Any, run: Run, fake_quantization: QuantizationScheme | None = None
) -> TrainingSetup:
    """The config's tokenizer, LoRA settings and checkpointer, the checkpoint to resume from
    (with ``resume_from_checkpoint``), and the model built for training (:func:`build_model`:
    from the resumed checkpoint's weights for a full run, fake-quantized under
    ``fake_quantization`` for QAT), with activation checkpointing and ``torch.compile`` when the
    config asks for them."""
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
    model = build_model(
        cfg.model,
        run,
        lora,
        weights=resumed_from if lora is None else None,
        cpu_offload=cfg.get("cpu_offload", False),
        fake_quantization=fake_quantization,
        expert_parallel_degree=cfg.get("expert_parallel_degree", 1),
    )
    if cfg.get("enable_activation_checkpointing"):
        apply_activation_checkpointing(model)
    if cfg.get("compile"):
        compile_layers(model)
    run.print(describe_counts(model))
    return TrainingSetup(tokenizer, lora, checkpointer, resumed_from, model)


def training_loop(
    cfg: Any,
    run: Run,
    setup: TrainingSetup,
    stream: BatchStream,
    companions: Mapping[str, TransformerDecoder] | None = None,
    updates_per_step: int = 1,
) -> TrainingLoop:
    """The optimizer over the model's trainable parameters (and its ``companions'``), its
    schedule, and the loop over ``stream`` for the config's epochs and steps, resumed from
    ``setup.resume_from`` when the run continues one.

    Args:
        cfg: the recipe's config.
        run: the run.
        setup: what :func:`setup_training` built.
        stream: the training batches.
        companions: models trained beside the main one by the same optimizer (PPO's value
            model), saved in each checkpoint as ``<name>/``.
        updates_per_step: optimizer steps the recipe takes per step of the loop (PPO's
            epochs times minibatches); the schedule counts optimizer steps.
    """
    model = setup.model
    epochs = cfg.get("epochs", 1)
    steps = total_steps(stream, epochs, cfg.get("max_steps"))
    # named, so that norms and biases can go without weight decay (as transformers' Trainer)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for key, companion in (companions or {}).items():
        named += [(f"{key}.{n}", p) for n, p in companion.named_parameters() if p.requires_grad]
    params = [param for _, param in named]
    optimizer = build_optimizer(cfg.optimizer, named)
    scheduler = config.instantiate(
        cfg.get("lr_scheduler"), optimizer=optimizer, num_training_steps=steps * updates_per_step
    )
    loop = TrainingLoop(
        run,
        model,
        params,
        optimizer,
        scheduler,
        stream,
        setup.checkpointer,
        setup.lora,
        total_steps=steps,
        epochs=epochs,
        log_every=cfg.get("log_every_n_steps", 1),
        companions=companions,
        metric_loggers=metric_loggers(cfg),
        hyperparameters=_hyperparameters(cfg),
    )
    if setup.resume_from is not None:
        loop.resume(setup.resume_from)
    return loop


def _hyperparameters(cfg: Any) -> dict[str, Any]:
    """The resolved config, as the trackers record it."""
    if isinstance(cfg, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def metric_loggers(cfg: Any) -> list[tuple[str, Any]]:
    """The config's trackers, named by where it gives them: ``metric_logger`` (one, or a
    list) and ``metric_loggers`` (a list, or one)."""
    built = []
    for key in ("metric_logger", "metric_loggers"):
        node = cfg.get(key)
        if node is None:
            continue
        if OmegaConf.is_list(node) or isinstance(node, list):
            built += [(f"{key}.{i}", config.instantiate(item)) for i, item in enumerate(node)]
        else:
            built.append((key, config.instantiate(node)))
    return built


def reference_model(
    cfg: Any, run: Run, policy: torch.nn.Module, lora: LoraSettings | None
) -> tuple[torch.nn.Module, bool]:
    """The frozen reference of preference and RL training: for a LoRA run the policy itself,
    to run with its adapters off (no second copy of the weights); otherwise a frozen copy of
    the starting ``model`` (sharded like the policy). Returns the model and whether its
    adapters are to be switched off."""
    if lora is not None:
        return policy, True
    reference = build_model(cfg.model, run, cpu_offload=cfg.get("cpu_offload", False))
    reference.requires_grad_(False)
    return reference, False
