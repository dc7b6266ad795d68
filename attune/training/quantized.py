"""The quantized model at the end of a run: written as a HF folder, and its held-out loss set
beside full precision's, so a run shows what quantizing costs.

Used by QAT (the full-finetune recipe with a ``quantization`` section) and by the ``quantize``
recipe (post-training quantization). The metrics, on the same held-out data:

- ``val_loss`` / ``val_perplexity``: the model in full precision (a QAT model with its fake
  quantization off);
- ``val_loss_fake_quant``: a QAT model with fake quantization on (what it trained as);
- ``val_loss_quantized`` / ``val_perplexity_quantized``: the converted model, loaded back from
  the folder written (so the numbers are those of what a user deploys).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attune.data import TokenizedDataset
from attune.models import TransformerDecoder
from attune.peft import LoraSettings, merge_state_dict
from attune.quantization import (
    QuantizationScheme,
    load_quantized,
    save_quantized,
    set_fake_quantization,
)
from attune.tokenizer import Tokenizer
from attune.training.evaluate import held_out_loss
from attune.training.run import Run
from attune.training.sharding import full_state_dict

QUANTIZED_FOLDER = "quantized"


def quantized_report(
    run: Run,
    model: TransformerDecoder,
    scheme: QuantizationScheme,
    lora: LoraSettings | None = None,
    validation: TokenizedDataset | None = None,
    loss_fn: Any = None,
    batch_size: int = 1,
    pad_id: int = 0,
    fake_quantized: bool = False,
    tokenizer: Tokenizer | None = None,
) -> dict[str, float]:
    """Write ``model`` quantized under ``scheme`` to ``output_dir/quantized`` and, with
    ``validation``, score full precision against the quantized model. A collective: every
    rank calls it (each then loads the quantized model, small, and scores its share).

    Args:
        run: the run.
        model: the trained model (sharded or not; a LoRA model's adapters are merged first).
        scheme: how to quantize.
        lora: the adapter settings of a LoRA model.
        validation: held-out data, or None to only write the folder.
        loss_fn: the loss to score with.
        batch_size, pad_id: for the held-out batches.
        fake_quantized: ``model`` carries QAT's fake quantizers (scored on and off).
        tokenizer: the run's tokenizer, whose chat template and stop tokens the folder gets
            (see :meth:`attune.tokenizer.Tokenizer.save_chat_settings`).

    Returns:
        The metrics (see the module docstring); empty without ``validation``.
    """
    report: dict[str, float] = {}
    if validation is not None:
        if fake_quantized:
            set_fake_quantization(model, True)
            report["val_loss_fake_quant"] = held_out_loss(
                model, validation, loss_fn, batch_size, pad_id, run
            )
            set_fake_quantization(model, False)
        report["val_loss"] = held_out_loss(model, validation, loss_fn, batch_size, pad_id, run)
    state = full_state_dict(model, run.world)
    folder = Path(run.output_dir) / QUANTIZED_FOLDER
    if run.is_main:
        weights = merge_state_dict(state, lora) if lora is not None else state
        save_quantized(model, folder, scheme, state=weights, source=model.config.source)
        if tokenizer is not None:
            tokenizer.save_chat_settings(folder)
        run.print(f"wrote the {scheme.describe()} quantized model to {folder}")
    run.world.barrier()
    if validation is not None:
        quantized = load_quantized(folder, dtype=run.dtype, device=run.device)
        report["val_loss_quantized"] = held_out_loss(
            quantized, validation, loss_fn, batch_size, pad_id, run
        )
        report["val_perplexity"] = math.exp(min(report["val_loss"], 50.0))
        report["val_perplexity_quantized"] = math.exp(min(report["val_loss_quantized"], 50.0))
        run.print(
            "held-out loss: full precision {val_loss:.4f}, quantized {val_loss_quantized:.4f}".format(
                **report
            )
        )
    return report
