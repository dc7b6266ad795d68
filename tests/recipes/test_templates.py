"""Chat templates end to end: a base checkpoint with an instruct template (its EOS is not the
template's end of turn), and plain-text rows for a checkpoint with no template at all."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from attune import tokenizer as attune_tokenizer
from attune.demo.tiny import tiny_checkpoint
from tests.recipes.conftest import records, run_tune_in_process, train, write_config


def copy_folder(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content))


@pytest.fixture
def base_with_instruct_template(tmp_path, tiny_cache) -> Path:
    """The tiny model as a base checkpoint ships: its EOS is ``<|endoftext|>`` (id 0) in every
    file, while its ChatML template ends turns with ``<|im_end|>`` (id 2), which the model
    (pre-trained on chats) produces at the end of an answer."""
    folder = copy_folder(tiny_checkpoint(tiny_cache["ATTUNE_CACHE"]), tmp_path / "base")
    edit_json(folder / "tokenizer_config.json", eos_token="<|endoftext|>")
    edit_json(folder / "config.json", eos_token_id=0)
    edit_json(folder / "generation_config.json", eos_token_id=0)
    return folder


def test_a_base_checkpoint_trains_with_an_instruct_template_and_stops_at_its_end_of_turn(
    tmp_path, base_with_instruct_template
):
    transformers = pytest.importorskip("transformers")
    base = base_with_instruct_template
    tok = attune_tokenizer.from_pretrained(base)
    assert (tok.eos_id, tok.token_id(tok.end_of_turn_token())) == (0, 2)
    config = write_config(tmp_path, base, "tiny/full", max_steps=2, **{"optimizer.lr": 1e-5})
    train("full_finetune_single_device", config)
    saved = tmp_path / "run" / "checkpoints" / "step_2"

    # generation_config.json lists the template's end of turn after the EOS, as instruct
    # releases do, and transformers reads it so
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert transformers.GenerationConfig.from_pretrained(saved).eos_token_id == [0, 2]

    # attune's generate stops at <|im_end|>, as transformers' generate does with that file
    prompt = "Repeat these words: cat dog sun"
    generate = tmp_path / "generate.yaml"
    generate.write_text(
        "base: tiny/generate\n"
        f"model: {{_component_: attune.models.from_pretrained, path: {saved}}}\n"
        f"tokenizer: {{_component_: attune.tokenizer.from_pretrained, path: {saved}}}\n"
        f"max_new_tokens: 24\nprompts: [{json.dumps(prompt)}]\n"
    )
    output = tmp_path / "answers.jsonl"
    result = run_tune_in_process(
        "run", "generate", "--config", str(generate), f"output_file={output}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(output.read_text())["tokens"]
    assert answer[-1] == 2 and len(answer) < 24, answer
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
    assert answer == expected[0, len(ids) :].tolist()


ROWS = [
    {"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}."}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 1), (6, 3), (9, 9)]
]
PAIRS = [
    {"prompt": row["prompt"], "chosen": row["completion"], "rejected": " I do not know."}
    for row in ROWS
]


@pytest.fixture
def without_template(tmp_path, checkpoint) -> Path:
    """The small checkpoint with no chat template (a base model's tokenizer)."""
    folder = copy_folder(checkpoint, tmp_path / "no_template")
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    return folder


def test_plain_text_rows_train_sft_on_the_completion_and_eos(tmp_path, without_template):
    """No template: each row is prompt + completion + EOS, and exactly the completion and the
    EOS are trained, for every row of the epoch."""
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = write_config(
        tmp_path,
        without_template,
        "tiny/full",
        dataset_builder="attune.data.instruct_dataset",
        max_steps=None,
        **{"dataset.source": str(source), "dataset.max_seq_len": 64},
    )
    train("full_finetune_single_device", config)
    logged = records(tmp_path / "run")
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) for r in logged)
    tok = attune_tokenizer.from_pretrained(without_template)
    expected = sum(len(tok.encode(row["completion"], add_special_tokens=False)) + 1 for row in ROWS)
    assert sum(r["trained_tokens"] for r in logged) == expected


def test_plain_text_preference_rows_train_dpo(tmp_path, without_template):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    config = write_config(
        tmp_path,
        without_template,
        "tiny/dpo_lora",
        dataset_builder="attune.data.preference_dataset",
        max_steps=2,
        **{"dataset.source": str(source)},
    )
    train("lora_dpo_single_device", config)
    logged = records(tmp_path / "run")
    # step 1 is DPO with the policy equal to the reference: ln 2 on the 4 pairs of the batch
    assert abs(logged[0]["loss"] - math.log(2)) < 1e-6
    assert logged[0]["pairs"] == 4 and len(logged) == 2
