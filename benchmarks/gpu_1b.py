"""Full fine-tuning of a Llama-3.2-1B-shaped model on one GPU: tokens/s, MFU, peak memory.

Random weights from Llama-3.2-1B's own config (1.24B parameters, tied embeddings, llama3 RoPE
scaling), written as a bf16 Hugging Face checkpoint; rows of random demo words with a wide length
spread (prompts 20-600 words, replies 20-1,000), packed into 2,048-token rows; pure bf16, fused
AdamW, compiled layers, flex attention over the packed documents
(:class:`attune.models.masks.DocumentBlockMask`), the chunked cross-entropy. It runs
``full_finetune_single_device`` through :mod:`benchmarks.harness` and prints its JSON (tokens/s
after the warm-up steps, which include compilation; MFU as 6 x parameters x tokens/s over the
device's dense bf16 peak, attention's FLOPs left out; peak CUDA memory).

    python benchmarks/gpu_1b.py                       # batch 8 x 2,048, 30 steps
    python benchmarks/gpu_1b.py --batch-size 16 --steps 40 -- enable_activation_checkpointing=true
    python benchmarks/gpu_1b.py --tiny --device cpu --steps 3   # a smoke run of the pipeline
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune.models.builders import HF_CONFIGS
from benchmarks.harness import recipe_config, run_and_measure
from benchmarks.random_checkpoint import write_random_checkpoint

# meta-llama/Llama-3.2-1B's architecture, as its config.json publishes it
LLAMA_3_2_1B = {
    **HF_CONFIGS["llama3_2_1b"],
    "architectures": ["LlamaForCausalLM"],
    "torch_dtype": "bfloat16",
}
# Qwen/Qwen3-30B-A3B's architecture (its config.json) cut to 4 of its 48 layers (--moe):
# 128 experts of width 768, top-8, about 2.6B parameters of which 0.5B active per token
QWEN3_30B_A3B_4_LAYERS = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001, "hidden_act": "silu", "torch_dtype": "bfloat16",
}  # fmt: skip
# the same architecture at a size a CPU runs in seconds (--tiny)
TINY = {**LLAMA_3_2_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def parameter_count(hf_config: dict, active: bool = False) -> int:
    """The model's parameters, tied ones counted once; with ``active``, those one token goes
    through (of a mixture of experts' expert weights, ``top_k / experts`` of them)."""
    import torch

    from attune.models import from_hf_config

    with torch.device("meta"):
        model = from_hf_config(hf_config)
    total = 0
    for name, param in model.named_parameters():
        share = 1.0
        if active and ".experts." in name:
            share = model.config.num_experts_per_tok / (model.config.num_experts or 1)
        total += int(param.numel() * share)
    return total


def write_rows(path: Path, count: int, seed: int = 0) -> None:
    from attune.demo.reverse_words import WORDS

    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            prompt = " ".join(rng.choices(WORDS, k=int(20 * 30 ** rng.random())))
            reply = " ".join(rng.choices(WORDS, k=int(20 * 50 ** rng.random())))
            out.write(json.dumps({"prompt": prompt, "completion": reply}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out (compilation)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model, for a smoke run")
    parser.add_argument(
        "--moe", action="store_true", help="Qwen3-30B-A3B's architecture, 4 of its layers"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides (after --)")
    args = parser.parse_args()

    from attune.demo.tiny import write_tokenizer

    hf_config = TINY if args.tiny else QWEN3_30B_A3B_4_LAYERS if args.moe else LLAMA_3_2_1B
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        write_random_checkpoint(work / "model", hf_config)
        write_tokenizer(work / "model")
        rows_needed = args.steps * args.batch_size * args.seq_len // 700 + 100
        write_rows(work / "rows.jsonl", rows_needed)
        dataset = {
            "_component_": "attune.data.instruct_dataset",
            "source": str(work / "rows.jsonl"),
            "max_seq_len": args.seq_len,
            "packed": True,
            "cache_dir": str(work / "hf"),
        }
        config = recipe_config(
            work / "model",
            dataset,
            work,
            device=args.device,
            dtype="bf16",
            compile=True,
            batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            optimizer={"_component_": "torch.optim.AdamW", "lr": 2.0e-5},
        )
        config_path = work / "gpu_1b.yaml"
        config_path.write_text(json.dumps(config))
        figures = run_and_measure(
            "full_finetune_single_device",
            str(config_path),
            args.overrides,
            args.steps,
            args.warmup,
            parameters=parameter_count(hf_config, active=True),  # MFU counts the FLOPs done
        )
    figures.update(
        {
            "parameters": parameter_count(hf_config),
            "active_parameters": parameter_count(hf_config, active=True),
            "batch_size": args.batch_size,
        }
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
