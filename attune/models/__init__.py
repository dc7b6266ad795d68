"""Models: one open TransformerDecoder, built for any supported family from its config.json."""

from attune.models.config import DecoderConfig
from attune.models.decoder import TransformerDecoder
from attune.models.families import FAMILIES, register_family
from attune.models.hf import (
    decoder_config,
    from_hf_config,
    from_pretrained,
    read_hf_config,
    save_pretrained,
)

__all__ = [
    "FAMILIES",
    "DecoderConfig",
    "TransformerDecoder",
    "decoder_config",
    "from_hf_config",
    "from_pretrained",
    "read_hf_config",
    "register_family",
    "save_pretrained",
]
