"""Memory and speed settings for a model about to train: activation checkpointing and
``torch.compile`` per layer."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.layers


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
