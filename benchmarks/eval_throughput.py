"""Evaluation throughput: requests per second of attune's lm-eval model (``AttuneLM``) and of
lm-eval's own ``HFLM``, on the same checkpoint and the same requests, for each request type.

Writes a random-weight Llama-shaped HF folder (``--hidden``, ``--layers``, ``--vocab``; the demo
tokenizer and its ChatML template), builds the requests of the shipped local tasks once with
lm-eval (``attune_reverse_words_mc`` -> ``loglikelihood``, ``attune_reverse_words_rolling`` ->
``loglikelihood_rolling``, ``attune_reverse_words_gen`` -> ``generate_until``; through the chat
template, with ``--num-fewshot`` examples in each prompt), then times each model answering each
type's requests (after one untimed warm-up pass over a few of them), alternating the two models
``--reps`` times and keeping each one's best, in wall-clock time (requests per second) and in
the process's CPU time (requests per CPU second: steadier on a machine shared with other work).
The answers are compared too: the largest log-likelihood difference and how many generations
differ. Prints one JSON object.

    python benchmarks/eval_throughput.py                            # ~13M parameters, fp32, CPU
    python benchmarks/eval_throughput.py --num-fewshot 5 --threads 1
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST_TYPES = {
    "loglikelihood": "attune_reverse_words_mc",
    "loglikelihood_rolling": "attune_reverse_words_rolling",
    "generate_until": "attune_reverse_words_gen",
}


def write_checkpoint(folder: Path, args: argparse.Namespace) -> None:
    """A random Llama (transformers' own init) with the demo tokenizer."""
    import torch
    import transformers

    from attune.demo.tiny import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    config = transformers.LlamaConfig(
        vocab_size=max(args.vocab, len(vocab) + 3),  # at least the tokenizer's ids
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=2048,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def build_requests(lm: Any, tasks_dir: Path, args: argparse.Namespace) -> dict[str, list]:
    """Each request type's requests (lm-eval ``Instance``s), as the evaluator builds them."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    loaded = manager.load(list(REQUEST_TYPES.values()))["tasks"]
    requests: dict[str, list] = {}
    for kind, name in REQUEST_TYPES.items():
        task = loaded[name]
        task.set_config(key="num_fewshot", value=args.num_fewshot)
        task.set_fewshot_seed(seed=0)
        task.build_all_requests(
            limit=args.limit,
            apply_chat_template=True,
            chat_template=lm.apply_chat_template,
            tokenizer_name=lm.tokenizer_name,
        )
        instances = [i for i in task.instances for _ in range(i.repeats)] * args.repeat
        requests[kind] = instances
    return requests


def timed(lm: Any, kind: str, requests: list) -> tuple[float, float, list]:
    """Wall-clock seconds, CPU seconds and the answers of ``lm`` to ``requests``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    answers = getattr(lm, kind)(requests, disable_tqdm=True)
    return time.perf_counter() - start, time.process_time() - start_cpu, answers


def compare(kind: str, ours: list, theirs: list) -> dict[str, float]:
    if kind == "generate_until":
        return {"generations_differing": sum(a != b for a, b in zip(ours, theirs, strict=True))}
    first = [a[0] if isinstance(a, tuple) else a for a in ours]
    second = [b[0] if isinstance(b, tuple) else b for b in theirs]
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(first, second, strict=True))
    return {"max_relative_logprob_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=50, help="documents per task (<= 50)")
    parser.add_argument("--repeat", type=int, default=1, help="answer each request this often")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own)")
    parser.add_argument("--types", nargs="+", default=list(REQUEST_TYPES), choices=REQUEST_TYPES)
    parser.add_argument("--folder", type=Path, help="an HF folder to use instead of a random one")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from attune.evaluation import local_task_folder
    from attune.evaluation.lm import AttuneLM
    from attune.models import from_pretrained
    from attune.tokenizer import from_pretrained as tokenizer_from_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        folder = args.folder or root / "model"
        if args.folder is None:
            write_checkpoint(folder, args)
        model = from_pretrained(folder, dtype=dtype, device=args.device).eval()
        systems = {
            "attune": AttuneLM(
                model,
                tokenizer_from_pretrained(folder),
                batch_size=args.batch_size,
            ),
            "hflm": HFLM(
                pretrained=str(folder),
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
            ),
        }
        requests = build_requests(systems["attune"], local_task_folder(root / "tasks"), args)
        parameters = sum(p.numel() for p in model.parameters())
        report: dict[str, Any] = {
            "parameters": parameters,
            "device": args.device,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "num_fewshot": args.num_fewshot,
            "torch_threads": torch.get_num_threads(),
        }
        for kind in args.types:
            batch = requests[kind]
            best = {name: math.inf for name in systems}
            best_cpu = {name: math.inf for name in systems}
            answers: dict[str, list] = {}
            for lm in systems.values():  # warm-up: allocations, kernels, caches
                timed(lm, kind, batch[: args.batch_size])
            for _ in range(args.reps):
                for name, lm in systems.items():
                    seconds, cpu_seconds, answers[name] = timed(lm, kind, batch)
                    best[name] = min(best[name], seconds)
                    best_cpu[name] = min(best_cpu[name], cpu_seconds)
            rates = {name: len(batch) / seconds for name, seconds in best.items()}
            cpu_rates = {name: len(batch) / seconds for name, seconds in best_cpu.items()}
            report[kind] = {
                "requests": len(batch),
                "attune_requests_per_second": round(rates["attune"], 2),
                "hflm_requests_per_second": round(rates["hflm"], 2),
                "speedup": round(rates["attune"] / rates["hflm"], 2),
                "attune_requests_per_cpu_second": round(cpu_rates["attune"], 2),
                "hflm_requests_per_cpu_second": round(cpu_rates["hflm"], 2),
                "cpu_speedup": round(cpu_rates["attune"] / cpu_rates["hflm"], 2),
                **compare(kind, answers["attune"], answers["hflm"]),
            }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
