"""What quantizing costs after plain fine-tuning (PTQ) and after quantization-aware training,
on the same data and step budget, with the tiny model on the demo task.

For each seed: ``tiny/full`` trains for ``--steps`` steps (checkpointing at ``--qat-from``);
``quantize`` scores its last checkpoint in full precision and quantized; QAT resumes the plain
run at ``--qat-from`` with fake quantization from there on (exact resume makes this the run
``tiny/qat fake_quant_after_n_steps=<qat-from>`` would be) and scores its converted model on the
same held-out rows. Prints one JSON object per seed and the medians.

    python benchmarks/qat_vs_ptq.py --scheme 8da4w --steps 1000 --qat-from 500
    python benchmarks/qat_vs_ptq.py --scheme int2_weight_only --steps 300 --qat-from 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def tune(*args: str) -> None:
    command = [sys.executable, "-m", "attune", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def closing_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def one_seed(root: Path, seed: int, args: argparse.Namespace) -> dict:
    common = (
        f"seed={seed}",
        f"max_steps={args.steps}",
        "answer_check=null",
        "eval_every_n_steps=null",
        f"checkpointer.save_every_n_steps={args.qat_from}",
        "checkpointer.keep_last_n=null",
    )
    scheme = (f"quantization.scheme={args.scheme}", f"quantization.group_size={args.group_size}")
    plain, ptq, qat = root / "plain", root / "ptq", root / "qat"
    tune(
        "run",
        "full_finetune_single_device",
        "--config",
        "tiny/full",
        f"output_dir={plain}",
        *common,
    )
    last = plain / "checkpoints" / f"step_{args.steps}"
    tune(
        "run",
        "quantize",
        "--config",
        "tiny/quantize",
        f"output_dir={ptq}",
        f"model.path={last}",
        *scheme,
    )
    start = f"step_{args.qat_from}"
    shutil.copytree(plain / "checkpoints" / start, qat / "checkpoints" / start)
    tune(
        "run",
        "qat_single_device",
        "--config",
        "tiny/qat",
        f"output_dir={qat}",
        *common,
        *scheme,
        f"fake_quant_after_n_steps={args.qat_from}",
        "resume_from_checkpoint=true",
    )
    full, after_ptq = closing_metrics(ptq)["val_loss"], closing_metrics(ptq)["val_loss_quantized"]
    after_qat = closing_metrics(qat)["val_loss_quantized"]
    return {
        "seed": seed,
        "full_precision_loss": full,
        "ptq_loss": after_ptq,
        "qat_loss": after_qat,
        "ptq_degradation": after_ptq - full,
        "qat_degradation": after_qat - full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="8da4w")
    parser.add_argument("--group-size", default="32", help="an integer, or null for per channel")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--qat-from", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(one_seed(Path(scratch), seed, args))
        print(json.dumps(rows[-1]), flush=True)
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "seed"}
    print(json.dumps({"scheme": args.scheme, "group_size": args.group_size, "median": medians}))


if __name__ == "__main__":
    main()
