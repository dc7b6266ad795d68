"""Preference optimisation: DPO and its relatives (cDPO, robust DPO, IPO, SimPO, ORPO) on
preference pairs, full or LoRA, one device or many.

Registered as ``lora_dpo_single_device``, ``lora_dpo_distributed``, ``full_dpo_single_device``
and ``full_dpo_distributed``: a ``lora`` section makes it a LoRA run. The ``loss`` component
picks the objective (:mod:`attune.rl.preference_losses`). The reference model is, for LoRA,
the policy with its adapters switched off; for full training, a frozen copy of the starting
model; or, with ``precompute_reference: true``, log-probabilities computed once before training
and cached in ``output_dir``, so no reference is held during training.

    tune run lora_dpo_single_device --config tiny/dpo_lora
    tune run --nproc_per_node 2 full_dpo_distributed --config tiny/dpo_full
"""

from attune import config, evaluation, rl, training

SCHEMA = {
    **training.TRAINING_KEYS,
    **training.VALIDATION_KEYS,
    **evaluation.EVAL_KEYS,
    "precompute_reference": config.Field(bool, required=False),
    "loss": config.Component(required=False, expects=rl.PREFERENCE_LOSS),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # The objective and the lm-eval tasks to score as it trains first (a bad beta or task ends
    # the run before any work), then the policy (sharded under torchrun), its adapters, and
    # where to resume
    loss_fn = config.instantiate(cfg.get("loss")) or rl.SigmoidDPOLoss()
    harness = evaluation.EvalDuringTraining(cfg, run)
    setup = training.setup_training(cfg, run)
    policy, tokenizer, lora = setup.model, setup.tokenizer, setup.lora

    # Preference pairs (and held-out ones), and the objective's reference: none,
    # precomputed once, the policy without its adapters, or a frozen copy of the model
    pad_id = tokenizer.padding_id
    datasets = {"train": config.instantiate(cfg.dataset, tokenizer=tokenizer)}
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    if validation is not None:
        datasets["validation"] = validation
    dataset = datasets["train"]
    run.print(f"{len(dataset)} preference pairs; {dataset.stats.summary(dataset.max_seq_len)}")
    reference, caches = None, {}
    if loss_fn.uses_reference and cfg.get("precompute_reference"):
        caches = precomputed_references(cfg, run, policy, lora, datasets, pad_id)
    elif loss_fn.uses_reference:
        reference = reference_scorer(cfg, run, policy, lora)
    objective = rl.PreferenceObjective(loss_fn, reference, caches.get("train"))
    if validation is not None:
        held_out_objective = rl.PreferenceObjective(loss_fn, reference, caches.get("validation"))
    held_out = training.HeldOutPairs(
        validation, policy, lambda batch: held_out_objective(policy, batch, run.precision)[1],
        run, batch_size=cfg.batch_size, pad_id=pad_id, accuracy="logps/accuracy",
        wins="the chosen reply is the more likely", means_of=rl.mean_statistics,
        every=cfg.get("eval_every_n_steps"),
    )  # fmt: skip

    # The loop (optimizer, schedule, checkpoints, metrics)
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loop = training.training_loop(cfg, run, setup, stream)
    if not loop.resumed:
        held_out.report("before")
    answers = training.AnswerLog.at_start(cfg, tokenizer, run, policy, loop.resumed)

    # The loop: one optimizer step per item; the loss is the mean over the step's pairs
    for micro_batches in loop:
        training.pairwise_step(
            loop, policy, micro_batches, objective, run, cfg.get("clip_grad_norm"),
            means_of=rl.mean_statistics,
        )  # fmt: skip
        if held_out.due(loop.step):
            loop.log_now(held_out.metrics())
        harness.at_step(loop, policy, tokenizer)
        loop.end_step()
    loop.finish()
    held_out.report("after")
    answers.record(policy, "after")


def reference_scorer(cfg, run, policy, lora):
    """Scores pairs under the reference: the policy with its adapters off (LoRA), or a frozen
    copy of the starting model, sharded like the policy."""
    reference, adapters_off = training.reference_model(cfg, run, policy, lora)
    return rl.reference_scorer(reference, adapters_off=adapters_off, precision=run.precision)


def precomputed_references(cfg, run, policy, lora, datasets, pad_id):
    """Every pair's reference log-probabilities, for each dataset: from ``output_dir``'s cache
    when it was made for this data and model, else computed now (and cached) with the
    reference model, which is let go after."""
    caches, score = {}, None
    for name, dataset in datasets.items():
        path = run.output_dir / f"reference_logprobs.{name}.safetensors"
        fingerprint = rl.reference_fingerprint(dataset, policy.config.source)
        cache = rl.ReferenceLogprobs.load(path, fingerprint)
        if not run.world.any(cache is None):  # every rank takes part in a pass, or none
            run.print(f"reference log-probabilities from {path}")
            caches[name] = cache
            continue
        score = score or reference_scorer(cfg, run, policy, lora)
        cache = rl.ReferenceLogprobs.compute(
            score, dataset, cfg.batch_size, pad_id, run.device, run.world.rank, run.world.world_size
        )
        if run.is_main:
            cache.save(path, fingerprint)
        run.world.barrier()
        run.print(f"reference log-probabilities of {len(dataset)} pairs computed into {path}")
        caches[name] = cache
    return caches


if __name__ == "__main__":
    recipe_main()
