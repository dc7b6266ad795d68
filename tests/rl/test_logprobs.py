"""Completion log-probabilities: equal to log-softmax of the full logits, the same packed and
unpacked, the LoRA reference equal to the base model, and the precomputed reference equal to
the live one."""

import json

import pytest
import torch

from attune.data import preference_dataset
from attune.demo.tiny import HF_CONFIG, write_tokenizer
from attune.models import from_hf_config
from attune.peft import LoraSettings, apply_lora, disabled_adapters
from attune.rl import (
    ReferenceLogprobs,
    SigmoidDPOLoss,
    pair_logprobs,
    reference_scorer,
    sequence_logprobs,
)
from attune.tokenizer import from_pretrained as tokenizer_from_pretrained

SMALL = {**HF_CONFIG, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
ROWS = [
    {"prompt": "Reverse the order of these words: red boat sky", "chosen": "sky boat red",
     "rejected": "red boat sky"},
    {"prompt": "Reverse the order of these words: cat", "chosen": "cat", "rejected": "dog dog"},
    {"prompt": [{"role": "user", "content": "Repeat these words: owl tea"}],
     "chosen": [{"role": "assistant", "content": "owl tea"}],
     "rejected": [{"role": "assistant", "content": "tea owl owl owl"}]},
    {"prompt": "Reverse the order of these words: lion sun sock moon", "chosen": "moon sock sun lion",
     "rejected": "lion"},
    {"prompt": "Repeat these words: hat", "chosen": "hat", "rejected": "cap cap"},
]  # fmt: skip


def small_model(seed=0):
    torch.manual_seed(seed)
    model = from_hf_config(SMALL)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return tokenizer_from_pretrained(folder)


def dataset(tokenizer, tmp_path, packed=False):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return preference_dataset(
        tokenizer, str(source), max_seq_len=48, packed=packed, cache_dir=str(tmp_path / "cache")
    )


def unpacked_batch(data, tokenizer, indices):
    return data.collate_fn(tokenizer.padding_id)([data[i] for i in indices])


def test_sequence_logprobs_equal_log_softmax_of_the_full_logits(tokenizer, tmp_path):
    data = dataset(tokenizer, tmp_path)
    batch = unpacked_batch(data, tokenizer, range(len(data)))
    model = small_model()
    hidden = model(batch["tokens"], padding_mask=batch["padding_mask"], return_hidden=True)
    sums, counts = sequence_logprobs(hidden, batch["labels"], model.output, chunk_size=7)

    logits = model(batch["tokens"], padding_mask=batch["padding_mask"]).double()
    labels = batch["labels"][:, 1:]
    trained = labels != -100
    gathered = torch.log_softmax(logits[:, :-1], dim=-1).gather(
        -1, labels.clamp(min=0).unsqueeze(-1)
    )[..., 0]
    expected = (gathered * trained).sum(dim=1)
    assert torch.equal(counts, trained.sum(dim=1))
    assert (sums.double() - expected).abs().max().item() < 1e-4
    sums.sum().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_packed_and_unpacked_pairs_give_the_same_logprobs_and_loss(tokenizer, tmp_path):
    unpacked = dataset(tokenizer, tmp_path)
    packed = dataset(tokenizer, tmp_path, packed=True)
    model = small_model()
    expected = pair_logprobs(model, unpacked_batch(unpacked, tokenizer, range(len(unpacked))))
    # the packs the training stream cuts: rows of 2 x 48 tokens, several pairs in a row
    packs = list(packed.sampler(shuffle=False))
    assert len(packs) < len(unpacked)
    view = packed.loading_view()
    batch = packed.collate_fn(tokenizer.padding_id)([view[pack] for pack in packs])
    assert batch["tokens"].shape == (len(packs), 96) and int(batch["pairs"]) == len(unpacked)
    assert batch["document_ids"][0].unique().numel() >= 5  # 2 pairs of 2 documents, padding
    order = batch["pair_index"]
    assert sorted(order.tolist()) == list(range(len(unpacked)))
    got = pair_logprobs(model, batch)
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        difference = getattr(got, name) - getattr(expected, name)[order]
        assert difference.abs().max().item() < 1e-5, name
    expected = pair_logprobs(model, unpacked_batch(unpacked, tokenizer, order.tolist()))

    reference = (expected.chosen.detach() - 0.3, expected.rejected.detach() + 0.2)
    loss = SigmoidDPOLoss(beta=0.5)
    packed_loss = loss(got.chosen, got.rejected, *reference, got.chosen_tokens, got.rejected_tokens)
    plain_loss = loss(
        expected.chosen, expected.rejected, *reference, expected.chosen_tokens,
        expected.rejected_tokens,
    )  # fmt: skip
    assert abs(packed_loss.losses.mean().item() - plain_loss.losses.mean().item()) < 1e-5


def test_lora_reference_is_the_base_model(tokenizer, tmp_path):
    data = dataset(tokenizer, tmp_path)
    batch = unpacked_batch(data, tokenizer, range(len(data)))
    base = small_model(seed=1)
    policy = small_model(seed=1)
    apply_lora(policy, LoraSettings(rank=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # a trained adapter: the policy differs from the base
    base_scores = pair_logprobs(base, batch)
    trained = pair_logprobs(policy, batch)
    assert (trained.chosen - base_scores.chosen).abs().max().item() > 1e-2
    reference = reference_scorer(policy, adapters_off=True)(batch)
    assert (reference.chosen - base_scores.chosen).abs().max().item() < 1e-5
    assert (reference.rejected - base_scores.rejected).abs().max().item() < 1e-5
    assert not reference.chosen.requires_grad
    with disabled_adapters(policy):
        pass
    assert (pair_logprobs(policy, batch).chosen - trained.chosen).abs().max().item() < 1e-6


def test_precomputed_reference_equals_the_live_one_and_is_cached(tokenizer, tmp_path):
    data = dataset(tokenizer, tmp_path)
    model = small_model(seed=2)
    score = reference_scorer(model, adapters_off=False)
    cache = ReferenceLogprobs.compute(score, data, 2, tokenizer.padding_id, torch.device("cpu"))
    batch = unpacked_batch(data, tokenizer, [3, 0, 4])
    live = score(batch)
    chosen, rejected = cache.lookup(batch["pair_index"])
    assert (chosen - live.chosen).abs().max().item() < 1e-5
    assert (rejected - live.rejected).abs().max().item() < 1e-5

    path = tmp_path / "reference.safetensors"
    cache.save(path, "abc")
    again = ReferenceLogprobs.load(path, "abc")
    assert torch.equal(again.chosen, cache.chosen) and torch.equal(again.rejected, cache.rejected)
    assert ReferenceLogprobs.load(path, "other data") is None
    assert ReferenceLogprobs.load(tmp_path / "missing.safetensors", "abc") is None
