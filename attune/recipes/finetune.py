"""Supervised fine-tuning: the full model, or LoRA / DoRA / QLoRA adapters (a ``lora`` section).

Registered as ``full_finetune_single_device`` and ``lora_finetune_single_device``: the config
decides what trains. The loop below is the whole method; the mechanics it calls (data stream,
token-exact accumulation, checkpoints, metrics) live in ``attune.training``.

    tune run lora_finetune_single_device --config tiny/lora
    tune run full_finetune_single_device --config qwen2_5/0.5B_full batch_size=4
"""

from attune import config, training

SCHEMA = {
    **training.TRAINING_KEYS,
    "eval_every_n_steps": config.Field(int | None, required=False),
    "validation_dataset": config.Component(required=False, provided=("tokenizer",)),
    "loss": config.Component(required=False),
}


@config.parse(SCHEMA)
def recipe_main(cfg):
    with training.start_run(cfg) as run:
        train(cfg, run)


def train(cfg, run):
    # Model (sharded across processes under torchrun), adapters, and where to resume
    tokenizer, lora, checkpointer, resumed_from, model = training.setup_training(cfg, run)

    # Data, loss, and the loop (optimizer, schedule, checkpoints, metrics)
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    pad_id = tokenizer.padding_id
    run.print(f"{len(dataset)} training examples; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loss_fn = config.instantiate(cfg.get("loss")) or training.ChunkedCrossEntropy()
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    eval_every = cfg.get("eval_every_n_steps")
    loop = training.training_loop(cfg, run, model, stream, checkpointer, lora)
    if resumed_from is not None:
        loop.resume(resumed_from)
    answers = training.AnswerLog(config.instantiate(cfg.get("answer_check")), tokenizer, run)
    if resumed_from is None:
        answers.record(model, "before")

    # The loop: one optimizer step per item; the loop object logs, checkpoints and stops
    for micro_batches in loop:
        result = training.backward_step(model, micro_batches, loss_fn, run.device, run.precision)
        training.check_finite(result.loss, loop.step, loop.last_saved)
        grad_norm = loop.optimizer_step(cfg.get("clip_grad_norm"))
        loop.count(result.input_tokens)
        loop.log(
            {"loss": result.loss, "trained_tokens": result.trained_tokens, "grad_norm": grad_norm}
        )
        if validation is not None and eval_every and loop.step % eval_every == 0:
            batches = training.eval_batches(
                validation, cfg.batch_size, pad_id, run.world.rank, run.world.world_size
            )
            val_loss = training.evaluate(model, batches, loss_fn, run.device, run.precision)
            loop.log_now({"val_loss": val_loss})
    loop.finish()
    answers.record(model, "after")


if __name__ == "__main__":
    recipe_main()
