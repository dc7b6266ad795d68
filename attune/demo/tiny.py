"""The ``tiny`` family: a small Llama-shaped checkpoint made by the package itself.

No machine of the project reaches a model hub, so demos and tests need a model that exists
without downloading. It is an ordinary HF folder: ``config.json`` (``model_type: llama``),
``model.safetensors``, a byte-level BPE ``tokenizer.json`` trained with the ``tokenizers``
library on the demo task's text, and a ``tokenizer_config.json`` with the ChatML chat template.
Its weights start random (seeded) and are trained for a few seconds on one task, repeating three
words in order, so it arrives as a "base model" with a behaviour of its own; the demo configs
then fine-tune it to reverse the words instead, and its answers before and after show the change.

The package ships that folder (``attune/demo/tiny_base``, 3.5 MB), made by
:func:`build_tiny_base` (``python -m attune.demo.tiny``): the pre-training is chaotic, so CPUs
that round differently (AVX2 against AVX-512 kernels) end it with different weights, and every
demo figure and test threshold would depend on the machine that built it.
:func:`tiny_checkpoint` copies the shipped folder into a cache folder (``$ATTUNE_CACHE`` or
``~/.cache/attune``) on first use, where runs find it by path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from attune.checkpoint import atomic_folder, exclusive_lock
from attune.data.collate import labels_from_mask, pad_collate
from attune.data.formats import instruction_messages
from attune.demo.reverse_words import corpus, echo_rows
from attune.models import TransformerDecoder, from_hf_config, from_pretrained, save_pretrained
from attune.tokenizer import BUILTIN_TEMPLATES, Tokenizer
from attune.tokenizer import from_pretrained as tokenizer_from_pretrained
from attune.training import ChunkedCrossEntropy, backward_step, constant_with_warmup, optimizer_step

VERSION = 2  # bump when the shipped weights change, so stale caches are not reused
SHIPPED = Path(__file__).resolve().parent / "tiny_base"
SHIPPED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json",
)  # fmt: skip
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 32
VOCAB_SIZE = 576  # room for every merge of the demo text (about 564 tokens)
HF_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def cache_root() -> Path:
    return Path(os.environ.get("ATTUNE_CACHE", Path.home() / ".cache" / "attune"))


def write_tokenizer(folder: Path) -> None:
    """Train the tiny BPE tokenizer and write it, with its config and template, into ``folder``."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": BUILTIN_TEMPLATES["chatml"],
        "model_max_length": HF_CONFIG["max_position_embeddings"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _pretrain(model: TransformerDecoder, tokenizer: Tokenizer) -> None:
    """Teach the random model the echo task (:func:`~attune.demo.reverse_words.echo_rows`),
    seeded, in a few seconds of CPU time."""
    torch.manual_seed(0)
    examples = []
    for row in echo_rows(PRETRAIN_STEPS * PRETRAIN_BATCH):
        tokens, mask = tokenizer.tokenize_messages(instruction_messages(row))
        examples.append({"tokens": tokens, "labels": labels_from_mask(tokens, mask)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = constant_with_warmup(optimizer, PRETRAIN_STEPS, num_warmup_steps=20)
    loss_fn = ChunkedCrossEntropy()
    model.train()
    for start in range(0, len(examples), PRETRAIN_BATCH):
        batch = pad_collate(examples[start : start + PRETRAIN_BATCH], pad_id=0)
        backward_step(model, [batch], loss_fn, torch.device("cpu"))
        optimizer_step(model.parameters(), optimizer, schedule, max_grad_norm=1.0)
    model.eval()


def _write_model(folder: Path, tokenizer_folder: Path) -> None:
    model = from_hf_config(HF_CONFIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "lm_head.weight":
                # logits of a useful range from the start (std 1 for unit-RMS hidden states)
                param.normal_(0.0, HF_CONFIG["hidden_size"] ** -0.5, generator=generator)
            else:
                param.normal_(0.0, HF_CONFIG["initializer_range"], generator=generator)
    _pretrain(model, tokenizer_from_pretrained(tokenizer_folder))
    save_pretrained(model, folder, source=tokenizer_folder)  # copies the tokenizer files


def tiny_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The tiny checkpoint's folder in the cache, copied from the package first if it is not
    there yet."""
    folder = Path(cache_dir or cache_root()) / f"tiny-v{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    # every rank of a torchrun job asks at once: one builds, the others wait and reuse it
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            _write_checkpoint(folder)
    return folder


def _write_checkpoint(folder: Path) -> None:
    with atomic_folder(folder) as staging:
        for name in SHIPPED_FILES:
            shutil.copyfile(SHIPPED / name, staging / name)


def build_tiny_base(folder: Path) -> None:
    """Make the tiny checkpoint from scratch into ``folder`` (a new one): train the tokenizer,
    initialise the weights (seeded) and pre-train them on the echo task. This is how the
    shipped ``tiny_base`` was made; rebuilding gives the same folder on a CPU of the same
    kind (vector width) only."""
    with atomic_folder(folder) as staging, tempfile.TemporaryDirectory() as scratch:
        # save_pretrained writes a folder of its own: build beside, then move in
        tokenizer_folder = Path(scratch) / "tokenizer"
        tokenizer_folder.mkdir()
        write_tokenizer(tokenizer_folder)
        _write_model(Path(scratch) / "tiny", tokenizer_folder)
        for file in (Path(scratch) / "tiny").iterdir():
            shutil.move(str(file), staging / file.name)


def tiny_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_labels: int | None = None,
) -> TransformerDecoder:
    """The tiny model, loaded from its cached checkpoint; with ``num_labels``, with a fresh
    score head instead of its output projection (a reward or value model to train)."""
    return from_pretrained(tiny_checkpoint(), dtype=dtype, device=device, num_labels=num_labels)


def tiny_tokenizer() -> Tokenizer:
    """The tiny model's tokenizer, with its ChatML template."""
    return tokenizer_from_pretrained(tiny_checkpoint())


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED
    build_tiny_base(target)  # replaces the folder once the new one is complete
    print(f"wrote {target}")
