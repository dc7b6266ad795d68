"""Quantization-aware training and post-training quantization (torchao).

:class:`QuantizationScheme` is the ``quantization`` config component;
:func:`insert_fake_quantization` prepares a model for QAT; :func:`save_quantized` writes a
quantized HF folder that transformers loads, and :func:`load_quantized` reads one back. Every
torchao call lives in :mod:`attune.quantization.ao`.
"""

from attune.quantization.export import (
    hf_quantization_config,
    is_quantized_folder,
    load_quantized,
    save_quantized,
)
from attune.quantization.scheme import (
    SCHEMES,
    QuantizationScheme,
    insert_fake_quantization,
    set_fake_quantization,
)

__all__ = [
    "SCHEMES",
    "QuantizationScheme",
    "hf_quantization_config",
    "insert_fake_quantization",
    "is_quantized_folder",
    "load_quantized",
    "save_quantized",
    "set_fake_quantization",
]
