"""SFT throughput on the anchor benchmark's setting (``../shared/bench/anchors``).

The anchors measured torchtune 0.6.1 and TRL on a 32M-parameter random Llama (hidden 512, 8
layers, 8 heads, 4 KV heads, vocab 8192), 2,000 Alpaca-style rows of a wide length spread,
max length 512, batch 4, 60 steps, fused AdamW, no clipping, CPU. This script rebuilds that
setting for attune (the same model shape; rows of the same length distribution from text mined
on this machine, since the anchors' generator is not shipped) and runs the real ``tune run``:

* full fp32, lr 2e-5 constant; LoRA r=8 alpha=16 on q/k/v/o/gate/up/down, lr 3e-4 cosine;
* unpacked (padded to the batch's longest row) and packed (rows of 512).

Tokens/s counts non-padding input tokens of steps 3..60 over their wall time, as the anchors
do (from ``metrics.jsonl``: each step's tokens and tokens/s).

    python benchmarks/sft_throughput.py                 # every variant, ~10 min on 2 cores
    python benchmarks/sft_throughput.py --variants full_fp32 lora_fp32
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

VARIANTS = {
    "full_fp32": ("full_finetune_single_device", "_bases/sft", []),
    "full_packed_fp32": ("full_finetune_single_device", "_bases/sft", ["dataset.packed=true"]),
    "full_bf16": ("full_finetune_single_device", "_bases/sft", ["dtype=bf16"]),
    "lora_fp32": ("lora_finetune_single_device", "_bases/lora", []),
    "lora_packed_fp32": ("lora_finetune_single_device", "_bases/lora", ["dataset.packed=true"]),
}


def sentences(limit: int = 20000) -> list[str]:
    """Plain English sentences from the docs installed with Python packages."""
    root = Path(sysconfig.get_paths()["purelib"])
    pattern = re.compile(r"[A-Z][a-z]+(?: [a-z][a-z,]*){5,30}\.")
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        found.extend(pattern.findall(" ".join(text.split())))
        if len(found) >= limit:
            break
    return sorted(set(found))[:limit]


def make_rows(pool: list[str], count: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows whose ChatML length spreads like the anchors' (median ~100, long tail past 512)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        answer_sentences = min(int(rng.lognormvariate(1.2, 0.9)) + 1, 40)
        rows.append(
            {
                "instruction": rng.choice(pool),
                "input": rng.choice(pool) if rng.random() < 0.4 else "",
                "output": " ".join(rng.choice(pool) for _ in range(answer_sentences)),
            }
        )
    return rows


def make_model(folder: Path, corpus: list[str]) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=4,
        pad_token_id=2,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(folder)


def tokens_per_second(metrics: Path, first_step: int = 3) -> tuple[float, float]:
    """Non-padding tokens/s over steps ``first_step``.. and the last step's loss."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    tokens = seconds = 0.0
    previous = 0
    for record in records:
        step_tokens = record["tokens_seen"] - previous
        previous = record["tokens_seen"]
        if record["step"] >= first_step:
            tokens += step_tokens
            seconds += step_tokens / record["tokens_per_second"]
    return tokens / seconds, records[-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        pool = sentences()
        make_model(root / "model", pool)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in make_rows(pool, 2000)))
        tune = str(Path(sys.executable).parent / "tune")
        for name in args.variants:
            recipe, base, extra = VARIANTS[name]
            config = {
                "base": base,
                "output_dir": str(root / name),
                "model": {
                    "_component_": "attune.models.from_pretrained",
                    "path": str(root / "model"),
                },
                "tokenizer": {
                    "_component_": "attune.tokenizer.from_pretrained",
                    "path": str(root / "model"),
                },
                "dataset": {
                    "_component_": "attune.data.instruct_dataset",
                    "source": str(data),
                    "max_seq_len": 512,
                    "cache_dir": str(root / "hf"),
                },
                "device": "cpu",
                "dtype": "fp32",
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_steps": args.steps,
                "clip_grad_norm": None,
                "optimizer": {"lr": 2.0e-5, "weight_decay": 0.0},
                "lr_scheduler": {
                    "_component_": "attune.training.constant_with_warmup",
                    "num_warmup_steps": 0,
                },
                "checkpointer": {"save_every_n_steps": None},
            }
            if base == "_bases/lora":
                config["lora"] = {
                    "rank": 8,
                    "alpha": 16,
                    "target_modules": [
                        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
                    ],
                }  # fmt: skip
                config["optimizer"]["lr"] = 3.0e-4
                config["lr_scheduler"] = {
                    "_component_": "attune.training.cosine_with_warmup",
                    "num_warmup_steps": 0,
                }
            path = root / f"{name}.yaml"
            path.write_text(json.dumps(config))
            command = [tune, "run", recipe, "--config", str(path), *extra]
            subprocess.run(command, check=True, capture_output=True, text=True)
            rate, loss = tokens_per_second(root / name / "metrics.jsonl")
            print(json.dumps({"variant": name, "tokens_per_second": round(rate), "loss": loss}))


if __name__ == "__main__":
    main()
