"""The shipped per-model configs run as they are, on a tiny checkpoint of the same family
(the weights and data paths overridden, nothing else)."""

import json

import pytest
import torch

from attune.demo.tiny import write_tokenizer
from tests.recipes.conftest import losses, train

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    eos_token_id=2,
    pad_token_id=0,
)


# mixtures of experts, scaled down: 4 experts, top-2 (Qwen3-30B-A3B's shape cut, with its
# renormalised top-k; Qwen1.5-MoE's shared expert; Mixtral's experts of intermediate_size)
QWEN3_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
)
QWEN2_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=96,
)  # fmt: skip
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize(
    ("config", "recipe", "hf_config", "extra"),
    [
        ("qwen2_5/0.5B_lora", "lora_finetune_single_device", "Qwen2Config", {}),
        ("gemma2/2B_full", "full_finetune_single_device", "Gemma2Config", {}),
        ("qwen2_5/0.5B_dpo_lora", "lora_dpo_single_device", "Qwen2Config", {}),
        ("llama3_2/1B_dpo_full", "full_dpo_distributed", "LlamaConfig", {}),
        ("qwen3_moe/30B_A3B_lora", "lora_finetune_single_device", "Qwen3MoeConfig", QWEN3_MOE),
        ("qwen3_moe/30B_A3B_dpo_lora", "lora_dpo_single_device", "Qwen3MoeConfig", QWEN3_MOE),
        ("mixtral/8x7B_instruct_lora", "lora_finetune_distributed", "MixtralConfig", MIXTRAL),
        ("qwen2_moe/A2.7B_full", "full_finetune_distributed", "Qwen2MoeConfig", QWEN2_MOE),
        ("qwen3/0.6B_grpo", "grpo_full_finetune_single_device", "Qwen3Config", {}),
    ],
)
def test_shipped_config_trains_a_tiny_model_of_its_family(
    tmp_path, config, recipe, hf_config, extra
):
    transformers = pytest.importorskip("transformers")
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    write_tokenizer(checkpoint)
    vocab = len(json.loads((checkpoint / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    torch.manual_seed(0)
    model_config = getattr(transformers, hf_config)(vocab_size=vocab, **SHAPE, **extra)
    transformers.AutoModelForCausalLM.from_config(model_config).save_pretrained(checkpoint)
    data = tmp_path / "data.jsonl"
    words = ["red", "blue", "cat", "dog", "sun", "moon"] * 4
    if "dpo" in config:  # UltraFeedback's layout: conversations with the prompt implicit
        rows = [
            {
                side: [
                    {"role": "user", "content": f"Say {w}."},
                    {"role": "assistant", "content": w if side == "chosen" else w[::-1]},
                ]
                for side in ("chosen", "rejected")
            }
            for w in words
        ]
    elif "grpo" in config:  # GSM8K's layout: a question, and a worked answer ending "#### n"
        rows = [{"question": f"Add {n} and 1.", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"}
                for n in range(len(words))]  # fmt: skip
    else:
        rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in words]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train(
        recipe,
        config,
        f"output_dir={tmp_path / 'run'}",
        f"model.path={checkpoint}",
        f"dataset.source={data}",
        f"dataset.cache_dir={tmp_path / 'hf'}",
        "dataset.num_proc=1",
        "device=cpu",
        "max_steps=3",
        "batch_size=2",
        "gradient_accumulation_steps=2",
        *(
            (
                "~dataset.load_kwargs",
                "max_new_tokens=8",
                "grpo.num_generations=2",
                "grpo.micro_batch_size=2",
            )
            if "grpo" in config
            else ()
        ),
    )
    assert len(losses(tmp_path / "run")) == 3
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir()
