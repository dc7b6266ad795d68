"""Decoding with the KV cache: same tokens as full recomputation and as transformers' generate."""

import pytest
import torch

from attune import models
from attune.models.generation import sample_next
from tests.models.hf_reference import make_checkpoint

PROMPTS = [[5, 17, 33, 2, 41, 9, 60], [7, 11], [88, 3, 14, 15]]
NEW_TOKENS = 8


def greedy_without_cache(model, prompt, steps):
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt) :]


@pytest.mark.parametrize(
    "case",
    [
        "llama_gqa_untied",
        "mistral_sliding_window",
        "qwen3_qk_norm",
        "gemma2_softcaps_sandwich_sliding",
        "gemma3_local_global_rope_qk_norm",
        "qwen3_moe_dense_layer_normalised_top3",
        "qwen2_moe_shared_expert_sliding_layers",
        "mixtral_sliding_window",
    ],
)
def test_cached_batched_decoding_equals_recomputing_each_prompt(case, tmp_path):
    make_checkpoint(case, tmp_path)
    model = models.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = [greedy_without_cache(model, p, NEW_TOKENS) for p in PROMPTS]
    assert models.generate(model, PROMPTS, NEW_TOKENS) == expected


@pytest.mark.parametrize("case", ["qwen2_sliding_layers", "qwen3_moe_every_second_layer_sliding"])
def test_greedy_decoding_equals_transformers_generate(case, tmp_path):
    reference = make_checkpoint(case, tmp_path)
    model = models.from_pretrained(tmp_path).eval()
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    eos = 7
    with torch.no_grad():
        output = reference.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
    expected = []
    for row in output[:, width:].tolist():
        expected.append(row[: row.index(eos) + 1] if eos in row else row)
    assert models.generate(model, PROMPTS, NEW_TOKENS, stop_tokens=[eos]) == expected


def test_stop_tokens_end_each_row_on_its_own(tmp_path):
    make_checkpoint("llama_gqa_untied", tmp_path)
    model = models.from_pretrained(tmp_path).eval()
    free = models.generate(model, PROMPTS, NEW_TOKENS)
    stop = free[0][2]  # the first row's third token
    stopped = models.generate(model, PROMPTS, NEW_TOKENS, stop_tokens=[stop])
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    for got, full in zip(stopped, free, strict=True):
        assert got == (full[: full.index(stop) + 1] if stop in full else full)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=generator)) for _ in range(200)}
    assert draws == {0, 1}
    # softmax of [4, 3, 2, 1, 0]: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=generator)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 5.0, generator=generator)) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}  # a high temperature reaches every token
    assert int(sample_next(logits)) == 0  # temperature 0: greedy
