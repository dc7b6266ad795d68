"""Named builders: each gives its model's published parameter count (built on meta, instantly)."""

import pytest
import torch

from attune import models

# Totals as the models' Hub pages report them (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "llama3_1_8b": 8_030_261_248,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_0_6b": 596_049_920,
    "mistral_7b_v0_3": 7_248_023_552,
    "gemma2_2b": 2_614_341_888,
    "phi3_mini_4k": 3_821_079_552,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_builder_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_overrides_reach_the_config():
    with torch.device("meta"):
        model = models.qwen2_5_0_5b(num_hidden_layers=2)
    assert len(model.layers) == 2 and model.config.tie_embeddings
