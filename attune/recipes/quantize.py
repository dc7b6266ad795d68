"""Post-training quantization: any checkpoint (a full HF folder, optionally with a LoRA adapter
merged in) quantized under a torchao scheme, written as a HF folder that transformers loads
and ``generate`` runs, with the held-out loss of full precision and of the quantized model in
``metrics.jsonl``.

    tune run quantize --config tiny/quantize model.path=/tmp/attune/tiny_full/checkpoints/step_1000
    tune run generate --config tiny/generate model._component_=attune.quantization.load_quantized \\
        model.folder=/tmp/attune/tiny_quantize/quantized
"""

from attune import config, training

SCHEMA = {
    **training.MODEL_KEYS,
    "output_dir": str,
    "adapter": config.Field(str | None, required=False),
    "quantization": config.Component(),
    "validation_dataset": config.Component(required=False, provided=("tokenizer",)),
    "batch_size": config.Field(int, required=False),
    "loss": config.Component(required=False, expects=training.SFT_LOSS),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # The scheme first (a bad one ends the run before any work), then the model
    scheme = config.instantiate(cfg.quantization)
    tokenizer = config.instantiate(cfg.tokenizer)
    model, lora = training.inference_model(cfg, run.dtype, run.device)
    validation = config.instantiate(cfg.get("validation_dataset"), tokenizer=tokenizer)
    loss_fn = config.instantiate(cfg.get("loss")) or training.ChunkedCrossEntropy()

    # Quantize, write, load back, and score both on the held-out data
    report = training.quantized_report(
        run, model, scheme, lora, validation, loss_fn, cfg.get("batch_size", 8),
        tokenizer.padding_id, tokenizer=tokenizer,
    )  # fmt: skip
    if run.is_main and report:
        training.append_metrics(run.output_dir, {"step": 0, **report})


if __name__ == "__main__":
    recipe_main()
