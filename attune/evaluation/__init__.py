"""Evaluation on lm-evaluation-harness: an lm-eval model over attune's decoder, the shipped
local tasks, the runs of lm-eval both the ``eleuther_eval`` recipe and training recipes make,
and evaluation during training (the ``eval`` block). Needs the ``eval`` extra
(``pip install "attune[eval]"``) when used; importing it does not."""

from attune.evaluation.during_training import EVAL_KEYS, EvalDuringTraining, kept_random_state
from attune.evaluation.harness import (
    HARNESS_KEYS,
    check_tasks,
    evaluate,
    flat_metrics,
    require_lm_eval,
    task_manager,
    task_names,
)
from attune.evaluation.tasks import LOCAL_TASKS, load_tasks, local_task_folder

__all__ = [
    "EVAL_KEYS",
    "HARNESS_KEYS",
    "LOCAL_TASKS",
    "EvalDuringTraining",
    "check_tasks",
    "evaluate",
    "flat_metrics",
    "kept_random_state",
    "load_tasks",
    "local_task_folder",
    "require_lm_eval",
    "task_manager",
    "task_names",
]
