"""Knowledge distillation's loss at a large vocabulary: peak memory and tokens per second of the
chunked loss (:class:`attune.training.DistillationLoss`) against the same loss on full logits.

Both compute ``(1 - kd_ratio) * CE + kd_ratio * KD`` over ``--positions`` trained positions,
forward and backward, from the student's and the teacher's final hidden states through their
output heads (``--hidden`` -> ``--vocab`` and ``--teacher-hidden`` -> ``--vocab``; Qwen2.5-0.5B
and 1.5B's sizes by default, a 151,936-token vocabulary). The unchunked loss holds both models'
``[positions, vocab]`` fp32 logits and their log-softmaxes at once, as torchtune's KD losses do;
the chunked one holds one ``[chunk, vocab]`` piece of each at a time, forward and backward.

Each configuration runs in its own child process (a process's peak resident memory only grows),
which reports the memory the loss added to what the inputs, heads and their gradients already
held: on a CPU its peak resident set above the resident set before the first pass, on a GPU the
peak of ``torch.cuda.max_memory_allocated`` above the allocation before it. Tokens per second
are trained positions over the best of ``--reps`` timed passes (after one untimed one). Prints a
Markdown table and, with ``--json``, the figures.

    python benchmarks/kd_memory.py                                   # CPU, 1,024 positions
    python benchmarks/kd_memory.py --positions 2048 --chunk-sizes 256 1024 --threads 2
    python benchmarks/kd_memory.py --device cuda --positions 16384 --chunk-sizes 1024 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def measure(args: argparse.Namespace, chunk_size: int | None) -> dict[str, Any]:
    """One configuration in this process: ``chunk_size`` None is the unchunked loss."""
    import torch
    import torch.nn.functional as F

    from attune.training.distillation import DistillationLoss, divergence

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.positions
    hidden = torch.randn(1, n + 1, args.hidden, device=device, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(1, n + 1, args.teacher_hidden, device=device, dtype=dtype)
    labels = torch.randint(0, args.vocab, (1, n + 1), device=device)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    teacher_head = torch.nn.Linear(
        args.teacher_hidden, args.vocab, bias=False, device=device, dtype=dtype
    ).requires_grad_(False)
    ratio = args.kd_ratio

    def chunked() -> torch.Tensor:
        loss_fn = DistillationLoss(args.kind, kd_ratio=ratio, chunk_size=chunk_size or 1)
        return loss_fn(hidden, labels, head, teacher_hidden, teacher_head).loss

    def unchunked() -> torch.Tensor:
        logits = head(hidden[:, :-1]).float().flatten(0, 1)
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[:, :-1]).float().flatten(0, 1)
        ce = F.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum")
        kd = divergence(logits, teacher_logits, args.kind).sum()
        return (1 - ratio) * ce + ratio * kd

    loss_of = unchunked if chunk_size is None else chunked

    def one_pass() -> float:
        start = time.perf_counter()
        loss = loss_of()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        hidden.grad.zero_()  # type: ignore[union-attr]
        head.weight.grad.zero_()  # type: ignore[union-attr]
        return elapsed

    # the inputs' gradients exist during every pass: allocate them once, in the baseline
    hidden.grad = torch.zeros_like(hidden)
    head.weight.grad = torch.zeros_like(head.weight)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = [one_pass() for _ in range(args.reps + 1)][1:]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    logits_bytes = n * args.vocab * 4
    return {
        "loss": "unchunked" if chunk_size is None else f"chunked ({chunk_size})",
        "positions": n,
        "vocab": args.vocab,
        "peak_extra_gb": max(peak, 0) / 1e9,
        "one_fp32_logits_gb": logits_bytes / 1e9,
        "tokens_per_second": n / min(times),
        "best_pass_s": min(times),
    }


def run_child(args: argparse.Namespace, chunk_size: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(chunk_size or 0)]
    for name in ("positions", "vocab", "hidden", "teacher_hidden", "device", "dtype", "kind"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--reps", str(args.reps), "--threads", str(args.threads)]
    command += ["--kd-ratio", str(args.kd_ratio)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {
            "loss": "unchunked" if chunk_size is None else f"chunked ({chunk_size})",
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loss | positions | vocab | peak memory added (GB) | tokens/s | best pass (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['loss']} | | | failed: {row['error']} | | |")
            continue
        lines.append(
            f"| {row['loss']} | {row['positions']:,} | {row['vocab']:,} | "
            f"{row['peak_extra_gb']:.2f} | {row['tokens_per_second']:,.0f} | "
            f"{row['best_pass_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=1024, help="trained positions")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896, help="the student's hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--kd-ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the heads' and hidden states' dtype")
    parser.add_argument("--reps", type=int, default=2, help="timed passes (best one counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-unchunked", action="store_true", help="skip the unchunked loss")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # one configuration, in a fresh process
        print(json.dumps(measure(args, args.child or None)))
        return
    sizes: list[int | None] = [None] if not args.no_unchunked else []
    rows = [run_child(args, size) for size in [*sizes, *args.chunk_sizes]]
    print(
        f"KD loss ({args.kind}, kd_ratio {args.kd_ratio}) forward + backward: hidden "
        f"{args.hidden} (teacher {args.teacher_hidden}), {args.dtype} on {args.device}, "
        f"{args.threads} thread(s); one [positions, vocab] fp32 logits tensor is "
        f"{args.positions * args.vocab * 4 / 1e9:.2f} GB"
    )
    print(table(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
