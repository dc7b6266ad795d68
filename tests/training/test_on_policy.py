"""On-policy distillation's batches: a seeded share ``lmbda`` of the examples completed by the
student, each example's choice and sampling the same whatever the processes and micro-batches
it is dealt into, the prompt kept and the completion trained, and ``lmbda`` checked."""

import pytest
import torch

from attune.data.collate import pad_collate
from attune.demo.tiny import HF_CONFIG
from attune.errors import ConfigError
from attune.models import from_hf_config
from attune.training.on_policy import OnPolicy, check_lmbda

STOP, PAD = 2, 0


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    config = {**HF_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    return from_hf_config({**config, "num_attention_heads": 2, "head_dim": 16}).eval()


def examples(count=8):
    """Prompts of 3 to 5 tokens, then a 2-token answer (trained) ending with the stop token."""
    rows = []
    for i in range(count):
        prompt = [10 + i, 20 + i, 30 + i, 40][: 3 + i % 2] + [7] * (i % 3 == 0)
        rows.append(
            {"tokens": [*prompt, 50 + i, STOP], "labels": [-100] * len(prompt) + [50 + i, STOP]}
        )
    return rows


def rows_of(batch):
    """Each row's real tokens and labels, and whether it was generated."""
    out = []
    for i in range(len(batch["tokens"])):
        n = int(batch["padding_mask"][i].sum())
        generated = bool(batch["generated"][i])
        out.append((batch["tokens"][i, :n].tolist(), batch["labels"][i, :n].tolist(), generated))
    return out


def on_policy(**settings):
    defaults = {"lmbda": 0.5, "max_new_tokens": 6, "stop_tokens": [STOP], "pad_id": PAD, "seed": 3}
    return OnPolicy(**{**defaults, **settings})


def test_each_example_is_picked_and_sampled_alike_on_any_number_of_processes(student):
    """A global batch of 8: one process with one micro-batch of 8, one process with 4
    micro-batches of 2, and 2 processes with 2 micro-batches of 2 each (the sampler deals the
    global order out to the ranks in turn)."""
    data = examples()
    whole = rows_of(on_policy(batch_size=8)(student, [pad_collate(data, PAD)], step=5)[0])

    split = on_policy(batch_size=2)(
        student, [pad_collate(data[k : k + 2], PAD) for k in range(0, 8, 2)], step=5
    )
    assert [row for batch in split for row in rows_of(batch)] == whole

    dealt = {}
    for rank in (0, 1):
        mine = data[rank::2]  # global positions rank, rank + 2, ...
        batches = [pad_collate(mine[k : k + 2], PAD) for k in (0, 2)]
        out = on_policy(batch_size=2, rank=rank, world_size=2)(student, batches, step=5)
        for index, row in zip(range(rank, 8, 2), [r for b in out for r in rows_of(b)], strict=True):
            dealt[index] = row
    assert [dealt[i] for i in range(8)] == whole

    picked = [generated for _, _, generated in whole]
    assert 0 < sum(picked) < 8, picked  # lmbda 0.5 picks some, not all
    # another step picks and samples afresh
    other = rows_of(on_policy(batch_size=8)(student, [pad_collate(data, PAD)], step=6)[0])
    assert other != whole


def test_a_generated_row_keeps_its_prompt_and_trains_its_completion(student):
    data = examples()
    out = rows_of(on_policy(lmbda=1.0, batch_size=8)(student, [pad_collate(data, PAD)], 1)[0])
    for example, (tokens, labels, generated) in zip(data, out, strict=True):
        prompt_len = example["labels"].count(-100)
        assert generated
        assert tokens[:prompt_len] == example["tokens"][:prompt_len]
        completion = tokens[prompt_len:]
        assert labels == [-100] * prompt_len + completion
        assert 1 <= len(completion) <= 6
        assert len(completion) == 6 or completion[-1] == STOP
        assert STOP not in completion[:-1]


def test_no_share_leaves_the_batches_as_they_are(student):
    batches = [pad_collate(examples(4), PAD)]
    out = on_policy(lmbda=0.0)(student, batches, step=1)
    assert out[0] is batches[0] and "generated" not in out[0]
    # rows not picked are the dataset's own
    kept = rows_of(on_policy(lmbda=1e-9, batch_size=4)(student, batches, step=1)[0])
    assert [(t, lab) for t, lab, _ in kept] == [(e["tokens"], e["labels"]) for e in examples(4)]
    assert not any(generated for _, _, generated in kept)


@pytest.mark.parametrize("lmbda", [-0.1, 1.5, float("nan")])
def test_lmbda_outside_zero_one_is_a_one_line_config_error(lmbda):
    with pytest.raises(ConfigError) as error:
        check_lmbda({"lmbda": lmbda})
    assert f"lmbda must be in [0, 1], got {lmbda}" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError):
        OnPolicy(lmbda=lmbda)


def test_a_packed_dataset_is_refused_with_a_share():
    class Packed:
        packed = True

    with pytest.raises(ConfigError, match="dataset is packed"):
        OnPolicy(lmbda=0.5).check_dataset(Packed())
    OnPolicy(lmbda=0.0).check_dataset(Packed())


def test_a_row_trained_from_its_first_token_is_left_as_it_is(student):
    """No untrained prefix (train_on_input, text completion): nothing to prompt the student
    with, so the row keeps its own tokens and is not counted as generated."""
    data = examples(2)
    data[0] = {"tokens": data[0]["tokens"], "labels": list(data[0]["tokens"])}
    out = rows_of(on_policy(lmbda=1.0, batch_size=2)(student, [pad_collate(data, PAD)], 1)[0])
    tokens, labels, generated = out[0]
    assert not generated and tokens == data[0]["tokens"] and labels == data[0]["tokens"]
    assert out[1][2]  # the other row is still the student's


def test_a_loss_without_generated_is_refused_only_when_the_run_generates():
    from attune.training import DistillationLoss
    from attune.training.on_policy import check_on_policy_loss

    def off_policy_loss(hidden, labels, output, teacher_hidden, teacher_output):
        return hidden.sum()

    def any_keywords(hidden, labels, output, teacher_hidden, teacher_output, **extra):
        return hidden.sum()

    check_on_policy_loss(off_policy_loss, 0.0)  # nothing generated: nothing passed
    check_on_policy_loss(any_keywords, 0.5)
    check_on_policy_loss(DistillationLoss(), 0.5)  # an nn.Module: its forward is read
    with pytest.raises(ConfigError, match=r"loss: .*off_policy_loss takes no `generated` keyword"):
        check_on_policy_loss(off_policy_loss, 0.5)
