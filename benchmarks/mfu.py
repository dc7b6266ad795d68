"""Model FLOPs utilisation: a run's model FLOPs per second over the machine's measured matmul peak.

Ratios against a peer stop meaning much near the ceiling; utilisation of what the machine can do
does not. This measures the peak the machine reaches on the matrix multiplies a model runs
(``torch.mm`` on the shapes of its projections, fp32 and bf16, at the current
``torch.get_num_threads()``), counts the forward + backward FLOPs a token needs (attention
included; for LoRA only the FLOPs LoRA requires) and divides the run's FLOPs per second by the
peak of the run's dtype.

    python benchmarks/mfu.py /tmp/attune/tiny_full            # a run folder (metrics.jsonl ...)
    python benchmarks/mfu.py --config-json model/config.json --tokens-per-second 503 \\
        --seq-len 512 --tokens-per-batch 2048 --json /tmp/mfu.json

The peak is what ``torch.mm`` reaches on this machine now, not a datasheet figure: on a CPU it
depends on the threads, the kernels torch picks and whatever else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune.cpu import cpu_flags, has_bf16_instructions
from attune.errors import AttuneError

# the flags that decide a CPU's matmul rate, shown in the report's header
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
SQUARE = (2048, 2048, 2048)  # the reference product: a 2,048^3 torch.mm
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TINY_DEMO_CONFIG = Path(__file__).resolve().parents[1] / "attune" / "demo" / "tiny_base"


def _dims(config: dict[str, Any]) -> dict[str, int]:
    """The widths of a dense decoder's projections, from its HF-style config."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "hidden": hidden,
        "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "vocab": config["vocab_size"],
    }


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each projection of one decoder layer, and the output head, as ``(in, out)`` features."""
    d = _dims(config)
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return {
        "q_proj": (d["hidden"], q),
        "k_proj": (d["hidden"], kv),
        "v_proj": (d["hidden"], kv),
        "o_proj": (q, d["hidden"]),
        "gate_proj": (d["hidden"], d["intermediate"]),
        "up_proj": (d["hidden"], d["intermediate"]),
        "down_proj": (d["intermediate"], d["hidden"]),
        "lm_head": (d["hidden"], d["vocab"]),
    }


def projection_shapes(config: dict[str, Any], tokens: int) -> list[tuple[int, int, int]]:
    """The ``[tokens, in] x [in, out]`` products of one forward pass as ``(M, K, N)``, one entry
    per product run (each layer's repeated ``num_hidden_layers`` times, the head's once)."""
    layers = _dims(config)["layers"]
    shapes = []
    for name, (fan_in, fan_out) in linear_shapes(config).items():
        shapes += [(tokens, fan_in, fan_out)] * (1 if name == "lm_head" else layers)
    return shapes


def matmul_peak(
    dtype: torch.dtype,
    shapes: Iterable[tuple[int, int, int]],
    device: str | torch.device = "cpu",
    seconds: float = 2.0,
) -> float:
    """The matmul rate (FLOP/s) this machine reaches on ``shapes`` with ``torch.mm``.

    Each distinct ``(M, K, N)`` is warmed up once, then timed for its share of ``seconds``
    (three repetitions at least) into one preallocated output, so that no time goes to the
    allocator's page faults (a fresh output each time measured 3% lower on a 2-core AVX2
    machine); its best time counts. The rate is the FLOPs of every product
    in ``shapes`` (repeats included) over the sum of their best times: what a pass through the
    model's projections would reach, the slow shapes weighing as much as they cost.

    Args:
        dtype: the operands' dtype (``torch.float32``, ``torch.bfloat16``).
        shapes: ``(M, K, N)`` for ``[M, K] x [K, N]``; repeats weigh the shape more.
        device: where to multiply (a CUDA device is synchronised around each product).
        seconds: the whole measurement's budget, split evenly over the distinct shapes.

    Returns:
        FLOP/s, counting ``2 * M * K * N`` per product.
    """
    counts = Counter(shapes)
    if not counts:
        raise ValueError("matmul_peak needs at least one shape")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    flops = total_time = 0.0
    for (m, k, n), count in counts.items():
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = torch.mm(a, b)  # warm-up: the first call picks the kernel
        sync()
        best, reps, deadline = float("inf"), 0, time.perf_counter() + seconds / len(counts)
        while reps < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            sync()
            best = min(best, time.perf_counter() - start)
            reps += 1
        flops += count * 2.0 * m * k * n
        total_time += count * best
    return flops / total_time


def model_flops_per_token(
    config: dict[str, Any],
    seq_len: float,
    lora_rank: int | None = None,
    lora_targets: Sequence[str] = ATTENTION + MLP,
) -> float:
    """Forward + backward FLOPs one token needs in a dense decoder, from its HF-style config.

    Matmuls: a weight of ``P`` parameters costs ``2P`` FLOPs a token forward, ``2P`` for the
    input's gradient and ``2P`` for the weight's: ``6P`` in full fine-tuning, over the
    attention projections, the MLP and the output head (counted even when tied to the
    embeddings: its matmul runs all the same); the embedding lookup is no matmul and left out.

    Attention's own matmuls (``QK^T`` and ``AV``): PaLM's count (appendix B) is ``12 * L * H *
    Q * T`` a token for forward + backward, with ``L`` layers, ``H`` heads of width ``Q`` and a
    sequence of ``T`` tokens; a causal mask needs half of it, so this counts
    ``6 * L * H * Q * T`` (``T = seq_len``, the span attended: for documents of several
    lengths, :func:`attended_span`, packed or not). The same in LoRA: the scores' inputs need
    gradients.

    LoRA counts the FLOPs LoRA requires, not full fine-tuning's: each frozen weight runs forward
    and passes the input's gradient back (``4P``, its own gradient is never computed) and each
    adapter ``A`` (``in x r``), ``B`` (``r x out``) costs ``6 * r * (in + out)``. (The first
    layer's input gradients, which autograd skips too, are counted: a few percent at most.) So
    LoRA's MFU is lower than full's at the same tokens/s, and honest about the work.

    Args:
        config: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``vocab_size``; ``num_key_value_heads`` and ``head_dim``
            if they differ from the defaults (all heads, ``hidden / heads``).
        seq_len: the sequence length attention spans (:func:`attended_span`).
        lora_rank: the adapters' rank ``r``; None for full fine-tuning.
        lora_targets: the adapted projections' names (the output head as ``lm_head``).
    """
    d = _dims(config)
    shapes = linear_shapes(config)
    counts = {name: 1 if name == "lm_head" else d["layers"] for name in shapes}
    attention = 6.0 * d["layers"] * d["heads"] * d["head_dim"] * seq_len
    if lora_rank is None:
        return 6.0 * sum(counts[n] * i * o for n, (i, o) in shapes.items()) + attention
    frozen = 4.0 * sum(counts[n] * i * o for n, (i, o) in shapes.items())
    unknown = set(lora_targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}: use {sorted(shapes)}")
    adapters = 6.0 * lora_rank * sum(counts[n] * sum(shapes[n]) for n in lora_targets)
    return frozen + adapters + attention


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOPs per second the run did over the peak (FLOP/s)."""
    return tokens_per_second * flops_per_token / peak


def model_config_for_run(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The model's ``config.json`` for a run's resolved config: from ``model.path``, or the
    shipped tiny model's for ``attune.demo.tiny_model``; None when neither applies."""
    model = cfg.get("model") or {}
    if model.get("path"):
        folder = Path(model["path"]).expanduser()
    elif model.get("_component_") == "attune.demo.tiny_model":
        folder = TINY_DEMO_CONFIG
    else:
        return None
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def lora_for_run(cfg: dict[str, Any]) -> tuple[int | None, list[str]]:
    """A run's LoRA rank and adapted projections (``(None, [])`` for full fine-tuning)."""
    lora = cfg.get("lora")
    if not lora:
        return None, []
    targets = lora.get("target_modules", "all-linear")
    if targets == "all-linear":  # attune's (and peft's) meaning: every linear but the head
        targets = list(ATTENTION + MLP)
    return int(lora["rank"]), [t.rsplit(".", 1)[-1] for t in targets]


def run_dtype(cfg: dict[str, Any]) -> str:
    """``bf16`` when the run multiplies in bf16 (weights or autocast), else ``fp32``."""
    names = {str(cfg.get("dtype", "fp32")), str(cfg.get("autocast"))}
    return "bf16" if names & {"bf16", "bfloat16"} else "fp32"


def attended_span(lengths: Sequence[int]) -> float:
    """The ``T`` of :func:`model_flops_per_token` for documents of these lengths.

    A token of a causal document of ``L`` tokens attends ``L / 2`` keys on average, which the
    formula counts as ``T = L``; over documents that is the token-weighted mean length,
    ``sum(L^2) / sum(L)``. It is the data's, not the batching's: padding a row, or masking a
    packed row's whole square, is work the model does not need (on the anchors' rows, packed
    to 512: 242).
    """
    total = sum(lengths)
    if total <= 0:
        raise ValueError("no tokens: the attended span needs at least one document")
    return sum(length * length for length in lengths) / total


def data_lengths(cfg: dict[str, Any]) -> list[int]:
    """The run's training examples' lengths after truncation, from its config's tokenizer and
    dataset (tokenized as the recipe tokenizes them, from ``datasets``' cache once made)."""
    from omegaconf import OmegaConf

    from attune import config as attune_config

    node = OmegaConf.create(cfg)
    tokenizer = attune_config.instantiate(node.tokenizer)
    dataset = attune_config.instantiate(node.dataset, tokenizer=tokenizer)
    return [int(length) for length in dataset.lengths]


def flops_for_run(output_dir: Path, seq_len: float | None = None) -> dict[str, Any] | None:
    """The FLOPs figures of a finished run from its ``config.yaml``: ``flops_per_token``,
    ``dtype``, ``seq_len`` (default: :func:`attended_span` of the run's data), ``lora_rank``;
    None when its model's ``config.json`` cannot be found."""
    import yaml

    cfg = yaml.safe_load((output_dir / "config.yaml").read_text())
    model_config = model_config_for_run(cfg)
    if model_config is None:
        return None
    seq_len = seq_len or attended_span(data_lengths(cfg))
    rank, targets = lora_for_run(cfg)
    return {
        "flops_per_token": model_flops_per_token(model_config, seq_len, rank, targets),
        "dtype": run_dtype(cfg),
        "seq_len": seq_len,
        "lora_rank": rank,
        "model_config": model_config,
    }


def peak_dtypes(needed: Iterable[str] = ()) -> tuple[str, ...]:
    """The dtypes worth a peak: fp32, and bf16 where a name in ``needed`` (a dtype, a setting)
    says bf16 or the CPU multiplies bf16 in hardware (emulated, its products take minutes to
    time for a figure nobody uses)."""
    if any("bf16" in name for name in needed) or has_bf16_instructions() is not False:
        return ("fp32", "bf16")
    return ("fp32",)


def measure_peaks(
    config: dict[str, Any], tokens: int, seconds: float, dtypes: Sequence[str] = ("fp32", "bf16")
) -> dict[str, float]:
    """FLOP/s by dtype name: ``{dtype}`` on the model's projections (``tokens`` rows) and
    ``{dtype}_square`` on a 2,048^3 product, each measured for about ``seconds``."""
    peaks = {}
    for name in dtypes:
        peaks[name] = matmul_peak(DTYPES[name], projection_shapes(config, tokens), seconds=seconds)
        peaks[f"{name}_square"] = matmul_peak(DTYPES[name], [SQUARE], seconds=seconds / 2)
    return peaks


def cpu_header() -> str:
    """One line: the CPU, its threads in use and the flags that decide its matmul rate."""
    flags = cpu_flags()
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in REPORTED_FLAGS)
    bf16 = {True: "yes", False: "no (emulated)", None: "unknown"}[has_bf16_instructions(flags)]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads; flags: {shown}; bf16 instructions: {bf16}"
    )


def _run_throughput(output_dir: Path, warmup: int) -> tuple[float, int]:
    """A run's tokens/s after ``warmup`` steps and its mean input tokens a step."""
    from benchmarks.harness import read_metrics, steady_state

    records = read_metrics(output_dir)
    try:
        tokens_per_second = steady_state(records, warmup)["tokens_per_second"]
    except ValueError:  # not every step logged: from the first logged step to the last
        first, last = records[0], records[-1]
        seconds = last["elapsed_s"] - first["elapsed_s"]
        if len(records) < 2 or seconds <= 0:
            raise
        tokens_per_second = (last["tokens_seen"] - first["tokens_seen"]) / seconds
    per_step = records[-1]["tokens_seen"] / records[-1]["step"]
    return tokens_per_second, max(1, round(per_step))


def _peak_cell(peaks: dict[str, float], dtype: str) -> str:
    if dtype not in peaks:
        return "not measured (emulated here)"
    return f"{peaks[dtype] / 1e9:,.1f} (2048^3: {peaks[f'{dtype}_square'] / 1e9:,.1f})"


def report(figures: dict[str, Any]) -> str:
    """The Markdown table of :func:`main`'s figures."""
    peaks = figures["peaks"]
    lines = [
        f"CPU: {figures['cpu']}",
        "",
        "| fp32 peak GFLOP/s | bf16 peak GFLOP/s | dtype | tokens/s | MFLOP/token | "
        "achieved GFLOP/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {_peak_cell(peaks, 'fp32')} | {_peak_cell(peaks, 'bf16')} "
        f"| {figures['dtype']} | {figures['tokens_per_second']:,.0f} "
        f"| {figures['flops_per_token'] / 1e6:,.1f} | {figures['achieved_flops'] / 1e9:,.1f} "
        f"| {figures['mfu']:.1%} |",
        "",
        f"attended span {figures['seq_len']:,.0f}, {figures['tokens_per_batch']} tokens a matmul, "
        f"{'LoRA r=' + str(figures['lora_rank']) if figures['lora_rank'] else 'full'}; "
        "peaks: torch.mm on the model's projection shapes (the square 2048^3 for reference)",
    ]
    return "\n".join(lines)


def sft_run_config(parser: argparse.ArgumentParser, run: Path) -> Any:
    """A finished full or LoRA SFT run's config (its ``config.yaml``), for re-running its steps
    in process; anything else is one line through ``parser.error``."""
    from omegaconf import OmegaConf

    config_file = run / "config.yaml"
    if not config_file.is_file():
        parser.error(f"{config_file} not found: give the output_dir of a fine-tuning run")
    cfg = OmegaConf.load(config_file)
    if cfg.get("quantization") is not None or "preference" in str(cfg.dataset.get("_component_")):
        parser.error(f"{run}: a full or LoRA SFT run's config is needed (no QAT, no DPO)")
    return cfg


def rerun_config(cfg: Any, output_dir: str, max_steps: int, **overrides: Any) -> Any:
    """``cfg`` re-run for ``max_steps`` into ``output_dir``: no checkpoints along the way, no
    trackers, no resuming, every step logged (``overrides`` on top)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(
        cfg,
        {
            "output_dir": output_dir,
            "max_steps": max_steps,
            "epochs": max(1, cfg.get("epochs", 1)),
            "log_every_n_steps": 1,
            "checkpointer": {
                **OmegaConf.to_container(cfg.checkpointer),
                "save_every_n_steps": None,
            },
            "metric_loggers": None,
            "resume_from_checkpoint": None,
            **overrides,
        },
    )


def median_and_quartiles(values: Sequence[float]) -> tuple[float, list[float]]:
    """The median of ``values`` and their first and third quartiles (one value: itself)."""
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), [quartiles[0], quartiles[2]]


def print_and_save(text: str, figures: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Print ``text``; write ``figures`` as JSON to ``path`` when given. Returns ``figures``."""
    print(text)
    if path is not None:
        path.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="a run's output_dir")
    parser.add_argument("--config-json", type=Path, help="the model's config.json")
    parser.add_argument("--tokens-per-second", type=float, help="without a run folder")
    parser.add_argument(
        "--seq-len", type=float, help="attention's span (default: the run's data's, attended_span)"
    )
    parser.add_argument("--tokens-per-batch", type=int, help="M of the timed products")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the run's, else fp32")
    parser.add_argument("--lora-rank", type=int, help="without a run folder: LoRA, all-linear")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--seconds", type=float, default=2.0, help="measurement per dtype")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    run: dict[str, Any] = {}
    if args.run is not None:
        try:
            run = flops_for_run(args.run, args.seq_len) or {}
        except AttuneError as error:  # the run's data is not readable here
            parser.error(
                f"{args.run}: attention's span needs the run's data: {error} (or give --seq-len)"
            )
        tokens_per_second, tokens_per_batch = _run_throughput(args.run, args.warmup)
    elif args.config_json is None or args.tokens_per_second is None:
        parser.error("give a run folder, or --config-json and --tokens-per-second")
    if args.config_json is not None:  # an explicit config wins over the run's
        config = json.loads(args.config_json.read_text())
        rank = args.lora_rank if args.lora_rank is not None else run.get("lora_rank")
        seq_len = args.seq_len or run.get("seq_len") or 2048
        run = {
            **run,
            "flops_per_token": model_flops_per_token(config, seq_len, rank),
            "seq_len": seq_len,
            "lora_rank": rank,
            "model_config": config,
        }
    elif not run:
        parser.error(f"no model config.json found for {args.run}: give --config-json")
    if args.tokens_per_second is not None:
        tokens_per_second = args.tokens_per_second
    if args.tokens_per_batch is not None or args.run is None:
        tokens_per_batch = args.tokens_per_batch or 2048
    dtype = args.dtype or run.get("dtype", "fp32")

    peaks = measure_peaks(run["model_config"], tokens_per_batch, args.seconds, peak_dtypes([dtype]))
    achieved = tokens_per_second * run["flops_per_token"]
    figures = {
        "cpu": cpu_header(),
        "cpu_flags": sorted(set(REPORTED_FLAGS) & cpu_flags()),
        "torch_threads": torch.get_num_threads(),
        "peaks": peaks,
        "dtype": dtype,
        "tokens_per_second": tokens_per_second,
        "tokens_per_batch": tokens_per_batch,
        "seq_len": run["seq_len"],
        "lora_rank": run["lora_rank"],
        "flops_per_token": run["flops_per_token"],
        "achieved_flops": achieved,
        "mfu": mfu(tokens_per_second, run["flops_per_token"], peaks[dtype]),
    }
    return print_and_save(report(figures), figures, args.json)


if __name__ == "__main__":
    main()
