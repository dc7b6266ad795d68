"""Tiny random Hugging Face checkpoints built with transformers, the referee for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Each case exercises one "what differs" cell of the supported families.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_gqa_untied": ("LlamaConfig", {}),
    "llama_mha_tied": ("LlamaConfig", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama_head_dim_and_llama3_rope": (
        "LlamaConfig",
        {
            "head_dim": 24,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "llama_dynamic_rope_past_trained_length": (
        "LlamaConfig",
        {
            "max_position_embeddings": 8,  # the 12-token test batch goes past it
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    "mistral_sliding_window": ("MistralConfig", {"sliding_window": 5, "head_dim": 16}),
    "qwen2_tied_biases": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2_sliding_layers": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen3_qk_norm": ("Qwen3Config", {"head_dim": 32}),
    "phi3_fused_tensors": ("Phi3Config", {"num_key_value_heads": 2}),
    "phi3_longrope_long_factors_partial_rotary": (
        "Phi3Config",
        {
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 8,  # the 12-token test batch is past it
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [1.0, 4.0, 9.0, 20.0],
            },
        },
    ),
    "phi3_longrope_short_factors": (
        "Phi3Config",
        {
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
                "long_factor": [1.0, 4.0, 9.0, 20.0, 30.0, 40.0, 50.0, 60.0],
            },
        },
    ),
    "gemma_geglu_scaled_embeddings": ("GemmaConfig", {"head_dim": 16}),
    "gemma2_softcaps_sandwich_sliding": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3_local_global_rope_qk_norm": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
            },
        },
    ),
    # mixtures of experts: grouped experts, routing, dense layers between sparse ones
    "qwen3_moe_dense_layer_normalised_top3": (
        "Qwen3MoeConfig",
        {
            "head_dim": 32,
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 40,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    "qwen3_moe_every_second_layer_sliding": (
        "Qwen3MoeConfig",
        {
            "num_experts": 5,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "decoder_sparse_step": 2,
            "use_sliding_window": True,
            "sliding_window": 5,
        },
    ),
    "qwen2_moe_shared_expert_sliding_layers": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 72,
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 2,
        },
    ),
    "mixtral_sliding_window": (
        "MixtralConfig",
        {"num_local_experts": 5, "num_experts_per_tok": 2, "sliding_window": 5, "head_dim": 8},
    ),
}


def make_checkpoint(case: str, folder: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Save a tiny random HF causal LM for ``case`` into ``folder``; return it (eager attention).

    Weights are drawn wider than HF's init so that logits differ clearly between tokens and
    a wrong computation cannot hide in near-uniform outputs.
    """
    config_class, extra = CASES[case]
    config = getattr(transformers, config_class)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(folder)
    return model


def padded_batch(vocab_size: int, seq_len: int = 12, seed: int = 1):
    """Two rows of tokens; the second is right-padded over its last 4 positions."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, seq_len), generator=generator)
    mask = torch.ones(2, seq_len, dtype=torch.bool)
    mask[1, -4:] = False
    return tokens, mask
