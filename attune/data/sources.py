"""Loading rows with the ``datasets`` library: local files, folders, or Hub ids.

Local ``.json``/``.jsonl``, ``.csv``, ``.parquet`` and ``.txt`` files load with the matching
``datasets`` builder (a text file gives one ``text`` row per line); a folder or a Hub id loads
as ``datasets.load_dataset`` loads it. ``datasets`` caches the rows as Arrow files, so a second
run reads the cache. Mistakes end with one line: a file that is not there, a JSON line that
does not parse (its line number), or nothing left after filtering.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attune.errors import AttuneError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(AttuneError):
    """A dataset that cannot be loaded or has nothing usable."""


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """For a JSON-lines file: the first line that does not parse, and why."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return number, error.msg
    return None


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (read only as far as the first other byte)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


def load_rows(
    source: str,
    *,
    split: str = "train",
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    cache_dir: str | None = None,
    **load_kwargs: Any,
) -> Any:
    """The rows of a dataset, as a ``datasets.Dataset``.

    Args:
        source: a local file, a local folder, or a Hub dataset id.
        split: which split (a local file has only ``train``; slicing like ``train[:90%]``
            works for any source).
        filter_fn: keep only the rows for which it is true.
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its own).
        **load_kwargs: passed to ``datasets.load_dataset`` (``name``, ``revision``, ...).

    Raises:
        DataError: the file is missing, a JSON line is malformed, loading fails, or no row is
            left after filtering.
    """
    import datasets

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    looks_local = suffix in BUILDERS or source.startswith((".", "/", "~"))
    if looks_local and not path.exists():
        raise DataError(f"dataset file not found: {source}")
    try:
        if path.is_file():
            if suffix not in BUILDERS:
                raise DataError(
                    f"{source}: unsupported file type '{suffix}' (use {', '.join(BUILDERS)})"
                )
            if _is_blank(path):
                raise DataError(f"{source}: the file is empty; give a dataset file with rows")
            rows = datasets.load_dataset(
                BUILDERS[suffix],
                data_files=str(path),
                split=split,
                cache_dir=cache_dir,
                **load_kwargs,
            )
        else:
            rows = datasets.load_dataset(source, split=split, cache_dir=cache_dir, **load_kwargs)
    except DataError:
        raise
    except Exception as error:
        if path.is_file() and BUILDERS.get(suffix) == "json":
            bad = _first_bad_json_line(path)
            if bad is not None:
                raise DataError(f"{source}:{bad[0]}: malformed JSON line ({bad[1]})") from None
        lines = str(error.__cause__ or error).strip().splitlines()
        reason = lines[0] if lines else type(error.__cause__ or error).__name__
        raise DataError(f"cannot load dataset {source}: {reason}") from None
    if filter_fn is not None:
        before = len(rows)
        rows = rows.filter(filter_fn)
        if len(rows) == 0:
            raise DataError(f"{source}: no rows left after filtering ({before} before)")
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty")
    return rows
