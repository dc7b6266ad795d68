"""Packed rows on the CPU: attention per document against the block-causal mask.

A packed row of several documents can attend through a ``[seq, seq]`` mask (SDPA computes every
score, then drops those across documents) or per document (each document's own causal
attention, :class:`attune.models.masks.DocumentSpans`, which the model takes on the CPU). This
times one forward and backward pass of the anchor benchmark's model shape (32M parameters,
hidden 512, 8 layers, GQA 8/4, vocab 8192) on batch 4 x 512 packed rows both ways and prints
the medians.

    python benchmarks/packed_attention.py [--repeats 7] [--documents 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from attune.data.collate import pack_collate
from attune.models import from_hf_config
from attune.training import ChunkedCrossEntropy

SHAPE = {
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def packed_batch(rows: int, seq: int, documents: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` rows of ``seq`` tokens, each cut into ``documents`` documents of random length."""
    rng = random.Random(seed)
    packs = []
    for _ in range(rows):
        cuts = sorted(rng.sample(range(16, seq - 16), documents - 1))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq], strict=True)]
        packs.append(
            [
                {
                    "tokens": [rng.randrange(3, 8192) for _ in range(n)],
                    "labels": [-100] + [rng.randrange(3, 8192) for _ in range(n - 1)],
                }
                for n in lengths
            ]
        )
    return pack_collate(packs, pad_id=0, max_seq_len=seq)


def step_seconds(model, batch, per_document: bool, repeats: int) -> float:
    if not per_document:
        model._attends_per_document = lambda *args: False
    else:
        model.__dict__.pop("_attends_per_document", None)
    loss_fn = ChunkedCrossEntropy()
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        hidden = model(
            batch["tokens"],
            document_ids=batch["document_ids"],
            padding_mask=batch["padding_mask"],
            return_hidden=True,
        )
        loss, _ = loss_fn(hidden, batch["labels"], model.output)
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--documents", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = from_hf_config(SHAPE)
    batch = packed_batch(4, 512, args.documents)
    masked = step_seconds(model, batch, per_document=False, repeats=args.repeats)
    spans = step_seconds(model, batch, per_document=True, repeats=args.repeats)
    print(f"threads {torch.get_num_threads()}, batch 4 x 512, {args.documents} documents per row")
    print(f"block-causal mask: {masked:.3f} s per forward+backward")
    print(f"per document:      {spans:.3f} s per forward+backward ({masked / spans:.2f}x)")


if __name__ == "__main__":
    main()
