"""The same recipe on 2 processes (gloo, CPU): the losses of 1 process with the same global
batch, resume across process counts, and outputs that transformers and peft load."""

import json
import shutil

import pytest
import torch

from attune import models
from attune.peft import load_adapter
from tests.recipes.conftest import losses, records, small_llama, train, write_config

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


# Rounding to a coarse grid turns the ~1e-7 float differences between summing gradients on 1
# or 2 processes into weights that land a grid step apart: measured, a 1e-7 relative nudge to
# every weight of this model moves its fake-quantized loss by ~5e-4, and runs drift apart from
# there. From the same weights (step 1) the loss and gradient norm agree to float rounding.
QAT_DRIFT = 1e-2


@pytest.mark.slow
def test_qat_on_two_processes_gives_the_first_step_of_one_and_resumes_exactly(tmp_path, checkpoint):
    """FSDP2 over fake-quantized layers: step 1's loss and gradient norm of one process (and
    not full precision's loss), later steps within the drift rounding amplifies, a quantized
    export scored on both counts, and an exact resume."""
    validation = {
        "_component_": "attune.demo.reverse_words_dataset",
        "split": "test",
        "cache_dir": str(tmp_path / "hf_cache"),
    }
    overrides = {
        "max_steps": 4,
        "quantization.scheme": "int2_weight_only",
        "checkpointer.save_every_n_steps": 2,
        "checkpointer.keep_last_n": None,
        "validation_dataset": validation,
    }
    configs, results = {}, {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        configs[processes] = write_config(folder, checkpoint, "tiny/qat", **overrides)
        run_on(processes, "qat_distributed", configs[processes])
        results[processes] = folder / "run"
    first = [records(results[n])[0] for n in (1, 2)]
    assert abs(first[0]["loss"] - first[1]["loss"]) < 1e-5, first
    assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-5), first
    one, two = losses(results[1]), losses(results[2])
    assert close(one, two, QAT_DRIFT), (one, two)
    plain = losses_without_fake_quant(tmp_path, checkpoint, overrides)
    assert abs(one[0] - plain[0]) > 1e-3, (one, plain)
    ends = [records(results[n])[-1] for n in (1, 2)]
    assert abs(ends[0]["val_loss_quantized"] - ends[1]["val_loss_quantized"]) < QAT_DRIFT, ends

    # resume is exact on one count (across counts the drift above applies)
    shutil.rmtree(results[1] / "checkpoints" / "step_4")
    run_on(1, "qat_distributed", configs[1], "resume_from_checkpoint=true")
    assert close(losses(results[1]), one, 1e-6), (losses(results[1]), one)


def losses_without_fake_quant(tmp_path, checkpoint, overrides):
    """The same run in full precision."""
    folder = tmp_path / "plain"
    folder.mkdir()
    plain = {**overrides, "validation_dataset": None}
    plain.pop("quantization.scheme")
    run_on(1, "full_finetune_distributed", write_config(folder, checkpoint, "tiny/full", **plain))
    return losses(folder / "run")
