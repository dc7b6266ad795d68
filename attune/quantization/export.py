"""Quantized models in and out: a Hugging Face folder with torchao-quantized weights.

The folder is what transformers writes for a ``TorchAoConfig`` model: ``config.json`` with a
``quantization_config`` (``quant_method: torchao``), and safetensors files in which each
quantized weight is stored as its parts (``<module>._weight_qdata``, ``_weight_scale``,
``_weight_zero_point``) with torchao's description of it in the file header. transformers'
``AutoModelForCausalLM.from_pretrained`` loads it as it is; :func:`load_quantized` loads it back
into attune (for ``generate``, or an evaluation).

Quantizing works on the HF tensors, after the family's key map: a layer HF stores fused
(Phi-3's ``qkv_proj``) is quantized whole, which gives the same numbers as quantizing its parts
since groups run along the input dimension.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from attune.checkpoint import weight_files
from attune.errors import CheckpointError
from attune.models import TransformerDecoder, from_pretrained, read_hf_config, save_pretrained
from attune.models.families import family_of
from attune.quantization import ao
from attune.quantization.scheme import QuantizationScheme

EMBEDDING_SUFFIX = "embed_tokens.weight"
OUTPUT_NAME = "lm_head.weight"


def _role(name: str, tensor: torch.Tensor) -> str | None:
    """What a HF tensor of a decoder is, for quantizing: ``embedding``, ``output``,
    ``linear`` (every other matrix: the projections), or None (norms, biases)."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return None
    if name.endswith(EMBEDDING_SUFFIX):
        return "embedding"
    return "output" if name == OUTPUT_NAME else "linear"


def _encoder(scheme: QuantizationScheme, tied: bool):
    def encode(tensors: dict[str, torch.Tensor]):
        configs = {
            "linear": scheme.linear_config(),
            "output": scheme.linear_config() if scheme.output else None,
            "embedding": scheme.embedding_config() if scheme.embedding else None,
            None: None,
        }
        quantized = {}
        for name, tensor in tensors.items():
            config = configs[_role(name, tensor)]
            quantized[name] = tensor if config is None else ao.quantize_weight(tensor, config)
        data, metadata = ao.flatten_state(quantized)
        return data, metadata, {"quantization_config": hf_quantization_config(scheme, tied)}

    return encode


def hf_quantization_config(scheme: QuantizationScheme, tied: bool) -> dict:
    """The ``quantization_config`` of ``config.json``, as transformers' ``TorchAoConfig``
    writes it."""
    default = scheme.linear_config()
    quant_type = (
        ao.per_module_config({"model.embed_tokens": scheme.embedding_config()}, default)
        if scheme.embedding
        else default
    )
    keep = [] if scheme.output or (tied and scheme.embedding) else ["lm_head"]
    return {
        "quant_method": "torchao",
        "quant_type": {"default": ao.config_dict(quant_type)},
        "modules_to_not_convert": keep or None,
        "include_input_output_embeddings": scheme.embedding or scheme.output,
        "untie_embedding_weights": False,
    }


def save_quantized(
    model: TransformerDecoder,
    folder: str | Path,
    scheme: QuantizationScheme,
    state: dict[str, torch.Tensor] | None = None,
    source: str | Path | None = None,
    max_shard_size: int | str | None = "5GB",
) -> Path:
    """Write ``model`` quantized under ``scheme`` as a HF folder (see the module docstring).

    Args:
        model: the full-precision model (its config and, unless ``state`` is given, weights).
        folder: where to write (atomically: a temporary name renamed into place).
        scheme: how to quantize.
        state: full-precision weights under the model's names (a LoRA run's merged weights).
        source: a folder to copy the tokenizer files and generation config from.
        max_shard_size: the largest weights file.
    """
    state = dict(state) if state is not None else model.state_dict()
    scheme.check_fits(model)
    return save_pretrained(
        model,
        folder,
        source=source,
        max_shard_size=max_shard_size,
        state=state,
        encode=_encoder(scheme, model.ties_embeddings),
    )


def is_quantized_folder(folder: str | Path) -> bool:
    """Whether a HF folder holds a torchao-quantized model."""
    config = read_hf_config(folder).get("quantization_config") or {}
    return config.get("quant_method") == "torchao"


def load_quantized(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TransformerDecoder:
    """A torchao-quantized HF folder (attune's or transformers') as an attune decoder that
    computes with the quantized weights.

    Args:
        folder: the folder.
        dtype: the dtype it computes in (of the full-precision tensors, and of the quantized
            ones once dequantized), whatever the folder was written in.
        device: where the model goes.

    Raises:
        CheckpointError: the folder is not torchao-quantized, a file is corrupt, or its
            quantized tensors cannot be rebuilt; a family HF stores with fused layers.
    """
    folder = Path(folder)
    if not is_quantized_folder(folder):
        raise CheckpointError(
            f"{folder} is not a torchao-quantized model folder (its config.json has no "
            "quantization_config with quant_method torchao)"
        )
    hf_config = read_hf_config(folder)
    if family_of(hf_config).fused_modules:
        raise CheckpointError(
            f"{folder}: a quantized {hf_config['model_type']} folder stores fused projections, "
            "which attune cannot split once quantized; load it with transformers, or quantize "
            "in attune from the full-precision checkpoint"
        )
    files = weight_files(folder)
    parts: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                metadata.update(handle.metadata() or {})
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    parts[name] = handle.get_tensor(name)
        except SafetensorError as error:
            raise CheckpointError(f"{file}: corrupt safetensors file ({error})") from None
    metadata.pop("format", None)
    try:
        tensors = ao.unflatten_state(parts, metadata)
    except (ValueError, KeyError) as error:
        raise CheckpointError(
            f"{folder}: its quantized tensors cannot be rebuilt ({error})"
        ) from None
    entries = ((name, files[0], tensor) for name, tensor in tensors.items())
    return from_pretrained(folder, dtype=dtype, device=device, tensors=entries)
