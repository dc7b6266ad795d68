"""The global sample order depends on the seed only, and resumes exactly mid-epoch."""

import pytest

from attune.data import GlobalOrderSampler


def global_sequence(num_samples, world_size, seed=7, epoch=0):
    """What all ranks consume, step by step, in order."""
    streams = []
    for rank in range(world_size):
        sampler = GlobalOrderSampler(num_samples, seed=seed, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        streams.append(list(sampler))
    return [index for step in zip(*streams, strict=True) for index in step]


@pytest.mark.parametrize("epoch", [0, 3])
def test_same_global_order_for_1_2_and_4_ranks(epoch):
    one = global_sequence(101, 1, epoch=epoch)
    assert sorted(one) == list(range(101))  # a permutation
    for world_size in (2, 4):
        sequence = global_sequence(101, world_size, epoch=epoch)
        assert sequence == one[: len(sequence)]
        assert len(sequence) == 101 - 101 % world_size  # only the short tail is dropped


def test_epochs_and_seeds_differ():
    assert global_sequence(50, 1, epoch=0) != global_sequence(50, 1, epoch=1)
    assert global_sequence(50, 1, seed=1) != global_sequence(50, 1, seed=2)


def test_resume_mid_epoch_continues_exactly():
    straight = GlobalOrderSampler(40, seed=3, rank=1, world_size=2)
    expected = list(straight)
    first = GlobalOrderSampler(40, seed=3, rank=1, world_size=2)
    iterator = iter(first)
    taken = [next(iterator) for _ in range(7)]
    state = first.state_dict()
    resumed = GlobalOrderSampler(40, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert len(resumed) == 20 - 7
    assert taken + list(resumed) == expected


def test_resuming_with_another_seed_is_refused():
    sampler = GlobalOrderSampler(10, seed=1)
    with pytest.raises(ValueError, match="used seed 1, this run 2"):
        GlobalOrderSampler(10, seed=2).load_state_dict(sampler.state_dict())


def test_position_reached_by_the_loop_wins_over_prefetched_draws():
    sampler = GlobalOrderSampler(30, seed=5)
    expected = list(GlobalOrderSampler(30, seed=5))
    iterator = iter(sampler)
    for _ in range(12):  # a prefetching loader drew 12, the loop used 9
        next(iterator)
    resumed = GlobalOrderSampler(30, seed=5)
    resumed.load_state_dict(sampler.state_dict(consumed=9))
    assert list(resumed) == expected[9:]


def test_resuming_on_a_changed_dataset_is_refused():
    sampler = GlobalOrderSampler(10, seed=1)
    with pytest.raises(ValueError, match="dataset of 10 samples, this run has 12"):
        GlobalOrderSampler(12, seed=1).load_state_dict(sampler.state_dict())
