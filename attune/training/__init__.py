"""The shared mechanics of every recipe: run setup, data streams, losses, optimizers and
schedules, the training step, checkpoints, metrics and the held-out answer check."""

from attune.distributed import World
from attune.training.answer_check import AnswerCheck, AnswerLog, AnswerReport
from attune.training.checkpoint_state import (
    restore_checkpoint,
    resume_point,
    save_checkpoint,
    weights_writer,
)
from attune.training.checkpointer import Checkpointer
from attune.training.data import BatchStream, eval_batches
from attune.training.distillation import KD_LOSS, DistillationLoss, DistillationTerms
from attune.training.divergence import TrainingError, check_finite
from attune.training.evaluate import HeldOutLoss, evaluate, evaluated_sums, held_out_loss
from attune.training.frozen import FrozenModels
from attune.training.interrupt import StopSignals
from attune.training.keys import (
    MODEL_KEYS,
    SAMPLING_KEYS,
    TRAINING_KEYS,
    VALIDATION_KEYS,
    sampling_options,
)
from attune.training.loop import TrainingLoop, total_steps
from attune.training.loss import SFT_LOSS, ChunkedCrossEntropy, token_count
from attune.training.metrics import MetricsWriter, append_metrics, mean_and_std
from attune.training.on_policy import ON_POLICY_KEYS, OnPolicy, check_lmbda, check_on_policy_loss
from attune.training.optim import (
    build_optimizer,
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
)
from attune.training.pairwise import HeldOutPairs, pairwise_step
from attune.training.quantized import QUANTIZED_FOLDER, quantized_report
from attune.training.run import Run, recipe, start_run
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
    TrainingSetup,
    apply_activation_checkpointing,
    build_model,
    compile_layers,
    describe_counts,
    inference_model,
    reference_model,
    setup_training,
    trainable_parameters,
    training_loop,
)
from attune.training.sharding import unsharded_root
from attune.training.step import StepResult, accumulated_backward, backward_step, optimizer_step
from attune.training.teacher import (
    TEACHER_KEYS,
    build_teacher,
    check_teacher_path,
    distillation_step,
)
from attune.training.trackers import (
    METRIC_LOGGER,
    MLflowLogger,
    TensorBoardLogger,
    Trackers,
    TrackioLogger,
    WandbLogger,
)
from attune.training.update import update_and_log

__all__ = [
    "KD_LOSS",
    "METRIC_LOGGER",
    "MODEL_KEYS",
    "ON_POLICY_KEYS",
    "QUANTIZED_FOLDER",
    "SAMPLING_KEYS",
    "SFT_LOSS",
    "TEACHER_KEYS",
    "TRAINING_KEYS",
    "VALIDATION_KEYS",
    "AnswerCheck",
    "AnswerLog",
    "AnswerReport",
    "BatchStream",
    "Checkpointer",
    "ChunkedCrossEntropy",
    "DistillationLoss",
    "DistillationTerms",
    "FrozenModels",
    "HeldOutLoss",
    "HeldOutPairs",
    "MLflowLogger",
    "MetricsWriter",
    "OnPolicy",
    "Run",
    "StepResult",
    "StopSignals",
    "TensorBoardLogger",
    "Trackers",
    "TrackioLogger",
    "TrainingError",
    "TrainingLoop",
    "TrainingSetup",
    "WandbLogger",
    "World",
    "accumulated_backward",
    "append_metrics",
    "apply_activation_checkpointing",
    "backward_step",
    "build_model",
    "build_optimizer",
    "build_teacher",
    "check_finite",
    "check_lmbda",
    "check_on_policy_loss",
    "check_teacher_path",
    "compile_layers",
    "constant_with_warmup",
    "cosine_with_warmup",
    "describe_counts",
    "distillation_step",
    "eval_batches",
    "evaluate",
    "evaluated_sums",
    "held_out_loss",
    "inference_model",
    "linear_with_warmup",
    "mean_and_std",
    "optimizer_step",
    "pairwise_step",
    "peak_memory_gb",
    "quantized_report",
    "recipe",
    "reference_model",
    "resolve_device",
    "resolve_dtype",
    "restore_checkpoint",
    "resume_point",
    "rng_state",
    "sampling_options",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_training",
    "start_run",
    "state_memory_gb",
    "token_count",
    "total_steps",
    "trainable_parameters",
    "training_loop",
    "unsharded_root",
    "update_and_log",
    "weights_writer",
]
