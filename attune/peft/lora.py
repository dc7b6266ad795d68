"""LoRA, DoRA and QLoRA adapters on a model's linear layers.

:class:`LoRALinear` replaces an ``nn.Linear`` in place and keeps its ``weight`` and ``bias``
under the same names, so the model's state dict and HF key map still apply to the base weights;
the adapter adds ``lora_A.weight``, ``lora_B.weight`` and, for DoRA, ``lora_magnitude_vector``,
which are peft's names too.

    y = W x + b + s * B A dropout(x)                       (LoRA, s = alpha / r)
    y = b + (m / |W + s B A|) * (W + s B A) x              (DoRA, norms per output row)

``s = alpha / sqrt(r)`` with rsLoRA. QLoRA keeps the frozen ``W`` in 4-bit NF4 (torchao) and
computes in the activations' dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attune.errors import ConfigError
from attune.quantization import ao
from attune.suggest import did_you_mean

ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    """What to adapt and how (the ``lora`` config component).

    Args:
        rank: the adapters' rank ``r``.
        alpha: the scale numerator: updates are scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: linear layer names to adapt (``q_proj``, ``k_proj``, ``v_proj``,
            ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``), or
            ``all-linear`` for every linear layer except the output head (peft's meaning).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (a trained magnitude per output feature).
        quantize_base: QLoRA: keep the frozen base weights of adapted layers in NF4.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    use_rslora: bool = False
    use_dora: bool = False
    quantize_base: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    block = 64
    if weight.numel() % block:
        raise ConfigError(
            f"lora.quantize_base: a weight of shape {tuple(weight.shape)} does not split into "
            f"NF4 blocks of {block} values"
        )
    # torchao's default of 256 scalers per block, or fewer for small layers
    scaler_block = math.gcd(256, weight.numel() // block)
    return ao.to_nf4(weight, block, scaler_block)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: the layer to adapt (its weight and bias are taken over and frozen).
        rank, alpha, dropout, use_rslora, use_dora, quantize_base: see :class:`LoraSettings`.

    Shapes: ``[..., in_features]`` -> ``[..., out_features]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        quantize_base: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        weight = base.weight.detach()
        self.quantized = quantize_base
        self.weight = nn.Parameter(_nf4(weight) if quantize_base else weight, requires_grad=False)
        self.bias = (
            nn.Parameter(base.bias.detach(), requires_grad=False) if base.bias is not None else None
        )
        # skip nn.Linear's own random init: the only draw is reset_adapter's, so adapters get
        # the same values however the model is built (on a device, or on meta then sharded)
        factory = {"device": weight.device, "dtype": weight.dtype, "bias": False}
        self.lora_A = torch.nn.utils.skip_init(nn.Linear, self.in_features, rank, **factory)
        self.lora_B = torch.nn.utils.skip_init(nn.Linear, rank, self.out_features, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = (
            nn.Parameter(self.base_weight().norm(dim=1)) if use_dora else None
        )
        self.adapter_enabled = True  # off: the base layer alone (see disabled_adapters)
        # quantization-aware training sets these (attune.quantization.insert_fake_quantization):
        # the frozen base weight and the layer's input then pass through fake quantization
        self.activation_fake_quantizer: nn.Module | None = None
        self.weight_fake_quantizer: nn.Module | None = None
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """peft's initialisation: ``A`` Kaiming-uniform, ``B`` zero (so the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in the compute dtype (dequantized under QLoRA)."""
        if self.quantized:
            nf4: Any = self.weight  # torchao's NF4Tensor, which is untyped
            return nf4.get_original_weight().to(self.lora_A.weight.dtype)
        return self.weight

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return ao.linear_nf4(x, self.weight)
        if self.weight_fake_quantizer is not None:
            return F.linear(x, self.weight_fake_quantizer(self.weight))
        return F.linear(x, self.weight)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``: ``[out_features, in_features]``."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        base = self._base(x)
        if not self.adapter_enabled:
            return base if self.bias is None else base + self.bias
        adapter_input = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(adapter_input)) * self.scaling
        if self.lora_magnitude_vector is None:
            out = base + update
        else:
            # the norm is a constant in the backward pass, as in the DoRA paper and peft
            weight = self.base_weight()
            norm = (weight + self.delta_weight().detach().to(weight.dtype)).norm(dim=1).detach()
            scale = (self.lora_magnitude_vector / norm).to(base.dtype)
            plain = (
                base if isinstance(self.lora_dropout, nn.Identity) else self._base(adapter_input)
            )
            out = base + (scale - 1) * plain + scale * update
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain weight with the update folded in: ``[out_features, in_features]``."""
        weight = self.base_weight()
        merged = weight + self.delta_weight().to(weight.dtype)
        if self.lora_magnitude_vector is not None:
            merged = merged * (self.lora_magnitude_vector / merged.norm(dim=1))[:, None]
        return merged


def _targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if settings.target_modules == ALL_LINEAR:
        return [name for name in linear if name.rsplit(".", 1)[-1] not in ("lm_head", "score")]
    wanted = (
        [settings.target_modules]
        if isinstance(settings.target_modules, str)
        else list(settings.target_modules)
    )
    short_names = {name.rsplit(".", 1)[-1] for name in linear}
    for target in wanted:
        if target not in short_names:
            hint = did_you_mean(target, short_names)
            raise ConfigError(
                f"lora.target_modules: the model has no linear layer '{target}'{hint} (it has "
                f"{', '.join(sorted(short_names))}, or use {ALL_LINEAR})"
            )
    return [name for name in linear if name.rsplit(".", 1)[-1] in wanted]


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Replace the target linear layers with :class:`LoRALinear` and freeze everything else.

    Returns:
        The adapted layers' names (in the model's naming).
    """
    if getattr(model, "ties_embeddings", False) and "lm_head" in _short(settings):
        raise ConfigError(
            "lora.target_modules: lm_head is the embedding matrix in this model (tied "
            "embeddings); adapt the other layers"
        )
    targets = _targets(model, settings)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(
            getattr(parent, child),
            settings.rank,
            settings.alpha,
            settings.dropout,
            settings.use_rslora,
            settings.use_dora,
            settings.quantize_base,
        )
        setattr(parent, child, layer)
    return targets


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block: every :class:`LoRALinear` computes its
    frozen layer alone. This is the reference model of LoRA preference and RL training, with no
    second copy of the weights in memory."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


def _short(settings: LoraSettings) -> set[str]:
    targets = settings.target_modules
    return {targets} if isinstance(targets, str) else set(targets)


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter tensor (``lora_A``/``lora_B``/DoRA magnitude)."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors, under the model's names (``...q_proj.lora_A.weight``)."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_key(name)}


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as a plain tensor (QLoRA's NF4 weights dequantized)."""
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight


@torch.no_grad()
def merge_state_dict(
    state: Mapping[str, torch.Tensor], settings: LoraSettings
) -> dict[str, torch.Tensor]:
    """A LoRA model's (full) state dict as a plain model's: each adapted weight merged
    (``W + s B A``, or DoRA's ``m * (W + s B A) / |W + s B A|``), adapter tensors dropped."""
    merged = {name: tensor for name, tensor in state.items() if not is_adapter_key(name)}
    for name in state:
        if not name.endswith(".lora_A.weight"):
            continue
        layer = name.removesuffix(".lora_A.weight")
        weight = _dense(state[f"{layer}.weight"])
        a, b = state[name], state[f"{layer}.lora_B.weight"]
        update = weight + (settings.scaling * (b.float() @ a.float())).to(weight.dtype)
        magnitude = state.get(f"{layer}.lora_magnitude_vector")
        if magnitude is not None:
            update = update * (magnitude / update.norm(dim=1))[:, None]
        merged[f"{layer}.weight"] = update
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a plain model's: every adapted layer's weight merged, and no
    adapter tensors. The model itself is left as it is."""
    state = {name: t for name, t in model.state_dict().items() if not is_adapter_key(name)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        weight = module.merged_weight()
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model
