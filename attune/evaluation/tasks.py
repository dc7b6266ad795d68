"""The shipped local tasks (the reversal task, nothing downloaded), written where lm-eval finds
them.

The YAMLs in ``attune/demo/eval_tasks`` name their data file ``DATA_FILE``: lm-eval hands a
``data_files`` path to ``datasets`` as it is, relative to the working directory, so
:func:`local_task_folder` writes copies with the data file's absolute path in an installed
package, for a ``TaskManager``'s ``include_path``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
