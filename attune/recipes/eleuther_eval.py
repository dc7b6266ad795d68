"""Evaluation with lm-evaluation-harness: a checkpoint (or a LoRA adapter on its base) scored on
lm-eval's tasks by attune's own model, as lm-eval's HF model would score it.

``tasks`` names lm-eval tasks or groups; ``include_path`` adds a folder of the user's own task
YAMLs. The shipped local tasks (``attune_reverse_words_mc``, ``attune_reverse_words_gen``,
``attune_reverse_words_rolling``) need nothing downloaded. Every task's dataset is loaded before
the model is: one that cannot be (offline with no cached copy, a missing data file) stops the
run with one line naming the task, its YAML and the dataset, and how to point it at local files.
Results go to ``${output_dir}/results.json`` (lm-eval's results dict), samples to
``${output_dir}/samples_<task>.jsonl`` with ``log_samples: true``, and lm-eval's table is printed,
then how many requests each process answered. Needs the ``eval`` extra:
``pip install "attune[eval]"``.

On several processes (``tune run --nproc_per_node N eleuther_eval ...``) every process holds the
whole model and lm-eval gives each its share of every task's documents (its ``rank`` /
``world_size`` contract); the per-document scores are gathered on rank 0, which writes
results.json: the same scores as one process.

    tune run eleuther_eval --config tiny/eval
    tune run eleuther_eval --config tiny/eval adapter=/tmp/attune/tiny_lora/checkpoints/step_1000
    tune run --nproc_per_node 2 eleuther_eval --config tiny/eval
"""

import json
from pathlib import Path

from omegaconf import OmegaConf

from attune import config, evaluation, training
from attune.errors import ConfigError

SCHEMA = {
    **training.MODEL_KEYS,
    **evaluation.HARNESS_KEYS,
    "output_dir": str,
    "adapter": config.Field(str | None, required=False),
    "log_samples": config.Field(bool, required=False),
}


@config.parse(SCHEMA)
def recipe_main(cfg):
    try:
        import lm_eval
        from lm_eval.utils import make_table

        from attune.evaluation import load_tasks
        from attune.evaluation.lm import AttuneLM
    except ImportError:
        raise ConfigError(
            'eleuther_eval needs lm-evaluation-harness: pip install "attune[eval]"'
        ) from None
    names = [str(name) for name in cfg.tasks]
    if not names:
        raise ConfigError("tasks: name at least one lm-eval task")
    output_dir = Path(cfg.output_dir)
    manager = evaluation.task_manager(
        cfg.get("include_path"), output_dir / "local_tasks", names=names
    )
    evaluation.check_tasks(names, manager)
    tasks = load_tasks(manager, names)  # their datasets too, before any model is built

    with training.start_run(cfg) as run:
        tokenizer = config.instantiate(cfg.tokenizer)
        model, _ = training.inference_model(cfg, run.dtype, run.device)
        lm = AttuneLM(model, tokenizer, batch_size=cfg.get("batch_size", 8), world=run.world)
        seed = cfg.get("seed", 0)
        gen_kwargs = cfg.get("gen_kwargs")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=cfg.get("num_fewshot"),
            limit=cfg.get("limit"),
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
        answered = lm.gather_object(lm.answered)
        if run.is_main:  # lm-eval gathers the results on rank 0 and returns None elsewhere
            write_results(results, output_dir)
            print(make_table(results), flush=True)
            if "groups" in results:
                print(make_table(results, "groups"), flush=True)
            print(answered_line(answered), flush=True)


def answered_line(counts):
    """How many requests each process answered."""
    if len(counts) == 1:
        return f"requests answered: {counts[0]}"
    return f"requests answered: {' + '.join(map(str, counts))} on {len(counts)} processes"


def write_results(results, output_dir):
    """``results.json`` (lm-eval's results dict) and, when logged, ``samples_<task>.jsonl``."""
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", None) or {}
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    (output_dir / "results.json").write_text(text + "\n", encoding="utf-8")
    for task, rows in samples.items():
        lines = "".join(
            json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n"
            for row in rows
        )
        (output_dir / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    recipe_main()
