"""Where a fine-tuning step's time goes, piece by piece, against what its FLOPs would take at the
machine's matmul peak.

`torch.profiler`'s per-op times on a CPU are not to be trusted for this: on the 2-core machine
this project benchmarks on it put a log-softmax at 60 ms that takes 5.7 ms timed, and per-document
attention at 131 ms of a step that loses 350-490 ms without it. Here each piece of a decoder
layer (its norms, the projections as the model groups them, RoPE, attention over the batch's own
documents, the activation, the residual adds), the output head with the loss, and the whole step
are timed by themselves, forward and backward, on the run's real modules (layer 0's, the
adapters included) at the run's batch shapes, round after round, interleaved with a matmul peak
measurement (this machine's speed drifts), and the medians are reported. The pieces' sum is
checked against the step measured beside them.

    python -m attune run lora_finetune_single_device --config X max_steps=1 output_dir=/tmp/r
    python benchmarks/step_budget.py /tmp/r --rounds 12 --json /tmp/budget.json

Each piece's FLOPs are counted as ``benchmarks/mfu.py`` counts them (frozen weights ``4P`` a
token, trained ``6P``, adapters ``6 r (in + out)``, attention ``6 H Q`` times each document's
``L^2``, causal), so "at peak" is what the piece would take at the peak measured beside it. The
output head is counted at every token, as MFU conventionally counts it; attune projects only
the positions whose label is trained, so "head + loss" can run faster than its count.

In a LoRA run the projections are timed a second time with the adapters switched off (the
frozen products alone): the difference is what the adapters cost, set beside their own FLOPs'
time at the peak, and the MFU the step would reach if they cost only that. Dense decoders with
Llama's layer layout (no mixture of experts, sandwich norms, QK norms or soft-capping); full and
LoRA SFT runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import mfu


def _projection_flops(layer: torch.nn.Module, tokens: int) -> float:
    """Forward + backward FLOPs of one projection over ``tokens`` (see the module docstring)."""
    from attune.peft import LoRALinear

    fan_out, fan_in = layer.weight.shape
    if isinstance(layer, LoRALinear) and layer.adapter_enabled:
        rank = layer.lora_A.weight.shape[0]
        return 4.0 * tokens * fan_in * fan_out + 6.0 * tokens * rank * (fan_in + fan_out)
    return (6.0 if layer.weight.requires_grad else 4.0) * tokens * fan_in * fan_out


PROJECTIONS = ("q, k, v projections", "o projection", "gate, up projections", "down projection")
ADAPTERS_OFF = " (adapters off)"  # the suffix of a projection piece timed with its adapters off


def _dense_llama_layers(model: torch.nn.Module) -> str | None:
    """Why the model's layers are outside what this script times, or None."""
    from attune.models.layers import GatedMLP

    layer = model.layers[0]
    if not isinstance(layer.mlp, GatedMLP):
        return "a mixture-of-experts layer"
    if layer.sandwich_norms:
        return "sandwich norms"
    if layer.self_attn.q_norm is not None:
        return "QK norms"
    if layer.self_attn.softcap is not None:
        return "soft-capped attention"
    return None


def budget_pieces(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable,
    made: dict[tuple[int, ...], torch.Tensor],
) -> dict[str, tuple[Callable[[], None], int, float]]:
    """The step's pieces for ``batch``: name -> (a forward + backward of it, how many a step
    runs, its FLOPs each).

    Inputs are random tensors kept in ``made`` (by shape) from one call to the next, so that
    after a first, untimed round a piece's time is its own work; layer 0's modules stand for
    every layer's (the same shapes and settings).
    """
    from attune.models.layers import project
    from attune.models.masks import DocumentSpans
    from attune.models.rope import apply_rope
    from attune.models.sdpa import scaled_dot_product_attention

    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    param = next(model.parameters())
    tokens = batch["tokens"]
    rows, seq = tokens.shape
    padding = batch.get("padding_mask")
    # FLOPs count the input tokens, padding aside, as the MFU does
    count = int(padding.sum()) if padding is not None else rows * seq
    hidden = model.norm.weight.shape[0]
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    inner = mlp.up_proj.weight.shape[0]
    layers = len(model.layers)

    def data(*shape: int) -> torch.Tensor:
        if shape not in made:
            made[shape] = torch.randn(*shape, device=param.device, dtype=param.dtype)
        return made[shape]

    def leaf(*shape: int) -> torch.Tensor:
        return data(*shape).detach().requires_grad_()

    def heads_first(width: int) -> torch.Tensor:  # [rows, heads, seq, dim] as attention sees it
        return data(rows, seq, width, head_dim).detach().transpose(1, 2).requires_grad_()

    document_ids = batch.get("document_ids")
    spans = (
        DocumentSpans.from_document_ids(document_ids, padding) if document_ids is not None else None
    )
    if spans is not None:
        lengths = [end - start for _, start, end in spans.spans]
    else:
        real = padding.sum(dim=1).tolist() if padding is not None else [seq] * rows
        lengths = [int(n) for n in real]

    def norm() -> None:
        layer.input_layernorm(leaf(rows, seq, hidden)).backward(data(rows, seq, hidden))

    def qkv() -> None:
        outs = project(leaf(rows, seq, hidden), (attn.q_proj, attn.k_proj, attn.v_proj))
        torch.autograd.backward(outs, [data(*out.shape) for out in outs])

    def rope() -> None:
        cos, sin = data(rows, seq, head_dim), data(rows, seq, head_dim)
        q, k = heads_first(heads), heads_first(kv_heads)
        torch.autograd.backward(
            (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
            (data(rows, heads, seq, head_dim), data(rows, kv_heads, seq, head_dim)),
        )

    def attention() -> None:
        q, k, v = heads_first(heads), heads_first(kv_heads), heads_first(kv_heads)
        if spans is not None:
            out = spans.attend(q, k, v, attn.scale)
        else:
            out = scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=attn.scale, enable_gqa=kv_heads != heads
            )
        out.transpose(1, 2).reshape(rows, seq, -1).backward(data(rows, seq, heads * head_dim))

    def o_proj() -> None:
        attn.o_proj(leaf(rows, seq, heads * head_dim)).backward(data(rows, seq, hidden))

    def residual() -> None:
        (leaf(rows, seq, hidden) + leaf(rows, seq, hidden)).backward(data(rows, seq, hidden))

    def gate_up() -> None:
        x = leaf(rows, seq, hidden)
        outs = project(x, (mlp.gate_proj, mlp.up_proj))
        torch.autograd.backward(outs, [data(rows, seq, inner)] * 2)

    def activation() -> None:
        gate, up = leaf(rows, seq, inner), leaf(rows, seq, inner)
        (mlp.activation(gate) * up).backward(data(rows, seq, inner))

    def down() -> None:
        mlp.down_proj(leaf(rows, seq, inner)).backward(data(rows, seq, hidden))

    def final_norm() -> None:
        model.norm(leaf(rows, seq, hidden)).backward(data(rows, seq, hidden))

    def head_and_loss() -> None:
        loss, _ = loss_fn(leaf(rows, seq, hidden), batch["labels"], model.output)
        loss.backward()

    head = getattr(model, "lm_head", None) or model.embed_tokens  # tied: the embedding's
    vocab = head.weight.shape[0]
    trained_head = head.weight.requires_grad
    attention_flops = 6.0 * heads * head_dim * sum(n * n for n in lengths)
    flops = lambda *modules: sum(_projection_flops(m, count) for m in modules)  # noqa: E731
    return {
        "norms": (norm, 2 * layers, 0.0),
        "q, k, v projections": (qkv, layers, flops(attn.q_proj, attn.k_proj, attn.v_proj)),
        "RoPE": (rope, layers, 0.0),
        "attention": (attention, layers, attention_flops),
        "o projection": (o_proj, layers, flops(attn.o_proj)),
        "residual adds": (residual, 2 * layers, 0.0),
        "gate, up projections": (gate_up, layers, flops(mlp.gate_proj, mlp.up_proj)),
        "activation x up": (activation, layers, 0.0),
        "down projection": (down, layers, flops(mlp.down_proj)),
        "final norm": (final_norm, 1, 0.0),
        "head + loss": (head_and_loss, 1, (6.0 if trained_head else 4.0) * count * hidden * vocab),
    }


def measure(
    cfg: Any, rounds: int, peak_seconds: float, model_config: dict[str, Any]
) -> dict[str, Any]:
    """Time every piece, the whole step and the peak ``rounds`` times, interleaved."""
    from attune import config
    from attune.errors import ConfigError
    from attune.peft import LoRALinear
    from attune.peft.lora import disabled_adapters
    from attune.training import (
        BatchStream,
        ChunkedCrossEntropy,
        backward_step,
        setup_training,
        start_run,
        training_loop,
    )

    with start_run(cfg) as run:
        setup = setup_training(cfg, run)
        model = setup.model
        lora = any(isinstance(module, LoRALinear) for module in model.modules())
        unsupported = _dense_llama_layers(model)
        if unsupported is not None:
            raise ConfigError(
                f"step_budget times dense Llama-style layers; this model has {unsupported}"
            )
        dataset = config.instantiate(cfg.dataset, tokenizer=setup.tokenizer)
        stream = BatchStream.from_config(cfg, dataset, setup.tokenizer.padding_id, run.world)
        loss_fn = config.instantiate(cfg.get("loss")) or ChunkedCrossEntropy()
        loop = training_loop(cfg, run, setup, stream)
        steps = []
        for micro_batches in loop:
            steps.append(micro_batches)
            loop.end_step()
            if len(steps) == rounds + 1:
                break
        loop.finish()
        dtype = mfu.DTYPES[mfu.run_dtype(dict(cfg))]
        times: dict[str, list[float]] = {}
        made: dict[tuple[int, ...], torch.Tensor] = {}
        counted_tokens = 0
        figures: dict[str, dict[str, float]] = {}
        for index, micro_batches in enumerate(steps):
            batch = micro_batches[0]
            on_device = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pieces = budget_pieces(model, on_device, loss_fn, made)
            # LoRA's projections again with the adapters off: the frozen products alone
            frozen = {}
            if lora:
                with disabled_adapters(model):
                    frozen = {
                        name + ADAPTERS_OFF: entry
                        for name, entry in budget_pieces(model, on_device, loss_fn, made).items()
                        if name in PROJECTIONS
                    }

            def whole_step(micro_batches: list = micro_batches) -> None:
                backward_step(model, micro_batches, loss_fn, run.device, run.precision)

            def adapters_off(fn: Callable[[], None]) -> Callable[[], None]:
                def run_frozen() -> None:
                    with disabled_adapters(model):
                        fn()

                return run_frozen

            timed = {
                **{name: (fn, n) for name, (fn, n, _) in pieces.items()},
                **{name: (adapters_off(fn), n) for name, (fn, n, _) in frozen.items()},
                "step": (whole_step, 1),
            }
            for name, (fn, _) in timed.items():
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                fn()
                if index:  # the first round warms every kernel up
                    times.setdefault(name, []).append(time.perf_counter() - started)
            if index:
                tokens = int(batch["tokens"].numel())  # the products run over every position
                shapes = mfu.projection_shapes(model_config, tokens)
                times.setdefault("peak", []).append(
                    mfu.matmul_peak(dtype, shapes, run.device, peak_seconds)
                )
                padding = batch.get("padding_mask")
                counted_tokens += int(padding.sum()) if padding is not None else tokens
                for name, (_, n, flop) in [*pieces.items(), *frozen.items()]:
                    figures.setdefault(name, {"per_step": n, "flops": 0.0})["flops"] += n * flop
        model.zero_grad(set_to_none=True)
    peak = statistics.median(times["peak"])
    step = statistics.median(times["step"])
    table = {}
    for name, entry in figures.items():
        seconds = statistics.median(times[name]) * entry["per_step"]
        flop = entry["flops"] / rounds
        table[name] = {
            "seconds": seconds,
            "share": seconds / step,
            "at_peak_seconds": flop / peak,
            "gflops": flop / seconds / 1e9 if flop else 0.0,
        }
    frozen_table = {name: table.pop(name) for name in list(table) if name.endswith(ADAPTERS_OFF)}
    counted = sum(figures[name]["flops"] for name in table) / rounds
    result = {
        "step_seconds": step,
        "pieces_seconds": sum(row["seconds"] for row in table.values()),
        "tokens": counted_tokens / rounds,
        "flops": counted,
        "peak": peak,
        "mfu": counted / step / peak,
        "pieces": table,
    }
    if frozen_table:
        # what the adapters take beyond the frozen products, against their own FLOPs' time
        cost = sum(
            table[name]["seconds"] - frozen_table[name + ADAPTERS_OFF]["seconds"]
            for name in PROJECTIONS
        )
        own = sum(
            table[name]["at_peak_seconds"] - frozen_table[name + ADAPTERS_OFF]["at_peak_seconds"]
            for name in PROJECTIONS
        )
        result["adapters_off"] = frozen_table
        result["adapters_cost_seconds"] = cost
        result["adapter_flops_at_peak_seconds"] = own
        result["mfu_if_adapters_cost_their_flops"] = counted / (step - cost + own) / peak
    return result


def report(figures: dict[str, Any]) -> str:
    """The budget as a markdown table."""
    lines = [
        "| piece | ms a step | share of the step | ms at the peak | GFLOP/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in figures["pieces"].items():
        rate = f"{row['gflops']:,.0f}" if row["gflops"] else "-"
        lines.append(
            f"| {name} | {row['seconds'] * 1e3:,.1f} | {row['share']:.1%} | "
            f"{row['at_peak_seconds'] * 1e3:,.1f} | {rate} |"
        )
    lines.append(
        f"| **sum of the pieces** / the step measured | {figures['pieces_seconds'] * 1e3:,.0f} / "
        f"{figures['step_seconds'] * 1e3:,.0f} | | | peak {figures['peak'] / 1e9:,.1f}, "
        f"MFU {figures['mfu']:.1%} |"
    )
    if "adapters_off" in figures:
        lines += [
            "",
            "| with the adapters off | ms a step | ms at the peak | GFLOP/s |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in figures["adapters_off"].items():
            lines.append(
                f"| {name} | {row['seconds'] * 1e3:,.1f} | {row['at_peak_seconds'] * 1e3:,.1f} | "
                f"{row['gflops']:,.0f} |"
            )
        lines.append(
            f"\nThe adapters take {figures['adapters_cost_seconds'] * 1e3:,.0f} ms a step beyond "
            f"the frozen products; their own FLOPs would take "
            f"{figures['adapter_flops_at_peak_seconds'] * 1e3:,.0f} ms at the peak. Were that all "
            f"they cost, the MFU would be {figures['mfu_if_adapters_cost_their_flops']:.1%}."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from attune.errors import AttuneError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a fine-tuning run's output_dir (its config.yaml)")
    parser.add_argument("--rounds", type=int, default=12, help="measured rounds (one warm-up more)")
    parser.add_argument("--peak-seconds", type=float, default=0.7, help="each peak's budget")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cfg = mfu.sft_run_config(parser, args.run)
    model_config = mfu.model_config_for_run(OmegaConf.to_container(cfg, resolve=True))
    if model_config is None:
        parser.error(f"no model config.json found for {args.run}")
    with tempfile.TemporaryDirectory(prefix="step_budget_") as scratch:
        rerun = mfu.rerun_config(cfg, scratch, args.rounds + 1, gradient_accumulation_steps=1)
        try:
            figures = measure(rerun, args.rounds, args.peak_seconds, model_config)
        except AttuneError as error:
            parser.error(f"{args.run}: {error}")
    print(f"CPU: {mfu.cpu_header()}")
    return mfu.print_and_save(report(figures), figures, args.json)


if __name__ == "__main__":
    main()
