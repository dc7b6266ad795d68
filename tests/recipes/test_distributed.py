"""The same recipe on 2 processes (gloo, CPU): the losses of 1 process with the same global
batch, resume across process counts, and outputs that transformers and peft load."""

import json
import shutil

import pytest
import torch

from attune import models
from attune.peft import load_adapter
from tests.recipes.conftest import losses, small_llama, train, write_config

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130]])
CASES = [("full_finetune_distributed", "tiny/full"), ("lora_finetune_distributed", "tiny/lora")]


def run_on(processes, recipe, config, *overrides):
    """Train on ``processes`` processes with the same global batch of 4."""
    launcher = ("--nproc_per_node", str(processes)) if processes > 1 else ()
    return train(recipe, config, f"batch_size={4 // processes}", *overrides, launcher=launcher)


def close(a, b, tolerance=1e-5):
    return len(a) == len(b) and all(abs(x - y) < tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("recipe", "base"), CASES)
def test_two_processes_give_the_losses_and_outputs_of_one_and_resume_on_the_other(
    tmp_path, checkpoint, recipe, base
):
    """One run on each process count, checkpointed at step 3: the same losses and outputs;
    then each resumes from step 3 on the other count with the uninterrupted losses."""
    overrides = {
        "max_steps": 6,
        "checkpointer.save_every_n_steps": 3,
        "checkpointer.keep_last_n": None,
    }
    configs, results = {}, {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        configs[processes] = write_config(folder, checkpoint, base, **overrides)
        run_on(processes, recipe, configs[processes])
        results[processes] = folder / "run"
    one, two = losses(results[1]), losses(results[2])
    assert close(one, two), (one, two)
    saved = {n: results[n] / "checkpoints" / "step_6" for n in (1, 2)}
    if base == "tiny/full":
        logits = {n: models.from_pretrained(saved[n])(TOKENS).detach() for n in (1, 2)}
        transformers = pytest.importorskip("transformers")
        reference = transformers.AutoModelForCausalLM.from_pretrained(saved[2]).eval()
        with torch.no_grad():
            assert (reference(TOKENS).logits - logits[2]).abs().max().item() < 1e-4
    else:
        logits = {}
        for n in (1, 2):
            model = models.from_pretrained(checkpoint)
            load_adapter(model, saved[n])
            logits[n] = model(TOKENS).detach()
        peft = pytest.importorskip("peft")
        transformers = pytest.importorskip("transformers")
        base_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        reference = peft.PeftModel.from_pretrained(base_model, saved[2]).eval()
        with torch.no_grad():
            assert (reference(TOKENS).logits - logits[2]).abs().max().item() < 1e-4
    assert (logits[1] - logits[2]).abs().max().item() < 1e-4

    for first, then in ((2, 1), (1, 2)):
        straight = losses(results[first])
        shutil.rmtree(results[first] / "checkpoints" / "step_6")
        run_on(then, recipe, configs[first], "resume_from_checkpoint=true")
        resumed = losses(results[first])
        assert close(resumed, straight), (first, then, resumed, straight)
        records = [json.loads(line) for line in (results[first] / "metrics.jsonl").open()]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_tied_embeddings_stay_tied_when_sharded(tmp_path):
    checkpoint = small_llama(tmp_path / "tied", tie_word_embeddings=True)
    results = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        run_on(
            processes,
            "full_finetune_distributed",
            write_config(folder, checkpoint, "tiny/full", max_steps=4),
        )
        results[processes] = folder / "run"
    assert close(losses(results[1]), losses(results[2]))
    saved = [models.from_pretrained(results[n] / "checkpoints" / "step_4") for n in (1, 2)]
    assert saved[1].lm_head.weight is saved[1].embed_tokens.weight
    assert (saved[0](TOKENS) - saved[1](TOKENS)).abs().max().item() < 1e-4
