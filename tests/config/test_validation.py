"""Validation: every problem at once, each with file:line and a "did you mean"."""

import pytest

from attune.config import Block, Component, ExistingPath, Field, check, load_config, validate
from attune.errors import ConfigError

SCHEMA = {
    "output_dir": str,
    "epochs": int,
    "seed": Field(int | None, required=False),
    "data_file": Field(ExistingPath, required=False),
    "model": Component(),
    "optimizer": Component(provided=("params",)),
    "dataset": Component(required=False, provided=("tokenizer",)),
}

GOOD = """
output_dir: /tmp/run
model_dir: /tmp/models
epochs: 2
seed: null
model:
  _component_: tests.config.components.build_model
  num_layers: 2
  activation: gelu
  name: ${model_dir}/tiny
optimizer:
  _component_: tests.config.components.Optimizer
  lr: 3e-4
  betas: [0.9, 0.95]
"""


def test_a_good_config_has_no_problems(write):
    # model_dir is not in the schema, but the config uses it in an interpolation: allowed
    assert validate(load_config(str(write("good.yaml", GOOD))), SCHEMA) == []


def test_reports_all_problems_at_once_with_file_lines_and_hints(write):
    path = write(
        "bad.yaml",
        """
        output_dir: /tmp/run
        epoch: 2
        model:
          _component_: tests.config.components.build_model
          num_layer: 2
          activation: swish
          dropout: high
        optimizer:
          _component_: tests.config.components.Optimizer
          betas: 0.9
        """,
    )
    with pytest.raises(ConfigError) as error:
        check(load_config(str(path)), SCHEMA)
    lines = str(error.value).splitlines()
    assert lines[0] == "config has 8 problems:"
    text = str(error.value)
    expected = [
        f"{path}:2: unknown key 'epoch'; did you mean 'epochs'?",
        "missing key 'epochs' (int); add epochs: ...",
        f"{path}:5: model.num_layer: tests.config.components.build_model takes no argument "
        "'num_layer'; did you mean 'num_layers'?",
        f"{path}:6: model.activation: tests.config.components.build_model expects "
        "Literal['relu', 'gelu'], got 'swish' (str)",
        f"{path}:7: model.dropout: tests.config.components.build_model expects float, got 'high' (str)",
        f"{path}:3: model: tests.config.components.build_model needs argument 'num_layers'",
        f"{path}:10: optimizer.betas: tests.config.components.Optimizer expects list[float] | None, "
        "got 0.9 (float)",
        f"{path}:8: optimizer: tests.config.components.Optimizer needs argument 'lr'",
    ]
    for message in expected:
        assert message in text, f"{message!r} not in:\n{text}"
    # 'params' is passed by the recipe at call time, so it is not reported missing
    assert "'params'" not in text


def test_command_line_overrides_are_named_as_the_source(write):
    cfg = load_config(str(write("good.yaml", GOOD)), ["epochs=two", "optimizer.lrr=1"])
    problems = validate(cfg, SCHEMA)
    assert "command line 'epochs=two': 'epochs' must be int, got 'two' (str)" in problems
    assert (
        "command line 'optimizer.lrr=1': optimizer.lrr: tests.config.components.Optimizer "
        "takes no argument 'lrr'; did you mean 'lr'?"
    ) in problems


def test_component_that_does_not_import_is_reported_with_its_line(write):
    path = write("g.yaml", GOOD.replace("components.build_model", "components.build_modle"))
    problems = validate(load_config(str(path)), SCHEMA)
    assert problems == [
        f"{path}:6: model._component_: cannot import 'tests.config.components.build_modle': "
        "'tests.config.components' has no 'build_modle'; did you mean 'build_model'?"
    ]


def test_missing_and_wrongly_shaped_components(write):
    path = write("g.yaml", GOOD.replace("optimizer:\n", "unused:\n") + "dataset: adam\n")
    problems = validate(load_config(str(path)), SCHEMA)
    assert "missing component 'optimizer'; add optimizer: {_component_: ...}" in problems
    assert (
        f"{path}:14: 'dataset' must be a component node with '_component_', got 'adam' (str)"
        in problems
    )
    assert any("unknown key 'unused'" in p for p in problems)


def test_input_paths_must_exist(write, tmp_path):
    data = write("data.jsonl", "{}\n")
    extra = f"data_file: {data}\ndataset:\n  _component_: tests.config.components.load_dataset\n  source: {data}\n"
    assert validate(load_config(str(write("ok.yaml", GOOD + extra))), SCHEMA) == []
    missing = tmp_path / "gone.jsonl"
    bad = write("bad.yaml", GOOD + extra.replace(str(data), str(missing)))
    problems = validate(load_config(str(bad)), SCHEMA)
    assert problems == [
        f"{bad}:14: data_file: file or folder not found: {missing}",
        f"{bad}:17: dataset.source: file or folder not found: {missing}",
    ]


def test_broken_interpolation_and_missing_value(write):
    path = write("i.yaml", GOOD + "log_dir: ${output_dirr}/logs\nrun_name: ???\n")
    problems = validate(load_config(str(path)), {**SCHEMA, "log_dir": str, "run_name": str})
    assert any(
        p.startswith(f"{path}:14: log_dir: cannot resolve ${{output_dirr}}/logs") for p in problems
    )
    assert f"{path}:15: run_name: value is missing (???); set it with run_name=..." in problems


def test_without_a_schema_required_arguments_of_top_level_components_are_not_judged(write):
    # Without the recipe's schema we cannot know what it passes at call time (an optimizer's
    # params), so only unknown arguments, types and nested components are judged.
    path = write(
        "n.yaml",
        """
        optimizer:
          _component_: torch.optim.AdamW
          lr: 2e-5
        m:
          _component_: tests.config.components.wrap
          inner:
            _component_: tests.config.components.build_model
            hiden: 3
        """,
    )
    assert validate(load_config(str(path))) == [
        f"{path}:8: m.inner.hiden: tests.config.components.build_model takes no argument "
        "'hiden'; did you mean 'hidden'?",
        f"{path}:6: m.inner: tests.config.components.build_model needs argument 'num_layers'; "
        "add m.inner.num_layers: ... to the config",
    ]


def test_none_is_accepted_where_the_default_is_none(write):
    path = write(
        "none.yaml",
        "m:\n  _component_: tests.config.components.takes_none_default\n  max_seq_len: null\n",
    )
    assert validate(load_config(str(path))) == []


def test_a_list_of_components_fits_a_component_key(write, tmp_path):
    data = write("data.jsonl", "{}\n")
    path = write(
        "multi.yaml",
        GOOD
        + f"""dataset:
  - _component_: tests.config.components.load_dataset
    source: {data}
  - _component_: tests.config.components.load_dataset
    source: {data}
    max_seq_len: 8
""",
    )
    assert validate(load_config(str(path)), SCHEMA) == []  # each item gets the tokenizer


def test_existing_path_or_plain_string_accepts_a_hub_id(write):
    path = write(
        "hub.yaml",
        "m:\n  _component_: tests.config.components.local_or_hub\n  source: org/dataset\n",
    )
    assert validate(load_config(str(path))) == []


def test_partial_components_may_leave_required_arguments_out(write):
    path = write(
        "p.yaml",
        "m:\n  _component_: tests.config.components.Optimizer\n  _partial_: true\n  lr: 0.1\n",
    )
    assert validate(load_config(str(path))) == []


def test_kwargs_components_accept_any_key(write):
    path = write("k.yaml", "m:\n  _component_: tests.config.components.anything\n  whatever: 1\n")
    assert validate(load_config(str(path))) == []


def test_one_problem_is_one_line(write):
    cfg = load_config(str(write("good.yaml", GOOD)), ["epochs=x"])
    with pytest.raises(ConfigError) as error:
        check(cfg, SCHEMA)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("config: command line 'epochs=x':")


BLOCK_SCHEMA = {
    "output_dir": str,
    "eval": Block({"tasks": list, "limit": Field(int | None, required=False, minimum=1)}),
}


def test_a_block_checks_its_own_keys_under_its_name(write):
    path = write("b.yaml", "output_dir: /tmp/run\neval:\n  taks: [a]\n  limit: 0\n")
    problems = validate(load_config(str(path)), BLOCK_SCHEMA)
    assert problems == [
        f"{path}:3: unknown key 'eval.taks'; did you mean 'eval.tasks'? (the recipe does not "
        "read it)",
        f"{path}:2: missing key 'tasks' in 'eval' (list); add eval.tasks: ...",
        f"{path}:4: 'eval.limit' must be at least 1, got 0",
    ]
    good = load_config(str(path), ["~eval.taks", "eval.tasks=[a]", "eval.limit=2"])
    assert validate(good, BLOCK_SCHEMA) == []
    assert validate(load_config(str(path), ["~eval"]), BLOCK_SCHEMA) == []  # optional
    assert validate(load_config(str(path), ["eval=3"]), BLOCK_SCHEMA) == [
        "command line 'eval=3': 'eval' must be a mapping of keys, got 3 (int)"
    ]


def test_above_excludes_its_bound(write):
    """A count or a fraction (lm-eval's ``limit``): anything greater than 0, 0 itself not."""
    schema = {"limit": Field(int | float | None, required=False, above=0)}
    path = write("l.yaml", "limit: 0\n")
    assert validate(load_config(str(path)), schema) == [
        f"{path}:1: 'limit' must be greater than 0, got 0"
    ]
    assert validate(load_config(str(path), ["limit=-0.5"]), schema) == [
        "command line 'limit=-0.5': 'limit' must be greater than 0, got -0.5"
    ]
    for fine in ("limit=0.01", "limit=3", "limit=null"):
        assert validate(load_config(str(path), [fine]), schema) == [], fine
