"""Adapters in peft's format, so ``PeftModel.from_pretrained(base, folder)`` loads them.

A folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``, ...) and ``adapter_model.safetensors`` with
peft's tensor names: ``base_model.model.`` + the HF module name + ``.lora_A.weight`` /
``.lora_B.weight`` / ``.lora_magnitude_vector``.

Adapters on a mixture of experts' grouped weights are written as peft (0.21, on transformers 5)
writes its ``target_parameters`` adapters (``ParamWrapper``), which ``target_parameters``
lists (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``):

- names: each adapted weight of an experts module wraps the module once, the first-registered
  weight innermost, so with both adapted ``gate_up_proj``'s tensors are
  ``...mlp.experts.base_layer.lora_A.weight`` and ``down_proj``'s ``...mlp.experts.lora_A.weight``
  (with one adapted, it is ``...mlp.experts.lora_A.weight``);
- layouts: for a weight of ``[experts, out, in]``, ``lora_A`` is ``[experts x r, in]`` (expert
  ``e``'s ``A`` in rows ``e r .. e r + r - 1``) and ``lora_B`` is ``[out, r x experts]`` (column
  ``k experts + e`` is rank ``k`` of expert ``e``); attune holds ``[experts, r, in]`` and
  ``[experts, out, r]``.

peft on transformers 5 reads ``target_modules`` named ``gate_proj``, ``up_proj``, ``down_proj``
or ``gate`` on a Qwen3-MoE (``w1``/``w2``/``w3``/``gate`` on Mixtral) as the experts of a
transformers 4 checkpoint and retargets them to the grouped weights; so the dense layers' linear
layers of those names go in ``target_parameters`` as ``gate_proj.weight`` (peft adapts them there
exactly as a LoRA linear layer, under the same tensor names).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attune.errors import CheckpointError, ConfigError
from attune.models import TransformerDecoder
from attune.models.families import family_of, llama_keys_from_hf, llama_keys_to_hf
from attune.models.hf import copy_tokenizer_files
from attune.peft.lora import (
    EXPERT_PROJECTIONS,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    experts_modules,
    is_adapter_key,
)

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# the target_modules names peft 0.21 retargets to a MoE model's grouped experts on transformers 5
# (its transformers_weight_conversion._MOE_TARGET_MODULE_MAPPING, by model type)
PEFT_RETARGETED = {
    "qwen3_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("gate", "w1", "w2", "w3"),
}


def _expert_key(name: str) -> tuple[str, str, str] | None:
    """``(experts module, lora_A or lora_B, projection)`` of an expert adapter key, else None."""
    owner, _, leaf = name.rpartition(".")
    owner, _, factor = owner.rpartition(".")
    if factor in ("lora_A", "lora_B") and leaf in EXPERT_PROJECTIONS:
        return owner, factor, leaf
    return None


def _adapted_layers(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapted linear layers (expert weights aside)."""
    return sorted(
        {
            name.rsplit(".lora_", 1)[0]
            for name in state
            if is_adapter_key(name) and _expert_key(name) is None
        }
    )


def _adapted_experts(names: Iterable[str]) -> dict[str, list[str]]:
    """Per experts module, its adapted projections in :data:`EXPERT_PROJECTIONS`' order."""
    found: dict[str, set[str]] = {}
    for name in names:
        key = _expert_key(name)
        if key is not None:
            found.setdefault(key[0], set()).add(key[2])
    return {m: [p for p in EXPERT_PROJECTIONS if p in found[m]] for m in sorted(found)}


def _peft_names(names: Iterable[str]) -> dict[str, str]:
    """attune's adapter key -> peft's, for every adapter key in ``names``."""
    names = [name for name in names if is_adapter_key(name)]
    experts = _adapted_experts(names)
    peft = {}
    for name in names:
        key = _expert_key(name)
        if key is None:
            peft[name] = PEFT_PREFIX + llama_keys_to_hf(name)
            continue
        owner, factor, projection = key
        adapted = experts[owner]
        wrappers = "base_layer." * (len(adapted) - 1 - adapted.index(projection))
        peft[name] = PEFT_PREFIX + llama_keys_to_hf(f"{owner}.{wrappers}{factor}.weight")
    return peft


def _to_peft(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An adapter tensor in peft's layout (expert adapters flattened, see the module doc)."""
    key = _expert_key(name)
    if key is None:
        return tensor
    experts, rows, columns = tensor.shape
    if key[1] == "lora_A":  # [experts, r, in] -> [experts x r, in]
        return tensor.reshape(experts * rows, columns)
    return tensor.permute(1, 2, 0).reshape(rows, columns * experts)  # [out, r x experts]


def _from_peft(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """A peft tensor in attune's layout, shaped as ``like`` (None where it cannot be)."""
    if _expert_key(name) is None or like.dim() != 3:
        return tensor if tensor.shape == like.shape else None
    if tensor.shape != _to_peft(name, like).shape:
        return None
    experts, rows, columns = like.shape
    if name.rpartition(".")[0].endswith(".lora_A"):
        return tensor.reshape(experts, rows, columns)
    return tensor.reshape(rows, columns, experts).permute(2, 0, 1).contiguous()


def _peft_targets(
    model: TransformerDecoder, state: Mapping[str, torch.Tensor], settings: LoraSettings
) -> tuple[list[str], list[str]]:
    """The adapter's ``target_modules`` and ``target_parameters`` for peft.

    Raises:
        CheckpointError: linear layers peft would retarget to the experts (see the module doc),
            with dropout or DoRA, which peft's adapters on parameters do not take.
    """
    modules = sorted({name.rsplit(".", 1)[-1] for name in _adapted_layers(state)})
    retargeted = set(modules) & set(PEFT_RETARGETED.get(model.config.hf_config["model_type"], ()))
    if retargeted and (settings.dropout > 0 or settings.use_dora):
        names = ", ".join(sorted(retargeted))
        raise CheckpointError(
            f"peft on transformers 5 reads {names} on a {model.config.hf_config['model_type']} "
            "model as its experts, so attune names these layers as peft target_parameters, "
            "which take no dropout or DoRA; train them with lora.dropout=0 and no DoRA, or save "
            "merged weights (checkpointer.save_merged=true)"
        )
    parameters = [f"{name}.weight" for name in sorted(retargeted)]
    every = experts_modules(model)
    adapted = _adapted_experts(state)
    for projection in EXPERT_PROJECTIONS:
        owners = [owner for owner, projections in adapted.items() if projection in projections]
        if owners and len(owners) == len(every):
            parameters.append(f"mlp.experts.{projection}")
        else:  # some layers' experts only: each by its full name on the HF model
            parameters += [llama_keys_to_hf(f"{owner}.{projection}") for owner in owners]
    return [name for name in modules if name not in retargeted], sorted(parameters)


def save_adapter(
    model: TransformerDecoder,
    folder: str | Path,
    settings: LoraSettings,
    base_model_name_or_path: str | None = None,
    tokenizer_source: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapters as a peft adapter folder (``folder`` must exist).

    Args:
        model: a model with :func:`~attune.peft.lora.apply_lora` applied.
        folder: where to write.
        settings: the adapters' settings.
        base_model_name_or_path: the base model's Hub id or folder, for peft to find it.
        tokenizer_source: a folder whose tokenizer files to copy beside the adapter.
        state: the model's full state dict, when it is not ``model.state_dict()`` (a sharded
            model's, gathered).

    Raises:
        CheckpointError: a layer HF stores fused with others (Phi-3's q/k/v), which peft cannot
            name on the HF model.
    """
    family = family_of(model.config.hf_config)
    state = state if state is not None else model.state_dict()
    layers = _adapted_layers(state)
    fused = sorted({n.rsplit(".", 1)[-1] for n in layers} & set(family.fused_modules))
    if fused:
        raise CheckpointError(
            f"{model.config.hf_config['model_type']} stores {', '.join(fused)} fused with other "
            "projections, so a peft adapter cannot name them; adapt other layers (o_proj, "
            "down_proj) or save merged weights (checkpointer.save_merged=true)"
        )
    names = _peft_names(state)
    tensors = {
        names[name]: _to_peft(name, tensor.detach()).contiguous().cpu()
        for name, tensor in state.items()
        if name in names
    }
    target_modules, target_parameters = _peft_targets(model, state, settings)
    folder = Path(folder)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        # None rather than []: peft then adapts what target_parameters name, and no module
        "target_modules": target_modules or None,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, folder)
    return folder


def read_adapter_settings(folder: str | Path) -> LoraSettings:
    """The :class:`LoraSettings` of a peft LoRA adapter folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; is this a LoRA adapter folder?")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer ranks or alphas are not supported")
    return LoraSettings(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config.get("target_modules") or [],
        # names on the HF model (model.layers.0.mlp.experts.down_proj) as the decoder's
        target_parameters=[llama_keys_from_hf(t) for t in config.get("target_parameters") or []],
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
    )


def load_adapter(model: TransformerDecoder, folder: str | Path) -> LoraSettings:
    """Apply a peft LoRA adapter folder to ``model`` (adapters added, weights loaded).

    Raises:
        CheckpointError: no adapter in the folder, or it does not fit the model (a module it
            targets, a layer it adapts, or a tensor's shape), said in one line that names the
            folder and the mismatch.
    """
    settings = read_adapter_settings(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    size = model.config

    def mismatch(what: str) -> CheckpointError:
        trained = f", {base}" if base else ""
        return CheckpointError(
            f"adapter {folder} does not fit this model ({size.num_layers} layers, hidden size "
            f"{size.hidden_size}): {what}; use the base model it was trained on{trained}"
        )

    try:
        apply_lora(model, settings)
    except ConfigError as error:  # settings this model cannot take: say which
        raise mismatch(_unfit_targets(model, settings) or str(error)) from None
    expected = adapter_state_dict(model)
    ours_of = {peft: ours for ours, peft in _peft_names(expected).items()}
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(weights)).items():
        if not name.startswith(PEFT_PREFIX):
            continue
        name = name.replace(".default", "")
        hf_name = name.removeprefix(PEFT_PREFIX)
        ours = ours_of.get(name)
        if ours is None:
            layer = hf_name.rsplit(".lora_", 1)[0].replace(".base_layer", "")
            raise mismatch(f"it adapts {layer}, which this model does not have")
        converted = _from_peft(ours, tensor, expected[ours])
        if converted is None:
            raise mismatch(
                f"its {hf_name} has shape {tuple(tensor.shape)} where this model's is "
                f"{tuple(_to_peft(ours, expected[ours]).shape)}"
            )
        loaded[ours] = converted
    missing = sorted(set(expected) - set(loaded))
    if missing:
        layers = sorted({llama_keys_to_hf(name).rsplit(".lora_", 1)[0] for name in missing})
        more = f" and {len(layers) - 1} more" if len(layers) > 1 else ""
        raise mismatch(f"it has no weights for {layers[0]}{more}, which its targets name")
    model.load_state_dict(loaded, strict=False)
    return settings


def _unfit_targets(model: TransformerDecoder, settings: LoraSettings) -> str | None:
    """Which of the adapter's target modules the model has no linear layer of, or None."""
    if not isinstance(settings.target_modules, list | tuple):
        return None
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    absent = sorted(set(settings.target_modules) - linear)
    if not absent:
        return None
    return (
        f"its target_modules name {', '.join(map(repr, absent))}, which this model has no "
        f"linear layer of (it has {', '.join(sorted(linear))})"
    )
