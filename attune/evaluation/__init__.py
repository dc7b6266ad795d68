"""Evaluation on lm-evaluation-harness: an lm-eval model over attune's decoder, and the
shipped local tasks. Needs the ``eval`` extra (``pip install "attune[eval]"``)."""

from attune.evaluation.tasks import LOCAL_TASKS, local_task_folder

__all__ = ["LOCAL_TASKS", "local_task_folder"]
