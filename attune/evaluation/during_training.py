"""lm-eval tasks on the live model as it trains: a training recipe's optional ``eval`` block.

::

    eval:
      tasks: [attune_reverse_words_mc]   # lm-eval task or group names
      limit: 50                          # examples per task
      every_n_steps: 100                 # and always at the last step

The tasks are checked when the run starts (lm-eval installed, each name known, its dataset
loaded), before any model is built. Every ``every_n_steps`` steps and at the last one, the model being
trained is scored by the same evaluator as the ``eleuther_eval`` recipe (:func:`evaluate`, over
:class:`attune.evaluation.lm.AttuneLM`) in eval mode, without gradients and under the run's
autocast, LoRA adapters active; its scores join the step's line of ``metrics.jsonl`` (and the
metric logger) as ``eval/<task>/<metric>`` (:func:`flat_metrics`). lm-eval seeds the global
random generators: their states are put back after, so a run with evaluation trains exactly
as one without.

Many processes: a sharded model's forward pass is a collective, so every process scores every
request (lm-eval sees one process on each) and the first one logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attune import config
from attune.evaluation.harness import (
    DEFAULT_BATCH_SIZE,
    HARNESS_KEYS,
    check_tasks,
    evaluate,
    flat_metrics,
    plain,
    require_lm_eval,
    task_manager,
    task_names,
)
from attune.evaluation.tasks import load_tasks
from attune.precision import entered
from attune.training import rng_state, set_rng_state

if TYPE_CHECKING:
    from attune.models import TransformerDecoder
    from attune.tokenizer import Tokenizer
    from attune.training import Run, TrainingLoop

EVAL_KEYS = {
    "eval": config.Block(
        {**HARNESS_KEYS, "every_n_steps": config.Field(int | None, required=False, minimum=1)}
    )
}
"""The ``eval`` block of a training recipe's schema: :data:`HARNESS_KEYS` and
``every_n_steps``."""

LOCAL_TASKS_DIR = "local_tasks"
PREFIX = "eval/"


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Put Python's, NumPy's and torch's (CPU and CUDA) global generators back as they were."""
    state, numpy_state = rng_state(), np.random.get_state()
    try:
        yield
    finally:
        set_rng_state(state)
        np.random.set_state(numpy_state)


class EvalDuringTraining:
    """The ``eval`` block of a training run (nothing happens without one).

    Args:
        cfg: the run's config (its ``eval`` block and ``seed``).
        run: the run (its ``output_dir``, where the shipped tasks are written, and autocast).

    Raises:
        ConfigError: lm-eval is not installed, a task is unknown or its dataset cannot be
            loaded, or ``include_path`` is not a folder.
    """

    def __init__(self, cfg: Any, run: Run):
        block = cfg.get("eval")
        self.run = run
        self.enabled = block is not None
        if block is None:
            return
        require_lm_eval("eval (evaluation during training)")
        names = task_names(block.get("tasks"), "eval.tasks")
        self.limit = block.get("limit")
        self.manager = task_manager(
            block.get("include_path"), run.output_dir / LOCAL_TASKS_DIR, "eval.include_path"
        )
        check_tasks(names, self.manager, "eval.tasks")
        self.tasks = load_tasks(self.manager, names)  # and their datasets, once
        self.every = block.get("every_n_steps")
        self.options: dict[str, Any] = {
            "num_fewshot": block.get("num_fewshot"),
            "batch_size": block.get("batch_size", DEFAULT_BATCH_SIZE),
            "apply_chat_template": block.get("apply_chat_template", False),
            "fewshot_as_multiturn": block.get("fewshot_as_multiturn", False),
            "system_instruction": block.get("system_instruction"),
            "gen_kwargs": plain(block.get("gen_kwargs")),
            "seed": cfg.get("seed", 0),
        }

    def due(self, step: int, last_step: int) -> bool:
        """Whether the tasks are scored at ``step``: every ``every_n_steps``, and the last."""
        if not self.enabled:
            return False
        return step == last_step or bool(self.every and step % self.every == 0)

    def at_step(self, loop: TrainingLoop, model: TransformerDecoder, tokenizer: Tokenizer) -> None:
        """Score the tasks when due and put the scores in the step's metrics (call it before
        ``loop.end_step()``, on every process)."""
        if not self.due(loop.step, loop.total_steps):
            return
        scores = self.scores(model, tokenizer)
        if scores:
            loop.log_now(scores)
            shown = " ".join(
                f"{name.removeprefix(PREFIX)}={value:.4g}" for name, value in scores.items()
            )
            line = f"step {loop.step} lm-eval: {shown}"
            if loop.metrics is not None:
                loop.metrics.write(line)
            else:
                self.run.print(line)

    def scores(self, model: TransformerDecoder, tokenizer: Tokenizer) -> dict[str, float]:
        """The tasks' scores on ``model`` now, as ``eval/<task>/<metric>`` (empty on the
        processes lm-eval does not report on); the model's mode and the global random
        generators are as they were after."""
        was_training = model.training
        model.eval()
        try:
            with kept_random_state(), torch.no_grad(), entered(self.run.precision):
                results = evaluate(
                    model,
                    tokenizer,
                    self.tasks,
                    self.manager,
                    limit=self.limit,
                    bootstrap_iters=0,  # standard errors are not logged
                    **self.options,
                )
        finally:
            model.train(was_training)
        return {} if results is None else flat_metrics(results, PREFIX)
