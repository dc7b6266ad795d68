"""Expert matrix products of a mixture-of-experts layer: one grouped GEMM against a loop over experts.

The shapes are Qwen3-30B-A3B's (hidden 2,048, expert intermediate 768, 128 experts, top-8): the
tokens' rows, sorted by expert, go through the gate, up and down projections either as one
``torch._grouped_mm`` per projection (offsets give each expert's rows) or as one ``@`` per expert.
Forward and backward, medians over repeats; the two results are compared first. This is the
kernel question under the MoE layer (``benchmarks/moe_layer.py`` times the whole layer).

    python benchmarks/grouped_gemm.py                    # cuda bf16, 8,192 tokens
    python benchmarks/grouped_gemm.py --device cpu --dtype fp32 --tokens 256 --experts 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def expert_counts(tokens: int, experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """How many (token, expert) pairs each expert gets under a random top-k routing."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=generator)
    chosen = scores.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(chosen, minlength=experts)


def grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor):
    hidden = torch._grouped_mm(x, gate_up, offs=offsets)
    gate, up = hidden.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down, offs=offsets)


def looped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]):
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        rows = x[start : start + count]
        gate, up = (rows @ gate_up[expert]).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ down[expert])
        start += count
    return torch.cat(outputs)


def timed(step: Callable[[], None], repeats: int, device: str) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    counts = expert_counts(args.tokens, args.experts, args.top_k)
    offsets = counts.cumsum(0).to(torch.int32).to(args.device)
    rows = int(counts.sum())
    torch.manual_seed(0)
    x = torch.randn(rows, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(args.experts, args.hidden, 2 * args.intermediate) * 0.02).to(
        args.device, dtype
    )
    down = (torch.randn(args.experts, args.intermediate, args.hidden) * 0.02).to(args.device, dtype)
    gate_up.requires_grad_(True)
    down.requires_grad_(True)
    count_list = counts.tolist()

    difference = (grouped(x, gate_up, down, offsets) - looped(x, gate_up, down, count_list)).abs()
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "dtype": args.dtype,
        "rows": rows,
        "max_abs_difference": difference.max().item(),
    }

    def forward_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            fn().float().square().mean().backward()
            x.grad = gate_up.grad = down.grad = None

        return step

    flops = 3 * 2 * rows * args.hidden * 3 * args.intermediate  # forward 1x, backward 2x
    for name, fn in (
        ("grouped_mm", lambda: grouped(x, gate_up, down, offsets)),
        ("per_expert_loop", lambda: looped(x, gate_up, down, count_list)),
    ):
        try:
            seconds = timed(forward_backward(fn), args.repeats, args.device)
        except RuntimeError as error:  # a backend without the kernel's backward
            figures[name] = f"failed: {str(error).splitlines()[0]}"
            continue
        figures[f"{name}_ms"] = round(seconds * 1e3, 3)
        figures[f"{name}_tflops"] = round(flops / seconds / 1e12, 2)
    if "grouped_mm_ms" in figures and "per_expert_loop_ms" in figures:
        figures["speedup"] = round(figures["per_expert_loop_ms"] / figures["grouped_mm_ms"], 2)  # type: ignore[operator]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
