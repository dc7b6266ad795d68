"""The outer loop every training recipe shares: steps and epochs, stop signals, checkpoints,
resume, and the metrics of each step.

A recipe writes only what its method does in one step::

    loop = training.training_loop(cfg, run, setup, stream)  # resumed when the run continues
    for micro_batches in loop:           # one optimizer step per item
        result = ...                     # forward and backward
        loop.optimizer_step(cfg.get("clip_grad_norm"))
        loop.count(result.input_tokens)
        loop.log({"loss": result.loss})  # written on logging steps, with the common fields
        loop.end_step()                  # metrics; a checkpoint when due or a signal came
    loop.finish()                        # saves the last step; RunStopped on a stop signal

:meth:`TrainingLoop.end_step` writes the step's metrics, agrees with the other ranks whether a
stop signal came, and saves a checkpoint when one is due or a signal asks for it, so a stopped
run resumes at the exact step and data position it stopped at. The recipe calls it, so where
a checkpoint is taken is in the recipe's text; a step without it is a mistake the loop names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from attune.errors import CheckpointError, RunStopped
from attune.models import TransformerDecoder
from attune.models.moe import expert_load
from attune.peft import LoraSettings
from attune.training import plots
from attune.training.checkpoint_state import restore_checkpoint, save_checkpoint
from attune.training.checkpointer import STATE_DIR, STATE_FILE, Checkpointer, newest_up_to
from attune.training.data import BatchStream
from attune.training.divergence import UpdateCheck, stopped
from attune.training.interrupt import StopSignals
from attune.training.metrics import MetricLogger, MetricsWriter, append_metrics
from attune.training.run import Run
from attune.training.runtime import peak_memory_gb, state_memory_gb
from attune.training.step import optimizer_step
from attune.training.trackers import Trackers

CURVES_EVERY_S = 30.0
"""At a checkpoint, ``curves.png`` is drawn again when its last drawing is this old."""


def total_steps(stream: BatchStream, epochs: int, max_steps: int | None) -> int:
    """The optimizer steps of a run: whole epochs, capped at ``max_steps`` when given."""
    steps = stream.steps_per_epoch() * epochs
    return steps if max_steps is None else min(steps, max_steps)


class TrainingLoop:
    """Steps of micro-batches with their bookkeeping.

    Args:
        run: the run.
        model: the model being trained (its state goes into checkpoints).
        params: the parameters it trains (the optimizer's, clipped together).
        optimizer: its optimizer.
        scheduler: the learning-rate schedule, or None.
        stream: where the steps' micro-batches come from.
        checkpointer: where checkpoints go.
        lora: the adapter settings of a LoRA run (its checkpoints hold the adapter).
        total_steps: the steps of the whole run.
        epochs: the epochs of the whole run.
        log_every: write metrics every this many steps (and at the last step).
        metric_logger: an extra metrics destination (TensorBoard, W&B...), or None.
        metric_loggers: more of them: trackers, or ``(name, tracker)`` pairs (the name keys
            its state in checkpoints). Opened when the loop starts, on rank 0, and closed
            when the run ends, however it ends.
        hyperparameters: the run's resolved config, which the trackers record.
        companions: models trained beside ``model`` by the same optimizer (PPO's value
            model), saved in each checkpoint as ``<name>/``.

    Attributes:
        step: the steps taken; inside the loop's body, the number of the step being taken.
        tokens_seen: input tokens (padding aside) of every step taken.
        last_saved: the latest checkpoint folder, or None.
        recipe_state: the recipe's own state (plain values: a KL coefficient, say), saved in
            each checkpoint and restored by :meth:`resume`.
        trackers: the experiment trackers the metrics also go to; their runs' ids are kept
            in each checkpoint, so that a resume continues them.
    """

    def __init__(
        self,
        run: Run,
        model: TransformerDecoder,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        stream: BatchStream,
        checkpointer: Checkpointer,
        lora: LoraSettings | None,
        *,
        total_steps: int,
        epochs: int,
        log_every: int = 1,
        metric_logger: MetricLogger | None = None,
        companions: Mapping[str, TransformerDecoder] | None = None,
        metric_loggers: Sequence[MetricLogger | tuple[str, MetricLogger]] = (),
        hyperparameters: Mapping[str, Any] | None = None,
    ):
        self.run = run
        self.companions = dict(companions or {})
        self.recipe_state: dict[str, Any] = {}
        self.model = model
        self.params = params
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = stream
        self.checkpointer = checkpointer
        self.lora = lora
        self.total_steps = total_steps
        self.epochs = epochs
        self.log_every = log_every
        self.metric_logger = metric_logger
        named = [("metric_logger", metric_logger)] if metric_logger is not None else []
        for index, item in enumerate(metric_loggers):
            named.append(item if isinstance(item, tuple) else (f"metric_loggers.{index}", item))
        self.trackers = Trackers(named, hyperparameters, enabled=run.is_main)
        run.at_exit(self.trackers.close)
        self._trackers_resumed: dict[str, Any] | None = None
        self._curves = run.is_main  # drawn until matplotlib is found missing
        self._curves_at: float | None = None
        self._curves_current = False
        self.step = 0
        self.tokens_seen = 0
        self.last_saved: str | None = None
        self.resumed = False
        self.metrics: MetricsWriter | None = None
        self.stop = StopSignals(latest=self._latest_complete)
        self._update_check = UpdateCheck(self._diverged)
        self.stopping = False
        self._record: dict[str, Any] = {}
        self._ended = True
        self._batches: Iterator[list[dict[str, torch.Tensor]]] = iter(())
        self._window_tokens = 0
        self._window_start = self._loop_start = time.perf_counter()

    # Resume and save ---------------------------------------------------------------------

    def resume(self, folder: Path) -> dict[str, Any]:
        """Continue from a checkpoint: optimizer (and adapters), schedule, data position, RNG
        states, step and token count. Returns the checkpoint's loop state."""
        state = restore_checkpoint(
            self.checkpointer, folder, self.model, self.optimizer, self.lora, self.companions
        )
        try:
            self.recipe_state = dict(state.get("recipe", {}))
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["lr_scheduler"])
            self.stream.load_state_dict(state["data"])
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self._trackers_resumed = dict(state.get("trackers") or {})
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise CheckpointError(
                f"cannot resume from {folder}: its {STATE_DIR}/{STATE_FILE} is not the state "
                f"of this kind of run ({type(error).__name__}: {error})"
            ) from None
        self.last_saved = str(folder)
        self.resumed = True
        self._update_check.weights_norm = None  # the weights are the checkpoint's now
        self.run.print(f"resumed from {folder} at step {self.step}")
        return state

    def save(self) -> str:
        """Write a checkpoint of the current step (a collective: every rank calls it)."""
        loop_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.stream.state_dict(),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "recipe": self.recipe_state,
            "param_groups": len(self.optimizer.param_groups),
            "trackers": self.trackers.state(),
        }
        folder = save_checkpoint(
            self.checkpointer,
            self.step,
            self.run,
            self.model,
            self.optimizer,
            self.lora,
            loop_state,
            self.companions,
        )
        self.last_saved = str(folder)
        self._draw_curves(checkpoint=True)
        return self.last_saved

    def _draw_curves(self, checkpoint: bool = False) -> None:
        """``curves.png`` from ``metrics.jsonl`` (main process): at the end, and at a
        checkpoint when its last drawing is :data:`CURVES_EVERY_S` old. Without matplotlib,
        one line says so; a drawing that fails is a warning, and the run goes on."""
        if not self._curves or self._curves_current:
            return
        started = time.perf_counter()
        if (
            checkpoint
            and self._curves_at is not None
            and started - self._curves_at < CURVES_EVERY_S
        ):
            return
        if not plots.available():
            self._curves = False
            self.run.print(
                f"{plots.CURVES_FILE} not drawn: matplotlib is not installed ({plots.INSTALL})"
            )
            return
        try:
            plots.draw_run(self.run.output_dir)
        except Exception as error:
            self._curves = False
            self.run.print(
                f"warning: {plots.CURVES_FILE} not drawn: {type(error).__name__}: {error}"
            )
        self._curves_at, self._curves_current = time.perf_counter(), True

    # The loop ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """A step's micro-batches at a time, until the last step, the last epoch, or a stop
        signal (SIGINT/SIGTERM on any rank)."""
        self.metrics = MetricsWriter(
            self.run.output_dir,
            self.total_steps,
            extra=self.metric_logger,
            resume_step=self.step if self.resumed else None,
            enabled=self.run.is_main,
        )
        self.trackers.start(
            self._trackers_resumed if self.resumed else None,
            resume_step=self.step if self.resumed else None,
        )
        self._window_start = self._loop_start = time.perf_counter()
        self.model.train()
        for companion in self.companions.values():
            companion.train()
        with self.stop:
            while self.step < self.total_steps and self.stream.epoch < self.epochs:
                self._batches = iter(self.stream)
                for micro_batches in self._batches:
                    self.step += 1
                    self._record = {}
                    self._ended = False
                    yield micro_batches
                    if not self._ended:
                        raise RuntimeError(
                            f"step {self.step} ended without loop.end_step(): a recipe calls it "
                            "at the end of each step (it writes metrics and checkpoints)"
                        )
                    if self.step >= self.total_steps or self.stopping:
                        return
                self.stream.set_epoch(self.stream.epoch + 1)
            # only steps that drew more data (more_batches) end the epochs this early
            if self.step < self.total_steps:
                self.run.print(
                    f"the data ran out at step {self.step} of {self.total_steps}: steps that "
                    "drew more than one batch (dynamic sampling) used it up sooner; raise epochs "
                    "or lower max_steps to train every step planned"
                )

    def more_batches(self) -> list[dict[str, torch.Tensor]] | None:
        """Inside a step: the next step's worth of micro-batches drawn into this one (DAPO's
        dynamic sampling refilling a batch), counted as consumed, so a resume starts after
        them; None at the end of the epoch."""
        return next(self._batches, None)

    def optimizer_step(self, max_grad_norm: float | None) -> float | None:
        """Clip (when ``max_grad_norm`` is set), step the optimizer and the schedule, clear the
        gradients; returns the gradient norm before clipping, when clipped.

        Raises:
            TrainingError: the gradient norm is not finite (before stepping), or the step left
                the weights non-finite or multiplied their norm (after it; nothing more is
                saved), naming the last checkpoint whose weights are good.
        """
        return optimizer_step(
            self.params, self.optimizer, self.scheduler, max_grad_norm, self._update_check
        )

    def _diverged(self, problem: str, stepped: bool) -> BaseException:
        # A bad update leaves the weights it started from good (their loss and gradient were
        # finite): a checkpoint of the previous step is. A non-finite gradient came from those
        # weights themselves: only a checkpoint of an earlier step is.
        good = newest_up_to(self.last_saved, self.step - 1 if stepped else self.step - 2)
        return stopped(problem, self.step, good)

    def _latest_complete(self) -> Path | None:
        """The newest complete checkpoint of this run (the one resumed from, if none newer)."""
        latest = self.checkpointer.latest()
        if latest is None and self.resumed and self.last_saved is not None:
            return Path(self.last_saved)
        return latest

    @property
    def log_due(self) -> bool:
        """Whether this step's metrics are written."""
        return self.step % self.log_every == 0 or self.step == self.total_steps

    def count(self, input_tokens: int) -> None:
        """Add the step's input tokens (padding aside) to the throughput and the total."""
        self.tokens_seen += input_tokens
        self._window_tokens += input_tokens

    def log(self, fields: Mapping[str, Any]) -> None:
        """The step's training metrics, written with the common ones (step, epoch, lr,
        throughput, memory) on logging steps; ignored on the others. Fields that are None are
        left out."""
        if not self.log_due:
            return
        now = time.perf_counter()
        self._record.update(
            {
                "epoch": self.stream.epoch,
                **{name: value for name, value in fields.items() if value is not None},
                "lr": self.optimizer.param_groups[0]["lr"],
                "tokens_per_second": self._window_tokens / max(now - self._window_start, 1e-9),
                "elapsed_s": now - self._loop_start,
                "tokens_seen": self.tokens_seen,
                "peak_memory_gb": peak_memory_gb(self.run.device),
                "state_memory_gb": state_memory_gb(self.model, self.optimizer),
                # a mixture of experts: each MoE layer's busiest expert, on the last batch
                **expert_load(self.model),
            }
        )
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def log_now(self, fields: Mapping[str, Any]) -> None:
        """Metrics written whatever the step (a validation pass's, say)."""
        self._record.update(fields)

    def log_after(self, fields: Mapping[str, Any]) -> None:
        """Metrics of the finished run (a final evaluation's), one more line of
        ``metrics.jsonl`` under the last step, also sent to the trackers and drawn in
        ``curves.png``."""
        if self.run.is_main:
            append_metrics(self.run.output_dir, {"step": self.step, **fields})
            self.trackers.log(fields, self.step)
            self._curves_current = False
            self._draw_curves()

    def end_step(self) -> None:
        """End the step: write its metrics, agree with the other ranks whether a stop signal
        came, and save a checkpoint when one is due or a signal asks for it (a collective:
        every rank calls it)."""
        self._ended = True
        assert self.metrics is not None, "end_step() is called inside the loop"
        if self._record:
            self.metrics.log({"step": self.step, **self._record})
            self.trackers.log(self._record, self.step)
            self._curves_current = False
        self.metrics.advance()
        self.stopping = self.run.world.any(self.stop.requested is not None)
        if self.checkpointer.due(self.step) or self.stopping:
            self.save()

    def finish(self) -> str:
        """End the run: on a stop signal, say where to resume and exit with the signal's
        status; otherwise save the last step (unless just saved). Returns the last checkpoint.

        Raises:
            RunStopped: a stop signal ended the run early (its checkpoint saved); the command
                line exits with the signal's status.
        """
        if self.metrics is not None:
            self.metrics.close()
        if self.stopping:
            self._draw_curves()
            signal_name = self.stop.requested or "on another rank"
            self.run.print(
                f"stopped by signal {signal_name} at step {self.step}; checkpoint "
                f"{self.last_saved}; continue with resume_from_checkpoint=true"
            )
            raise RunStopped(self.stop.exit_code)
        saved = self.last_saved
        if saved is None or not saved.endswith(f"step_{self.step}"):
            saved = self.save()
        self._draw_curves()
        self.run.print(f"saved {saved}")
        return saved
