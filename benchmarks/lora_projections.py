"""LoRA's projections of one input, forward and backward, three ways, interleaved round after
round on this machine (its speed drifts; rounds do not): together (:func:`attune.models.layers.project`,
LoRA's ``project_together``: the adapters' ``A`` stacked, so their input is read once a pass),
each (every layer's own forward), and frozen (the same layers with their adapters switched off:
the frozen products alone, the floor that adapters costing nothing would reach).

    python benchmarks/lora_projections.py                                # q, k, v of the anchors' model
    python benchmarks/lora_projections.py --hidden 512 --outs 1408 1408  # its gate and up
    python benchmarks/lora_projections.py --hidden 1408 --outs 512       # its down

FLOPs as ``benchmarks/mfu.py`` counts them: the frozen products ``4 tokens in out`` (forward
and the input's gradient), the adapters ``6 tokens r (in + out)``; the peak is ``torch.mm``'s
on the products' own shapes, measured each round. "Adapters' cost" is each's time over frozen's,
paired round by round: what the rank-r products and their additions take beyond the frozen
products, of which their own FLOPs at the peak are the ``adapter FLOPs at peak`` part.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune.models.layers import project
from attune.peft import LoRALinear
from attune.peft.lora import disabled_adapters
from benchmarks import mfu

VARIANTS = ("together", "each", "frozen")


def projection_flops(tokens: int, hidden: int, outs: Sequence[int], rank: int) -> dict[str, float]:
    """Forward + backward FLOPs of the frozen products and of their adapters."""
    return {
        "frozen": 4.0 * tokens * hidden * sum(outs),
        "adapters": 6.0 * tokens * rank * sum(hidden + out for out in outs),
    }


def measure(
    hidden: int, outs: Sequence[int], tokens: int, rank: int, rounds: int, peak_seconds: float
) -> dict[str, Any]:
    """Each variant timed once a round (in a rotating order), with a peak; medians (``rounds``
    at least 2, for the quartiles)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        LoRALinear(torch.nn.Linear(hidden, out, bias=False), rank, 2 * rank) for out in outs
    )
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(tokens, hidden)
    grads = [torch.randn(tokens, out) for out in outs]

    def timed(variant: str) -> float:
        leaf = x.detach().requires_grad_()
        layers.zero_grad(set_to_none=True)
        started = time.perf_counter()
        if variant == "together":
            outputs = project(leaf, layers)
        elif variant == "each":
            outputs = [layer(leaf) for layer in layers]
        else:
            with disabled_adapters(layers):
                outputs = [layer(leaf) for layer in layers]
        torch.autograd.backward(outputs, grads)
        return time.perf_counter() - started

    for variant in VARIANTS:  # warm-up
        timed(variant)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    peaks = []
    shapes = [(tokens, hidden, out) for out in outs]
    for index in range(rounds):
        order = VARIANTS[index % 3 :] + VARIANTS[: index % 3]
        for variant in order:
            times[variant].append(timed(variant))
        peaks.append(mfu.matmul_peak(torch.float32, shapes, seconds=peak_seconds))
    flops = projection_flops(tokens, hidden, outs, rank)
    peak = statistics.median(peaks)
    figures: dict[str, Any] = {
        "tokens": tokens,
        "hidden": hidden,
        "outs": list(outs),
        "rank": rank,
        "rounds": rounds,
        "peak": peak,
        "flops": flops,
        "adapter_flops_at_peak_seconds": flops["adapters"] / peak,
    }
    for variant in VARIANTS:
        seconds = statistics.median(times[variant])
        counted = flops["frozen"] + (0.0 if variant == "frozen" else flops["adapters"])
        entry = {"seconds": seconds, "gflops": counted / seconds / 1e9}
        if variant != "frozen":
            cost = [a - b for a, b in zip(times[variant], times["frozen"], strict=True)]
            entry["adapters_cost_seconds"], entry["adapters_cost_quartiles"] = (
                mfu.median_and_quartiles(cost)
            )
        figures[variant] = entry
    saved = [b - a for a, b in zip(times["together"], times["each"], strict=True)]
    figures["together_saves_seconds"], figures["together_saves_quartiles"] = (
        mfu.median_and_quartiles(saved)
    )
    return figures


def report(figures: dict[str, Any]) -> str:
    ms = lambda seconds: f"{seconds * 1e3:.1f} ms"  # noqa: E731
    lines = [
        f"{figures['tokens']} tokens, {figures['hidden']} -> {figures['outs']}, "
        f"r={figures['rank']}, {figures['rounds']} rounds, peak "
        f"{figures['peak'] / 1e9:.0f} GFLOP/s (adapter FLOPs at peak "
        f"{ms(figures['adapter_flops_at_peak_seconds'])})"
    ]
    for variant in VARIANTS:
        entry = figures[variant]
        line = f"  {variant:8s} {ms(entry['seconds']):>9s}  {entry['gflops']:5.0f} GFLOP/s"
        if "adapters_cost_seconds" in entry:
            low, high = entry["adapters_cost_quartiles"]
            line += (
                f"  adapters' cost {ms(entry['adapters_cost_seconds'])} "
                f"(quartiles {low * 1e3:.1f} to {high * 1e3:.1f})"
            )
        lines.append(line)
    low, high = figures["together_saves_quartiles"]
    lines.append(
        f"  together saves {ms(figures['together_saves_seconds'])} against each "
        f"(quartiles {low * 1e3:.1f} to {high * 1e3:.1f})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="the projections' input width")
    parser.add_argument("--outs", type=int, nargs="+", default=[512, 256, 256])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--peak-seconds", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="also save the figures here")
    args = parser.parse_args(argv)
    if min(args.hidden, args.tokens, args.rank, *args.outs) < 1 or args.rounds < 2:
        parser.error("--hidden, --outs, --tokens and --rank must be at least 1, --rounds 2")
    figures = measure(
        args.hidden, args.outs, args.tokens, args.rank, args.rounds, args.peak_seconds
    )
    return mfu.print_and_save(report(figures), figures, args.json)


if __name__ == "__main__":
    main()
