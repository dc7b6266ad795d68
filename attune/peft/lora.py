"""LoRA, DoRA and QLoRA adapters on a model's linear layers, and LoRA on the grouped weights of
a mixture of experts.

:class:`LoRALinear` replaces an ``nn.Linear`` in place and keeps its ``weight`` and ``bias``
under the same names, so the model's state dict and HF key map still apply to the base weights;
the adapter adds ``lora_A.weight``, ``lora_B.weight`` and, for DoRA, ``lora_magnitude_vector``,
which are peft's names too.

    y = W x + b + s * B A dropout(x)                       (LoRA, s = alpha / r)
    y = b + (m / |W + s B A|) * (W + s B A) x              (DoRA, norms per output row)

``s = alpha / sqrt(r)`` with rsLoRA. QLoRA keeps the frozen ``W`` in 4-bit NF4 (torchao) and
computes in the activations' dtype.

:class:`LoRAGroupedExperts` replaces a :class:`~attune.models.moe.GroupedExperts` in place: each
adapted projection ``P`` (``gate_up_proj``, ``down_proj``, ``[experts, out, in]``) gets one rank-r
adapter per expert, ``lora_A.P`` ``[experts, r, in]`` and ``lora_B.P`` ``[experts, out, r]``,
applied inside the grouped product (``y_e = W_e x + s B_e A_e x`` for expert ``e``'s rows, no
loop over experts). These are peft's ``target_parameters`` adapters (its ``ParamWrapper``), so
they take no dropout, DoRA or NF4 base.
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
from attune.models.moe import GroupedExperts, grouped_linear
from attune.quantization import ao
from attune.suggest import did_you_mean

ALL_LINEAR = "all-linear"
# the grouped expert weights LoRA adapts, in the order transformers 5 registers them on its
# experts modules (which is the order peft nests its wrappers of them: see attune.peft.adapter)
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass
class LoraSettings:
    """What to adapt and how (the ``lora`` config component).

    Args:
        rank: the adapters' rank ``r``.
        alpha: the scale numerator: updates are scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: linear layer names to adapt (``q_proj``, ``k_proj``, ``v_proj``,
            ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``), or
            ``all-linear`` for every linear layer except the output head (peft's meaning) and,
            on a mixture-of-experts model, the experts' grouped weights too (as if
            ``target_parameters`` named both). A MoE router is not a linear layer: it stays
            frozen. (peft's own ``all-linear`` on transformers 5 differs by model type: it
            adapts Qwen3-MoE's and Mixtral's routers too, with rank ``2r`` on ``gate_up_proj``,
            and Qwen2-MoE's experts not at all; attune's adapter folders list what they adapt,
            so peft loads exactly that.)
        target_parameters: grouped expert weights to adapt (peft's ``target_parameters``): a
            parameter's name or the end of it, ``mlp.experts.gate_up_proj`` and
            ``mlp.experts.down_proj``; every expert gets an adapter of its own. A linear
            layer's weight (``down_proj.weight``) adapts that layer, as ``target_modules``
            would. Adapters on parameters take no dropout and no DoRA.
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
    target_parameters: Sequence[str] = ()
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


class _LowRankAdaptedLinear(torch.autograd.Function):
    """``x W^T + s (a A^T) B^T`` for a frozen ``W``, with the adapters' skinny products laid out
    the way the CPU's GEMMs run fast.

    Autograd's own backward of ``B (A a)`` takes ``B``'s gradient as ``g^T @ low`` and the rank-r
    input gradient as ``g @ B``: on a CPU these ``[out, tokens] x [tokens, r]`` products run
    several times slower than the same products transposed (measured at the anchors' model's
    shapes: 8.7 ms against 1.0 ms for a 1,408-wide projection over 2,048 tokens). Here they are
    computed transposed, and the frozen output and the update, and the two input gradients
    when ``a`` is ``x``, are summed by an in-place ``addmm_``.

    ``a`` is None when it is ``x`` (no dropout): the same tensor passed twice would stop
    ``torch.compile`` tracing the function (a graph break around every adapted projection).

    Shapes: ``x``, ``a`` ``[tokens, in]``; ``W`` ``[out, in]``; ``A`` ``[r, in]``; ``B``
    ``[out, r]`` -> ``[tokens, out]``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        adapter_input: torch.Tensor | None,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        ctx.same_input = adapter_input is None
        if adapter_input is None:
            adapter_input = x
        low = (adapter_input @ lora_a.t()) * scaling
        ctx.scaling = scaling
        ctx.save_for_backward(adapter_input, weight, lora_a, lora_b, low)
        # in place: addmm would first copy the fresh [tokens, out] product into its result
        return (x @ weight.t()).addmm_(low, lora_b.t())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        adapter_input, weight, lora_a, lora_b, low = ctx.saved_tensors
        grad_b = (low.t() @ grad).t()
        grad_low = (lora_b.t() @ grad.t()).t() * ctx.scaling  # [tokens, r]
        grad_a = grad_low.t() @ adapter_input
        grad_x = grad_adapter_input = None
        if ctx.same_input:
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ weight).addmm_(grad_low, lora_a)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = grad @ weight
            if ctx.needs_input_grad[1]:
                grad_adapter_input = grad_low @ lora_a
        return grad_x, grad_adapter_input, None, grad_a, grad_b, None


class _LowRankAdaptedLinears(torch.autograd.Function):
    """Several frozen projections of one input with their rank-r updates, the adapters' input
    side computed once for all: ``y_i = x W_i^T + s (x A_i^T) B_i^T``.

    The ``A`` matrices are stacked (``[n r, in]``), so the input is read by one skinny product
    instead of one per projection, in the forward (``x A^T``) and twice in the backward (``A``'s
    gradient and the input gradient's low-rank part); the input gradient of every projection is
    summed in place. On the anchors' model (queries, keys and values over 2,048 tokens,
    forward and backward) 36.8 ms against 41.8 ms as three :class:`_LowRankAdaptedLinear`.

    Shapes: ``x`` ``[tokens, in]``; ``W_i`` ``[out_i, in]``; ``A_i`` ``[r, in]``; ``B_i``
    ``[out_i, r]`` -> a tuple of ``[tokens, out_i]``. ``tensors`` is ``W_1..W_n, A_1..A_n,
    B_1..B_n``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scaling: float, *tensors: torch.Tensor) -> Any:
        count = len(tensors) // 3
        weights, lora_a, lora_b = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        rank = lora_a[0].shape[0]
        stacked_a = torch.cat(lora_a)
        low = (x @ stacked_a.t()).mul_(scaling)  # [tokens, n r]
        outs = tuple(
            (x @ weight.t()).addmm_(low[:, i * rank : (i + 1) * rank], b.t())
            for i, (weight, b) in enumerate(zip(weights, lora_b, strict=True))
        )
        ctx.scaling, ctx.count, ctx.rank = scaling, count, rank
        ctx.save_for_backward(x, stacked_a, low, *weights, *lora_b)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, stacked_a, low, *rest = ctx.saved_tensors
        count, rank = ctx.count, ctx.rank
        weights, lora_b = rest[:count], rest[count:]
        # the rank-r gradients, transposed: [n r, tokens], each projection's r rows written by
        # the fast layout of _LowRankAdaptedLinear's backward
        grad_low_t = x.new_zeros(count * rank, x.shape[0])
        grad_b: list[torch.Tensor | None] = []
        grad_x: torch.Tensor | None = None
        for i, grad in enumerate(grads):
            if grad is None:
                grad_b.append(None)
                continue
            rows = slice(i * rank, (i + 1) * rank)
            grad_b.append((low[:, rows].t() @ grad).t())
            torch.mm(lora_b[i].t(), grad.t(), out=grad_low_t[rows])
            if ctx.needs_input_grad[0]:
                grad_x = grad @ weights[i] if grad_x is None else grad_x.addmm_(grad, weights[i])
        grad_low_t.mul_(ctx.scaling)
        grad_a = (grad_low_t @ x).split(rank)
        if grad_x is not None:
            grad_x.addmm_(grad_low_t.t(), stacked_a)
        return (grad_x, None, *([None] * count), *grad_a, *grad_b)


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

    def _plain_lora(self, x: torch.Tensor) -> bool:
        """Whether the fused path computes this layer: LoRA on a plain frozen weight, outside
        autocast, with nothing hooked on the adapters (DoRA, QLoRA and QAT take the modules)."""
        return (
            self.lora_magnitude_vector is None
            and not self.quantized
            and self.weight_fake_quantizer is None
            and not self.weight.requires_grad
            and type(self.lora_A) is nn.Linear
            and type(self.lora_B) is nn.Linear
            and not (self.lora_A._forward_hooks or self.lora_A._forward_pre_hooks)
            and not (self.lora_B._forward_hooks or self.lora_B._forward_pre_hooks)
            and not torch.is_autocast_enabled(x.device.type)
        )

    @staticmethod
    def project_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor] | None:
        """Each of ``layers``' outputs for the one input ``x``, the adapters' input side computed
        once for all (:class:`_LowRankAdaptedLinears`), or None where a layer needs its own
        forward (DoRA, QLoRA, QAT, dropout, hooks, autocast, adapters off, mixed ranks or
        scales): :func:`attune.models.layers.project` then calls each.

        Shapes: ``[..., in_features]`` -> ``[..., out_features_i]`` for each layer.
        """
        first = layers[0]
        if not (
            isinstance(first, LoRALinear)
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks
        ):
            return None
        plain = [
            layer
            for layer in layers
            if isinstance(layer, LoRALinear)
            and layer.adapter_enabled
            and layer._plain_lora(x)
            and layer.activation_fake_quantizer is None
            and isinstance(layer.lora_dropout, nn.Identity)
            and not (layer._forward_hooks or layer._forward_pre_hooks)
            and layer.scaling == first.scaling
            and layer.in_features == first.in_features
            and layer.lora_A.weight.shape[0] == first.lora_A.weight.shape[0]
        ]
        if len(plain) != len(layers) or len(plain) < 2:
            return None
        flat = x.reshape(-1, first.in_features)
        outs = _LowRankAdaptedLinears.apply(
            flat,
            first.scaling,
            *(layer.weight for layer in plain),
            *(layer.lora_A.weight for layer in plain),
            *(layer.lora_B.weight for layer in plain),
        )
        shaped = [
            (out.view(*x.shape[:-1], layer.out_features), layer.bias)
            for out, layer in zip(outs, plain, strict=True)
        ]
        return [out if bias is None else out + bias for out, bias in shaped]

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``: ``[out_features, in_features]``."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        if self.adapter_enabled and self._plain_lora(x):
            adapter_input = self.lora_dropout(x)
            flat = x.reshape(-1, self.in_features)
            out = _LowRankAdaptedLinear.apply(
                flat,
                None if adapter_input is x else adapter_input.reshape(-1, self.in_features),
                self.weight,
                self.lora_A.weight,
                self.lora_B.weight,
                self.scaling,
            ).view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        base = self._base(x)
        if not self.adapter_enabled:
            return base if self.bias is None else base + self.bias
        adapter_input = self.lora_dropout(x)
        # scaled on the rank-r side: the same update, r values a position multiplied instead of
        # out_features (a [tokens, out] elementwise pass saved per projection)
        update = self.lora_B(self.lora_A(adapter_input) * self.scaling)
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


class LoRAGroupedExperts(GroupedExperts):
    """Grouped experts (frozen) plus a trainable rank-r update per expert on each adapted
    projection, added inside the grouped product.

    Args:
        base: the experts to adapt (their weights are taken over and frozen).
        projections: which of ``gate_up_proj`` and ``down_proj`` to adapt.
        rank, alpha, use_rslora: see :class:`LoraSettings`.

    Each adapted projection ``P`` of ``[experts, out, in]`` gets ``lora_A[P]`` of
    ``[experts, r, in]`` (peft's initialisation, per expert) and ``lora_B[P]`` of
    ``[experts, out, r]`` (zeros), so the update starts at 0.
    """

    def __init__(
        self,
        base: GroupedExperts,
        projections: Sequence[str],
        rank: int,
        alpha: float,
        use_rslora: bool = False,
    ):
        nn.Module.__init__(self)
        # take over the experts as they are (their settings, submodules and frozen weights)
        for key, value in vars(base).items():
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        for name, weight in base.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(weight.detach(), requires_grad=False))
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in projections:
            weight = getattr(self, name)
            experts, out_features, in_features = weight.shape
            factory = {"device": weight.device, "dtype": weight.dtype}
            self.lora_A[name] = nn.Parameter(torch.empty(experts, rank, in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.empty(experts, out_features, rank, **factory))
        self.adapter_enabled = True  # off: the experts alone (see disabled_adapters)
        self.reset_adapter()

    @property
    def projections(self) -> list[str]:
        """The adapted projections, in :data:`EXPERT_PROJECTIONS`' order."""
        return [name for name in EXPERT_PROJECTIONS if name in self.lora_A]

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """Fresh adapter values, full size, on the CPU in float32, by parameter name
        (``lora_A.gate_up_proj``...): ``A`` as peft draws its ``[experts x r, in]`` matrix
        (Kaiming-uniform, bound ``1 / sqrt(in)``), ``B`` zeros. For a model built on the meta
        device, whose shards take their slices of these."""
        values = {}
        for name in self.projections:
            a = self.lora_A[name]
            drawn = torch.empty(a.shape[0] * a.shape[1], a.shape[2])
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
            values[f"lora_A.{name}"] = drawn.view(a.shape)
            values[f"lora_B.{name}"] = torch.zeros(self.lora_B[name].shape)
        return values

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """peft's initialisation (see :meth:`initial_adapter`); nothing is drawn on the meta
        device, where the values come later, once."""
        if any(p.is_meta for p in self.lora_A.values()):
            return
        for name, value in self.initial_adapter().items():
            self.get_parameter(name).copy_(value)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B_e A_e`` for every expert: ``[experts, out, in]``."""
        return self.scaling * torch.bmm(self.lora_B[name], self.lora_A[name])

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """The projection's weight with the update folded in: ``[experts, out, in]``."""
        weight: torch.Tensor = getattr(self, name)
        if name not in self.lora_A:
            return weight
        return weight + self.delta_weight(name).to(weight.dtype)

    def project(self, name: str, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = grouped_linear(rows, self.local(getattr(self, name)), counts)
        if not self.adapter_enabled or name not in self.lora_A:
            return out
        # this process's experts' adapters (all of them but under expert parallelism)
        a, b = self.local(self.lora_A[name]), self.local(self.lora_B[name])
        # grouped products need 16-byte strides: zero ranks padded on (rank 8 covers float32,
        # bfloat16 and float16) add nothing to the update
        pad = -self.rank % 8
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        update = grouped_linear(grouped_linear(rows, a, counts), b, counts)
        return out + update * self.scaling


def _plain_experts(module: LoRAGroupedExperts) -> GroupedExperts:
    """The experts with every adapter folded in, as a plain :class:`GroupedExperts`."""
    plain = GroupedExperts.__new__(GroupedExperts)
    nn.Module.__init__(plain)
    adapter_attributes = ("rank", "scaling", "adapter_enabled")
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in adapter_attributes:
            setattr(plain, key, value)
    for name, child in module.named_children():
        if name not in ("lora_A", "lora_B"):
            plain.add_module(name, child)
    for name, buffer in module.named_buffers(recurse=False):
        plain.register_buffer(name, buffer)
    for name, _ in module.named_parameters(recurse=False):
        plain.register_parameter(name, nn.Parameter(module.merged_weight(name)))
    return plain


def _linear_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
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
            if target in EXPERT_PROJECTIONS and experts_modules(model):
                hint = (
                    f" (the experts' {target} is a grouped weight, not a linear layer: name it "
                    f"in lora.target_parameters, e.g. mlp.experts.{target})"
                )
            raise ConfigError(
                f"lora.target_modules: the model has no linear layer '{target}'{hint} (it has "
                f"{', '.join(sorted(short_names))}, or use {ALL_LINEAR})"
            )
    return [name for name in linear if name.rsplit(".", 1)[-1] in wanted]


def experts_modules(model: nn.Module) -> list[str]:
    """The names of the model's grouped experts modules (none in a dense model)."""
    return [name for name, module in model.named_modules() if isinstance(module, GroupedExperts)]


def _parameter_targets(model: nn.Module, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """The linear layers and the expert weights (``...experts.gate_up_proj``) that
    ``target_parameters`` names, each entry a parameter's full name or its end (peft's rule)."""
    targets = (
        [settings.target_parameters]
        if isinstance(settings.target_parameters, str)
        else list(settings.target_parameters)
    )
    linear, experts = [], []
    for target in targets:
        matched = [
            (module_name, module, parameter)
            for module_name, module in model.named_modules()
            for parameter, _ in module.named_parameters(recurse=False)
            if f"{module_name}.{parameter}" == target
            or f"{module_name}.{parameter}".endswith(f".{target}")
        ]
        if not matched:
            if not experts_modules(model):
                hint = "; this model has no experts (name its linear layers in target_modules)"
            else:
                names = [f"mlp.experts.{name}" for name in EXPERT_PROJECTIONS]
                hint = did_you_mean(target, names) + f" (it has {', '.join(names)})"
            raise ConfigError(
                f"lora.target_parameters: the model has no parameter '{target}'{hint}"
            )
        for module_name, module, parameter in matched:
            if isinstance(module, GroupedExperts) and parameter in EXPERT_PROJECTIONS:
                experts.append(f"{module_name}.{parameter}")
            elif isinstance(module, nn.Linear) and parameter == "weight":
                linear.append(module_name)
            else:
                raise ConfigError(
                    f"lora.target_parameters: '{target}' names {module_name}.{parameter}, which "
                    "LoRA does not adapt: it adapts the experts' grouped weights "
                    f"({', '.join(EXPERT_PROJECTIONS)}) and linear layers' weights; a router "
                    "(mlp.gate) stays frozen"
                )
    return linear, experts


def _check_expert_settings(settings: LoraSettings, experts: list[str]) -> None:
    """Adapters on grouped expert weights are plain LoRA (peft's ParamWrapper is too)."""
    if not experts:
        return
    leave_out = (
        f"; or name lora.target_modules instead of {ALL_LINEAR} to leave the experts out"
        if settings.target_modules == ALL_LINEAR and not settings.target_parameters
        else ""
    )
    where = f"the experts' grouped weights ({experts[0]}...)"
    if settings.dropout > 0:
        raise ConfigError(
            f"lora.dropout={settings.dropout}: adapters on {where} take no dropout (it cannot "
            f"be factored out of a grouped product; peft refuses it too); set lora.dropout=0"
            f"{leave_out}"
        )
    if settings.use_dora:
        raise ConfigError(
            f"lora.use_dora: DoRA is not supported on {where} (nor by peft); set "
            f"lora.use_dora=false{leave_out}"
        )
    if settings.quantize_base:
        raise ConfigError(
            f"lora.quantize_base: QLoRA keeps linear layers in NF4, not {where}; set "
            f"lora.quantize_base=false{leave_out}"
        )


def _targets(model: nn.Module, settings: LoraSettings) -> tuple[list[str], dict[str, list[str]]]:
    """The linear layers to adapt, and per experts module the projections to adapt; both in the
    model's module order (the order adapters are drawn in)."""
    linear = set(_linear_targets(model, settings))
    named_linear, named_experts = _parameter_targets(model, settings)
    linear.update(named_linear)
    experts = set(named_experts)
    if settings.target_modules == ALL_LINEAR:
        experts.update(f"{m}.{p}" for m in experts_modules(model) for p in EXPERT_PROJECTIONS)
    if named_linear and (settings.dropout > 0 or settings.use_dora):
        raise ConfigError(
            "lora.target_parameters: adapters on parameters take no dropout and no DoRA (as "
            "peft's); name the linear layers in lora.target_modules instead"
        )
    ordered = [name for name, _ in model.named_modules()]
    projections: dict[str, list[str]] = {}
    for module in ordered:
        chosen = [p for p in EXPERT_PROJECTIONS if f"{module}.{p}" in experts]
        if chosen:
            projections[module] = chosen
    _check_expert_settings(settings, [f"{m}.{p[0]}" for m, p in projections.items()])
    return [name for name in ordered if name in linear], projections


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Replace the target linear layers with :class:`LoRALinear` and the target experts with
    :class:`LoRAGroupedExperts`, and freeze everything else (routers included).

    Returns:
        The adapted layers' names (in the model's naming): linear layers, and experts modules'
        adapted weights (``layers.0.mlp.experts.gate_up_proj``).
    """
    tied = getattr(model, "ties_embeddings", False)
    if tied and "lm_head" in _short(settings):
        raise ConfigError(
            "lora.target_modules: lm_head is the embedding matrix in this model (tied "
            "embeddings); adapt the other layers"
        )
    linear, experts = _targets(model, settings)
    if tied and "lm_head" in linear:
        raise ConfigError(
            "lora.target_parameters: lm_head is the embedding matrix in this model (tied "
            "embeddings); adapt the other layers"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    # in module order, so that adapters are drawn in the same order however they are built
    order = [name for name, _ in model.named_modules() if name in experts or name in linear]
    for name in order:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer: nn.Module
        if name in experts:
            layer = LoRAGroupedExperts(
                getattr(parent, child),
                experts[name],
                settings.rank,
                settings.alpha,
                settings.use_rslora,
            )
        else:
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
    return [
        target
        for name in order
        for target in ([f"{name}.{p}" for p in experts[name]] if name in experts else [name])
    ]


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block: every :class:`LoRALinear` computes its
    frozen layer alone, every :class:`LoRAGroupedExperts` its frozen experts. This is the
    reference model of LoRA preference and RL training, with no second copy of the weights in
    memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear | LoRAGroupedExperts)]
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
    """The trainable adapter tensors, under the model's names (``...q_proj.lora_A.weight``,
    ``...experts.lora_A.gate_up_proj``)."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_key(name)}


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as a plain tensor (QLoRA's NF4 weights dequantized)."""
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight


@torch.no_grad()
def merge_state_dict(
    state: Mapping[str, torch.Tensor], settings: LoraSettings
) -> dict[str, torch.Tensor]:
    """A LoRA model's (full) state dict as a plain model's: each adapted weight merged
    (``W + s B A``, or DoRA's ``m * (W + s B A) / |W + s B A|``; per expert ``W_e + s B_e A_e``
    for grouped expert weights), adapter tensors dropped."""
    merged = {name: tensor for name, tensor in state.items() if not is_adapter_key(name)}
    for name in state:
        if ".lora_A." not in name:
            continue
        # X.lora_A.weight adapts X.weight (a linear layer); X.lora_A.P adapts X.P (experts)
        owner, _, leaf = name.rpartition(".lora_A.")
        weight = _dense(state[f"{owner}.{leaf}"])
        a, b = state[name].float(), state[f"{owner}.lora_B.{leaf}"].float()
        product = torch.bmm(b, a) if a.dim() == 3 else b @ a
        update = weight + (settings.scaling * product).to(weight.dtype)
        magnitude = state.get(f"{owner}.lora_magnitude_vector")
        if magnitude is not None:
            update = update * (magnitude / update.norm(dim=1))[:, None]
        merged[f"{owner}.{leaf}"] = update
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a plain model's: every adapted layer's weight merged, and no
    adapter tensors. The model itself is left as it is."""
    state = {name: t for name, t in model.state_dict().items() if not is_adapter_key(name)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
        if isinstance(module, LoRAGroupedExperts):
            for projection in module.projections:
                state[f"{name}.{projection}"] = module.merged_weight(projection)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers (and
    :class:`~attune.models.moe.GroupedExperts`) back."""
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, LoRAGroupedExperts):
            experts = _plain_experts(module)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, experts)
            continue
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
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model
