"""Supervised fine-tuning: the full model, or LoRA / DoRA / QLoRA adapters (a ``lora`` section),
with quantization-aware training when the config has a ``quantization`` section.

Registered as ``full_finetune_*``, ``lora_finetune_*``, ``qat_*`` and ``qat_lora_finetune_*``:
the config decides what trains. QAT fake-quantizes the layers the scheme covers (from the first
step, or after ``fake_quant_after_n_steps``), then converts: the quantized model is written to
``output_dir/quantized`` and its held-out loss set beside full precision's in metrics.jsonl.
The loop below is the whole method; the mechanics it calls (data stream, token-exact
accumulation, checkpoints, metrics) live in ``attune.training``.

    tune run lora_finetune_single_device --config tiny/lora
    tune run full_finetune_single_device --config qwen2_5/0.5B_full batch_size=4
    tune run --nproc_per_node 2 qat_distributed --config tiny/qat
"""

from attune import config, evaluation, quantization, training

SCHEMA = {
    **training.TRAINING_KEYS,
    **training.VALIDATION_KEYS,
    **evaluation.EVAL_KEYS,
    "loss": config.Component(required=False, expects=training.SFT_LOSS),
    "quantization": config.Component(required=False),
    "fake_quant_after_n_steps": config.Field(int | None, required=False),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # lm-eval tasks to score as it trains (checked now), the model (sharded under torchrun),
    # adapters, QAT's fake quantization, where to resume
    harness = evaluation.EvalDuringTraining(cfg, run)
    scheme = config.instantiate(cfg.get("quantization"))
    setup = training.setup_training(cfg, run, scheme)
    model, tokenizer = setup.model, setup.tokenizer
    fake_quant_from = cfg.get("fake_quant_after_n_steps") or 0

    # Data, loss, and the loop (optimizer, schedule, checkpoints, metrics)
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    pad_id = tokenizer.padding_id
    run.print(f"{len(dataset)} training examples; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loss_fn = config.instantiate(cfg.get("loss")) or training.ChunkedCrossEntropy()
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    held_out = training.HeldOutLoss(cfg, model, validation, loss_fn, pad_id, run)
    loop = training.training_loop(cfg, run, setup, stream)
    answers = training.AnswerLog.at_start(cfg, tokenizer, run, model, loop.resumed)

    # The loop: one optimizer step per item
    for micro_batches in loop:
        if scheme is not None:
            quantization.set_fake_quantization(model, loop.step > fake_quant_from)
        result = training.backward_step(model, micro_batches, loss_fn, run.device, run.precision)
        # the update, the step's metrics (with a mixture of experts' router loss), val_loss
        training.update_and_log(loop, result, cfg.get("clip_grad_norm"), held_out)
        harness.at_step(loop, model, tokenizer)
        loop.end_step()
    loop.finish()
    answers.record(model, "after")

    # QAT's convert: the quantized model, written and scored against full precision
    if scheme is not None:
        report = training.quantized_report(
            run, model, scheme, setup.lora, validation, loss_fn, cfg.batch_size, pad_id, True,
            tokenizer,
        )  # fmt: skip
        loop.log_after(report)


if __name__ == "__main__":
    recipe_main()
