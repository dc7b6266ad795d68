"""A Qwen3-30B-A3B-shaped mixture-of-experts layer, forward and backward: attune's grouped path
against a loop over experts and transformers' own block, in one run.

The layer: hidden 2,048, 128 experts of width 768, top-8 with the top-k weights renormalised
(Qwen3-30B-A3B's ``config.json``). Every implementation gets the same weights and tokens:

- ``attune_grouped``: :class:`attune.models.moe.SparseMoE` (tokens sorted by expert, one grouped
  matrix product per projection);
- ``attune_grouped_compiled``: the same block under ``torch.compile`` (GPU, bf16 only);
- ``per_expert_loop``: attune's router, then a Python loop over the experts that got tokens
  (one matrix product per expert and projection);
- ``transformers_eager`` and ``transformers_grouped_mm``: transformers'
  ``Qwen3MoeSparseMoeBlock`` with ``experts_implementation`` set to each (transformers 5's
  default is ``grouped_mm`` where torch has it).

Outputs are compared to attune's before timing. Prints tokens/s (forward + backward, median
of the repeats) per implementation as JSON.

    python benchmarks/moe_layer.py                                      # cuda, bf16, 8,192 tokens
    python benchmarks/moe_layer.py --device cpu --dtype fp32 --tokens 512 --experts 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attune.models import DecoderConfig, moe
from attune.models.moe import SparseMoE

QWEN3_30B_A3B = dict(
    hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768
)


def per_expert_loop(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The router, then one matrix product per expert that got tokens and per projection."""
    tokens = x.reshape(-1, x.shape[-1])
    _, weights, indices = block.gate(tokens)
    experts = block.experts
    out = torch.zeros_like(tokens)
    hit = torch.bincount(indices.reshape(-1), minlength=experts.num_experts).nonzero()
    for expert in hit.flatten().tolist():
        token, slot = torch.where(indices == expert)
        gate, up = F.linear(tokens[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[expert])
        out = out.index_add(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out.reshape(x.shape)


def transformers_block(block: SparseMoE, args: argparse.Namespace, implementation: str):
    """transformers' Qwen3-MoE block with ``block``'s weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.intermediate,
        norm_topk_prob=True,
    )
    config._experts_implementation = implementation
    reference = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        reference.gate.weight.copy_(block.gate.weight)
        reference.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        reference.experts.down_proj.copy_(block.experts.down_proj)
    return reference.to(block.gate.weight.device, block.gate.weight.dtype)


def timed(step: Callable[[], None], repeats: int, device: str) -> float:
    for _ in range(2):  # warm-up (and compilation)
        step()
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
    parser.add_argument("--experts", type=int, default=QWEN3_30B_A3B["num_experts"])
    parser.add_argument("--top-k", type=int, default=QWEN3_30B_A3B["num_experts_per_tok"])
    parser.add_argument("--hidden", type=int, default=QWEN3_30B_A3B["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=QWEN3_30B_A3B["moe_intermediate_size"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print attune's ops")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=8, hidden_size=args.hidden, intermediate_size=8, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=8, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.intermediate, norm_topk_prob=True,
    )  # fmt: skip
    block = SparseMoE(config).to(args.device, dtype).train()
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype)
    x.requires_grad_(True)
    upstream = torch.randn_like(x)

    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "attune_grouped": block,
        "per_expert_loop": lambda inputs: per_expert_loop(block, inputs),
    }
    if args.device == "cuda" and dtype == torch.bfloat16:
        candidates["attune_grouped_compiled"] = torch.compile(block)
    for implementation in ("eager", "grouped_mm"):
        try:
            candidates[f"transformers_{implementation}"] = transformers_block(
                block, args, implementation
            )
        except (ImportError, ValueError) as error:  # transformers absent, or too old
            print(f"transformers_{implementation}: skipped ({error})")

    with torch.no_grad():
        expected = block(x).float()
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "experts": args.experts,
        "top_k": args.top_k,
    }
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for name, forward in candidates.items():
        with torch.no_grad():
            difference = (forward(x).float() - expected).abs().max().item()
        figures[f"{name}_max_abs_difference"] = difference
        if difference > tolerance:
            raise SystemExit(f"{name} differs from attune_grouped by {difference}")

        def step(forward: Callable[[torch.Tensor], torch.Tensor] = forward) -> None:
            (forward(x) * upstream).sum().backward()
            x.grad = None

        seconds = timed(step, args.repeats, args.device)
        figures[f"{name}_tokens_per_s"] = round(args.tokens / seconds)
        figures[f"{name}_ms"] = round(seconds * 1e3, 2)
    figures["grouped_mm_used"] = moe._GROUPED_MM_WORKS.get((x.device.type, dtype))
    print(json.dumps(figures))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if args.device == "cuda" else []
        )
        with profile(activities=activities) as profiler:
            for _ in range(3):
                (block(x) * upstream).sum().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
