"""The generate recipe answers as transformers' greedy generate does, with or without an
adapter."""

import json
import shutil

import pytest
import torch

from attune import models, tokenizer
from attune.peft import LoRALinear, LoraSettings, apply_lora, save_adapter
from tests.conftest import run_tune

PROMPTS = ["Reverse the order of these words: red boat sky", "Repeat these words: cat dog"]


@pytest.fixture(scope="module")
def sharp_checkpoint(checkpoint, tmp_path_factory):
    """The small checkpoint with wider weights, so greedy choices are not near-ties."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("sharp")
    for file in checkpoint.iterdir():
        shutil.copy(file, folder / file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.15, generator=generator)
    model.save_pretrained(folder)
    return folder


def run_generate(checkpoint, tmp_path, *extra):
    config = tmp_path / "generate.yaml"
    config.write_text(
        "base: tiny/generate\n"
        f"model: {{_component_: attune.models.from_pretrained, path: {checkpoint}}}\n"
        f"tokenizer: {{_component_: attune.tokenizer.from_pretrained, path: {checkpoint}}}\n"
        "max_new_tokens: 6\n"
        f"prompts: {json.dumps(PROMPTS)}\n"
    )
    output = tmp_path / "answers.jsonl"
    result = run_tune("run", "generate", "--config", str(config), f"output_file={output}", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def prompt_ids(tok, prompt):
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_greedy_answers_equal_transformers_generate(tmp_path, sharp_checkpoint):
    transformers = pytest.importorskip("transformers")
    tok = tokenizer.from_pretrained(sharp_checkpoint)
    reference = transformers.AutoModelForCausalLM.from_pretrained(sharp_checkpoint).eval()
    expected = []
    for prompt in PROMPTS:
        ids = prompt_ids(tok, prompt)
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id
        )
        expected.append(out[0, len(ids) :].tolist())
    records = run_generate(sharp_checkpoint, tmp_path)
    assert [r["tokens"] for r in records] == expected
    assert [r["prompt"] for r in records] == PROMPTS
    assert records[0]["answer"] == tok.decode(expected[0], skip_special_tokens=True)


def test_an_adapter_changes_the_answers_as_the_adapted_model_gives_them(tmp_path, sharp_checkpoint):
    model = models.from_pretrained(sharp_checkpoint)
    settings = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.5, generator=generator)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter(model, adapter, settings)
    tok = tokenizer.from_pretrained(sharp_checkpoint)
    with torch.no_grad():
        answer = models.generate(model, [prompt_ids(tok, PROMPTS[0])], 6, stop_tokens=[2])[0]
    only_first = f"prompts=['{PROMPTS[0]}']"
    adapted = run_generate(sharp_checkpoint, tmp_path, f"adapter={adapter}", only_first)
    assert [r["tokens"] for r in adapted] == [answer]
    assert adapted != run_generate(sharp_checkpoint, tmp_path, only_first)
