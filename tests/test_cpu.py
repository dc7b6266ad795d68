"""The CPU's bf16 instructions and the one-line notice for a bf16 run on a CPU without them."""

import torch

from attune import cpu

X86_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 fma
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma
"""
X86_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_flags_are_read_from_cpuinfo_on_x86_and_arm(tmp_path):
    for text, expected in ((X86_AVX2, False), (X86_BF16, True), (ARM_BF16, True)):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        flags = cpu.cpu_flags(path)
        assert "avx2" in flags or "asimd" in flags
        assert cpu.has_bf16_instructions(flags) is expected
    assert cpu.cpu_flags(tmp_path / "missing") == set()
    assert cpu.has_bf16_instructions(set()) is None  # cannot tell: no notice


def test_the_notice_is_one_line_with_the_measured_slowdown_and_the_fix(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    line = cpu.bf16_notice(torch.device("cpu"), torch.bfloat16, None)
    assert line is not None and "\n" not in line
    assert "bf16 is emulated on this CPU" in line and "set dtype=fp32" in line
    slowdown = float(line.split("measured ")[1].split("x")[0])
    assert slowdown > 0
    # bf16 autocast over fp32 weights is a bf16 run too
    assert cpu.bf16_notice(torch.device("cpu"), torch.float32, "bf16") is not None
    assert cpu.bf16_notice(torch.device("cpu"), torch.float32, None) is None
    assert cpu.bf16_notice(torch.device("meta"), torch.bfloat16, None) is None


def test_no_notice_where_the_cpu_has_bf16_or_cannot_tell(monkeypatch):
    for flags in ({"avx512_bf16"}, {"amx_bf16", "amx_tile"}, set()):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert cpu.bf16_notice(torch.device("cpu"), torch.bfloat16, None) is None
