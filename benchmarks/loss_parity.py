"""attune's full fp32 fine-tuning against torchtune's, loss for loss, on torchtune's own tokens.

The side-by-side runs give each system its own tokenization. Those differ by one trained token per
row: attune trains the assistant's reply and its end-of-turn token (DESIGN.md: the mask covers
exactly those), while the anchors also train the newline the ChatML template writes after
``<|im_end|>`` (torchtune's anchor tokenizer and TRL's completion-only loss agree on it). So the
runs' losses differ by construction (loss at step 60: torchtune 7.695, attune 7.823 with its own
masks), and that says nothing about whether the two train alike.

This script takes that difference away: it writes torchtune's tokenized rows (token ids and labels
from the anchors' ``instruct_dataset`` with their ChatML tokenizer, in the anchors' virtualenv),
runs attune's ``full_finetune_single_device`` on exactly those rows (:func:`anchor_rows`) with the
side-by-side settings (same checkpoint, batch 4, seed 0, fused AdamW lr 2e-5 constant), runs
torchtune's full fp32 anchor, and prints both loss curves step by step with their largest
difference.

    python benchmarks/loss_parity.py [--steps N<=60] [--work /tmp/anchors-work]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.side_by_side import (
    ANCHORS,
    STEPS,
    anchors_venv,
    attune_config,
    prepare_anchor_inputs,
    run_anchors,
)

ROWS_FILE = "tt_rows.jsonl"

# Run in the anchors' virtualenv: torchtune's rows exactly as its recipe reads them.
DUMP_TORCHTUNE_ROWS = """
import json, os, sys
from anchors_tt import ChatMLTokenizer
from torchtune.datasets import instruct_dataset
work = os.environ["ANCHORS_WORK"]
model = os.path.join(work, "model")
tokenizer = ChatMLTokenizer(os.path.join(model, "tokenizer.json"),
                            os.path.join(model, "tokenizer_config.json"), max_seq_len=512)
rows = instruct_dataset(tokenizer, source="json", data_files=os.path.join(work, "data_io.jsonl"),
                        split="train", train_on_input=False)
with open(sys.argv[1], "w") as out:
    for index in range(len(rows)):
        row = rows[index]
        tokens, labels = [int(t) for t in row["tokens"]], [int(t) for t in row["labels"]]
        out.write(json.dumps({"tokens": tokens, "labels": labels}) + "\\n")
"""


def anchor_rows(tokenizer: Any, source: str, max_seq_len: int = 512, packed: bool = False) -> Any:
    """A dataset component: rows already tokenized (``tokens`` and ``labels`` columns, -100 for
    untrained positions), read as attune reads its own."""
    import datasets

    from attune.data.tokenized import TokenizedDataset, encode_rows

    rows = datasets.load_dataset("json", data_files=source, split="train")
    table = encode_rows(
        rows,
        lambda row: {"tokens": row["tokens"], "labels": row["labels"]},
        identity={"pretokenized": source},
        source=source,
    )
    return TokenizedDataset(table, max_seq_len=max_seq_len, packed=packed, source=source)


def dump_torchtune_rows(work: Path) -> Path:
    path = work / ROWS_FILE
    env = {**os.environ, "ANCHORS_WORK": str(work), "PYTHONPATH": str(ANCHORS)}
    python = anchors_venv() / "bin" / "python"
    subprocess.run([str(python), "-c", DUMP_TORCHTUNE_ROWS, str(path)], env=env, check=True)
    return path


def torchtune_losses(work: Path, steps: int) -> list[float]:
    run_anchors(work, ["tt_full_fp32"], reps=1)
    logs = glob.glob(str(work / "results" / "tt_full_fp32_r1" / "tt_out" / "logs" / "log_*.txt"))
    losses = {}
    for line in Path(max(logs, key=os.path.getmtime)).read_text().splitlines():
        match = re.match(r"Step (\d+) \| loss:([0-9.eE+-]+)", line)
        if match:
            losses[int(match.group(1))] = float(match.group(2))
    return [losses[step] for step in range(1, steps + 1)]


def attune_losses(work: Path, rows: Path, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config_path = attune_config(work, "full", folder)
        config = json.loads(config_path.read_text())
        config["dataset"] = {
            "_component_": "benchmarks.loss_parity.anchor_rows",
            "source": str(rows),
            "max_seq_len": 512,
        }
        config["imports"] = ["benchmarks.loss_parity"]  # a component of ours: trust it by name
        config_path.write_text(json.dumps(config))
        command = [
            sys.executable, "-m", "attune", "run", "full_finetune_single_device",
            "--config", str(config_path), f"output_dir={folder / 'run'}",
            f"max_steps={steps}", "log_every_n_steps=1",
        ]  # fmt: skip
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
    losses = {record["step"]: record["loss"] for record in records if "loss" in record}
    return [losses[step] for step in range(1, steps + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"at most {STEPS}, the anchors'")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anchors-work")
    args = parser.parse_args()
    if not 1 <= args.steps <= STEPS:
        parser.error(f"--steps must be between 1 and {STEPS} (the anchors run {STEPS} steps)")
    prepare_anchor_inputs(args.work)
    rows = dump_torchtune_rows(args.work)
    ours = attune_losses(args.work, rows, args.steps)
    theirs = torchtune_losses(args.work, args.steps)
    print("| step | torchtune | attune | difference |")
    print("| --- | --- | --- | --- |")
    for step, (a, b) in enumerate(zip(theirs, ours, strict=True), start=1):
        print(f"| {step} | {a:.6f} | {b:.6f} | {b - a:+.2e} |")
    worst = max(abs(b - a) for a, b in zip(theirs, ours, strict=True))
    print(f"largest difference over {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
