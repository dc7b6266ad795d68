"""Tokenization throughput of ``instruct_dataset``, and the time of a second run (cache hit).

Writes ``--rows`` Alpaca-sized rows (instruction ~13 words, an input on 40% of rows, output ~50
words; seeded random words), trains a byte-level BPE tokenizer on them (``--vocab`` entries,
with Llama 3's special tokens) and uses the built-in ``llama3`` chat template. Then it builds
the dataset twice with a fresh ``datasets`` cache: the first build loads the JSON and tokenizes
every row (rendering the template and deriving the assistant mask); the second must only read
the cache.

    python benchmarks/tokenize_throughput.py                 # 50,000 rows, 1 process
    python benchmarks/tokenize_throughput.py --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
SPECIAL.append("<|eot_id|>")


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "so", "ve", "du", "pin", "tha", "or", "ex", "al"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)})

    def sentence(mean: int) -> str:
        length = max(1, int(rng.gauss(mean, mean / 2)))
        return " ".join(rng.choices(words, k=length)).capitalize() + "."

    return [
        {
            "instruction": sentence(13),
            "input": sentence(8) if rng.random() < 0.4 else "",
            "output": " ".join(sentence(12) for _ in range(rng.randint(2, 6))),
        }
        for _ in range(count)
    ]


def make_tokenizer_folder(folder: Path, rows: list[dict[str, str]], vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((row["output"] for row in rows), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--vocab", type=int, default=8_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import datasets

    from attune.data import instruct_dataset
    from attune.tokenizer import from_pretrained

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        rows = make_rows(args.rows, args.seed)
        source = root / "alpaca.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        make_tokenizer_folder(root / "tokenizer", rows, args.vocab)
        tokenizer = from_pretrained(root / "tokenizer", chat_template="llama3")
        cache = str(root / "cache")

        timings = []
        for _ in range(2):
            start = time.perf_counter()
            dataset = instruct_dataset(
                tokenizer, str(source), num_proc=args.num_proc, cache_dir=cache
            )
            timings.append(time.perf_counter() - start)
        tokens = dataset.num_tokens()
        print(
            json.dumps(
                {
                    "rows": len(dataset),
                    "tokens": tokens,
                    "mean_tokens_per_row": round(tokens / len(dataset), 1),
                    "num_proc": args.num_proc,
                    "first_run_s": round(timings[0], 2),
                    "rows_per_s": round(len(dataset) / timings[0]),
                    "second_run_s": round(timings[1], 3),
                }
            )
        )


if __name__ == "__main__":
    main()
