"""What this machine's CPU can do for training: whether it has bf16 instructions.

A CPU without them (AVX2 machines, AVX-512 without ``avx512_bf16``) runs bf16 matrix
multiplies by converting to fp32 and back, slower than fp32 itself: a bf16 run there is slower
than the fp32 run it was meant to beat, with nothing telling the user. :func:`bf16_notice` says
so in one line, with the slowdown measured on the spot.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# x86: AVX-512 BF16 dot products, or AMX's bf16 tiles; Arm: the BF16 extension (BFMMLA)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The instruction-set flags the kernel reports for the first CPU (``flags`` on x86,
    ``Features`` on Arm); empty where there is no ``/proc/cpuinfo`` (macOS, Windows)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def has_bf16_instructions(flags: set[str] | None = None) -> bool | None:
    """Whether the CPU multiplies bf16 natively; None when it cannot be told (no flags:
    macOS or Windows, where no notice is given)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return bool(flags & BF16_FLAGS)


def bf16_slowdown(size: int = 512, seconds: float = 0.5) -> float:
    """How many times slower a ``[size, size] @ [size, size]`` bf16 ``torch.mm`` is than the
    fp32 one on this CPU, each timed for about ``seconds / 2`` (best of the repetitions)."""

    def best_time(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: the first call picks and loads the kernel
        best, deadline = float("inf"), time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return best

    return best_time(torch.bfloat16) / best_time(torch.float32)


def bf16_notice(device: torch.device, dtype: torch.dtype, autocast: str | None) -> str | None:
    """One line for a bf16 run (weights or autocast) on a CPU without bf16 instructions, with
    the measured slowdown and the fix; None when the run is not one."""
    uses_bf16 = dtype == torch.bfloat16 or autocast in ("bf16", "bfloat16")
    if device.type != "cpu" or not uses_bf16 or has_bf16_instructions() is not False:
        return None
    slowdown = bf16_slowdown()
    return (
        f"notice: bf16 is emulated on this CPU ({platform.machine()}, no AVX-512 BF16 or AMX "
        f"instructions): a bf16 matrix multiply measured {slowdown:.1f}x the time of an fp32 "
        "one here; set dtype=fp32 (and autocast=null) to train faster"
    )
