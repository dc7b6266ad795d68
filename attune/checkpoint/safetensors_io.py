"""Reading HF weight folders: one ``model.safetensors``, or shards listed in an index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from attune.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, in a stable order.

    Raises:
        CheckpointError: the folder is missing, has no safetensors weights, or its index
            names a shard that is not there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {path.name}, which is not in {folder}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    if pickled:
        raise CheckpointError(
            f"{folder} has only pickled weights ({', '.join(pickled[:3])}); attune loads "
            "safetensors only, since unpickling can run arbitrary code. Convert them with "
            "transformers (from_pretrained, then save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Every tensor in these files, memory-mapped, as ``(name, file, tensor)``.

    Raises:
        CheckpointError: a file is corrupt or truncated.
    """
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, path, handle.get_tensor(name)
        except SafetensorError as error:
            raise CheckpointError(f"{path}: corrupt safetensors file ({error})") from None


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    folder: str | Path,
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as HF does: ``model.safetensors``, or numbered shards plus the index.

    Args:
        tensors: name -> tensor (contiguous copies are made where needed).
        folder: an existing folder.
        max_shard_bytes: split into shards no larger than this (a single tensor larger than it
            gets a shard of its own); None writes one file.
        metadata: string entries for every file's header besides ``format`` (a quantized
            model's description of its tensors, which readers merge across shards).

    Returns:
        The files written.
    """
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    metadata = {**(metadata or {}), "format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
        return [folder / SINGLE_FILE]
    files, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        files.append(path)
        weight_map.update(dict.fromkeys(shard, path.name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files
