"""Knowledge distillation: a student (the ``model``, full or through LoRA adapters with a
``lora`` section) learns the next-token distributions of a frozen ``teacher`` that shares its
tokenizer, mixed with the ordinary cross-entropy on the trained tokens.

Registered as ``knowledge_distillation_single_device`` and ``knowledge_distillation_distributed``:
under torchrun the teacher is sharded with FSDP2 like the student. The ``loss`` component
(:class:`attune.training.DistillationLoss`) picks the divergence (``forward_kl``, ``reverse_kl``,
``symmetric_kl``, ``jsd`` with ``beta``), its ``temperature`` and ``kd_ratio``, the
divergence's share of the loss; it is computed a chunk of positions at a time, so neither
model's full-vocabulary logits are held. The teacher runs in ``teacher_dtype`` (bf16 on a GPU
unless set) and, with ``offload_teacher``, waits on the CPU between steps. On-policy (GKD): a
share ``lmbda`` of each step's examples are completed by the student itself (``max_new_tokens``,
``temperature``, ``top_k``, ``top_p``), scored by the teacher. Outputs are SFT's: a HF folder
(full) or a peft adapter (LoRA).

    tune run knowledge_distillation_single_device --config tiny/kd
    tune run --nproc_per_node 8 knowledge_distillation_distributed \\
        --config llama3_1/8B_to_llama3_2_1B_kd
"""

from attune import config, evaluation, training

SCHEMA = {
    **training.TRAINING_KEYS,
    **training.VALIDATION_KEYS,
    **evaluation.EVAL_KEYS,
    **training.TEACHER_KEYS,
    **training.ON_POLICY_KEYS,
    "loss": config.Component(required=False, expects=training.KD_LOSS),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # The loss settings, the on-policy share, the teacher's folder and the lm-eval tasks first
    # (a bad value ends the run before any work), then the student (sharded under torchrun),
    # its adapters, where to resume, and the teacher: frozen, its vocabulary checked against
    # the student's
    loss_fn = config.instantiate(cfg.get("loss")) or training.DistillationLoss()
    training.check_lmbda(cfg)
    training.check_on_policy_loss(loss_fn, cfg.get("lmbda"))
    training.check_teacher_path(cfg)
    harness = evaluation.EvalDuringTraining(cfg, run)
    setup = training.setup_training(cfg, run)
    student, tokenizer = setup.model, setup.tokenizer
    teacher = training.build_teacher(cfg, run, tokenizer, student)
    offload_teacher = cfg.get("offload_teacher", False)

    # Data, the student's own completions (a share lmbda of each step), the held-out
    # cross-entropy, and the loop (optimizer, schedule, checkpoints, metrics)
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    pad_id = tokenizer.padding_id
    run.print(f"{len(dataset)} training examples; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    on_policy = training.OnPolicy.from_config(cfg, run, tokenizer)
    on_policy.check_dataset(dataset)
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    held_out_ce = training.ChunkedCrossEntropy(getattr(loss_fn, "chunk_size", 1024))
    held_out = training.HeldOutLoss(cfg, student, validation, held_out_ce, pad_id, run)
    loop = training.training_loop(cfg, run, setup, stream)
    answers = training.AnswerLog.at_start(cfg, tokenizer, run, student, loop.resumed)

    # The loop: one optimizer step per item; the loss is the mean per trained token
    for micro_batches in loop:
        micro_batches = on_policy(student, micro_batches, loop.step)
        result = training.distillation_step(
            student, teacher, micro_batches, loss_fn, run, offload_teacher
        )
        # the update, the step's metrics (ce_loss, kd_loss, on_policy_share), val_loss
        training.update_and_log(loop, result, cfg.get("clip_grad_norm"), held_out)
        harness.at_step(loop, student, tokenizer)
        loop.end_step()
    loop.finish()
    answers.record(student, "after")


if __name__ == "__main__":
    recipe_main()
