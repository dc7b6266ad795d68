"""MFU on a machine whose speed drifts: a fine-tuning run's steps re-run in this process, each
followed by the matmul peak measured right after it, and the median of the per-step MFUs.

`mfu.py` divides a finished run's tokens/s by a peak measured after the run. On a shared or
throttled machine the matmul rate itself wanders (by 20-40% within an hour on the 2-core CPU
this project benchmarks on), so a run and a peak taken a minute apart can disagree by more than
the effect being measured. Here every step is paired with a peak taken seconds later, and the
figure is the median of the pairs' own ratios: a slow minute slows both halves of a pair.

    python -m attune run lora_finetune_single_device --config X max_steps=3 output_dir=/tmp/r
    python benchmarks/mfu_paired.py /tmp/r --steps 20 --json /tmp/paired.json

The run folder gives the config (its ``config.yaml``: model, LoRA, data, batch, dtype) and the
attended span (``mfu.flops_for_run``). Each step is the SFT recipe's own (``attune.training``:
``backward_step`` then ``update_and_log``, the batches from the recipe's ``BatchStream``), timed
from fetching its batch to ``end_step`` as the recipe's tokens/s is; the peak is
``mfu.matmul_peak`` on the model's projection shapes at the step's token count. Checkpoints
and metrics go to a temporary folder. Full and LoRA SFT configs (QAT's fake quantization and
held-out losses are left out: neither is part of the step measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import mfu


def paired_steps(
    cfg: Any, peak_seconds: float, model_config: dict[str, Any]
) -> list[dict[str, float]]:
    """Run ``cfg``'s SFT training (its ``max_steps``), each step followed by a peak measurement.

    Returns:
        Per step: ``seconds``, ``input_tokens`` and ``peak`` (FLOP/s of the run's dtype).
    """
    from attune import config
    from attune.training import (
        BatchStream,
        ChunkedCrossEntropy,
        backward_step,
        setup_training,
        start_run,
        training_loop,
        update_and_log,
    )

    pairs = []
    with start_run(cfg) as run:
        setup = setup_training(cfg, run)
        dataset = config.instantiate(cfg.dataset, tokenizer=setup.tokenizer)
        stream = BatchStream.from_config(cfg, dataset, setup.tokenizer.padding_id, run.world)
        loss_fn = config.instantiate(cfg.get("loss")) or ChunkedCrossEntropy()
        loop = training_loop(cfg, run, setup, stream)
        dtype = mfu.DTYPES[mfu.run_dtype(dict(cfg))]
        started = time.perf_counter()
        for micro_batches in loop:
            result = backward_step(setup.model, micro_batches, loss_fn, run.device, run.precision)
            update_and_log(loop, result, cfg.get("clip_grad_norm"))
            loop.end_step()
            seconds = time.perf_counter() - started
            shapes = mfu.projection_shapes(model_config, result.input_tokens)
            peak = mfu.matmul_peak(dtype, shapes, run.device, peak_seconds)
            pairs.append({"seconds": seconds, "input_tokens": result.input_tokens, "peak": peak})
            started = time.perf_counter()
        loop.finish()
    return pairs


def summarize(pairs: Sequence[dict[str, float]], flops_per_token: float) -> dict[str, Any]:
    """Each pair's MFU (its step's FLOPs over its step's seconds, over its peak) and the
    medians: ``mfu`` (of the pairs' MFUs), ``mfu_quartiles``, ``tokens_per_second``, ``peak``."""
    rates = [pair["input_tokens"] / pair["seconds"] for pair in pairs]
    mfus = [
        mfu.mfu(rate, flops_per_token, pair["peak"])
        for rate, pair in zip(rates, pairs, strict=True)
    ]
    median, quartiles = mfu.median_and_quartiles(mfus)
    return {
        "mfu": median,
        "mfu_quartiles": quartiles,
        "tokens_per_second": statistics.median(rates),
        "peak": statistics.median(pair["peak"] for pair in pairs),
        "pairs": [{**pair, "mfu": m} for pair, m in zip(pairs, mfus, strict=True)],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    from attune.errors import AttuneError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a fine-tuning run's output_dir (its config.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="steps to time, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="each peak's budget")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    cfg = mfu.sft_run_config(parser, args.run)
    try:
        run = mfu.flops_for_run(args.run)
    except AttuneError as error:
        parser.error(f"{args.run}: attention's span needs the run's data: {error}")
    if run is None:
        parser.error(f"no model config.json found for {args.run}")

    with tempfile.TemporaryDirectory(prefix="mfu_paired_") as scratch:
        cfg = mfu.rerun_config(cfg, scratch, args.steps)
        pairs = paired_steps(cfg, args.peak_seconds, run["model_config"])
    if len(pairs) <= args.warmup:
        parser.error(
            f"{args.run}: its data gave {len(pairs)} steps, not more than --warmup "
            f"({args.warmup}); use more data or a smaller batch"
        )
    figures = {
        "cpu": mfu.cpu_header(),
        "dtype": run["dtype"],
        "seq_len": run["seq_len"],
        "lora_rank": run["lora_rank"],
        "flops_per_token": run["flops_per_token"],
        "warmup": args.warmup,
        **summarize(pairs[args.warmup :], run["flops_per_token"]),
    }
    low, high = figures["mfu_quartiles"]
    print(f"CPU: {figures['cpu']}")
    print(
        f"{'LoRA r=' + str(run['lora_rank']) if run['lora_rank'] else 'full'}, {run['dtype']}, "
        f"attended span {run['seq_len']:,.0f}, {run['flops_per_token'] / 1e6:,.1f} MFLOP/token: "
        f"{len(pairs) - args.warmup} steps, each followed by its peak: median "
        f"{figures['tokens_per_second']:,.0f} tokens/s, peak {figures['peak'] / 1e9:,.1f} "
        f"GFLOP/s, MFU {figures['mfu']:.1%} (quartiles {low:.1%}-{high:.1%})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
