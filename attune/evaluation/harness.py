"""Running lm-evaluation-harness on an attune model, for the ``eleuther_eval`` recipe and for
evaluation during training alike: the config keys they share, the tasks a run may name (lm-eval's
own, the shipped local ones, a folder of the user's), the checks made before any work, one
evaluation, and its metrics as flat names.

lm-eval is the optional ``eval`` extra: it is imported when a function here needs it, so
importing this module (and reading :data:`HARNESS_KEYS`) works without it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from attune import config
from attune.errors import ConfigError
from attune.evaluation.tasks import LOCAL_TASKS, local_task_folder
from attune.suggest import did_you_mean

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from attune.distributed import World
    from attune.models import TransformerDecoder
    from attune.tokenizer import Tokenizer

INSTALL = 'pip install "attune[eval]"'

HARNESS_KEYS = {
    "tasks": list,
    "include_path": config.Field(str | None, required=False),
    "num_fewshot": config.Field(int | None, required=False, minimum=0),
    # examples per task, or (below 1.0) that share of each task
    "limit": config.Field(int | float | None, required=False, above=0),
    "batch_size": config.Field(int, required=False, minimum=1),
    "apply_chat_template": config.Field(bool, required=False),
    "fewshot_as_multiturn": config.Field(bool, required=False),
    "system_instruction": config.Field(str | None, required=False),
    "gen_kwargs": config.Field(dict | None, required=False),
}
"""The lm-eval settings a config gives (``eleuther_eval``'s top-level keys, the ``eval``
block of a training recipe): which tasks, how many examples, how they are prompted."""

DEFAULT_BATCH_SIZE = 8


def require_lm_eval(what: str) -> None:
    """Stop with one line when lm-evaluation-harness is not installed.

    Args:
        what: what needs it, for the message (``eleuther_eval``, ``eval``).

    Raises:
        ConfigError: lm-eval cannot be imported.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs lm-evaluation-harness: {INSTALL}") from None


def task_manager(
    include_path: str | None,
    local_tasks_dir: str | Path,
    key: str = "include_path",
    names: Sequence[str] | None = None,
) -> TaskManager:
    """lm-eval's ``TaskManager`` over its own tasks, the shipped local tasks (written into
    ``local_tasks_dir``) and ``include_path``; lm-eval's own are left out when ``names`` asks
    for shipped tasks only (indexing its thousands of YAMLs takes seconds).

    Args:
        include_path: a folder of the user's own task YAMLs, or None.
        local_tasks_dir: where the shipped tasks are written for lm-eval to find.
        key: the config key of ``include_path``, for the message.
        names: the tasks that will be asked for, when known.

    Raises:
        ConfigError: ``include_path`` is not a folder.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(local_task_folder(local_tasks_dir))]
    if include_path:
        if not Path(include_path).is_dir():
            raise ConfigError(f"{key}: {include_path} is not a folder of task YAMLs")
        paths.append(str(include_path))
    shipped_only = names is not None and not include_path and set(names) <= set(LOCAL_TASKS)
    return TaskManager(include_path=paths, include_defaults=not shipped_only)


def task_names(names: Sequence[Any] | None, key: str = "tasks") -> list[str]:
    """The task names a config gives, as strings; at least one.

    Raises:
        ConfigError: none is named.
    """
    found = [str(name) for name in names or ()]
    if not found:
        raise ConfigError(f"{key}: name at least one lm-eval task")
    return found


def check_tasks(names: Sequence[str], manager: TaskManager, key: str = "tasks") -> None:
    """Each name is a task or group lm-eval knows.

    Raises:
        ConfigError: one is not, naming the closest known one.
    """
    known = manager.all_tasks
    for name in names:
        if name not in known:
            raise ConfigError(f"{key}: unknown lm-eval task '{name}'{did_you_mean(name, known)}")


def plain(value: Any) -> Any:
    """A config node as plain Python (``gen_kwargs`` from a DictConfig), None as it is."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value


def evaluate(
    model: TransformerDecoder,
    tokenizer: Tokenizer,
    tasks: Sequence[Any],
    manager: TaskManager,
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    system_instruction: str | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    log_samples: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 100000,
    world: World | None = None,
) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate`` of ``model`` (through :class:`AttuneLM`) on ``tasks``.

    The model is used as it is (its mode, device, autocast and gradient settings are the
    caller's). lm-eval seeds Python's, NumPy's and torch's global generators with ``seed``.

    Args:
        model: the decoder.
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names (see :func:`check_tasks`), or the tasks
            :func:`attune.evaluation.load_tasks` loaded (their datasets read once).
        manager: the ``TaskManager`` that knows them (:func:`task_manager`).
        limit: examples per task (a share below 1.0), or None for all.
        num_fewshot: few-shot examples, or None for each task's own.
        batch_size: requests scored or generated together.
        apply_chat_template: render prompts with the model's chat template.
        fewshot_as_multiturn: few-shot examples as conversation turns.
        system_instruction: a system message, or None.
        gen_kwargs: settings that override generation tasks' own.
        log_samples: keep each example's inputs and outputs (``results["samples"]``).
        seed: the seed of lm-eval's generators and few-shot sampling.
        bootstrap_iters: resamples of bootstrapped standard errors (0: none).
        world: the processes to split the requests across, each holding the whole model
            (``eleuther_eval`` under torchrun); None: this process answers every request (as
            each rank of a sharded model must).

    Returns:
        lm-eval's results dict on the process that reports (rank 0), None on the others.
    """
    import lm_eval

    from attune.evaluation.lm import AttuneLM

    return lm_eval.simple_evaluate(  # type: ignore[no-any-return]
        model=AttuneLM(model, tokenizer, batch_size=batch_size, world=world),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        system_instruction=system_instruction,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        gen_kwargs=plain(gen_kwargs),
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def flat_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The scores of lm-eval's results dict as flat names: ``<task>/<metric>`` for lm-eval's
    ``"<metric>,none"``, ``<task>/<metric>/<filter>`` for another filter (``exact_match,strip``
    -> ``<task>/exact_match/strip``); standard errors and non-numbers left out.

    Args:
        results: what :func:`evaluate` returned.
        prefix: put before each name (``eval/``).
    """
    flat: dict[str, float] = {}
    for task, scores in results.get("results", {}).items():
        for name, value in scores.items():
            if "," not in name or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            metric, _, applied = name.partition(",")
            if metric.endswith("_stderr"):
                continue
            suffix = "" if applied == "none" else f"/{applied}"
            flat[f"{prefix}{task}/{metric}{suffix}"] = float(value)
    return flat
