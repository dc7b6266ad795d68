"""Measure one training run: any recipe and config, a fixed number of steps, figures as JSON.

The run is the real ``tune run`` in a child process, every step logged. From its
``metrics.jsonl`` (each step's input tokens, trained tokens and clock) and the child's resource
usage this reports, over the steady state (the steps after ``warmup``):

- ``tokens_per_second``: non-padding input tokens per second (the anchors' measure);
- ``trained_tokens_per_second``: tokens that carry a loss, per second;
- ``step_seconds``: the mean wall time of a step (data, forward, backward, optimizer);
- ``peak_rss_gb``: the child's peak resident memory (the whole process, all of the run);
- ``peak_cuda_memory_gb`` and ``mfu`` on a GPU (model FLOPs utilisation: 6 x parameters x
  non-padding tokens/s over the device's dense bf16 peak; attention's own FLOPs left out);
- ``flops_per_token`` (forward + backward, attention included, LoRA's own count: see
  :func:`benchmarks.mfu.model_flops_per_token`) and ``matmul_dtype`` when the model's
  ``config.json`` is found, and on a CPU ``matmul_peak_flops`` (``torch.mm`` on the model's
  projection shapes, measured after the run) and ``mfu`` over it;
- ``loss``: the last step's, and ``wall_seconds``: the whole process.

    python benchmarks/harness.py full_finetune_single_device --config tiny/full --steps 30
    python benchmarks/harness.py lora_finetune_single_device --config my.yaml --steps 60 \\
        --warmup 2 -- batch_size=4 dataset.packed=true
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.mfu, run as a script

# Dense bf16 tensor-core peaks (FLOP/s), for MFU; a device not listed reports no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def recipe_config(
    model_dir: Path, dataset: dict[str, Any], folder: Path, **settings: Any
) -> dict[str, Any]:
    """A fine-tuning config for a benchmark: the model folder (and its tokenizer), the
    ``dataset`` component, seed 0, no checkpoints during the run, and ``settings`` on top."""
    return {
        "base": "_bases/sft",
        "output_dir": str(folder / "unused"),
        "model": {"_component_": "attune.models.from_pretrained", "path": str(model_dir)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(model_dir)},
        "dataset": dataset,
        "seed": 0,
        "checkpointer": {"save_every_n_steps": None},
        **settings,
    }


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run (a closing evaluation line has no ``loss``: left out)."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def steady_state(records: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Throughput over the steps after ``warmup``: from the end of step ``warmup`` to the end
    of the last step, so data loading between steps is inside the window."""
    by_step = {record["step"]: record for record in records}
    last = max(by_step)
    if warmup < 1 or warmup >= last or any(s not in by_step for s in range(warmup, last + 1)):
        raise ValueError(
            f"need every step from {warmup} to {last} logged (log_every_n_steps=1) and more "
            f"steps than the {warmup} warm-up ones"
        )
    start, end = by_step[warmup], by_step[last]
    seconds = end["elapsed_s"] - start["elapsed_s"]
    tokens = end["tokens_seen"] - start["tokens_seen"]
    trained = sum(by_step[s].get("trained_tokens", 0) for s in range(warmup + 1, last + 1))
    return {
        "steps_measured": last - warmup,
        "tokens_per_second": tokens / seconds,
        "trained_tokens_per_second": trained / seconds,
        "step_seconds": seconds / (last - warmup),
        "loss": end["loss"],
    }


def run_and_measure(
    recipe: str,
    config: str,
    overrides: list[str],
    steps: int,
    warmup: int = 2,
    output_dir: Path | None = None,
    parameters: int | None = None,
    env: dict[str, str] | None = None,
    peak_seconds: float = 0.0,
) -> dict[str, Any]:
    """Run ``tune run recipe --config config`` for ``steps`` steps and measure it.

    Args:
        recipe, config, overrides: what ``tune run`` gets.
        steps: optimizer steps (``max_steps``).
        warmup: steps left out of the throughput (compilation, first allocations).
        output_dir: the run's folder (default: a temporary one, removed after).
        parameters: the model's parameter count, for MFU on a GPU.
        env: extra environment for the run.
        peak_seconds: on a CPU, measure the matmul peak of the run's dtype for this long after
            the run and report ``mfu`` over it (0: no measurement, ``flops_per_token`` only).

    Raises:
        RuntimeError: the run failed (its stderr's tail in the message).
    """
    with tempfile.TemporaryDirectory() as scratch:
        folder = output_dir or Path(scratch) / "run"
        command = [
            sys.executable,
            "-m",
            "attune",
            "run",
            recipe,
            "--config",
            config,
            f"output_dir={folder}",
            f"max_steps={steps}",
            "log_every_n_steps=1",
            *overrides,
        ]
        started = time.perf_counter()
        with tempfile.TemporaryFile("w+") as stderr:
            child = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
            # the child's own peak resident set (ru_maxrss is in KiB on Linux)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - started
            if child.returncode != 0:
                stderr.seek(0)
                raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read()[-3000:]}")
        records = read_metrics(folder)
        figures = steady_state(records, warmup)
        flops = _flops_figures(folder, records, figures, peak_seconds)
    figures.update(
        {
            "recipe": recipe,
            "config": config,
            "overrides": overrides,
            "steps": steps,
            "warmup_steps": warmup,
            "peak_rss_gb": usage.ru_maxrss / 2**20,
            "wall_seconds": wall,
        }
    )
    figures.update(flops)
    figures.update(_gpu_figures(records, figures, parameters))
    return figures


def _flops_figures(
    folder: Path, records: list[dict[str, Any]], figures: dict[str, Any], peak_seconds: float
) -> dict[str, Any]:
    # imported here: mfu.py needs torch, which the harness itself does not
    from benchmarks.mfu import DTYPES, flops_for_run, matmul_peak, mfu, projection_shapes

    run = flops_for_run(folder)
    if run is None:
        return {}
    found = {"flops_per_token": run["flops_per_token"], "matmul_dtype": run["dtype"]}
    import torch

    if peak_seconds > 0 and not torch.cuda.is_available():  # a GPU's peak is its datasheet's
        # the products the run's projections multiply: its mean input tokens a step as M
        tokens = max(1, round(records[-1]["tokens_seen"] / records[-1]["step"]))
        shapes = projection_shapes(run["model_config"], tokens)
        peak = matmul_peak(DTYPES[run["dtype"]], shapes, seconds=peak_seconds)
        found["matmul_peak_flops"] = peak
        found["mfu"] = mfu(figures["tokens_per_second"], run["flops_per_token"], peak)
    return found


def _gpu_figures(
    records: list[dict[str, Any]], figures: dict[str, Any], parameters: int | None
) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    gpu = {"peak_cuda_memory_gb": max(r.get("peak_memory_gb") or 0 for r in records)}
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if parameters and peak:
        gpu["mfu"] = 6 * parameters * figures["tokens_per_second"] / peak
        gpu["device"] = name
    return gpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a recipe, ``--config`` and the options, then ``key=value`` overrides
    anywhere after the recipe (``-- k=v`` too: the overrides' positional list is read after
    the options, so it does not close empty at the recipe)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--parameters", type=int, default=None, help="for MFU on a GPU")
    parser.add_argument(
        "--peak-seconds", type=float, default=2.0, help="CPU matmul peak measurement, for MFU"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides (after --)")
    return parser.parse_intermixed_args(argv)


def main() -> None:
    args = parse_args()
    figures = run_and_measure(
        args.recipe,
        args.config,
        args.overrides,
        args.steps,
        args.warmup,
        None,
        args.parameters,
        peak_seconds=args.peak_seconds,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
