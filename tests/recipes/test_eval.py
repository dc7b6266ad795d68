"""The eleuther_eval recipe through the real ``tune run``: results.json, samples, the scores of
one process on two, an adapter scored as its merged model, and one-line errors."""

from __future__ import annotations

import json
import re
import sys

import pytest

pytest.importorskip("lm_eval")

from attune.demo.tiny import HF_CONFIG
from attune.models import from_hf_config
from attune.peft import LoraSettings, apply_lora, save_adapter
from tests.conftest import assert_one_line_error, run_tune
from tests.recipes.conftest import run_tune_in_process, train

ALL_TASKS = "tasks=[attune_reverse_words_mc,attune_reverse_words_gen,attune_reverse_words_rolling]"


def hf_model(folder) -> tuple[str, str]:
    """Overrides that evaluate the HF folder ``folder`` instead of the tiny model."""
    return (
        f"model={{_component_: attune.models.from_pretrained, path: {folder}}}",
        f"tokenizer={{_component_: attune.tokenizer.from_pretrained, path: {folder}}}",
    )


def scores(run_dir) -> dict[str, dict[str, float]]:
    """Each task's numeric results (metrics and their standard errors) from results.json."""
    results = json.loads((run_dir / "results.json").read_text())["results"]
    return {
        task: {
            name: value
            for name, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        for task, metrics in results.items()
    }


def leaves(value) -> list:
    """The numbers and strings of a nested response (``[[logprob, is_greedy], ...]``), flat."""
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def samples_by_doc(run_dir, task) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / f"samples_{task}.jsonl").open()]
    by_doc = {row["doc_id"]: row for row in rows}
    assert len(by_doc) == len(rows), f"{task}: a document scored twice"
    return by_doc


def evaluate(tmp_path, tiny_cache, *overrides: str):
    return run_tune_in_process(
        "run",
        "eleuther_eval",
        "--config",
        "tiny/eval",
        f"output_dir={tmp_path / 'run'}",
        "limit=4",
        *overrides,
        env=tiny_cache,
    )


def test_writes_lm_eval_results(tmp_path, tiny_cache):
    result = evaluate(tmp_path, tiny_cache, "log_samples=true")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert set(results["attune_reverse_words_mc"]) >= {"acc,none", "acc_norm,none"}
    assert "exact_match,strip" in results["attune_reverse_words_gen"]
    samples = (tmp_path / "run" / "samples_attune_reverse_words_mc.jsonl").read_text()
    assert len(samples.splitlines()) == 4
    assert "attune_reverse_words_mc" in result.stdout  # lm-eval's table


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tasks=[attune_reverse_word_mc]", "did you mean 'attune_reverse_words_mc'"),
        ("include_path=/nonexistent/tasks", "include_path: /nonexistent/tasks is not a folder"),
        ("limit=0", "'limit' must be greater than 0, got 0"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_cache, override, message):
    result = evaluate(tmp_path, tiny_cache, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_without_lm_eval_says_what_to_install(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # ``import lm_eval`` raises ImportError
    result = evaluate(tmp_path, tiny_cache)
    assert result.returncode != 0
    assert 'pip install "attune[eval]"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_two_processes_score_as_one(tmp_path, checkpoint):
    """7 examples of each shipped task (4 on rank 0, 3 on rank 1: lm-eval pads the shorter
    rank) on a random checkpoint: the same results.json metrics as one process, and the same
    answer to every request, gathered on rank 0."""
    common = (ALL_TASKS, "limit=7", "log_samples=true", "batch_size=2", *hf_model(checkpoint))
    one, two = tmp_path / "one", tmp_path / "two"
    alone = train("eleuther_eval", "tiny/eval", f"output_dir={one}", *common)
    split = train("eleuther_eval", "tiny/eval", f"output_dir={two}", *common,
                  launcher=("--nproc_per_node", "2"))  # fmt: skip
    total = int(re.search(r"requests answered: (\d+)\n", alone.stdout)[1])
    shares = re.search(r"requests answered: (\d+) \+ (\d+) on 2 processes", split.stdout)
    assert shares, split.stdout[-2000:]
    assert all(int(share) < total for share in shares.groups()), (total, shares.groups())
    assert sum(map(int, shares.groups())) >= total
    expected, got = scores(one), scores(two)
    assert set(got) == set(expected) == {
        "attune_reverse_words_mc", "attune_reverse_words_gen", "attune_reverse_words_rolling"
    }  # fmt: skip
    for task, metrics in expected.items():
        assert set(got[task]) == set(metrics), task
        for name, value in metrics.items():
            assert got[task][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, name)
    for task in expected:
        mine, reference = samples_by_doc(two, task), samples_by_doc(one, task)
        assert sorted(mine) == sorted(reference) == list(range(7)), task
        for doc_id, row in reference.items():
            assert mine[doc_id]["arguments"] == row["arguments"]
            assert leaves(mine[doc_id]["filtered_resps"]) == pytest.approx(
                leaves(row["filtered_resps"]), rel=1e-6
            ), doc_id


def test_an_adapter_scores_as_its_merged_model(tmp_path, tiny_cache):
    """The peft adapter a tiny/lora run wrote, applied to the tiny model, scores as the merged
    full folder the same run wrote beside it (acc, acc_norm, exact_match, perplexities)."""
    train("lora_finetune_single_device", "tiny/lora", f"output_dir={tmp_path / 'lora'}",
          "max_steps=8", "checkpointer.save_merged=true", "validation_dataset=null",
          "answer_check=null", f"dataset.cache_dir={tmp_path / 'hf'}", env=tiny_cache)  # fmt: skip
    saved = tmp_path / "lora" / "checkpoints" / "step_8"
    common = (ALL_TASKS, "limit=8", "log_samples=true")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    train("eleuther_eval", "tiny/eval", f"output_dir={adapter}", f"adapter={saved}", *common,
          env=tiny_cache)  # fmt: skip
    train("eleuther_eval", "tiny/eval", f"output_dir={merged}", *hf_model(saved / "merged"),
          *common, env=tiny_cache)  # fmt: skip
    expected, got = scores(merged), scores(adapter)
    names = {
        "attune_reverse_words_mc": ("acc,none", "acc_norm,none"),
        "attune_reverse_words_gen": ("exact_match,strip",),
        "attune_reverse_words_rolling": ("word_perplexity,none", "bits_per_byte,none"),
    }
    for task, metrics in names.items():
        for name in metrics:
            assert got[task][name] == pytest.approx(expected[task][name], rel=1e-5), (task, name)
    for task in names:
        mine, reference = samples_by_doc(adapter, task), samples_by_doc(merged, task)
        for doc_id, row in reference.items():
            assert leaves(mine[doc_id]["filtered_resps"]) == pytest.approx(
                leaves(row["filtered_resps"]), rel=1e-5
            ), (task, doc_id)


def task_yaml(folder, name: str, dataset: str) -> None:
    """A multiple-choice task ``name`` in ``folder`` whose dataset is ``dataset`` (YAML lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n{dataset}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_a_hub_dataset_out_of_reach_is_one_line(tmp_path, tiny_cache):
    """Offline, with no cached copy: which task and dataset, and how to use local files."""
    task_yaml(tmp_path / "tasks", "hub_task", "dataset_path: someone/no-such-dataset")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf"), **tiny_cache}  # fmt: skip
    result = run_tune("run", "eleuther_eval", "--config", "tiny/eval",
                      f"output_dir={tmp_path / 'run'}", f"include_path={tmp_path / 'tasks'}",
                      "tasks=[hub_task]", env=offline)  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr,
        f"tasks: 'hub_task' ({tmp_path / 'tasks' / 'hub_task.yaml'}) cannot load its dataset "
        "(someone/no-such-dataset)",
        "dataset_path: json, dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}",
    )


def test_a_local_data_file_that_is_missing_is_one_line(tmp_path, tiny_cache):
    missing = tmp_path / "gone.jsonl"
    dataset = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}"
    task_yaml(tmp_path / "tasks", "local_task", dataset)
    result = evaluate(tmp_path, tiny_cache, f"include_path={tmp_path / 'tasks'}",
                      "tasks=[local_task]")  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr,
        f"tasks: 'local_task' ({tmp_path / 'tasks' / 'local_task.yaml'}) cannot load its dataset "
        f"(json, data_files {{'test': '{missing}'}})",
        "fix data_files in the task's YAML",
    )


def adapter_of(folder, **shape) -> str:
    """A peft adapter (q_proj and v_proj) of the tiny model's family with ``shape`` changed."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = from_hf_config({**HF_CONFIG, **shape})
    settings = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, settings)
    folder.mkdir(parents=True)
    save_adapter(model, folder, settings, base_model_name_or_path="another/base")
    return str(folder)


@pytest.mark.parametrize(
    ("shape", "edit", "mismatch"),
    [
        ({"hidden_size": 64, "intermediate_size": 128}, None,
         "its model.layers.0.self_attn.q_proj.lora_A.weight has shape (4, 64) where this "
         "model's is (4, 128)"),
        ({"num_hidden_layers": 6}, None,
         "it adapts model.layers.4.self_attn.q_proj, which this model does not have"),
        ({"num_hidden_layers": 2}, None,
         "it has no weights for model.layers.2.self_attn.q_proj and 3 more"),
        ({}, ["c_attn"], "its target_modules name 'c_attn', which this model has no linear layer"),
    ],
    ids=["hidden_size", "more_layers", "fewer_layers", "target_modules"],
)  # fmt: skip
def test_an_adapter_of_another_model_is_one_line(tmp_path, tiny_cache, shape, edit, mismatch):
    folder = adapter_of(tmp_path / "adapter", **shape)
    if edit is not None:
        config_file = tmp_path / "adapter" / "adapter_config.json"
        adapter_config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**adapter_config, "target_modules": edit}))
    result = evaluate(tmp_path, tiny_cache, f"adapter={folder}")
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr,
        f"adapter {folder} does not fit this model (4 layers, hidden size 128): {mismatch}",
        "use the base model it was trained on, another/base",
    )


@pytest.mark.parametrize("limit", ["0", "-3", "-0.5"])
def test_tune_validate_refuses_a_limit_that_is_not_positive(limit):
    result = run_tune_in_process("validate", "tiny/eval", f"limit={limit}")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"'limit' must be greater than 0, got {limit}")
    assert run_tune_in_process("validate", "tiny/eval", "limit=0.25").returncode == 0
