"""Models: one open TransformerDecoder, built for any supported family from its config.json."""

from attune.models.builders import (
    gemma2_2b,
    llama3_1_8b,
    llama3_2_1b,
    llama3_2_3b,
    mistral_7b_v0_3,
    phi3_mini_4k,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen3_0_6b,
)
from attune.models.config import DecoderConfig
from attune.models.decoder import TransformerDecoder
from attune.models.families import FAMILIES, register_family
from attune.models.generation import generate, sample_next
from attune.models.hf import (
    decoder_config,
    from_hf_config,
    from_pretrained,
    init_score_head,
    is_sequence_classifier,
    load_weights,
    read_hf_config,
    save_pretrained,
    with_score_head,
)
from attune.models.kv_cache import KVCache

__all__ = [
    "FAMILIES",
    "DecoderConfig",
    "KVCache",
    "TransformerDecoder",
    "decoder_config",
    "from_hf_config",
    "from_pretrained",
    "gemma2_2b",
    "generate",
    "init_score_head",
    "is_sequence_classifier",
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "load_weights",
    "mistral_7b_v0_3",
    "phi3_mini_4k",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen3_0_6b",
    "read_hf_config",
    "register_family",
    "sample_next",
    "save_pretrained",
    "with_score_head",
]
