"""Tokenizer folders built around real chat templates, for tests that compare with transformers.

``templates/`` holds 20 chat templates exactly as real instruct models ship them, with each
one's special tokens (``special_tokens.json``). :func:`make_tokenizer_folder` trains a small
byte-level BPE with those special tokens and writes a model folder that both attune and
transformers load: ``tokenizer.json`` and ``tokenizer_config.json`` with the template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

TEMPLATES = Path(__file__).parent / "templates"
SPECIAL_TOKENS = json.loads((TEMPLATES / "special_tokens.json").read_text())
TEMPLATE_NAMES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))

CORPUS = [
    "You are a helpful assistant. What is the capital of France? Paris is the capital.",
    "Add 2 and 3. The sum of 2 and 3 is 5. Thanks! You're welcome.",
    "system user assistant tool function call name arguments result weather today",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
] * 4


def template_source(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def make_tokenizer_folder(name: str, folder: Path, base_eos: str | None = None) -> Path:
    """A model folder with a small BPE tokenizer and the real template ``name``.

    Args:
        name: the template.
        folder: where to write.
        base_eos: make it a base checkpoint's folder with the instruct template: this token
            (say ``<|end_of_text|>``) is the EOS, and ``generation_config.json`` lists only it,
            as a base model ships them.
    """
    spec = dict(SPECIAL_TOKENS[name])
    if base_eos is not None:
        spec["extra"] = [*spec.get("extra", []), spec["eos"]]  # still a token of the vocabulary
        spec["eos"] = base_eos
    named = [spec.get(k) for k in ("bos", "eos", "pad", "unk", "end_of_turn")]
    specials = list(dict.fromkeys(t for t in [*named, *spec.get("extra", [])] if t))
    tokenizer = Tokenizer(models.BPE(unk_token=spec.get("unk")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    added = spec.get("added_non_special", [])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.get("bos"),
        "eos_token": spec.get("eos"),
        "pad_token": spec.get("pad"),
        "unk_token": spec.get("unk"),
        "chat_template": template_source(name),
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # As real instruct checkpoints do, generation_config.json lists every token that ends a
    # reply; a base checkpoint's lists its EOS only.
    ends = (spec["eos"],) if base_eos is not None else (spec["eos"], spec["end_of_turn"])
    stops = dict.fromkeys(tokenizer.token_to_id(t) for t in ends)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(stops)}))
    return folder
