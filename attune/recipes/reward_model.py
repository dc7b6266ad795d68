"""Reward-model training: a decoder with a scalar ``score`` head learns, from preference pairs,
to score the chosen reply above the rejected one (Bradley–Terry), one device or many.

Registered as ``reward_model_single_device`` and ``reward_model_distributed``. The ``model``
component is built with ``num_labels: 1``: from a causal LM's checkpoint the output projection
is left out and a fresh score head added; the run saves HF ``*ForSequenceClassification``
folders that transformers' ``AutoModelForSequenceClassification`` loads, and that PPO reads as
its reward (``attune.rl.ModelReward``) or starts its value model from. The reward is read at
each reply's end-of-turn token (see :mod:`attune.rl.reward_model`).
It has no ``eval`` block (lm-eval tasks during training): a scalar score head is not a
language model lm-eval's requests can score.

    tune run reward_model_single_device --config tiny/reward_model
"""

from attune import config, rl, training
from attune.errors import ConfigError

SCHEMA = {
    **training.TRAINING_KEYS,
    **training.VALIDATION_KEYS,
    "loss": config.Component(required=False, expects=rl.PAIR_LOSS),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # The objective (a bad setting ends the run before any work), then the scoring model
    objective = rl.RewardObjective(config.instantiate(cfg.get("loss")) or rl.BradleyTerryLoss())
    if cfg.get("lora") is not None:
        raise ConfigError(
            "reward models train in full here (their new score head has no LoRA form peft "
            "reads back); remove the lora section"
        )
    setup = training.setup_training(cfg, run)
    model, tokenizer = setup.model, setup.tokenizer
    if model.config.num_labels != 1:
        raise ConfigError(
            "a reward model has one output: give the model component num_labels: 1 (for "
            "attune.models.from_pretrained or attune.demo.tiny_model)"
        )

    # Preference pairs (and held-out ones)
    pad_id = tokenizer.padding_id
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    run.print(f"{len(dataset)} preference pairs; {dataset.stats.summary(dataset.max_seq_len)}")

    held_out = training.HeldOutPairs(
        validation, model, lambda batch: objective(model, batch, run.precision)[1], run,
        batch_size=cfg.batch_size, pad_id=pad_id, accuracy="accuracy",
        wins="the chosen reply scores higher", every=cfg.get("eval_every_n_steps"),
    )  # fmt: skip

    # The loop (optimizer, schedule, checkpoints, metrics)
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loop = training.training_loop(cfg, run, setup, stream)
    if not loop.resumed:
        held_out.report("before")

    # The loop: one optimizer step per item; the loss is the mean over the step's pairs
    for micro_batches in loop:
        training.pairwise_step(
            loop, model, micro_batches, objective, run, cfg.get("clip_grad_norm")
        )
        if held_out.due(loop.step):
            loop.log_now(held_out.metrics())
        loop.end_step()
    loop.finish()
    held_out.report("after")


if __name__ == "__main__":
    recipe_main()
