"""Checkpoint storage: reading and writing safetensors weights in the Hugging Face layout,
manifests that catch a damaged file before a resume (:mod:`attune.checkpoint.manifest`), and
reading sharded checkpoints without running their code (:mod:`attune.checkpoint.sharded`).

This package knows files, not models: :mod:`attune.models` maps the tensors it reads onto a
decoder.
"""

from attune.checkpoint.atomic import atomic_folder, exclusive_lock, publish_folder
from attune.checkpoint.safetensors_io import iter_safetensors, weight_files, write_safetensors

__all__ = [
    "atomic_folder",
    "exclusive_lock",
    "iter_safetensors",
    "publish_folder",
    "weight_files",
    "write_safetensors",
]
