"""LoRA's projections of one input (queries, keys, values) computed together or each by itself,
forward and backward, alternated in pairs on this machine (its speed drifts, pairs do not).

    python benchmarks/lora_projections.py                       # the anchors' model's shapes
    python benchmarks/lora_projections.py --hidden 2048 --outs 2048 512 512 --tokens 4096

Together is :func:`attune.models.layers.project` (LoRA's ``project_together``: the adapters' ``A``
stacked, so their input is read once a pass); each is every layer's own forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune.models.layers import project
from attune.peft import LoRALinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--outs", type=int, nargs="+", default=[512, 256, 256])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [
        LoRALinear(torch.nn.Linear(args.hidden, out, bias=False), args.rank, 2 * args.rank)
        for out in args.outs
    ]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(args.tokens, args.hidden)
    grads = [torch.randn(args.tokens, out) for out in args.outs]

    def timed(together: bool) -> float:
        leaf = x.detach().requires_grad_()
        for layer in layers:
            layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        started = time.perf_counter()
        outs = project(leaf, layers) if together else [layer(leaf) for layer in layers]
        torch.autograd.backward(outs, grads)
        return time.perf_counter() - started

    for _ in range(3):
        timed(True), timed(False)
    together, each = [], []
    for index in range(args.pairs):
        order = (True, False) if index % 2 else (False, True)
        for flag in order:
            (together if flag else each).append(timed(flag))
    saved = [b - a for a, b in zip(together, each, strict=True)]
    low, _, high = statistics.quantiles(saved, n=4)
    print(
        f"{args.tokens} tokens, {args.hidden} -> {args.outs}, r={args.rank}: together "
        f"{statistics.median(together) * 1e3:.1f} ms, each {statistics.median(each) * 1e3:.1f} ms, "
        f"saved {statistics.median(saved) * 1e3:.1f} ms a pass (quartiles {low * 1e3:.1f} to "
        f"{high * 1e3:.1f}) over {args.pairs} pairs"
    )


if __name__ == "__main__":
    main()
