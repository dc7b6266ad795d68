"""Evaluation with lm-evaluation-harness: a checkpoint (or a LoRA adapter on its base) scored on
lm-eval's tasks by attune's own model, as lm-eval's HF model would score it.

``tasks`` names lm-eval tasks or groups; ``include_path`` adds a folder of the user's own task
YAMLs. The shipped local tasks (``attune_reverse_words_mc``, ``attune_reverse_words_gen``,
``attune_reverse_words_rolling``) need nothing downloaded. Results go to
``${output_dir}/results.json`` (lm-eval's results dict), samples to
``${output_dir}/samples_<task>.jsonl`` with ``log_samples: true``, and lm-eval's table is printed.
Needs the ``eval`` extra: ``pip install "attune[eval]"``.

    tune run eleuther_eval --config tiny/eval
    tune run eleuther_eval --config tiny/eval adapter=/tmp/attune/tiny_lora/checkpoints/step_1000
"""

import json
from pathlib import Path

from omegaconf import OmegaConf

from attune import config, training
from attune.errors import ConfigError
from attune.suggest import did_you_mean

SCHEMA = {
    **training.MODEL_KEYS,
    "output_dir": str,
    "adapter": config.Field(str | None, required=False),
    "tasks": list,
    "include_path": config.Field(str | None, required=False),
    "num_fewshot": config.Field(int | None, required=False, minimum=0),
    "limit": config.Field(int | float | None, required=False),
    "batch_size": config.Field(int, required=False, minimum=1),
    "apply_chat_template": config.Field(bool, required=False),
    "fewshot_as_multiturn": config.Field(bool, required=False),
    "system_instruction": config.Field(str | None, required=False),
    "log_samples": config.Field(bool, required=False),
    "gen_kwargs": config.Field(dict | None, required=False),
}


def task_manager(include_path, local_tasks_dir):
    """lm-eval's ``TaskManager`` over its own tasks, the shipped local tasks and
    ``include_path``."""
    from lm_eval.tasks import TaskManager

    from attune.evaluation import local_task_folder

    paths = [str(local_task_folder(local_tasks_dir))]
    if include_path:
        if not Path(include_path).is_dir():
            raise ConfigError(f"include_path: {include_path} is not a folder of task YAMLs")
        paths.append(str(include_path))
    return TaskManager(include_path=paths)


def check_tasks(names, manager):
    """Each name is a task or group lm-eval knows (else the closest one)."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            raise ConfigError(f"tasks: unknown lm-eval task '{name}'{did_you_mean(name, known)}")


@config.parse(SCHEMA)
def recipe_main(cfg):
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable, make_table

        from attune.evaluation.lm import AttuneLM
    except ImportError:
        raise ConfigError(
            'eleuther_eval needs lm-evaluation-harness: pip install "attune[eval]"'
        ) from None
    limit = cfg.get("limit")
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit: {limit} must be > 0 (a number of examples, or a fraction)")
    names = [str(name) for name in cfg.tasks]
    if not names:
        raise ConfigError("tasks: name at least one lm-eval task")
    output_dir = Path(cfg.output_dir)
    manager = task_manager(cfg.get("include_path"), output_dir / "local_tasks")
    check_tasks(names, manager)

    device = training.resolve_device(cfg.get("device", "auto"))
    dtype = training.resolve_dtype(cfg.get("dtype", "fp32"))
    seed = cfg.get("seed", 0)
    tokenizer = config.instantiate(cfg.tokenizer)
    model, _ = training.inference_model(cfg, dtype, device)
    gen_kwargs = cfg.get("gen_kwargs")
    results = lm_eval.simple_evaluate(
        model=AttuneLM(model, tokenizer, batch_size=cfg.get("batch_size", 8)),
        tasks=names,
        num_fewshot=cfg.get("num_fewshot"),
        limit=limit,
        log_samples=cfg.get("log_samples", False),
        system_instruction=cfg.get("system_instruction"),
        apply_chat_template=cfg.get("apply_chat_template", False),
        fewshot_as_multiturn=cfg.get("fewshot_as_multiturn", False),
        gen_kwargs=None if gen_kwargs is None else OmegaConf.to_container(gen_kwargs),
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # lm-eval returns results on rank 0 only
        return
    samples = results.pop("samples", None) or {}
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    (output_dir / "results.json").write_text(text + "\n", encoding="utf-8")
    for task, rows in samples.items():
        lines = "".join(
            json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n"
            for row in rows
        )
        (output_dir / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")
    print(make_table(results), flush=True)
    if "groups" in results:
        print(make_table(results, "groups"), flush=True)


if __name__ == "__main__":
    recipe_main()
