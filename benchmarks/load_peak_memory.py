"""Peak host memory while loading a sharded HF checkpoint, as a multiple of the weights' size.

Writes a Llama-shaped checkpoint of random weights (bf16, sharded, with its index) into a
temporary folder, then loads it with ``attune.models.from_pretrained`` in a fresh process and
reads the process's resident-memory high-water mark (``VmHWM``) against its resident memory
just before the load, after every weight has been read once (weights loaded in the file's
dtype stay memory-mapped, so the figure right after the load alone would flatter).

    python benchmarks/load_peak_memory.py            # about 320 MB of bf16 weights
    python benchmarks/load_peak_memory.py --layers 16 --load-dtype float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.random_checkpoint import write_random_checkpoint


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_checkpoint(folder: Path, layers: int, shard_mb: int) -> int:
    """A random bf16 Llama-shaped checkpoint; returns the weights' size in bytes."""
    hf_config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    return write_random_checkpoint(folder, hf_config, shard_mb)


def measure(folder: str, dtype: str) -> dict[str, float]:
    """Run in a fresh process: load and report the peak memory added by the load."""
    from attune.models import from_pretrained

    before = _status("VmRSS")
    model = from_pretrained(folder, dtype=getattr(torch, dtype))
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    after_load = _status("VmHWM")
    # Weights loaded in the file's dtype stay memory-mapped until first read: read every page
    # (a 4 KiB page holds 1024 float32 or 2048 bf16 values) so the figure covers them all.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.view(-1)[::512].float().sum()
    return {
        "rss_before_bytes": before,
        "peak_after_load_bytes": after_load,
        "peak_bytes": _status("VmHWM"),
        "loaded_bytes": loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~320 MB)")
    parser.add_argument("--shard-mb", type=int, default=100, help="largest shard, in MB")
    parser.add_argument("--load-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.load_dtype)))
        return
    with tempfile.TemporaryDirectory() as folder:
        size = write_checkpoint(Path(folder), args.layers, args.shard_mb)
        shards = len(list(Path(folder).glob("*.safetensors")))
        run = subprocess.run(
            [sys.executable, __file__, "--measure", folder, "--load-dtype", args.load_dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(run.stdout.strip().splitlines()[-1])
    added = figures["peak_bytes"] - figures["rss_before_bytes"]
    report = {
        "checkpoint_mb": round(size / 1e6, 1),
        "shards": shards,
        "load_dtype": args.load_dtype,
        "loaded_weights_mb": round(figures["loaded_bytes"] / 1e6, 1),
        "added_rss_right_after_load_mb": round(
            (figures["peak_after_load_bytes"] - figures["rss_before_bytes"]) / 1e6, 1
        ),
        "peak_added_rss_mb": round(added / 1e6, 1),
        "peak_over_loaded_weights": round(added / figures["loaded_bytes"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
