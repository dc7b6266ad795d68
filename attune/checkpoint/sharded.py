"""Reading a sharded checkpoint (torch.distributed.checkpoint, DCP) without running its code.

DCP's own reader unpickles the ``.metadata`` file with plain :mod:`pickle` and the non-tensor
values (an optimizer's learning rate and betas) with ``torch.load(weights_only=False)``: a
crafted checkpoint folder runs whatever it names. :class:`RestrictedReader` reads the metadata
through an unpickler that admits only the classes DCP writes there (found by reading real
``.metadata`` files: DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, paths), and
:class:`RestrictedLoadPlanner` loads the values with ``weights_only=True``. Both are passed to
``dcp.load``.

Before loading, :func:`read_metadata` and :func:`check_files` check that the metadata is
readable, points only at files in its own folder, and that those files are long enough for
what it says they hold; :func:`check_fits` compares the tensors it holds with the ones a run
expects, so a checkpoint of another shape is one message naming the tensor.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from attune.errors import CheckpointError

METADATA_FILE = ".metadata"

# Every global a ``.metadata`` written by ``dcp.save`` refers to (torch 2.x), and nothing that
# can act on the system when called: dataclasses, an enum, tuple subclasses, a path, and a
# lookup of a layout by its name. Dtypes are admitted by kind below.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UntrustedCheckpoint(CheckpointError):
    """A checkpoint file that asks to run or build something a checkpoint never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UntrustedCheckpoint(f"{module}.{name}")


def read_metadata(path: str | Path, label: str | None = None) -> Metadata:
    """The DCP metadata in ``path``, unpickled with only the metadata classes admitted, its
    files checked to be plain names in its own folder.

    Args:
        path: the ``.metadata`` file.
        label: how messages name the file (default: its path).

    Raises:
        UntrustedCheckpoint: the file names anything else (nothing it names is run).
        CheckpointError: the file is missing, corrupt, or not DCP metadata.
    """
    label = label or str(path)
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except UntrustedCheckpoint as error:
        raise UntrustedCheckpoint(
            f"{label} is not a valid attune checkpoint file and is not trusted: it asks to run "
            f"{error}, which checkpoint metadata never holds (nothing was run)"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{label} is missing") from None
    except Exception as error:  # pickle raises many kinds on garbage bytes
        raise CheckpointError(f"{label} is corrupt ({_first_line(error)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{label} is corrupt (it holds no checkpoint metadata)")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UntrustedCheckpoint(
                f"{label} is not a valid attune checkpoint file and is not trusted: it points "
                f"at {name!r}, outside its own folder"
            )
    return metadata


def check_files(folder: str | Path, metadata: Metadata, label: str | None = None) -> None:
    """Check that every file ``metadata`` reads from is in ``folder`` and long enough.

    Raises:
        CheckpointError: naming the missing or truncated file (as ``label/name``).
    """
    folder = Path(folder)
    label = label or str(folder)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{label}/{name} is missing")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{label}/{name} is truncated ({size} bytes; its metadata reads up to {end})"
            )


def _tensors(node: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a nested state dict, under the dotted names DCP flattens them to."""
    if isinstance(node, torch.Tensor):
        yield prefix, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _tensors(value, f"{prefix}.{index}" if prefix else str(index))


def check_fits(metadata: Metadata, template: Mapping[str, Any]) -> None:
    """Check that the checkpoint holds every tensor of ``template`` (a state dict laid out as
    this run lays it out, sharded or not) with the same full shape.

    Raises:
        CheckpointError: naming the first tensor that is missing or has another shape, and
            how many others do not fit either.
    """
    saved = metadata.state_dict_metadata
    problems = []
    # the model's own tensors (adapters) first: they tell more than their optimizer states
    named = sorted(_tensors(template), key=lambda item: item[0].startswith("optimizer."))
    for name, tensor in named:
        entry = saved.get(name)
        if entry is None:
            problems.append(f"it has no {name}")
        elif isinstance(entry, BytesStorageMetadata) or not isinstance(
            entry, TensorStorageMetadata
        ):
            problems.append(f"its {name} is not a tensor")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.append(
                f"its {name} has shape {list(entry.size)}, this run's {list(tensor.shape)}"
            )
    if problems:
        more = f", and {len(problems) - 1} more tensors differ" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}")


class RestrictedReader(FileSystemReader):
    """DCP's file reader, with its metadata read by :func:`read_metadata` (always the folder's
    one ``.metadata``: attune never writes per-rank metadata)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path) / METADATA_FILE)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None  # set just above
        metadata.storage_meta.load_id = self.load_id
        return metadata


class RestrictedLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor values (an optimizer's hyperparameters)
    loaded by ``torch.load(weights_only=True)`` instead of a plain unpickling."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as error:
            raise load_failure(error, f"its value {read_item.dest_index.fqn}") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_failure(error: BaseException, label: str) -> CheckpointError:
    """The one-line error for a ``torch.load(weights_only=True)`` of ``label`` that failed:
    not trusted when the file names a global torch refuses to run, else corrupt."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return UntrustedCheckpoint(
            f"{label} is not a valid attune checkpoint file and is not trusted: it asks to run "
            f"{refused.group(1)}, which a checkpoint never holds (nothing was run)"
        )
    if "Weights only load failed" in text:
        reason = "not a torch file of tensors and plain values"
    else:
        reason = _first_line(error).split(". ")[0]
    return CheckpointError(f"{label} is corrupt or truncated ({reason})")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
