"""Every training recipe's metrics on its tiny config, recorded to compare two trees bit for bit.

A refactor that must not change behaviour ("no behaviour change") is checked by recording
before and after and comparing: each recipe runs a few steps of its ``tiny/*`` config through
the real ``tune run`` (logging every step, no answer check), and every logged loss, reward, KL,
margin, accuracy and log-probability is kept exactly as ``metrics.jsonl`` has it.

    python benchmarks/recipe_metrics.py record /tmp/before        # on the old tree
    python benchmarks/recipe_metrics.py record /tmp/after         # on the new one
    python benchmarks/recipe_metrics.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RUNS = [
    ("full_finetune_single_device", "tiny/full", ["max_steps=6", "eval_every_n_steps=3"]),
    ("lora_finetune_single_device", "tiny/lora", ["max_steps=6"]),
    ("full_dpo_single_device", "tiny/dpo_full", ["max_steps=4", "eval_every_n_steps=2"]),
    ("lora_dpo_single_device", "tiny/dpo_lora", ["max_steps=4"]),
    ("reward_model_single_device", "tiny/reward_model", ["max_steps=4"]),
    ("ppo_full_finetune_single_device", "tiny/ppo", ["max_steps=2"]),
    ("ppo_lora_finetune_single_device", "tiny/ppo_lora", ["max_steps=2"]),
    ("qat_single_device", "tiny/qat", ["max_steps=4"]),
    ("qat_lora_finetune_single_device", "tiny/qat_lora", ["max_steps=4"]),
]
KEPT = ("loss", "reward", "kl", "margin", "accuracy", "logps", "entropy")
RESULTS = "metrics.json"


def record(folder: Path) -> None:
    """Run every recipe into ``folder`` and write what they logged to ``folder/metrics.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ATTUNE_CACHE": str(folder / "cache")}
    results = {}
    for recipe, config, extra in RUNS:
        out = folder / recipe
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable, "-m", "attune", "run", recipe, "--config", config,
            f"output_dir={out}", "answer_check=null", "log_every_n_steps=1", *extra,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{recipe} failed:\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        results[recipe] = [
            {k: v for k, v in r.items() if k == "step" or any(word in k for word in KEPT)}
            for r in records
        ]
        print(f"{recipe}: {len(records)} records")
    (folder / RESULTS).write_text(json.dumps(results, indent=1, sort_keys=True))


def compare(before: Path, after: Path) -> bool:
    """Print each recipe's verdict; True when every recorded value is exactly equal."""
    old = json.loads((before / RESULTS).read_text())
    new = json.loads((after / RESULTS).read_text())
    same = True
    for recipe in sorted(old.keys() | new.keys()):
        equal = old.get(recipe) == new.get(recipe)
        same &= equal
        print(f"{recipe}: {'identical' if equal else 'DIFFERENT'}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("record").add_argument("folder", type=Path)
    comparing = commands.add_parser("compare")
    comparing.add_argument("before", type=Path)
    comparing.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.folder)
    else:
        raise SystemExit(0 if compare(args.before, args.after) else 1)


if __name__ == "__main__":
    main()
