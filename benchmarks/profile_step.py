"""Where a training step's time goes: torch.profiler over a few full steps (forward, chunked
loss, backward, fused AdamW) of a HF checkpoint on one batch of packed rows, the operators
ranked by their own CPU time.

    python benchmarks/profile_step.py --model /tmp/anchors-work/model            # full
    python benchmarks/profile_step.py --model /tmp/anchors-work/model --lora      # LoRA r=8

The anchors' model and shape by default (batch 4 x 512, four documents a row).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from attune.data.collate import pack_collate
from attune.host_memory import keep_freed_host_memory
from attune.models import from_pretrained
from attune.peft import LoraSettings, apply_lora
from attune.training import ChunkedCrossEntropy
from attune.training.step import summed_loss

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def packed_batch(vocab: int, batch: int, seq: int, documents: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        samples = []
        for _ in range(documents):
            tokens = torch.randint(5, vocab, (seq // documents,), generator=generator).tolist()
            samples.append({"tokens": tokens, "labels": tokens})
        rows.append(samples)
    return pack_collate(rows, pad_id=0, max_seq_len=seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    args = parser.parse_args()
    keep_freed_host_memory()  # as a recipe on the CPU does
    model = from_pretrained(args.model)
    if args.lora:
        apply_lora(model, LoraSettings(rank=8, alpha=16, target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    batch = packed_batch(model.config.vocab_size, args.batch, args.seq, args.documents)
    loss_fn = ChunkedCrossEntropy()

    def step() -> None:
        loss, tokens = summed_loss(model, batch, loss_fn)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: first allocations
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - started) / args.steps
    tokens = (
        int(batch["padding_mask"].sum()) if "padding_mask" in batch else batch["tokens"].numel()
    )
    print(f"{seconds:.3f} s a step (under the profiler), {tokens / seconds:,.0f} tokens/s")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
