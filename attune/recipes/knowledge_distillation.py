"""Knowledge distillation: a student (the ``model``, full or through LoRA adapters with a
``lora`` section) learns the next-token distributions of a frozen ``teacher`` that shares its
tokenizer, mixed with the ordinary cross-entropy on the trained tokens.

Registered as ``knowledge_distillation_single_device`` and ``knowledge_distillation_distributed``:
under torchrun the teacher is sharded with FSDP2 like the student. The ``loss`` component
(:class:`attune.training.DistillationLoss`) picks the divergence (``forward_kl``, ``reverse_kl``,
``symmetric_kl``, ``jsd`` with ``beta``), its ``temperature`` and ``kd_ratio``, the
divergence's share of the loss; it is computed a chunk of positions at a time, so neither
model's full-vocabulary logits are held. The teacher runs in ``teacher_dtype`` (bf16 on a GPU
unless set). Outputs are SFT's: a HF folder (full) or a peft adapter (LoRA).

    tune run knowledge_distillation_single_device --config tiny/kd
    tune run --nproc_per_node 8 knowledge_distillation_distributed \\
        --config llama3_1/8B_to_llama3_2_1B_kd
"""

from attune import config, evaluation, training

SCHEMA = {
    **training.TRAINING_KEYS,
    **training.VALIDATION_KEYS,
    **evaluation.EVAL_KEYS,
    "teacher": config.Component(provided=("dtype", "device")),
    "teacher_dtype": config.Field(str | None, required=False),
    "teacher_tokenizer": config.Component(required=False),
    "loss": config.Component(required=False, expects=training.KD_LOSS),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # The loss settings, the teacher's folder and the lm-eval tasks first (a bad value ends the
    # run before any work), then the student (sharded under torchrun), its adapters, where to
    # resume, and the teacher: frozen, its vocabulary checked against the student's
    loss_fn = config.instantiate(cfg.get("loss")) or training.DistillationLoss()
    training.check_teacher_path(cfg)
    harness = evaluation.EvalDuringTraining(cfg, run)
    setup = training.setup_training(cfg, run)
    student, tokenizer = setup.model, setup.tokenizer
    teacher = training.build_teacher(cfg, run, tokenizer, student)

    # Data, the held-out cross-entropy, and the loop (optimizer, schedule, checkpoints, metrics)
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    pad_id = tokenizer.padding_id
    run.print(f"{len(dataset)} training examples; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    held_out_ce = training.ChunkedCrossEntropy(getattr(loss_fn, "chunk_size", 1024))
    eval_every = cfg.get("eval_every_n_steps")
    loop = training.training_loop(cfg, run, setup, stream)
    answers = training.AnswerLog(config.instantiate(cfg.get("answer_check")), tokenizer, run)
    if not loop.resumed:
        answers.record(student, "before")

    # The loop: one optimizer step per item; the loss is the mean per trained token
    for micro_batches in loop:
        result = training.distillation_step(student, teacher, micro_batches, loss_fn, run)
        training.check_finite(result.loss, loop.step, loop.last_saved)
        grad_norm = loop.optimizer_step(cfg.get("clip_grad_norm"))
        loop.count(result.input_tokens)
        loop.log(
            {
                "loss": result.loss,
                "trained_tokens": result.trained_tokens,
                "grad_norm": grad_norm,
                **result.extras,  # ce_loss, kd_loss (and a mixture of experts' router loss)
            }
        )
        if validation is not None and eval_every and loop.step % eval_every == 0:
            val_loss = training.held_out_loss(
                student, validation, held_out_ce, cfg.batch_size, pad_id, run
            )
            loop.log_now({"val_loss": val_loss})
        harness.at_step(loop, student, tokenizer)
        loop.end_step()
    loop.finish()
    answers.record(student, "after")


if __name__ == "__main__":
    recipe_main()
