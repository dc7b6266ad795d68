"""The shared mechanics of every recipe: run setup, data streams, losses, optimizers and
schedules, the training step, checkpoints, metrics and the held-out answer check."""

from attune.training.answer_check import AnswerCheck, AnswerLog, AnswerReport
from attune.training.checkpointer import Checkpointer
from attune.training.data import BatchStream, eval_batches
from attune.training.distributed import World, unsharded_root
from attune.training.frozen import FrozenModels
from attune.training.interrupt import StopSignals
from attune.training.loop import TrainingLoop, total_steps
from attune.training.loss import SFT_LOSS, ChunkedCrossEntropy, token_count
from attune.training.metrics import (
    METRIC_LOGGER,
    MetricsWriter,
    TensorBoardLogger,
    WandbLogger,
    append_metrics,
)
from attune.training.model_setup import (
    apply_activation_checkpointing,
    compile_layers,
    describe_counts,
    trainable_parameters,
)
from attune.training.optim import (
    build_optimizer,
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
)
from attune.training.quantized import QUANTIZED_FOLDER, quantized_report
from attune.training.run import (
    Run,
    restore_checkpoint,
    resume_point,
    save_checkpoint,
    setup_model,
    start_run,
    weights_writer,
)
from attune.training.runtime import (
    peak_memory_gb,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    state_memory_gb,
)
from attune.training.setup import (
    MODEL_KEYS,
    SAMPLING_KEYS,
    TRAINING_KEYS,
    VALIDATION_KEYS,
    TrainingSetup,
    model_to_use,
    prepare_model,
    reference_model,
    setup_training,
    training_loop,
)
from attune.training.step import (
    HeldOutPairs,
    StepResult,
    TrainingError,
    accumulated_backward,
    all_ranks_sums,
    backward_step,
    check_finite,
    evaluate,
    evaluated_sums,
    held_out_loss,
    optimizer_step,
)

__all__ = [
    "METRIC_LOGGER",
    "MODEL_KEYS",
    "QUANTIZED_FOLDER",
    "SAMPLING_KEYS",
    "SFT_LOSS",
    "TRAINING_KEYS",
    "VALIDATION_KEYS",
    "AnswerCheck",
    "AnswerLog",
    "AnswerReport",
    "BatchStream",
    "Checkpointer",
    "ChunkedCrossEntropy",
    "FrozenModels",
    "HeldOutPairs",
    "MetricsWriter",
    "Run",
    "StepResult",
    "StopSignals",
    "TensorBoardLogger",
    "TrainingError",
    "TrainingLoop",
    "TrainingSetup",
    "WandbLogger",
    "World",
    "accumulated_backward",
    "all_ranks_sums",
    "append_metrics",
    "apply_activation_checkpointing",
    "backward_step",
    "build_optimizer",
    "check_finite",
    "compile_layers",
    "constant_with_warmup",
    "cosine_with_warmup",
    "describe_counts",
    "eval_batches",
    "evaluate",
    "evaluated_sums",
    "held_out_loss",
    "linear_with_warmup",
    "model_to_use",
    "optimizer_step",
    "peak_memory_gb",
    "prepare_model",
    "quantized_report",
    "reference_model",
    "resolve_device",
    "resolve_dtype",
    "restore_checkpoint",
    "resume_point",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_model",
    "setup_training",
    "start_run",
    "state_memory_gb",
    "token_count",
    "total_steps",
    "trainable_parameters",
    "training_loop",
    "unsharded_root",
    "weights_writer",
]
