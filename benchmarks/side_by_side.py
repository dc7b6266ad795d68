"""attune beside torchtune 0.6.1 and TRL, on the same checkpoint, data and settings, in one run.

The anchors are measured by the shared harness (``../shared/bench/anchors``: its own virtualenv
with torchtune and TRL, the 32M-parameter Llama and the 2,000 Alpaca-style rows it makes,
batch 4, max length 512, 60 steps, fused AdamW without weight decay or clipping; full: lr 2e-5
constant; LoRA: r=8, alpha=16 on every linear layer, lr 3e-4 cosine). Then attune's recipes run
on that model folder and those rows with the same settings, through :mod:`benchmarks.harness`,
and the table gives every configuration's median tokens/s (non-padding input tokens per second
after 2 warm-up steps, as the anchors count them), peak RSS and last loss, and the ratios of
attune's best setting to each anchor's best, for full and for LoRA fine-tuning.

Beside tokens/s, each configuration's model FLOPs utilisation (:mod:`benchmarks.mfu`): forward +
backward FLOPs a token (attention at 512 tokens; LoRA's own count) x tokens/s over the matmul
peak of its dtype, measured once with ``torch.mm`` on the model's projection shapes (2,048
tokens). On a CPU without bf16 instructions the bf16 settings, attune's and the anchors', are
left out (bf16 is emulated there: each would take hours); ``--bf16`` keeps them. The header
records the CPU's flags.

    python benchmarks/side_by_side.py                      # everything, 3 repetitions
    python benchmarks/side_by_side.py --reps 1 --attune full_fp32 lora_fp32 \\
        --anchors tt_full_fp32 tt_lora_fp32 trl_full_fp32 trl_lora_fp32

Figures from another machine do not compare: only ratios from one run of this script do.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune.cpu import cpu_flags, has_bf16_instructions
from benchmarks.harness import recipe_config, run_and_measure
from benchmarks.mfu import (
    DTYPES,
    REPORTED_FLAGS,
    attended_span,
    cpu_header,
    data_lengths,
    measure_peaks,
    mfu,
    model_flops_per_token,
    peak_dtypes,
)

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "anchors"
STEPS = 60
WARMUP = 2

# attune's configurations: (method, extra overrides)
ATTUNE = {
    "full_fp32": ("full", []),
    "full_packed_fp32": ("full", ["dataset.packed=true"]),
    "full_bf16": ("full", ["dtype=bf16"]),
    "full_bf16_autocast": ("full", ["autocast=bf16"]),
    "lora_fp32": ("lora", []),
    "lora_packed_fp32": ("lora", ["dataset.packed=true"]),
    "lora_bf16": ("lora", ["dtype=bf16"]),
    "full_packed_bf16": ("full", ["dataset.packed=true", "dtype=bf16"]),
    "full_packed_bf16_autocast": ("full", ["dataset.packed=true", "autocast=bf16"]),
    "lora_packed_bf16": ("lora", ["dataset.packed=true", "dtype=bf16"]),
    "lora_packed_bf16_autocast": ("lora", ["dataset.packed=true", "autocast=bf16"]),
    "full_packed_fp32_compiled": ("full", ["dataset.packed=true", "compile=true"]),
    "lora_packed_fp32_compiled": ("lora", ["dataset.packed=true", "compile=true"]),
    "full_packed_bf16_compiled": ("full", ["dataset.packed=true", "dtype=bf16", "compile=true"]),
    "lora_packed_bf16_compiled": ("lora", ["dataset.packed=true", "dtype=bf16", "compile=true"]),
}
ANCHOR_IDS = (
    "tt_full_fp32",
    "tt_lora_fp32",
    "tt_full_packed_fp32",
    "tt_lora_packed_fp32",
    "tt_full_bf16",
    "tt_lora_bf16",
    "tt_lora_bf16_ce",
    "trl_full_fp32",
    "trl_lora_fp32",
    "trl_full_bf16amp",
    "trl_lora_bf16amp",
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LEN, BATCH, LORA_RANK = 512, 4, 8


def attune_config(work: Path, method: str, folder: Path) -> Path:
    """attune's config for the anchors' setting (see the module docstring)."""
    # the rows torchtune reads: {input: the prompt, output: the reply}
    dataset = {
        "_component_": "attune.data.instruct_dataset",
        "source": str(work / "data_io.jsonl"),
        "column_map": {"prompt": "input", "completion": "output"},
        "max_seq_len": 512,
        "cache_dir": str(folder / "hf"),
    }
    config = recipe_config(
        work / "model",
        dataset,
        folder,
        base="_bases/lora" if method == "lora" else "_bases/sft",
        device="cpu",
        dtype="fp32",
        batch_size=4,
        gradient_accumulation_steps=1,
        clip_grad_norm=None,
        optimizer={"_component_": "torch.optim.AdamW", "fused": True, "lr": 2.0e-5},
        lr_scheduler={
            "_component_": "attune.training.constant_with_warmup",
            "num_warmup_steps": 0,
        },
    )
    config["optimizer"]["weight_decay"] = 0.0
    if method == "lora":
        config["lora"] = {"rank": 8, "alpha": 16, "target_modules": LORA_TARGETS}
        config["optimizer"]["lr"] = 3.0e-4
        config["lr_scheduler"] = {
            "_component_": "attune.training.cosine_with_warmup",
            "num_warmup_steps": 0,
        }
    path = folder / f"attune_{method}.yaml"
    path.write_text(json.dumps(config))
    return path


def anchors_venv() -> Path:
    return Path(os.environ.get("ANCHORS_VENV", Path(tempfile.gettempdir()) / "anchors-venv"))


def prepare_anchor_inputs(work: Path) -> None:
    """The anchors' virtualenv, model and rows, made as their script makes them, minus the rows
    whose prompt alone fills the 512 tokens: TRL drops those (nothing left to train) while
    torchtune keeps them, so the two would not see the same batches and the anchors' own token
    check stops. With the sentences mined on some machines the generator makes one or two."""
    venv = anchors_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-r", str(ANCHORS / "requirements.txt")], check=True)
    env = {**os.environ, "ANCHORS_WORK": str(work), "PYTHONPATH": str(ANCHORS)}
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "model.safetensors").is_file():
        subprocess.run([str(python), str(ANCHORS / "make_model.py")], env=env, check=True)
    if not (work / "data_chat.jsonl").is_file():
        subprocess.run([str(python), str(ANCHORS / "make_data.py")], env=env, check=True)
    drop_prompts_that_fill(work, 512)


def drop_prompts_that_fill(work: Path, max_len: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(work / "model" / "tokenizer.json"))
    chat = [json.loads(line) for line in (work / "data_chat.jsonl").read_text().splitlines()]
    header = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    keep = [
        len(tokenizer.encode(header.format(row["prompt"][0]["content"])).ids) < max_len
        for row in chat
    ]
    if all(keep):
        return
    for name in ("data.jsonl", "data_io.jsonl", "data_chat.jsonl"):
        path = work / name
        lines = path.read_text().splitlines()
        assert len(lines) == len(keep), f"{path}: {len(lines)} rows, expected {len(keep)}"
        path.write_text(
            "".join(line + "\n" for line, kept in zip(lines, keep, strict=True) if kept)
        )
    print(f"dropped {keep.count(False)} rows whose prompt fills {max_len} tokens", flush=True)


def run_anchors(work: Path, ids: list[str], reps: int, steps: int = STEPS) -> dict[str, list[dict]]:
    """The anchors' runs (the shared script), as each run's metrics.json, by config id."""
    prepare_anchor_inputs(work)
    env = {
        **os.environ,
        "ANCHORS_VENV": str(anchors_venv()),
        "ANCHORS_WORK": str(work),
        "ANCHORS_REPS": str(reps),
        "ANCHORS_STEPS": str(steps),
        "ANCHORS_CONFIGS": " ".join(ids),
        "ANCHORS_FRESH": "1",
    }
    subprocess.run(["bash", str(ANCHORS / "run_anchors.sh")], env=env, check=True)
    runs: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(str(work / "results" / "*" / "metrics.json"))):
        metrics = json.loads(Path(path).read_text())
        runs.setdefault(metrics["config_id"], []).append(
            {
                "tokens_per_second": metrics["tokens_per_s"],
                "peak_rss_gb": metrics["peak_rss_gb"],
                "loss": metrics["final_loss"],
                "step_seconds": metrics["median_step_s"],
            }
        )
    return runs


def run_attune(
    work: Path, names: list[str], reps: int, steps: int = STEPS, peak_seconds: float = 0.0
) -> dict[str, list[dict]]:
    """attune's runs, by name; with ``peak_seconds``, each run's MFU against the matmul peak
    measured right after it (a shared machine's speed drifts over an hour's table)."""
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        configs = {method: attune_config(work, method, folder) for method in ("full", "lora")}
        for _ in range(reps):
            for name in names:
                method, overrides = ATTUNE[name]
                recipe = f"{method}_finetune_single_device"
                try:
                    figures = run_and_measure(
                        recipe,
                        str(configs[method]),
                        overrides,
                        steps,
                        WARMUP,
                        peak_seconds=peak_seconds,
                    )
                except RuntimeError as error:  # one failed setting leaves the others' figures
                    print(f"attune_{name} failed: {error}", flush=True)
                    continue
                runs.setdefault(f"attune_{name}", []).append(figures)
                print(json.dumps({**figures, "name": f"attune_{name}"}), flush=True)
    return runs


def select_settings(
    attune: list[str], anchors: list[str], keep_bf16: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """attune's and the anchors' settings to run, and those left out: every bf16 one on a CPU
    without bf16 instructions (emulated there, each would take hours), unless ``keep_bf16``."""
    if keep_bf16 or has_bf16_instructions() is not False:
        return list(attune), list(anchors), []
    left_out = [f"attune_{n}" for n in attune if "bf16" in n] + [n for n in anchors if "bf16" in n]
    kept_attune = [n for n in attune if "bf16" not in n]
    return kept_attune, [n for n in anchors if "bf16" not in n], left_out


def data_span(work: Path) -> float:
    """Attention's span on the anchors' rows (:func:`benchmarks.mfu.attended_span`), from their
    lengths as attune tokenizes them; the same rows for every system, so one span for all."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = json.loads(attune_config(work, "full", Path(folder)).read_text())
        return attended_span(data_lengths(cfg))


def machine(work: Path, peak_seconds: float, names: Sequence[str] = ()) -> dict:
    """The CPU (its flags), the matmul peaks (bf16's where a configuration in ``names`` needs
    it or the CPU has bf16 instructions) and the anchors' model's FLOPs a token, for MFU."""
    config = json.loads((work / "model" / "config.json").read_text())
    span = data_span(work)
    return {
        "cpu": cpu_header(),
        "cpu_flags": sorted(set(REPORTED_FLAGS) & cpu_flags()),
        "bf16_instructions": has_bf16_instructions(),
        "peaks": measure_peaks(
            config,
            BATCH * MAX_LEN,
            peak_seconds,
            peak_dtypes(names),
        ),
        "attended_span": span,
        "flops_per_token": {
            "full": model_flops_per_token(config, span),
            "lora": model_flops_per_token(config, span, LORA_RANK, LORA_TARGETS),
        },
    }


def row_mfu(name: str, row: dict[str, float], figures: dict) -> float:
    """A configuration's MFU: the median of its runs' own (each against the peak measured
    after it), else against the table's peak of the dtype its name says it multiplies in."""
    if "mfu" in row:
        return row["mfu"]
    flops = figures["flops_per_token"]["lora" if "lora" in name else "full"]
    peak = figures["peaks"]["bf16" if "bf16" in name else "fp32"]
    return mfu(row["tokens_per_second"], flops, peak)


def medians(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Each configuration's medians over its runs (``mfu`` where every run has its own)."""
    keys = ("tokens_per_second", "peak_rss_gb", "loss", "step_seconds", "mfu")
    return {
        name: {
            key: statistics.median(run[key] for run in group)
            for key in keys
            if all(key in run for run in group)
        }
        for name, group in runs.items()
    }


def best(table: dict[str, dict[str, float]], prefix: str, method: str) -> tuple[str, dict] | None:
    """The fastest configuration of one system (``attune_``, ``tt_``, ``trl_``) for a method."""
    chosen = [(n, r) for n, r in table.items() if n.startswith(f"{prefix}{method}")]
    return max(chosen, key=lambda item: item[1]["tokens_per_second"], default=None)


def report(
    table: dict[str, dict[str, float]],
    reps: int,
    figures: dict | None = None,
    steps: int = STEPS,
) -> str:
    """The Markdown tables; with ``figures`` (:func:`machine`'s, plus ``left_out``), the CPU's
    flags and peaks in the header and an MFU column."""
    lines = [
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {steps} steps (first {WARMUP} excluded), medians of {reps}.",
    ]
    if figures is not None:
        peaks = figures["peaks"]
        lines.append(
            f"CPU: {figures['cpu']}. Matmul peak (torch.mm, the model's shapes): "
            + ", ".join(
                f"{dtype} {peaks[dtype] / 1e9:,.0f} GFLOP/s" for dtype in DTYPES if dtype in peaks
            )
            + ". "
            f"MFU counts attention over the rows' documents (attended span "
            f"{figures.get('attended_span', MAX_LEN):,.0f} tokens); attune's runs against the "
            "peak measured right after each, the anchors' against this one, measured at the end."
        )
        if figures.get("left_out"):
            lines.append(
                "Left out, no bf16 instructions on this CPU (bf16 emulated, hours a run): "
                + ", ".join(figures["left_out"])
                + "."
            )
    lines += [
        "",
        f"| config | tokens/s | MFU | step s | peak RSS GB | loss @{steps} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(table.items()):
        utilisation = f"{row_mfu(name, row, figures):.0%}" if figures is not None else "-"
        lines.append(
            f"| {name} | {row['tokens_per_second']:,.0f} | {utilisation} | "
            f"{row['step_seconds']:.2f} | {row['peak_rss_gb']:.2f} | {row['loss']:.3f} |"
        )
    lines += ["", "| method | attune best | vs torchtune best | vs TRL best | RSS vs torchtune |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for method in ("full", "lora"):
        ours = best(table, "attune_", method)
        if ours is None:
            continue
        cells = [method, f"{ours[0]} ({ours[1]['tokens_per_second']:,.0f})"]
        for prefix in ("tt_", "trl_"):
            theirs = best(table, prefix, method)
            ratio = (
                ours[1]["tokens_per_second"] / theirs[1]["tokens_per_second"] if theirs else None
            )
            cells.append(f"{ratio:.2f}x ({theirs[0]})" if theirs else "-")
        tt = best(table, "tt_", method)
        cells.append(f"{ours[1]['peak_rss_gb'] / tt[1]['peak_rss_gb']:.2f}" if tt else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--attune", nargs="*", default=list(ATTUNE), choices=list(ATTUNE))
    parser.add_argument("--anchors", nargs="*", default=list(ANCHOR_IDS), choices=ANCHOR_IDS)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("ANCHORS_WORK", Path(tempfile.gettempdir()) / "anchors-work")),
        help="the anchors' work folder (model, data, their runs)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    parser.add_argument("--bf16", action="store_true", help="run bf16 settings on any CPU")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps a run")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="per dtype, for MFU")
    args = parser.parse_args()
    attune, anchors, left_out = select_settings(args.attune, args.anchors, args.bf16)
    if left_out:
        print(
            f"left out {', '.join(left_out)}: this CPU has no bf16 instructions (AVX-512 BF16 "
            "or AMX), bf16 is emulated and each run would take hours (--bf16 keeps them)",
            flush=True,
        )
    runs = run_anchors(args.work, anchors, args.reps, args.steps) if anchors else {}
    if not (args.work / "model" / "model.safetensors").is_file():
        raise SystemExit(f"no anchor model in {args.work}: run with some --anchors first")
    runs.update(run_attune(args.work, attune, args.reps, args.steps, args.peak_seconds))
    table = medians(runs)
    # measured after the runs, alone on the machine, as the runs were
    figures = {**machine(args.work, args.peak_seconds, [*attune, *anchors]), "left_out": left_out}
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": figures, "configs": table}, indent=1) + "\n")
    print(report(table, args.reps, figures, args.steps))


if __name__ == "__main__":
    main()
