"""Named sizes: thin wrappers that build a known checkpoint's shape from its ``config.json``.

Each builder returns a randomly initialised decoder (build it under ``torch.device("meta")``
to plan memory without allocating). To fine-tune, load real weights with
:func:`attune.models.from_pretrained`, which reads the same shape from the checkpoint itself;
these exist for configs, tests and planning, and go through exactly the same code path.
"""

from __future__ import annotations

from typing import Any

from attune.models.decoder import TransformerDecoder
from attune.models.hf import from_hf_config

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
}
_QWEN2_5 = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# The architecture fields of each model's published config.json.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3_2_1b": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
    },
    "llama3_2_3b": {
        **_LLAMA3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
    },
    "llama3_1_8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
    },
    "qwen2_5_0_5b": {
        **_QWEN2_5,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
    "qwen2_5_1_5b": {
        **_QWEN2_5,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
    },
    "qwen2_5_7b": {
        **_QWEN2_5,
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "qwen3_0_6b": {
        **_QWEN2_5,
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
    },
    "mistral_7b_v0_3": {
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma2_2b": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 2,
        "eos_token_id": 1,
    },
    "phi3_mini_4k": {
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "sliding_window": 2047,
        "bos_token_id": 1,
        "eos_token_id": 32000,
    },
}


def _builder(name: str):
    def build(**overrides: Any) -> TransformerDecoder:
        return from_hf_config({**HF_CONFIGS[name], **overrides})

    build.__name__ = name
    build.__doc__ = (
        f"A randomly initialised decoder shaped as ``{name}``; keyword arguments override "
        "fields of its HF config.json."
    )
    return build


llama3_2_1b = _builder("llama3_2_1b")
llama3_2_3b = _builder("llama3_2_3b")
llama3_1_8b = _builder("llama3_1_8b")
qwen2_5_0_5b = _builder("qwen2_5_0_5b")
qwen2_5_1_5b = _builder("qwen2_5_1_5b")
qwen2_5_7b = _builder("qwen2_5_7b")
qwen3_0_6b = _builder("qwen3_0_6b")
mistral_7b_v0_3 = _builder("mistral_7b_v0_3")
gemma2_2b = _builder("gemma2_2b")
phi3_mini_4k = _builder("phi3_mini_4k")
