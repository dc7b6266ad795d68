"""Supervised fine-tuning: the full model, or LoRA / DoRA / QLoRA adapters (a ``lora`` section).

Registered as ``full_finetune_single_device`` and ``lora_finetune_single_device``: the config
decides what trains. The loop below is the whole method; the mechanics it calls (data stream,
token-exact accumulation, checkpoints, metrics) live in ``attune.training``.

    tune run lora_finetune_single_device --config tiny/lora
    tune run full_finetune_single_device --config qwen2_5/0.5B_full batch_size=4
"""

import json
import time

from attune import config, training

SCHEMA = {
    "output_dir": str,
    "seed": config.Field(int, required=False),
    "device": config.Field(str, required=False),
    "dtype": config.Field(str, required=False),
    "autocast": config.Field(str | None, required=False),
    "batch_size": int,
    "gradient_accumulation_steps": config.Field(int, required=False),
    "epochs": config.Field(int, required=False),
    "max_steps": config.Field(int | None, required=False),
    "max_steps_per_epoch": config.Field(int | None, required=False),
    "clip_grad_norm": config.Field(float | None, required=False),
    "log_every_n_steps": config.Field(int, required=False),
    "eval_every_n_steps": config.Field(int | None, required=False),
    "resume_from_checkpoint": config.Field(bool, required=False),
    "compile": config.Field(bool, required=False),
    "enable_activation_checkpointing": config.Field(bool, required=False),
    "num_workers": config.Field(int, required=False),
    "cpu_offload": config.Field(bool, required=False),
    "model": config.Component(provided=("dtype", "device")),
    "tokenizer": config.Component(),
    "lora": config.Component(required=False),
    "dataset": config.Component(provided=("tokenizer",)),
    "validation_dataset": config.Component(required=False, provided=("tokenizer",)),
    "optimizer": config.Component(provided=("params",)),
    "lr_scheduler": config.Component(required=False, provided=("optimizer", "num_training_steps")),
    "loss": config.Component(required=False),
    "checkpointer": config.Component(provided=("output_dir",)),
    "metric_logger": config.Component(required=False),
    "answer_check": config.Component(required=False),
}


@config.parse(SCHEMA)
def recipe_main(cfg):
    with training.start_run(cfg) as run:
        train(cfg, run)


def train(cfg, run):
    # Model (sharded across processes under torchrun), adapters, and where to resume
    tokenizer = config.instantiate(cfg.tokenizer)
    lora = config.instantiate(cfg.get("lora"))
    checkpointer = config.instantiate(cfg.checkpointer, output_dir=run.output_dir)
    resumed_from = training.resume_point(checkpointer, cfg.get("resume_from_checkpoint"))
    model = training.setup_model(
        cfg.model,
        run,
        lora,
        weights=resumed_from if lora is None else None,
        cpu_offload=cfg.get("cpu_offload", False),
    )
    if cfg.get("enable_activation_checkpointing"):
        training.apply_activation_checkpointing(model)
    if cfg.get("compile"):
        training.compile_layers(model)
    run.print(training.describe_counts(model))

    # Data, optimizer, schedule, loss
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    pad_id = tokenizer.padding_id
    run.print(f"{len(dataset)} training examples; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream(
        dataset,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        pad_id=pad_id,
        seed=cfg.get("seed", 0),
        rank=run.world.rank,
        world_size=run.world.world_size,
        max_steps_per_epoch=cfg.get("max_steps_per_epoch"),
        num_workers=cfg.get("num_workers", 0),
    )
    epochs = cfg.get("epochs", 1)
    total_steps = stream.steps_per_epoch() * epochs
    if cfg.get("max_steps") is not None:
        total_steps = min(total_steps, cfg.max_steps)
    params = list(training.trainable_parameters(model))
    optimizer = training.build_optimizer(cfg.optimizer, params)
    scheduler = config.instantiate(
        cfg.get("lr_scheduler"), optimizer=optimizer, num_training_steps=total_steps
    )
    loss_fn = config.instantiate(cfg.get("loss")) or training.ChunkedCrossEntropy()
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    eval_every = cfg.get("eval_every_n_steps")
    answer_check = config.instantiate(cfg.get("answer_check"))

    step, tokens_seen = 0, 0
    if resumed_from is not None:
        state = training.restore_checkpoint(checkpointer, resumed_from, model, optimizer, lora)
        if scheduler is not None:
            scheduler.load_state_dict(state["lr_scheduler"])
        stream.load_state_dict(state["data"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        run.print(f"resumed from {resumed_from} at step {step}")
    answers = {}
    if answer_check is not None and resumed_from is None:
        answers["before"] = answer_check(model, tokenizer)
        run.print("\n".join(answers["before"].lines("before training")))
    last_saved = str(resumed_from) if resumed_from is not None else None

    def save_checkpoint():
        loop_state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "data": stream.state_dict(),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        folder = training.save_checkpoint(
            checkpointer, step, run, model, optimizer, lora, loop_state
        )
        return str(folder)

    metrics = training.MetricsWriter(
        run.output_dir,
        total_steps,
        extra=config.instantiate(cfg.get("metric_logger")),
        resume_step=step if resumed_from is not None else None,
        enabled=run.is_main,
    )
    log_every = cfg.get("log_every_n_steps", 1)
    window_tokens, window_start = 0, time.perf_counter()
    model.train()
    with training.StopSignals() as stop:
        stopping = False
        while step < total_steps and stream.epoch < epochs and not stopping:
            for micro_batches in stream:
                result = training.backward_step(
                    model, micro_batches, loss_fn, run.device, run.precision
                )
                training.check_finite(result.loss, step + 1, last_saved)
                grad_norm = training.optimizer_step(
                    params, optimizer, scheduler, cfg.get("clip_grad_norm")
                )
                step += 1
                tokens_seen += result.input_tokens
                window_tokens += result.input_tokens
                record = {}
                if step % log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "epoch": stream.epoch,
                        "loss": result.loss,
                        "trained_tokens": result.trained_tokens,
                        "lr": optimizer.param_groups[0]["lr"],
                        "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                        "tokens_seen": tokens_seen,
                        "peak_memory_gb": training.peak_memory_gb(run.device),
                        "state_memory_gb": training.state_memory_gb(model, optimizer),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    window_tokens, window_start = 0, time.perf_counter()
                if validation is not None and eval_every and step % eval_every == 0:
                    batches = training.eval_batches(
                        validation, cfg.batch_size, pad_id, run.world.rank, run.world.world_size
                    )
                    val_loss = training.evaluate(model, batches, loss_fn, run.device, run.precision)
                    record = {"step": step, **record, "val_loss": val_loss}
                if record:
                    metrics.log(record)
                metrics.advance()
                stopping = run.world.any(stop.requested is not None)
                if checkpointer.due(step) or stopping:
                    last_saved = save_checkpoint()
                if step >= total_steps or stopping:
                    break
            else:
                stream.set_epoch(stream.epoch + 1)
    metrics.close()

    if stopping:
        signal_name = stop.requested or "on another rank"
        run.print(
            f"stopped by signal {signal_name} at step {step}; checkpoint {last_saved}; "
            "continue with resume_from_checkpoint=true"
        )
        raise SystemExit(stop.exit_code)
    if last_saved is None or not last_saved.endswith(f"step_{step}"):
        last_saved = save_checkpoint()
    run.print(f"saved {last_saved}")
    if answer_check is not None:
        answers["after"] = answer_check(model, tokenizer)
        run.print("\n".join(answers["after"].lines("after training")))
        report = {name: vars(value) for name, value in answers.items()}
        if run.is_main:
            (run.output_dir / "answers.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    recipe_main()
