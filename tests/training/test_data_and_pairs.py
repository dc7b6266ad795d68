"""The data stream (steps, epochs, exact resume, validation passes), the preference-pair step
and its held-out statistics, and the frozen models of RL, on the tiny model and demo data."""

from __future__ import annotations

import pytest
import torch

from attune import training
from attune.demo import reverse_words_dataset, reverse_words_preference_dataset
from attune.demo.tiny import tiny_checkpoint, tiny_model, tiny_tokenizer
from attune.peft import LoraSettings, apply_lora
from attune.rl import PreferenceObjective, SimPOLoss, mean_statistics, pair_logprobs
from attune.training import BatchStream
from attune.training.data import eval_batches
from attune.training.pairwise import HeldOutPairs, per_pair

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's tokenizer and demo datasets, in caches of this module's own."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTUNE_CACHE", str(root / "cache"))
        tiny_checkpoint(root / "cache")
        tokenizer = tiny_tokenizer()
        cache = str(root / "hf")
        yield {
            "cache": root / "cache",
            "tokenizer": tokenizer,
            "sft": reverse_words_dataset(tokenizer, "test", max_seq_len=64, cache_dir=cache),
            "pairs": reverse_words_preference_dataset(
                tokenizer, "test", max_seq_len=64, cache_dir=cache
            ),
        }


def stream(dataset, pad_id, **options):
    return BatchStream(
        dataset, batch_size=4, gradient_accumulation_steps=2, pad_id=pad_id, **options
    )


def tokens_of(step):
    return [batch["tokens"].tolist() for batch in step]


def test_steps_are_whole_and_a_resumed_stream_continues_exactly(tiny):
    dataset, pad = tiny["sft"], tiny["tokenizer"].padding_id
    first = stream(dataset, pad, seed=3)
    assert first.steps_per_epoch() == len(dataset) // 8  # a partial last step is skipped
    steps = iter(first)
    taken = [next(steps) for _ in range(3)]
    assert all(len(step) == 2 for step in taken)
    state = first.state_dict()
    rest = [tokens_of(step) for step in steps]
    resumed = stream(dataset, pad, seed=3)
    resumed.load_state_dict(state)
    assert [tokens_of(step) for step in resumed] == rest
    again = stream(dataset, pad, seed=3)
    assert tokens_of(next(iter(again))) == tokens_of(taken[0])  # the order is the seed's
    assert tokens_of(next(iter(stream(dataset, pad, seed=4)))) != tokens_of(taken[0])


def test_max_steps_per_epoch_and_a_new_epoch(tiny):
    data = stream(tiny["sft"], tiny["tokenizer"].padding_id, max_steps_per_epoch=2)
    assert len(list(data)) == 2 and list(data) == []  # the epoch is spent
    data.set_epoch(1)
    assert len(list(data)) == 2


def test_a_validation_pass_covers_every_example_once_in_order(tiny):
    dataset, pad = tiny["sft"], tiny["tokenizer"].padding_id
    shares = [list(eval_batches(dataset, 5, pad, rank, 2)) for rank in (0, 1)]
    seen = sum(int(batch["tokens"].shape[0]) for share in shares for batch in share)
    assert len(dataset) <= seen <= len(dataset) + 1  # ranks get equal shares (one padded)
    whole = list(eval_batches(dataset, 5, pad))
    assert [b["tokens"].tolist() for b in whole] == [
        b["tokens"].tolist() for b in eval_batches(dataset, 5, pad)
    ]


def test_held_out_pairs_are_the_means_of_the_objective_over_every_pair(tiny):
    model = tiny_model(device=CPU)
    dataset, pad = tiny["pairs"], tiny["tokenizer"].padding_id
    objective = PreferenceObjective(SimPOLoss())
    run = training.Run(device=CPU, dtype=torch.float32, autocast=None, output_dir=tiny["cache"])
    held_out = HeldOutPairs(
        dataset,
        model,
        lambda batch: objective(model, batch)[1],
        run,
        batch_size=3,
        pad_id=pad,
        accuracy="logps/accuracy",
        wins="the chosen reply is the more likely",
        means_of=mean_statistics,
        every=2,
    )
    metrics = held_out.metrics()
    with torch.no_grad():
        scores = pair_logprobs(model, next(iter(eval_batches(dataset, len(dataset), pad))))
    wins = (scores.chosen > scores.rejected).float().mean().item()
    assert metrics["val_logps/accuracy"] == pytest.approx(wins)
    assert metrics["val_logps/chosen"] == pytest.approx(scores.chosen.mean().item(), rel=1e-5)
    assert held_out.due(4) and not held_out.due(3)
    assert per_pair(4, {"loss": 2.0}) == {"loss": 0.5}


def test_a_lora_policys_reference_is_itself_with_adapters_off(tiny):
    policy = tiny_model(device=CPU)
    base = tiny_model(device=CPU)
    apply_lora(policy, LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    for module in policy.modules():  # adapters that change the output
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight)
    run = training.Run(device=CPU, dtype=torch.float32, autocast=None, output_dir=tiny["cache"])

    class NoReward:
        def prepare(self, device, dtype):
            self.prepared = (device, dtype)

    reward = NoReward()
    frozen = training.FrozenModels(policy, True, reward, run, offload=False)
    assert reward.prepared == (CPU, torch.float32)
    tokens = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad(), frozen.reference(policy) as reference:
        hidden = policy(tokens, return_hidden=True)
        assert reference is policy
        head = frozen.head_of(reference)
        assert torch.equal(head(hidden), base.output(hidden))
        assert not torch.equal(policy.output(hidden), base.output(hidden))


def test_an_offloaded_frozen_copy_visits_the_device_only_when_used(tiny):
    reference = tiny_model(device=CPU)
    run = training.Run(device=CPU, dtype=torch.float32, autocast=None, output_dir=tiny["cache"])

    class NoReward:
        def prepare(self, device, dtype):
            pass

    frozen = training.FrozenModels(reference, False, NoReward(), run, offload=True)
    with frozen.reference(None) as model:
        assert model is reference and frozen.head_of(model) == reference.output
