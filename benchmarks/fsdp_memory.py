"""Per-process memory for parameters, gradients and optimizer state with 1, 2, ... processes.

Writes a Llama-shaped checkpoint of random weights (about 110M parameters, 440 MB in fp32),
then runs ``full_finetune_distributed`` on the CPU (gloo) for a few steps with each process
count and reads ``state_memory_gb`` from ``metrics.jsonl``: each process's shards of the fp32
parameters, their gradients and AdamW's two moments. With N processes it should be about 1/N
of one process's figure.

    python benchmarks/fsdp_memory.py                  # 1 and 2 processes
    python benchmarks/fsdp_memory.py --processes 1 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()

    import torch
    import transformers

    from attune.demo.tiny import write_tokenizer

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        model_dir = root / "model"
        model_dir.mkdir()
        write_tokenizer(model_dir)
        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=512,
            eos_token_id=2,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
        tune = str(Path(sys.executable).parent / "tune")
        results = {}
        for processes in args.processes:
            out = root / f"run{processes}"
            command = [tune, "run"]
            if processes > 1:
                command += ["--nproc_per_node", str(processes)]
            command += [
                "full_finetune_distributed",
                "--config",
                "tiny/full",
                f"output_dir={out}",
                "model._component_=attune.models.from_pretrained",
                f"model.path={model_dir}",
                "tokenizer._component_=attune.tokenizer.from_pretrained",
                f"tokenizer.path={model_dir}",
                "~answer_check",
                "~validation_dataset",
                "max_steps=2",
                "log_every_n_steps=1",
                "batch_size=2",
                f"dataset.cache_dir={root / 'hf'}",
                "checkpointer.save_every_n_steps=null",
            ]
            subprocess.run(command, check=True, capture_output=True, text=True)
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            results[processes] = last["state_memory_gb"]
            params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
            print(
                json.dumps(
                    {
                        "processes": processes,
                        "parameters": params,
                        "state_memory_gb_per_process": round(results[processes], 3),
                        "ratio_to_one_process": round(
                            results[processes] / results[args.processes[0]], 3
                        ),
                    }
                )
            )


if __name__ == "__main__":
    main()
