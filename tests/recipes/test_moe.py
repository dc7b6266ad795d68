"""Mixture-of-experts models through the real ``tune run``: the router's load-balancing loss
trains and is logged, two processes (experts sharded by FSDP2) equal one, resume is exact
across process counts, and the saved folder loads in transformers with the same logits."""

import shutil

import pytest
import torch

from attune import models
from attune.peft import load_adapter
from tests.conftest import assert_one_line_error
from tests.recipes.conftest import (
    config_file,
    losses,
    records,
    run_tune_in_process,
    small_moe,
    train,
    write_config,
)

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130]])


def close(a, b, tolerance=1e-5):
    return len(a) == len(b) and all(abs(x - y) < tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("recipe", "base"),
    [("full_finetune_distributed", "tiny/full"), ("lora_finetune_distributed", "tiny/lora")],
)
def test_two_processes_equal_one_and_resume_on_the_other(tmp_path, recipe, base):
    checkpoint = small_moe(tmp_path / "model", decoder_sparse_step=1, mlp_only_layers=[1])
    # micro-batches of one row on either count: the router's loss is computed per forward
    # pass (as transformers computes it), so each rank must see the rows one process sees
    overrides = {
        "max_steps": 4,
        "batch_size": 1,
        "checkpointer.save_every_n_steps": 2,
        "checkpointer.keep_last_n": None,
    }
    configs, runs = {}, {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        configs[processes] = write_config(
            folder, checkpoint, base, gradient_accumulation_steps=4 // processes,
            **overrides,
        )  # fmt: skip
        launcher = ("--nproc_per_node", str(processes)) if processes > 1 else ()
        train(recipe, configs[processes], launcher=launcher)
        runs[processes] = folder / "run"
    one, two = losses(runs[1]), losses(runs[2])
    assert close(one, two), (one, two)
    logged = records(runs[2])[0]
    assert logged["router_aux_loss"] > 0.9  # ~1.0 when balanced, > 1 when not
    assert "moe/layer_0/max_load" in logged and "moe/layer_1/max_load" not in logged

    saved = runs[2] / "checkpoints" / "step_4"
    transformers = pytest.importorskip("transformers")
    if base == "tiny/full":
        reference = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
        model = models.from_pretrained(saved)
    else:  # the experts' adapters too, loaded by peft on transformers' model
        peft = pytest.importorskip("peft")
        base_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        reference = peft.PeftModel.from_pretrained(base_model, saved).eval()
        model = models.from_pretrained(checkpoint)
        load_adapter(model, saved)
        assert any("experts" in name for name, _ in model.named_parameters() if "lora" in name)
    with torch.no_grad():
        expected = model.eval()(TOKENS)
        assert (reference(TOKENS).logits - expected).abs().max().item() < 1e-4

    straight = losses(runs[2])
    shutil.rmtree(saved)
    train(recipe, configs[2], "resume_from_checkpoint=true",
          "gradient_accumulation_steps=4")  # fmt: skip
    assert close(losses(runs[2]), straight), (losses(runs[2]), straight)


@pytest.mark.parametrize("config_class", ["Qwen2MoeConfig", "MixtralConfig"])
def test_sft_trains_each_moe_family(tmp_path, config_class):
    checkpoint = small_moe(tmp_path / "model", config_class)
    config = write_config(tmp_path, checkpoint, "tiny/full", max_steps=3)
    train("full_finetune_single_device", config)
    history = losses(tmp_path / "run")
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    assert all("router_aux_loss" in r for r in records(tmp_path / "run") if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "base", "plan"),
    [
        # fresh on both counts, then the expert-parallel checkpoint resumed on one process
        ("full_finetune_distributed", "tiny/full", [("one", 1, None), ("ep", 2, None),
                                                     ("one_from_ep", 1, "ep")]),
        # one process's checkpoint (adapters and their optimizer) resumed expert-parallel
        ("lora_finetune_distributed", "tiny/lora", [("one", 1, None), ("ep", 2, "one")]),
    ],
    ids=["full", "lora"],
)  # fmt: skip
def test_expert_parallel_equals_one_process_and_resumes_across_counts(tmp_path, recipe, base, plan):
    """Two processes with two experts each (``expert_parallel_degree=2``: tokens sent to their
    experts' process by all-to-all) give one process's losses; a checkpoint of either resumes
    on the other; the saved folder (every expert gathered) loads in transformers (and peft)
    with the one-process run's logits."""
    checkpoint = small_moe(tmp_path / "model")
    runs = {}
    for name, processes, resume_from in plan:
        folder = tmp_path / name
        folder.mkdir()
        extra = {"expert_parallel_degree": 2} if processes == 2 else {}
        if resume_from is not None:
            extra["resume_from_checkpoint"] = str(runs[resume_from] / "checkpoints" / "step_2")
        config = write_config(
            folder, checkpoint, base, max_steps=4, batch_size=1,
            gradient_accumulation_steps=4 // processes, **extra,
            **{"checkpointer.save_every_n_steps": 2, "checkpointer.keep_last_n": None},
        )  # fmt: skip
        launcher = ("--nproc_per_node", str(processes)) if processes > 1 else ()
        train(recipe, config, launcher=launcher)
        runs[name] = folder / "run"
    one = losses(runs["one"])
    for name, _, resume_from in plan[1:]:
        wanted = one if resume_from is None else one[2:]  # a resumed run logs steps 3 and 4
        assert close(losses(runs[name]), wanted), (name, losses(runs[name]), one)

    transformers = pytest.importorskip("transformers")
    load = transformers.AutoModelForCausalLM.from_pretrained
    folders = [runs[name] / "checkpoints" / "step_4" for name in ("ep", "one")]
    if base == "tiny/full":
        reference, expected = (load(folder).eval() for folder in folders)
    else:
        peft = pytest.importorskip("peft")
        reference, expected = (
            peft.PeftModel.from_pretrained(load(checkpoint), folder).eval() for folder in folders
        )
    with torch.no_grad():
        difference = (reference(TOKENS).logits - expected(TOKENS).logits).abs().max().item()
    assert difference < 1e-4


def test_expert_parallelism_on_one_process_is_a_one_line_error(tmp_path):
    checkpoint = small_moe(tmp_path / "model")
    config = write_config(tmp_path, checkpoint, "tiny/full", expert_parallel_degree=2)
    result = run_tune_in_process("run", "full_finetune_single_device", "--config", str(config))
    assert result.returncode != 0
    assert_one_line_error(result.stderr, "expert_parallel_degree=2", "--nproc_per_node 2")


def test_grpo_and_distillation_train_a_mixture_of_experts(tmp_path):
    """The newer recipes take a mixture of experts as they take a dense model: GRPO samples it
    with the KV cache and trains it with the router's loss; KD distils an MoE teacher into an
    MoE student."""
    student = small_moe(tmp_path / "student")
    teacher = small_moe(tmp_path / "teacher", "MixtralConfig")
    prompts = {"_component_": "attune.demo.reverse_words_prompts"}
    for name in ("grpo", "kd"):
        (tmp_path / name).mkdir()
    reward = {"_component_": "attune.rl.FunctionReward",
              "function": {"_component_": "attune.demo.reverse_words_reward", "_partial_": True}}  # fmt: skip
    grpo = config_file(tmp_path / "grpo", {
        "base": "tiny/grpo", "output_dir": str(tmp_path / "grpo" / "run"),
        "model": {"_component_": "attune.models.from_pretrained", "path": str(student)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(student)},
        "dataset": prompts, "reward": reward, "answer_check": None, "max_steps": 2,
        "batch_size": 2, "max_new_tokens": 4, "log_every_n_steps": 1,
    }, {"grpo.num_generations": 2})  # fmt: skip
    kd = write_config(
        tmp_path / "kd", student, "tiny/kd", max_steps=2,
        teacher={"_component_": "attune.models.from_pretrained", "path": str(teacher)},
    )  # fmt: skip
    for recipe, config in (("grpo_full_finetune_single_device", grpo),
                           ("knowledge_distillation_single_device", kd)):  # fmt: skip
        train(recipe, config)
        logged = [r for r in records(config.parent / "run") if "loss" in r]
        assert len(logged) == 2, recipe
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged), recipe
        assert all(r["router_aux_loss"] > 0.5 for r in logged), recipe
