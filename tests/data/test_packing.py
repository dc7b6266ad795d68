"""Packing on the fly: the same documents, the same labels, positions and loss as unpacked."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from attune.data import IGNORE_INDEX, PackingSampler, instruct_dataset
from attune.data.packing import best_fit_packs
from attune.models import DecoderConfig, TransformerDecoder
from attune.models.masks import positions_from_document_ids
from tests.data.conftest import ALPACA, write_jsonl


def test_one_open_pack_is_greedy_packing_in_order_and_no_example_is_split():
    lengths = [4, 3, 5, 2, 6, 1]
    assert best_fit_packs(range(6), lengths, 8, open_packs=1) == [[0, 1], [2, 3], [4, 5]]
    assert best_fit_packs([5, 4, 3, 2, 1, 0], lengths, 8, 1) == [[5, 4], [3, 2], [1, 0]]
    with pytest.raises(ValueError, match="example 4 has 6 tokens, more than 5"):
        best_fit_packs(range(6), lengths, 5)


def test_an_example_joins_the_fullest_open_pack_it_fits_and_the_oldest_closes_first():
    # greedy: [0] [1] [2, 3] [4]; with two open packs 2 and 3 fill the first two
    assert best_fit_packs(range(5), [5, 6, 3, 2, 4], 8, 1) == [[0], [1], [2, 3], [4]]
    assert best_fit_packs(range(5), [5, 6, 3, 2, 4], 8, 2) == [[0, 2], [1, 3], [4]]
    # 2 fits both open packs and joins the fuller (7 of 8); 3 then fits only the first
    assert best_fit_packs(range(4), [4, 5, 2, 2], 8, 3) == [[0, 3], [1, 2]]
    # a third pack opened closes the oldest, before the end's leftovers (oldest first)
    assert best_fit_packs(range(3), [5, 5, 5], 8, 2) == [[0], [1], [2]]


def test_best_fit_fills_packs_closer_than_greedy_and_keeps_every_example_once():
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randint(1, 60, (500,), generator=generator) ** 2 // 12 + 1).tolist()
    order = torch.randperm(500, generator=generator).tolist()
    greedy = best_fit_packs(order, lengths, 512, 1)
    packs = best_fit_packs(order, lengths, 512)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 512 for pack in packs)
    # within a pack, examples keep the global order
    position = {index: n for n, index in enumerate(order)}
    assert all(pack == sorted(pack, key=position.get) for pack in packs)
    fill = sum(lengths) / (512 * len(packs))
    assert fill > 0.95 and len(packs) < 0.9 * len(greedy), (fill, len(packs), len(greedy))


def global_packs(lengths, world_size, seed=11):
    streams = []
    for rank in range(world_size):
        sampler = PackingSampler(lengths, 16, seed=seed, rank=rank, world_size=world_size)
        streams.append(list(sampler))
    return [pack for step in zip(*streams, strict=True) for pack in step]


def test_packs_follow_one_global_order_for_any_number_of_ranks_and_resume():
    lengths = [(7 * i) % 13 + 1 for i in range(60)]
    one = global_packs(lengths, 1)
    assert sorted(i for pack in one for i in pack) == list(range(60))
    assert all(sum(lengths[i] for i in pack) <= 16 for pack in one)
    for world_size in (2, 4):
        many = global_packs(lengths, world_size)
        assert many == one[: len(many)] and len(one) - len(many) < world_size
    sampler = PackingSampler(lengths, 16, seed=11, rank=1, world_size=2)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(5)]
    resumed = PackingSampler(lengths, 16, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(sampler.state_dict())
    assert taken + list(resumed) == list(PackingSampler(lengths, 16, seed=11, rank=1, world_size=2))


def shifted_loss(logits, labels):
    """Mean next-token cross-entropy over trained positions, and the number of them."""
    targets = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum()
    return losses / count, count


def test_packed_and_unpacked_batches_give_the_same_loss(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)
    unpacked = instruct_dataset(tokenizer, source, max_seq_len=160, cache_dir=cache)
    packed = instruct_dataset(tokenizer, source, max_seq_len=160, packed=True, cache_dir=cache)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    model = TransformerDecoder(config).eval()

    def batches(dataset):
        loader = DataLoader(
            dataset.loading_view(),
            batch_size=3,
            sampler=dataset.sampler(seed=4),
            collate_fn=dataset.collate_fn(pad_id=0),
        )
        return list(loader)

    packed_batches, unpacked_batches = batches(packed), batches(unpacked)
    assert sum(b["tokens"].shape[0] for b in packed_batches) < len(unpacked)
    assert all(b["tokens"].shape[1] == 160 for b in packed_batches)

    # per document: the same tokens, labels and restarted positions, in the same global order
    def documents(batch_list, packed_rows):
        found = []
        for batch in batch_list:
            for row in range(batch["tokens"].shape[0]):
                real = batch["padding_mask"][row]
                ids = (
                    batch["document_ids"][row][real]
                    if packed_rows
                    else torch.zeros(int(real.sum()), dtype=torch.long)
                )
                positions = positions_from_document_ids(ids[None])[0]
                for document in ids.unique_consecutive():
                    where = ids == document
                    found.append(
                        (
                            batch["tokens"][row][real][where].tolist(),
                            batch["labels"][row][real][where].tolist(),
                            positions[where].tolist(),
                        )
                    )
        return found

    assert documents(packed_batches, True) == documents(unpacked_batches, False)

    with torch.no_grad():

        def total_loss(batch_list):
            total, count = 0.0, 0
            for batch in batch_list:
                inputs = {k: v for k, v in batch.items() if k in ("document_ids", "padding_mask")}
                loss, n = shifted_loss(model(batch["tokens"], **inputs), batch["labels"])
                total, count = total + loss * n, count + n
            return total / count

        assert abs(total_loss(packed_batches) - total_loss(unpacked_batches)) < 1e-5

        # no attention crosses a document boundary: changing the first document of a packed
        # row leaves every later document's logits unchanged
        batch = packed_batches[0]
        row = batch["document_ids"][0]
        first = row == 0
        assert (row == 1).any()
        changed = batch["tokens"].clone()
        changed[0, first] = (changed[0, first] + 1) % config.vocab_size
        before = model(batch["tokens"], document_ids=batch["document_ids"])[0, ~first]
        after = model(changed, document_ids=batch["document_ids"])[0, ~first]
        assert (before - after).abs().max().item() < 1e-6
