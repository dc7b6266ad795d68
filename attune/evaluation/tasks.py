"""lm-eval's tasks for a run: the shipped local tasks (the reversal task, nothing downloaded),
written where lm-eval finds them, and the requested tasks loaded with their datasets before any
model is, a dataset that cannot be loaded said in one line.

The YAMLs in ``attune/demo/eval_tasks`` name their data file ``DATA_FILE``: lm-eval hands a
``data_files`` path to ``datasets`` as it is, relative to the working directory, so
:func:`local_task_folder` writes copies with the data file's absolute path in an installed
package, for a ``TaskManager``'s ``include_path``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attune.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "demo" / "eval_tasks"
DATA_FILE = SHIPPED / "reverse_words_eval.jsonl"
LOCAL_TASKS = (
    "attune_reverse_words_mc",
    "attune_reverse_words_gen",
    "attune_reverse_words_rolling",
)


def local_task_folder(folder: str | Path) -> Path:
    """Write the shipped task YAMLs into ``folder``, pointing at the shipped data file.

    Args:
        folder: where to write them (created if missing).

    Returns:
        The folder, for ``TaskManager(include_path=...)``.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    data_file = DATA_FILE.as_posix()
    for source in sorted(SHIPPED.glob("*.yaml")):
        text = source.read_text(encoding="utf-8").replace("DATA_FILE", data_file)
        # written whole or not at all: another process may read the folder meanwhile
        handle, temporary = tempfile.mkstemp(dir=target, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, target / source.name)
    return target


def load_tasks(manager: Any, names: Sequence[str]) -> list[Any]:
    """The tasks and groups ``names`` (with their datasets), ready for ``simple_evaluate``.

    Args:
        manager: lm-eval's ``TaskManager``, with every name in its index.
        names: task, group or tag names.

    Returns:
        The loaded tasks and groups, each once (a group's members inside it).

    Raises:
        ConfigError: a task's dataset cannot be loaded (not on this machine and the Hub out of
            reach, or a local file missing): which task, which dataset, and how to point the
            task at local files.
    """
    try:
        loaded = manager.load(list(names))
    except Exception as error:
        failed = _failed_download(error)
        if failed is None:
            raise
        raise ConfigError(_dataset_problem(manager, *failed, error)) from None
    groups = list(loaded["groups"].values())
    inner = {id(group) for parent in groups for group in parent.get_all_groups()}
    inner |= {id(task) for group in groups for task in group.get_all_tasks()}
    top = [group for group in groups if id(group) not in inner]
    top += [task for task in loaded["tasks"].values() if id(task) not in inner]
    return top


def _failed_download(error: BaseException) -> tuple[Any, dict] | None:
    """The task whose dataset download raised ``error``, and the arguments it passed, or None
    when the error came from elsewhere."""
    from lm_eval.api.task import Task

    frame = error.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        task = frame.tb_frame.f_locals.get("self")
        if code.co_name == "download" and isinstance(task, Task):
            return task, dict(frame.tb_frame.f_locals.get("dataset_kwargs") or {})
        frame = frame.tb_next
    return None


def _dataset_problem(manager: Any, task: Any, kwargs: dict, error: BaseException) -> str:
    name = task.config.task
    entry = manager.task_index.get(name)
    where = f" ({entry.yaml_path})" if entry is not None and entry.yaml_path else ""
    dataset = str(task.DATASET_PATH)
    if task.DATASET_NAME:
        dataset += f", name {task.DATASET_NAME}"
    files = kwargs.get("data_files")
    if files:
        dataset += f", data_files {files}"
    reason = " ".join(str(error).split()) or type(error).__name__
    if files:
        fix = (
            "fix data_files in the task's YAML (absolute paths, or relative to the working "
            f"directory {Path.cwd()})"
        )
    else:
        fix = (
            "load it once where the Hub is reachable (the datasets cache serves it offline "
            "after), or point the task's YAML at local files: dataset_path: json, "
            "dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}"
        )
    return f"tasks: '{name}'{where} cannot load its dataset ({dataset}): {reason}; {fix}"
