"""attune's GRPO beside TRL's ``GRPOTrainer``, on the same checkpoint, prompts and settings, in one run.

Both systems train the same model folder: by default a random Llama made here with
transformers (hidden 512, 8 layers, 8 heads, 4 KV heads, MLP 1408: 24M parameters) around
attune's demo tokenizer (byte-level BPE, 576 tokens, ChatML template); ``--checkpoint`` takes
any other HF folder with a chat template. The prompts are the demo's reversal rows
(``attune/demo/data/reverse_words_train.jsonl``) as one-message conversations, so each side
renders them with the same chat template; the reward is :func:`attune.demo.reverse_words_reward`.

Settings, alike on both: CPU, fp32, no vLLM, no activation (gradient) checkpointing,
``--prompts`` prompts per step, each answered ``--num-generations`` times; up to
``--max-new-tokens`` tokens sampled at temperature 1 (no top-k / top-p), stopping at
``<|im_end|>``; one optimizer step per generated batch (``num_iterations`` 1, the whole batch
in one forward pass); the ``dapo`` loss, clip 0.2 both ways, ``beta`` 0 (no reference model),
rewards scaled by the group's standard deviation; AdamW (no weight decay), a constant learning
rate, gradients clipped to norm 1; ``--threads`` intra-op threads. attune runs as
``tune run grpo_full_finetune_single_device`` on a config written here; TRL 1.16 runs
:mod:`benchmarks.trl_grpo`; each in a child process, one after the other.

The table gives, over the steps after the first ``--warmup`` (each step: generate the batch,
score it, one update):

- ``step s``: the median wall time from the end of one step to the end of the next;
- ``gen tok/s``: completion tokens generated (every sampled token, the stop token included,
  padding not) per second of step time, the measured steps' tokens over their summed time;
- ``sampling tok/s``: the same tokens per second spent sampling them: attune's
  ``generated_tokens_per_second`` (its sampling phase: generation, decoding, reward scoring),
  TRL's time inside ``GRPOTrainer._generate`` (tokenizing, ``model.generate``, decoding);
- ``mean len``: the mean completion length (a random model rarely samples the stop token, so
  both run near ``--max-new-tokens``);
- the ratio of attune's ``gen tok/s`` (and step time) to TRL's.

    python benchmarks/grpo_side_by_side.py                          # 12 steps each, 2 warm-up
    python benchmarks/grpo_side_by_side.py --steps 5 --warmup 1 --json /tmp/grpo.json
    python benchmarks/grpo_side_by_side.py --checkpoint ~/.cache/attune/tiny-v2 --max-new-tokens 12

Figures from another machine do not compare: only ratios from one run of this script do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = "grpo_full_finetune_single_device"
SYSTEMS = ("attune", "trl")
# the default checkpoint's shape (the anchors' Llama, with the demo's vocabulary)
MODEL_SHAPE = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1408}


def make_checkpoint(folder: Path, shape: dict[str, int], seed: int = 0) -> None:
    """A random Llama in HF format with the demo tokenizer and its ChatML template, made by
    transformers (as TRL loads it). Kept when ``folder`` already holds one."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from attune.demo.tiny import write_tokenizer

    if (folder / "model.safetensors").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokenizer.json").is_file():
        write_tokenizer(folder)
    tokens = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokens["model"]["vocab"]
    eos, pad = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(folder)


def count_parameters(folder: Path) -> int:
    """The parameters in an HF folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - a safe_open handle is no dict
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def write_prompts(path: Path) -> int:
    """The demo's training rows as conversational prompts with their expected ``output``."""
    from attune.demo import reverse_words_rows

    rows = reverse_words_rows("train")
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": row["instruction"]}],
                    "output": row["output"],
                }
            )
            + "\n"
            for row in rows
        )
    )
    return len(rows)


def attune_config(model: Path, data: Path, folder: Path, args: argparse.Namespace) -> Path:
    """attune's GRPO config for the shared settings (see the module docstring)."""
    config = {
        "base": "_bases/grpo",
        "output_dir": str(folder / "attune_run"),
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        "batch_size": args.prompts,
        "gradient_accumulation_steps": 1,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
        "clip_grad_norm": 1.0,
        "enable_activation_checkpointing": False,
        "compile": False,
        "model": {"_component_": "attune.models.from_pretrained", "path": str(model)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(model)},
        "dataset": {
            "_component_": "attune.data.prompt_dataset",
            "source": str(data),
            "cache_dir": str(folder / "hf"),
        },
        "reward": {
            "_component_": "attune.rl.FunctionReward",
            "function": {"_component_": "attune.demo.reverse_words_reward", "_partial_": True},
        },
        "grpo": {
            "num_generations": args.num_generations,
            "loss_type": "dapo",
            "scale_rewards": "group",
            "epsilon_low": 0.2,
            "epsilon_high": 0.2,
            "beta": 0.0,
            "num_iterations": 1,
            "minibatch_size": None,
            "micro_batch_size": None,
        },
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "attune.training.constant_with_warmup",
            "num_warmup_steps": 0,
        },
        "checkpointer": {"save_every_n_steps": None, "keep_last_n": 1},
    }
    path = folder / "attune_grpo.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def run_child(command: list[str], threads: int, name: str) -> float:
    """Run a child process; its wall time. Raises RuntimeError with its output's tail."""
    started = time.perf_counter()
    child = subprocess.run(
        command, env=child_env(threads), capture_output=True, text=True, cwd=ROOT, check=False
    )
    wall = time.perf_counter() - started
    if child.returncode != 0:
        tail = (child.stdout + child.stderr)[-3000:]
        raise RuntimeError(f"{name} failed ({' '.join(command)}):\n{tail}")
    return wall


def run_attune(config: Path, folder: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    """attune's steps: ``end`` (seconds since its loop started), completion tokens, sampling
    seconds (from ``metrics.jsonl``)."""
    output = folder / "attune_run"
    command = [
        sys.executable, "-m", "attune", "run", RECIPE, "--config", str(config),
        f"output_dir={output}", f"max_steps={args.steps}", "log_every_n_steps=1",
    ]  # fmt: skip
    run_child(command, args.threads, "attune")
    completions = args.prompts * args.num_generations
    steps = []
    for line in (output / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "completion_length" not in record:
            continue
        tokens = record["completion_length"] * completions
        steps.append(
            {
                "step": record["step"],
                "end": record["elapsed_s"],
                "completions": completions,
                "completion_tokens": tokens,
                "generation_s": tokens / record["generated_tokens_per_second"],
                "loss": record["loss"],
                "reward": record["reward"],
            }
        )
    return steps


def run_trl(model: Path, data: Path, folder: Path, args: argparse.Namespace) -> list[dict]:
    """TRL's steps, as :mod:`benchmarks.trl_grpo` writes them."""
    out = folder / "trl_steps.jsonl"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "trl_grpo.py"), "--model", str(model),
        "--data", str(data), "--out", str(out), "--steps", str(args.steps),
        "--prompts", str(args.prompts), "--num-generations", str(args.num_generations),
        "--max-completion-length", str(args.max_new_tokens), "--lr", str(args.lr),
        "--threads", str(args.threads), "--scratch", str(folder / "trl_out"),
    ]  # fmt: skip
    run_child(command, args.threads, "TRL")
    return [json.loads(line) for line in out.read_text().splitlines()]


def measure(steps: list[dict], warmup: int) -> dict[str, float]:
    """Figures over the steps after ``warmup`` (see the module docstring)."""
    by_step = {step["step"]: step for step in steps}
    last = max(by_step)
    if warmup < 1 or warmup >= last or any(s not in by_step for s in range(warmup, last + 1)):
        raise ValueError(f"need every step from {warmup} to {last} and more than {warmup}")
    measured = range(warmup + 1, last + 1)
    seconds = [by_step[s]["end"] - by_step[s - 1]["end"] for s in measured]
    tokens = sum(by_step[s]["completion_tokens"] for s in measured)
    completions = sum(by_step[s]["completions"] for s in measured)
    sampling = sum(by_step[s]["generation_s"] for s in measured)
    return {
        "steps_measured": len(seconds),
        "step_seconds": statistics.median(seconds),
        "step_seconds_mean": sum(seconds) / len(seconds),
        "generated_tokens_per_second": tokens / sum(seconds),
        "sampling_tokens_per_second": tokens / sampling,
        "sampling_share": sampling / sum(seconds),
        "mean_completion_length": tokens / completions,
        "last_reward": by_step[last].get("reward", float("nan")),
    }


def report(table: dict[str, dict[str, float]], args: argparse.Namespace, params: int) -> str:
    lines = [
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{args.threads} threads of {os.cpu_count()} CPUs; {params / 1e6:.1f}M-parameter model, "
        f"{args.prompts} prompts x {args.num_generations} completions per step, up to "
        f"{args.max_new_tokens} new tokens; {args.steps} steps (first {args.warmup} excluded).",
        "",
        "| system | step s (median) | gen tok/s | sampling tok/s | sampling share | mean len "
        "| vs TRL (tok/s) | vs TRL (step time) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    trl = table.get("trl")
    for name, row in table.items():
        ratio = speedup = "-"
        if trl is not None:
            ratio = (
                f"{row['generated_tokens_per_second'] / trl['generated_tokens_per_second']:.2f}x"
            )
            speedup = f"{trl['step_seconds'] / row['step_seconds']:.2f}x"
        lines.append(
            f"| {name} | {row['step_seconds']:.2f} | {row['generated_tokens_per_second']:,.0f} | "
            f"{row['sampling_tokens_per_second']:,.0f} | {row['sampling_share']:.0%} | "
            f"{row['mean_completion_length']:.1f} | {ratio} | {speedup} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="an HF model folder (default: a random one)"
    )
    for key, value in MODEL_SHAPE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' files here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        model = args.checkpoint or folder / "model"
        if args.checkpoint is None:
            make_checkpoint(model, {key: getattr(args, key) for key in MODEL_SHAPE})
        params = count_parameters(model)
        data = folder / "prompts.jsonl"
        write_prompts(data)
        runs: dict[str, list[dict]] = {}
        for system in args.systems:
            print(f"running {system}: {args.steps} steps", flush=True)
            if system == "attune":
                runs[system] = run_attune(attune_config(model, data, folder, args), folder, args)
            else:
                runs[system] = run_trl(model, data, folder, args)
    table = {name: measure(steps, args.warmup) for name, steps in runs.items()}
    result = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "parameters": params,
        "figures": table,
        "steps": runs,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(report(table, args, params))


if __name__ == "__main__":
    main()
