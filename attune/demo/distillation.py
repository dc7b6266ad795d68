"""The knowledge distillation demo's two models, made on first use into the cache beside the
tiny checkpoint (nothing downloaded, nothing shipped):

- the **teacher**: the tiny model fine-tuned on the reversal task (what ``tiny/full`` does) by
  the package's own training step, seeded; a minute or two of CPU time, once.
- the **student**: a smaller model of the same tokenizer, the tiny model with every other of
  its decoder layers (DistilBERT's initialisation from its teacher's layers), which has never
  seen the reversal task.

``tiny/kd`` then distills the teacher into the student; its held-out exact answers rise.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from attune.checkpoint import atomic_folder, exclusive_lock
from attune.data.collate import labels_from_mask, pad_collate
from attune.data.formats import instruction_messages
from attune.demo.reverse_words import reverse_words_rows
from attune.demo.tiny import cache_root, tiny_checkpoint
from attune.models import TransformerDecoder, from_hf_config, from_pretrained, save_pretrained
from attune.tokenizer import from_pretrained as tokenizer_from_pretrained
from attune.training import ChunkedCrossEntropy, backward_step, cosine_with_warmup, optimizer_step

VERSION = 1  # bump when how they are made changes, so stale caches are not reused
TEACHER_STEPS = 1000  # tiny/full's 8 epochs of 125 batches
TEACHER_BATCH = 32
STUDENT_LAYERS = (0, 2)  # of the tiny model's 4


def _cached(name: str, make, cache_dir: str | Path | None) -> Path:
    folder = Path(cache_dir or cache_root()) / f"{name}-v{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    # every rank of a torchrun job asks at once: one builds, the others wait and reuse it
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            with atomic_folder(folder) as staging, tempfile.TemporaryDirectory() as scratch:
                made = Path(scratch) / name
                make(made, tiny_checkpoint(cache_dir))
                for file in made.iterdir():
                    shutil.move(str(file), staging / file.name)
    return folder


def _train_teacher(folder: Path, base: Path) -> None:
    """The tiny model fine-tuned on the reversal task's training rows, seeded."""
    torch.manual_seed(0)
    tokenizer = tokenizer_from_pretrained(base)
    model = from_pretrained(base)
    examples = []
    for row in reverse_words_rows("train"):
        tokens, mask = tokenizer.tokenize_messages(instruction_messages(row))
        examples.append({"tokens": tokens, "labels": labels_from_mask(tokens, mask)})
    order = torch.randperm(len(examples)).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = cosine_with_warmup(optimizer, TEACHER_STEPS, num_warmup_steps=20)
    loss_fn = ChunkedCrossEntropy()
    model.train()
    for step in range(TEACHER_STEPS):
        start = step * TEACHER_BATCH % len(examples)
        picked = [examples[order[(start + i) % len(examples)]] for i in range(TEACHER_BATCH)]
        batch = pad_collate(picked, pad_id=tokenizer.padding_id)
        backward_step(model, [batch], loss_fn, torch.device("cpu"))
        optimizer_step(model.parameters(), optimizer, schedule, max_grad_norm=1.0)
    model.eval()
    save_pretrained(model, folder, source=base)


def _make_student(folder: Path, base: Path) -> None:
    """The tiny model with the decoder layers :data:`STUDENT_LAYERS` only."""
    config = json.loads((base / "config.json").read_text())
    state = from_pretrained(base).state_dict()
    for new, old in enumerate(STUDENT_LAYERS):
        for key in [k for k in state if k.startswith(f"layers.{old}.")]:
            state[f"layers.{new}.{key[len(f'layers.{old}.') :]}"] = state[key]
    student = from_hf_config({**config, "num_hidden_layers": len(STUDENT_LAYERS)})
    student.load_state_dict({k: v for k, v in state.items() if k in student.state_dict()})
    save_pretrained(student, folder, source=base)


def tiny_teacher_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The demo teacher's folder in the cache, trained first if it is not there yet."""
    return _cached("tiny-teacher", _train_teacher, cache_dir)


def tiny_student_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The demo student's folder in the cache, made first if it is not there yet."""
    return _cached("tiny-student", _make_student, cache_dir)


def tiny_teacher(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TransformerDecoder:
    """The demo teacher: the tiny model fine-tuned on the reversal task."""
    return from_pretrained(tiny_teacher_checkpoint(), dtype=dtype, device=device)


def tiny_student(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TransformerDecoder:
    """The demo student: the tiny model with half its decoder layers."""
    return from_pretrained(tiny_student_checkpoint(), dtype=dtype, device=device)
