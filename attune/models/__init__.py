"""Models: one open TransformerDecoder, built for any supported family from its config.json."""

from attune.models.config import DecoderConfig
from attune.models.decoder import TransformerDecoder
from attune.models.families import FAMILIES, register_family
from attune.models.generation import generate, sample_next
from attune.models.hf import (
    decoder_config,
    from_hf_config,
    from_pretrained,
    read_hf_config,
    save_pretrained,
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
    "generate",
    "read_hf_config",
    "register_family",
    "sample_next",
    "save_pretrained",
]
