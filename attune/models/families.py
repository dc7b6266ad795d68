"""Model families: how each HF ``model_type`` maps its ``config.json`` onto a DecoderConfig.

A family registers with :func:`register_family`, giving the function that reads its config and,
when its checkpoint differs from the decoder's layout, the tensor maps both ways. Llama-shaped
families need none: the decoder's names are HF's without the ``model.`` prefix. Phi-3 stores
q/k/v and gate/up fused in one tensor each, so its maps split and fuse them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from attune.errors import CheckpointError
from attune.models.config import DecoderConfig
from attune.models.rope import SUPPORTED_ROPE_TYPES
from attune.suggest import did_you_mean

StateDict = dict[str, torch.Tensor]
HF_PREFIX = "model."


HEAD_NAMES = ("lm_head.", "score.")  # output heads sit beside HF's ``model.`` body


def llama_keys_from_hf(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.self_attn.q_proj.weight``."""
    return name.removeprefix(HF_PREFIX)


def llama_keys_to_hf(name: str) -> str:
    """The inverse of :func:`llama_keys_from_hf`."""
    return name if name.startswith(HEAD_NAMES) else HF_PREFIX + name


@dataclass(frozen=True)
class Slot:
    """Where a HF tensor goes inside a larger decoder tensor: entry ``index`` of a grouped
    ``[experts, ...]`` tensor, the ``part``-th of ``parts`` equal row blocks of that entry (a
    checkpoint's per-expert ``gate_proj`` is part 0 of 2 of ``gate_up_proj``)."""

    index: int
    part: int = 0
    parts: int = 1


class Part(NamedTuple):
    """A decoder tensor, or a slot of one, that a HF tensor holds."""

    name: str
    tensor: torch.Tensor
    slot: Slot | None = None


TensorsFromHF = Callable[[str, torch.Tensor, DecoderConfig], list[Part]]
StateToHF = Callable[[StateDict, DecoderConfig], StateDict]


def llama_tensors_from_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[Part]:
    """One HF tensor -> the decoder tensors it holds (here: itself, renamed)."""
    return [Part(llama_keys_from_hf(name), tensor)]


def llama_state_to_hf(state: StateDict, config: DecoderConfig) -> StateDict:
    """The decoder's state dict under HF's names."""
    return {llama_keys_to_hf(name): tensor for name, tensor in state.items()}


@dataclass(frozen=True)
class Family:
    """What one family registers.

    Args:
        model_types: the HF ``model_type`` values it reads.
        config_from_hf: HF ``config.json`` (a dict) -> DecoderConfig.
        tensors_from_hf: one HF tensor -> the (name, tensor) pairs of the decoder it holds.
        state_to_hf: the decoder's state dict -> HF's tensors.
        fused_modules: decoder linear layers that HF stores fused into another (Phi-3's
            ``q_proj`` in ``qkv_proj``): they have no HF module of their own to name in a peft
            adapter.
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], DecoderConfig]
    tensors_from_hf: TensorsFromHF = llama_tensors_from_hf
    state_to_hf: StateToHF = llama_state_to_hf
    fused_modules: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}


ConfigReader = Callable[[dict[str, Any]], DecoderConfig]


def register_family(
    *model_types: str,
    tensors_from_hf: TensorsFromHF = llama_tensors_from_hf,
    state_to_hf: StateToHF = llama_state_to_hf,
    fused_modules: tuple[str, ...] = (),
) -> Callable[[ConfigReader], ConfigReader]:
    """Register the decorated ``config_from_hf`` function for these HF model types."""

    def decorate(config_from_hf: ConfigReader) -> ConfigReader:
        family = Family(model_types, config_from_hf, tensors_from_hf, state_to_hf, fused_modules)
        for model_type in model_types:
            FAMILIES[model_type] = family
        return config_from_hf

    return decorate


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family that reads this ``config.json``.

    Raises:
        CheckpointError: no ``model_type``, or one no family registered.
    """
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise CheckpointError("config.json has no 'model_type'; is this a Hugging Face model?")
    if model_type not in FAMILIES:
        hint = did_you_mean(str(model_type), FAMILIES)
        raise CheckpointError(
            f"model_type '{model_type}' is not supported{hint} (supported: "
            f"{', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    parameters = hf.get("rope_parameters")
    if parameters:
        theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json asks for RoPE scaling '{kind}', which attune does not support yet "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling = {**scaling, "rope_type": kind}
    # dynamic and longrope scaling need the trained lengths, which configs keep beside them
    scaling.setdefault("max_position_embeddings", hf.get("max_position_embeddings"))
    if kind == "longrope":
        scaling.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings"),
        )
    return float(theta), scaling


def _sliding_windows(hf: dict[str, Any], num_layers: int) -> list[int | None]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if hf.get("use_sliding_window") is False:
        return [None] * num_layers
    if hf.get("use_sliding_window"):  # Qwen2 before transformers 5
        first = hf.get("max_window_layers", num_layers)
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers


def llama_shaped_config(hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
    """A DecoderConfig from the keys every Llama-shaped ``config.json`` shares."""
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    theta, scaling = _rope(hf)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    partial = (hf.get("rope_parameters") or {}).get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
    )
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        output_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(hf, layers),
        activation=hf.get("hidden_act", "silu"),
        hf_config=dict(hf),
    )
    architectures = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        fields["num_labels"] = hf.get("num_labels") or len(hf.get("id2label") or {0: 0, 1: 1})
    fields.update(overrides)
    return DecoderConfig(**fields)


@register_family("llama", "mistral")
def llama_config(hf: dict[str, Any]) -> DecoderConfig:
    """Llama 2/3.x, SmolLM, TinyLlama and Mistral (sliding window from the config)."""
    return llama_shaped_config(hf)


@register_family("qwen2")
def qwen2_config(hf: dict[str, Any]) -> DecoderConfig:
    """Qwen2 and Qwen2.5: biases on q/k/v, none on the output projection."""
    return llama_shaped_config(hf, attention_bias=True, output_bias=False)


@register_family("qwen3")
def qwen3_config(hf: dict[str, Any]) -> DecoderConfig:
    """Qwen3: RMSNorm on each query and key head before RoPE."""
    return llama_shaped_config(hf, qk_norm=True)


def _gemma_common(hf: dict[str, Any]) -> dict[str, Any]:
    """What every Gemma shares: (1 + weight) norms, scaled embeddings, GeGLU, tied output."""
    return dict(
        norm_offset=1.0,
        embed_scale=hf["hidden_size"] ** 0.5,
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _gemma_windows(hf: dict[str, Any], is_sliding: Callable[[int], bool]) -> list[int | None]:
    """Per-layer windows: from ``layer_types`` (transformers 5) or the family's fixed pattern."""
    layers = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        return _sliding_windows(hf, layers)
    return [hf.get("sliding_window") if is_sliding(i) else None for i in range(layers)]


@register_family("gemma")
def gemma_config(hf: dict[str, Any]) -> DecoderConfig:
    """Gemma 1."""
    return llama_shaped_config(hf, **_gemma_common(hf))


@register_family("gemma2")
def gemma2_config(hf: dict[str, Any]) -> DecoderConfig:
    """Gemma 2: sandwich norms, soft-capped attention and logits, alternating sliding layers."""
    return llama_shaped_config(
        hf,
        **_gemma_common(hf),
        sandwich_norms=True,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        query_scale=hf["query_pre_attn_scalar"] ** -0.5,
        sliding_windows=_gemma_windows(hf, lambda i: i % 2 == 0),
    )


@register_family("gemma3_text")
def gemma3_config(hf: dict[str, Any]) -> DecoderConfig:
    """Gemma 3 (text): Gemma 2's layout plus q/k norms and a RoPE base of its own for the
    sliding-window layers."""
    parameters = hf.get("rope_parameters") or {}
    if "full_attention" in parameters:  # transformers 5: one RoPE setting per layer type
        full = parameters["full_attention"]
        local = parameters.get("sliding_attention", {})
        theta, scaling = _rope({"rope_parameters": full})
        local_theta, local_scaling = _rope({"rope_parameters": local})
        if local_scaling is not None:
            raise CheckpointError("gemma3_text: RoPE scaling on sliding layers is not supported")
    else:
        theta, scaling = _rope(hf)
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return llama_shaped_config(
        hf,
        **_gemma_common(hf),
        qk_norm=True,
        sandwich_norms=True,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        query_scale=hf["query_pre_attn_scalar"] ** -0.5,
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_theta=local_theta,
        sliding_windows=_gemma_windows(hf, lambda i: (i + 1) % pattern != 0),
    )


def _phi3_tensors_from_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[Part]:
    """Split Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` into the decoder's projections."""
    base = llama_keys_from_hf(name)
    if ".self_attn.qkv_proj." in base:
        q_rows = config.num_heads * config.head_dim
        kv_rows = config.num_kv_heads * config.head_dim
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
        parts = {"q_proj": q, "k_proj": k, "v_proj": v}
        return [Part(base.replace("qkv_proj", part), t) for part, t in parts.items()]
    if ".mlp.gate_up_proj." in base:
        gate, up = tensor.chunk(2, dim=0)
        parts = {"gate_proj": gate, "up_proj": up}
        return [Part(base.replace("gate_up_proj", part), t) for part, t in parts.items()]
    return [Part(base, tensor)]


def _phi3_state_to_hf(state: StateDict, config: DecoderConfig) -> StateDict:
    """Fuse the decoder's q/k/v and gate/up projections back into Phi-3's tensors."""
    hf: StateDict = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            qkv = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            hf[llama_keys_to_hf(name.replace("q_proj", "qkv_proj"))] = torch.cat(qkv)
        elif ".mlp.gate_proj." in name:
            up = state[name.replace("gate_proj", "up_proj")]
            hf[llama_keys_to_hf(name.replace("gate_proj", "gate_up_proj"))] = torch.cat(
                [tensor, up]
            )
        elif not any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            hf[llama_keys_to_hf(name)] = tensor
    return hf


@register_family(
    "phi3",
    tensors_from_hf=_phi3_tensors_from_hf,
    state_to_hf=_phi3_state_to_hf,
    fused_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
)
def phi3_config(hf: dict[str, Any]) -> DecoderConfig:
    """Phi-3, Phi-3.5 and Phi-4: fused tensors in the checkpoint, ``longrope`` scaling, and a
    partial rotary factor where the config gives one."""
    return llama_shaped_config(hf, attention_bias=False, output_bias=False)


# Mixture-of-experts families ---------------------------------------------------------------
# Their checkpoints store each expert's projections as tensors of their own
# (``mlp.experts.3.gate_proj.weight``); transformers 5 and attune hold them grouped
# (``mlp.experts.gate_up_proj`` of ``[experts, 2 x inner, hidden]``, ``mlp.experts.down_proj``).
# Both layouts load; attune writes the checkpoints' own, which every version of transformers
# and vLLM reads.


def _moe_tensor_maps(block: str, gate: str, up: str, down: str) -> tuple[TensorsFromHF, StateToHF]:
    """The maps of a MoE family whose checkpoint names the MoE block ``block`` (``mlp``;
    Mixtral's ``block_sparse_moe``) and an expert's projections ``gate``, ``up``, ``down``."""
    expert = re.compile(rf"^(.*)\.{block}\.experts\.(\d+)\.(\w+)\.weight$")
    slots = {gate: ("gate_up_proj", 0, 2), up: ("gate_up_proj", 1, 2), down: ("down_proj", 0, 1)}

    def tensors_from_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[Part]:
        match = expert.match(llama_keys_from_hf(name))
        if match and match.group(3) in slots:
            layer, index, projection = match.groups()
            target, part, parts = slots[projection]
            return [Part(f"{layer}.mlp.experts.{target}", tensor, Slot(int(index), part, parts))]
        return [Part(llama_keys_from_hf(name).replace(f".{block}.", ".mlp."), tensor)]

    def state_to_hf(state: StateDict, config: DecoderConfig) -> StateDict:
        hf: StateDict = {}
        for name, tensor in state.items():
            stem = llama_keys_to_hf(name).replace(".mlp.", f".{block}.")
            if name.endswith(".mlp.experts.gate_up_proj"):
                prefix = stem.removesuffix("gate_up_proj")
                for index, (gate_rows, up_rows) in enumerate(t.chunk(2) for t in tensor):
                    hf[f"{prefix}{index}.{gate}.weight"] = gate_rows.contiguous()
                    hf[f"{prefix}{index}.{up}.weight"] = up_rows.contiguous()
            elif name.endswith(".mlp.experts.down_proj"):
                prefix = stem.removesuffix("down_proj")
                for index, rows in enumerate(tensor):
                    hf[f"{prefix}{index}.{down}.weight"] = rows.contiguous()
            elif ".mlp.gate." in name or ".mlp.experts." in name:
                hf[stem] = tensor
            else:
                hf[llama_keys_to_hf(name)] = tensor
        return hf

    return tensors_from_hf, state_to_hf


def _num_experts(hf: dict[str, Any]) -> int:
    """Experts per MoE layer: ``num_experts`` (Qwen's checkpoints) or ``num_local_experts``
    (Mixtral's, and transformers 5's spelling when it writes a Qwen-MoE config)."""
    if "num_experts" in hf:
        return int(hf["num_experts"])
    return int(hf["num_local_experts"])


def _moe_layers(hf: dict[str, Any]) -> list[bool]:
    """Qwen-MoE's sparse layers: every ``decoder_sparse_step``-th, except ``mlp_only_layers``."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    experts = _num_experts(hf)
    return [
        i not in dense and experts > 0 and (i + 1) % step == 0
        for i in range(hf["num_hidden_layers"])
    ]


def _qwen_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        num_experts=_num_experts(hf),
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=_moe_layers(hf),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )


_QWEN_MOE_TENSORS, _QWEN_MOE_STATE = _moe_tensor_maps("mlp", "gate_proj", "up_proj", "down_proj")


@register_family("qwen2_moe", tensors_from_hf=_QWEN_MOE_TENSORS, state_to_hf=_QWEN_MOE_STATE)
def qwen2_moe_config(hf: dict[str, Any]) -> DecoderConfig:
    """Qwen1.5-MoE and Qwen2-MoE: Qwen2's attention (``qkv_bias``), experts on the layers
    ``decoder_sparse_step`` and ``mlp_only_layers`` choose, and a shared expert behind a
    sigmoid gate."""
    layers = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        windows = _sliding_windows(hf, layers)
    elif hf.get("use_sliding_window"):  # transformers' rule when the config names no types
        first = hf.get("max_window_layers", 28)
        windows = [
            hf.get("sliding_window") if (i + 1) % 2 and i < first else None for i in range(layers)
        ]
    else:
        windows = [None] * layers
    qkv_bias = bool(hf.get("qkv_bias", True))
    return llama_shaped_config(
        hf,
        **_qwen_moe_fields(hf),
        attention_bias=qkv_bias,
        output_bias=False,
        sliding_windows=windows,
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or None,
    )


@register_family("qwen3_moe", tensors_from_hf=_QWEN_MOE_TENSORS, state_to_hf=_QWEN_MOE_STATE)
def qwen3_moe_config(hf: dict[str, Any]) -> DecoderConfig:
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with q/k norms, experts
    on the layers ``decoder_sparse_step`` and ``mlp_only_layers`` choose, no shared expert."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return llama_shaped_config(
        hf, **_qwen_moe_fields(hf), qk_norm=True, sliding_windows=[window] * layers
    )


_MIXTRAL_TENSORS, _MIXTRAL_STATE = _moe_tensor_maps("block_sparse_moe", "w1", "w3", "w2")


@register_family("mixtral", tensors_from_hf=_MIXTRAL_TENSORS, state_to_hf=_MIXTRAL_STATE)
def mixtral_config(hf: dict[str, Any]) -> DecoderConfig:
    """Mixtral: Mistral's attention, every layer's MLP a mixture of ``num_local_experts``
    experts of ``intermediate_size``, the top-k weights always renormalised (and kept in
    float32), optional router jitter in training."""
    return llama_shaped_config(
        hf,
        num_experts=_num_experts(hf),
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"],
        norm_topk_prob=True,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        router_jitter_noise=float(hf.get("router_jitter_noise") or 0.0),
        router_weights_in_float=True,
    )
