"""Building a decoder from a Hugging Face folder: its ``config.json`` and its weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from attune.checkpoint import atomic_folder, iter_safetensors, weight_files, write_safetensors
from attune.errors import CheckpointError
from attune.models.config import DecoderConfig
from attune.models.decoder import TransformerDecoder
from attune.models.families import family_of, llama_keys_to_hf
from attune.models.rope import RotaryEmbedding

# Files a model folder carries besides its weights and config, copied from the source folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# What an ``encode`` step of save_pretrained gives: the tensors to write, the safetensors
# metadata describing them, and entries to add to config.json.
EncodedWeights = tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]

# Old checkpoints store RoPE tables; the decoder computes its own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict.

    Raises:
        CheckpointError: the file is missing or not JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}; is it a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def decoder_config(hf_config: dict[str, Any]) -> DecoderConfig:
    """The DecoderConfig for any supported family's ``config.json``.

    Raises:
        CheckpointError: an unsupported family, or a config missing a field or contradicting
            itself.
    """
    family = family_of(hf_config)
    try:
        return family.config_from_hf(hf_config)
    except KeyError as error:
        raise CheckpointError(
            f"config.json of a {hf_config['model_type']} model lacks {error}"
        ) from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"config.json: {error}") from None


def is_sequence_classifier(hf_config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a ``*ForSequenceClassification`` model."""
    return any(
        a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or []
    )


def with_score_head(hf_config: dict[str, Any], num_labels: int) -> dict[str, Any]:
    """A causal LM's ``config.json`` turned into its ``*ForSequenceClassification`` twin with
    ``num_labels`` outputs (reward and value models), as transformers writes one.

    Raises:
        CheckpointError: the architecture has no ``ForCausalLM`` name to derive it from.
    """
    if is_sequence_classifier(hf_config):
        labels = hf_config.get("num_labels") or len(hf_config.get("id2label") or {0: 0, 1: 1})
        if labels != num_labels:
            raise CheckpointError(
                f"the checkpoint's score head has {labels} outputs, not num_labels={num_labels}"
            )
        return dict(hf_config)
    architectures = hf_config.get("architectures") or []
    causal = [a for a in architectures if a.endswith("ForCausalLM")]
    if not causal:
        raise CheckpointError(
            f"cannot add a score head to a {architectures or hf_config.get('model_type')} "
            "checkpoint: its config.json names no *ForCausalLM architecture"
        )
    labels = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    return {
        **hf_config,
        "architectures": [causal[0].removesuffix("ForCausalLM") + "ForSequenceClassification"],
        "id2label": labels,
        "label2id": {name: int(i) for i, name in labels.items()},
    }


def from_hf_config(config: dict[str, Any] | str | Path) -> TransformerDecoder:
    """A randomly initialised decoder shaped by a ``config.json`` (a dict, file or folder)."""
    if not isinstance(config, dict):
        path = Path(config)
        config = read_hf_config(path if path.is_dir() else path.parent)
    return TransformerDecoder(decoder_config(config))


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tensors: Iterable[tuple[str, Path, torch.Tensor]] | None = None,
    num_labels: int | None = None,
) -> TransformerDecoder:
    """Build the model a HF folder describes and load its weights.

    The model is built on the meta device and each tensor, memory-mapped from disk, is moved
    once into ``dtype`` on ``device``, so host memory stays near one copy of the weights.

    Args:
        path: the HF folder.
        dtype: the dtype of the weights (of a quantized tensor, the dtype it computes in).
        device: where the model goes.
        tensors: the weights as ``(HF name, file, tensor)`` instead of the folder's files as
            they are (a quantized model's tensors, rebuilt from their parts).
        num_labels: a ``score`` head of this many outputs (a reward or value model). On a
            causal LM's folder the output projection is left out and the head starts fresh
            (:func:`init_score_head`); the model saves as ``*ForSequenceClassification``.

    Raises:
        CheckpointError: no config or weights, an unsupported family, a corrupt file, a
            missing or unexpected tensor, or a shape mismatch (named, with both shapes); a
            quantized folder without ``tensors``.
    """
    hf_config = read_hf_config(path)
    quantized = hf_config.get("quantization_config")
    if tensors is None and quantized:
        method = quantized.get("quant_method", "unknown")
        how = (
            "load it with attune.quantization.load_quantized"
            if method == "torchao"
            else "attune reads only torchao-quantized folders; start from the full-precision one"
        )
        raise CheckpointError(f"{path} holds a quantized model (quant_method {method}); {how}")
    if num_labels is not None:
        hf_config = with_score_head(hf_config, num_labels)
    config = decoder_config(hf_config)
    config.source = str(path)
    with torch.device("meta"):
        model = TransformerDecoder(config)
    loaded = _read_weights(path, model, dtype, device, tensors=tensors)
    if _fresh_score_head(model, path):
        model.score.to_empty(device=device)
        init_score_head(model)
        model.score.to(dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():  # RoPE tables were built on the meta device
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters(device)
    return model


def _read_weights(
    path: str | Path,
    model: TransformerDecoder,
    dtype: torch.dtype,
    device: str | torch.device,
    ignore: Callable[[str], bool] | None = None,
    tensors: Iterable[tuple[str, Path, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a HF folder (or ``tensors``, as ``(HF name, file, tensor)``) under the
    model's names, checked against the model's own (every one present, none unexpected, shapes
    equal), in ``dtype`` on ``device`` (a quantized tensor's compute dtype). Model tensors for
    which ``ignore`` is true (adapters, say) are not expected in the folder."""
    hf_config = model.config.hf_config
    family = family_of(hf_config)
    config = model.config
    expected = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if ignore is None or not ignore(name)
    }
    if model.ties_embeddings:
        expected.pop("lm_head.weight")
    if _fresh_score_head(model, path):
        expected.pop("score.weight")
    loaded: dict[str, torch.Tensor] = {}
    filled: dict[str, set[tuple[int, int, int]]] = {}  # grouped tensors: the slots read
    if tensors is None:
        tensors = iter_safetensors(weight_files(path))
    for hf_name, file, hf_tensor in tensors:
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and "lm_head.weight" not in expected:
            continue  # tied: the embedding is the output projection
        try:
            parts = family.tensors_from_hf(hf_name, hf_tensor, config)
        except RuntimeError as error:  # a fused tensor that does not split as the config says
            raise CheckpointError(
                f"{file.name}: tensor '{hf_name}' of shape {tuple(hf_tensor.shape)} does not "
                f"fit the config ({error})"
            ) from None
        for name, tensor, slot in parts:
            if name not in expected:
                raise CheckpointError(
                    f"{file.name}: tensor '{hf_name}' does not belong to a "
                    f"{hf_config['model_type']} model of this config"
                )
            shape = tuple(expected[name].shape)
            if slot is not None:  # one expert's projection, a block of a grouped tensor
                if not 0 <= slot.index < shape[0]:
                    raise CheckpointError(
                        f"{file.name}: tensor '{hf_name}' is expert {slot.index}, but the config "
                        f"has {shape[0]} experts"
                    )
                shape = (shape[1] // slot.parts, *shape[2:])
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{file.name}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, but the "
                    f"config makes it {shape}"
                )
            if slot is None:
                loaded[name] = tensor.to(device=device, dtype=dtype)
                continue
            if name not in loaded:
                loaded[name] = torch.empty(expected[name].shape, dtype=dtype, device=device)
                filled[name] = set()
            rows = shape[0]
            loaded[name][slot.index, slot.part * rows : (slot.part + 1) * rows] = tensor
            filled[name].add((slot.index, slot.part, slot.parts))
    for name, slots in filled.items():
        if len(slots) != expected[name].shape[0] * next(iter(slots))[2]:
            del loaded[name]  # some expert's tensor is not in the folder: reported as missing
    missing = sorted(set(expected) - set(loaded))
    if missing:
        names = ", ".join(llama_keys_to_hf(n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: the weights lack {names}{more}")
    return loaded


def _fresh_score_head(model: TransformerDecoder, path: str | Path) -> bool:
    """Whether ``model`` has a score head that the folder at ``path`` (a causal LM) lacks."""
    return model.config.num_labels is not None and not is_sequence_classifier(read_hf_config(path))


@torch.no_grad()
def init_score_head(model: TransformerDecoder, seed: int = 0) -> None:
    """A new score head: normal with the checkpoint's ``initializer_range`` as its std (0.02
    when unset), as transformers starts one, drawn from ``seed`` so that every process of a
    sharded run, and every run, starts from the same head."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    weight = model.score.weight
    std = model.config.hf_config.get("initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    full = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if isinstance(weight, DTensor):
        shard = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None)
        weight.to_local().copy_(shard.to_local())
    else:
        weight.copy_(full)


def load_weights(
    model: TransformerDecoder, path: str | Path, ignore: Callable[[str], bool] | None = None
) -> TransformerDecoder:
    """Copy a HF folder's weights into an existing model (the folder must be of the same
    architecture, such as a checkpoint of it); they keep the model's dtype and device.

    A model sharded with FSDP2 (DTensor parameters) gets each tensor's local shard only: every
    process reads the memory-mapped file and copies its own slice.

    Args:
        model: the model to fill.
        path: the HF folder.
        ignore: model tensors not to expect in the folder (LoRA adapters, say).

    Raises:
        CheckpointError: as :func:`from_pretrained`.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    reference = model.embed_tokens.weight
    device = reference.to_local().device if isinstance(reference, DTensor) else reference.device
    targets = dict(model.state_dict(keep_vars=True))
    loaded = _read_weights(path, model, reference.dtype, "cpu", ignore)
    with torch.no_grad():
        for name, tensor in loaded.items():
            target = targets[name]
            if isinstance(target, DTensor):
                shard = distribute_tensor(
                    tensor, target.device_mesh, target.placements, src_data_rank=None
                )
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(tensor.to(device))
    if _fresh_score_head(model, path):
        init_score_head(model)
    return model


def _parse_size(size: int | str | None) -> int | None:
    """``"5GB"``, ``"200MB"``, ``"40KB"`` or a byte count -> bytes (decimal units, as HF)."""
    if size is None or isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_pretrained(
    model: TransformerDecoder,
    folder: str | Path,
    source: str | Path | None = None,
    max_shard_size: int | str | None = "5GB",
    state: Mapping[str, torch.Tensor] | None = None,
    encode: Callable[[dict[str, torch.Tensor]], EncodedWeights] | None = None,
) -> Path:
    """Write ``model`` as a HF folder that transformers loads as it is.

    The folder gets the checkpoint's own ``config.json`` (only the dtype updated), a
    ``generation_config.json`` and the tokenizer files (copied from ``source`` when it has
    them), and the weights under HF's names: one ``model.safetensors`` or shards of at most
    ``max_shard_size`` with their index. Tied embeddings are stored once, as HF does. The
    folder is written under a temporary name and renamed into place.

    Args:
        model: the model (its config and, unless ``state`` is given, its weights).
        folder: where to write.
        source: a folder to copy the generation config and tokenizer files from.
        max_shard_size: the largest weights file (``"5GB"``, bytes, or None for one file).
        state: the weights to write instead of ``model.state_dict()`` (a LoRA model's merged
            weights, say), under the model's names.
        encode: turns the HF tensors into what is written (quantized, say): the tensors, the
            safetensors metadata that describes them, and entries for ``config.json``.

    Raises:
        CheckpointError: the model was not built from a HF config (nothing to write as
            ``config.json``).
    """
    hf_config = dict(model.config.hf_config)
    if not hf_config:
        raise CheckpointError(
            "this model was not built from a Hugging Face config.json, so it cannot be saved "
            "in the HF layout; build it with attune.models.from_pretrained or from_hf_config"
        )
    family = family_of(hf_config)
    state = dict(state) if state is not None else model.state_dict()
    if model.ties_embeddings:
        state.pop("lm_head.weight", None)
    tensors = family.state_to_hf(state, model.config)
    dtype = next(iter(tensors.values())).dtype
    # transformers 5 writes "dtype", earlier versions "torch_dtype": keep the file's spelling
    dtype_key = "torch_dtype" if "torch_dtype" in hf_config else "dtype"
    hf_config[dtype_key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    source = Path(source) if source is not None else None
    folder = Path(folder)
    metadata: dict[str, str] = {}
    if encode is not None:
        tensors, metadata, config_entries = encode(tensors)
        hf_config.update(config_entries)
    with atomic_folder(folder) as staging:
        write_safetensors(tensors, staging, _parse_size(max_shard_size), metadata)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = source / "generation_config.json" if source else None
        if generation is not None and generation.is_file():
            shutil.copyfile(generation, staging / "generation_config.json")
        else:
            defaults = {
                key: hf_config[key]
                for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(key) is not None
            }
            (staging / "generation_config.json").write_text(json.dumps(defaults, indent=2) + "\n")
        if source is not None:
            copy_tokenizer_files(source, staging)
    return folder


def copy_tokenizer_files(source: str | Path, folder: str | Path) -> None:
    """Copy the tokenizer files (and chat template) that ``source`` has into ``folder``."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(folder) / name)
