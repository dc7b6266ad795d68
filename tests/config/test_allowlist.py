"""A shared config cannot run code: components resolve inside the allow-list only, and each
recipe slot gets an object of the kind it calls."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from attune import config, rl, training
from attune.config import allowlist, import_component, instantiate, validate
from attune.errors import ConfigError
from tests.conftest import assert_one_line_error, run_tune


@pytest.fixture
def untrusted(monkeypatch):
    """Only the built-in allow-list: nothing the other tests of this folder trust."""
    monkeypatch.setattr(allowlist, "_trusted_modules", set())
    monkeypatch.setattr(allowlist, "_trusted_folders", set())


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("os.system", "'os.system' is not in a trusted package"),
        ("subprocess.run", "not in a trusted package"),
        ("builtins.eval", "not in a trusted package"),
        # a trusted module's own imports are not trusted
        ("attune.errors.os.system", "resolves to posix.system"),
        ("attune.config.allowlist.importlib.util.find_spec", "resolves to importlib.util"),
        ("torch.hub.load", "torch.hub runs code from outside it"),
        ("torch.load", "torch.load runs code from outside it"),
        ("torch.utils.cpp_extension.load_inline", "torch.utils.cpp_extension runs code"),
        ("transformers.dynamic_module_utils.get_class_from_dynamic_module", "runs code"),
        ("attune.cli.main.main", "attune.cli runs code"),
        ("torch.nn.Module.__init__", "names the private '__init__'"),
        ("attune.errors.__builtins__", "private"),
    ],
)
def test_paths_outside_the_allow_list_are_refused_before_import(untrusted, path, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        import_component(path)


def test_a_refused_module_is_never_imported(untrusted, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="add `imports: \\[sneaky\\]`"):
        import_component("sneaky.f")
    assert not marker.exists()


def test_modules_the_user_names_and_the_recipe_folder_are_trusted(untrusted, tmp_path, monkeypatch):
    (tmp_path / "mylosses.py").write_text("def build():\n    return 'built'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with allowlist.trusted(["mylosses"]):
        assert import_component("mylosses.build")() == "built"
    with pytest.raises(ConfigError, match="not in a trusted package"):
        import_component("mylosses.build")
    with allowlist.trusted(folder=tmp_path):
        assert import_component("mylosses.build")() == "built"
    allowlist.trust_run(imports=["mylosses"])
    assert import_component("mylosses.build")() == "built"


def test_imports_must_be_module_names(untrusted):
    with pytest.raises(ConfigError, match="imports: 'not a module' is not a module name"):
        allowlist.trust_run(imports=["not a module"])
    cfg = OmegaConf.create({"imports": [3]})
    assert any("imports: expected a list of module names" in p for p in validate(cfg))


def test_trust_remote_code_is_refused_anywhere():
    node = {
        "_component_": "attune.models.from_pretrained",
        "path": "x",
        "trust_remote_code": True,
    }
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: attune never runs code"):
        instantiate(OmegaConf.create({"model": node}).model)
    problems = validate(OmegaConf.create({"data": {"inner": [{"trust_remote_code": "yes"}]}}))
    assert problems == [
        "data.inner.0.trust_remote_code: attune never runs code from a checkpoint or dataset "
        "folder; remove it"
    ]


@pytest.mark.parametrize(
    ("schema", "key", "path", "message"),
    [
        (
            {"loss": config.Component(expects=rl.PREFERENCE_LOSS)},
            "loss",
            "attune.training.ChunkedCrossEntropy",
            "is not a preference loss (attune.rl.SigmoidDPOLoss, IPOLoss, SimPOLoss, ORPOLoss, "
            "...) (it has no 'uses_reference')",
        ),
        (
            {"loss": config.Component(expects=training.SFT_LOSS)},
            "loss",
            "attune.rl.SigmoidDPOLoss",
            "is not an SFT loss",
        ),
        (
            {"loss": config.Component(expects=training.SFT_LOSS)},
            "loss",
            "torch.nn.CrossEntropyLoss",
            "calling it fails: too many positional arguments",
        ),
        (
            {"loss": config.Component(expects=rl.PAIR_LOSS)},
            "loss",
            "attune.training.ChunkedCrossEntropy",
            "is not a reward-model pair loss",
        ),
        (
            {"metric_logger": config.Component(expects=training.METRIC_LOGGER)},
            "metric_logger",
            "torch.nn.Linear",
            "is not a metric logger",
        ),
        (
            {"optimizer": config.Component(expects=training.optim.OPTIMIZER)},
            "optimizer",
            "torch.nn.Linear",
            "is not an optimizer",
        ),
    ],
)
def test_each_slot_gets_an_object_of_its_kind(schema, key, path, message):
    cfg = OmegaConf.create({key: {"_component_": path}})
    problems = validate(cfg, schema)
    assert len(problems) == 1 and problems[0].startswith(f"{key}._component_: {path} ")
    assert message in problems[0]


@pytest.mark.parametrize(
    ("expects", "path"),
    [
        (rl.PREFERENCE_LOSS, "attune.rl.SigmoidDPOLoss"),
        (rl.PREFERENCE_LOSS, "attune.rl.SimPOLoss"),
        (rl.PAIR_LOSS, "attune.rl.BradleyTerryLoss"),
        (training.SFT_LOSS, "attune.training.ChunkedCrossEntropy"),
        (training.METRIC_LOGGER, "attune.training.TensorBoardLogger"),
        (training.optim.OPTIMIZER, "torch.optim.SGD"),
    ],
)
def test_right_kinds_pass(expects, path):
    schema = {"slot": config.Component(expects=expects, required=False)}
    problems = validate(OmegaConf.create({"slot": {"_component_": path}}), schema)
    assert not [p for p in problems if " is not " in p], problems


@pytest.mark.parametrize("slot", ["loss", "metric_logger"])
def test_a_shared_config_cannot_run_a_shell_command(tmp_path, tiny_config, slot):
    marker = tmp_path / "pwned"
    node = f"{{_component_: os.system, command: 'touch {marker}'}}"
    result = run_tune(
        "run", "full_finetune_single_device", "--config", tiny_config, f"{slot}={node}"
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{slot}._component_", "'os.system' is not in a trusted")
    assert not marker.exists()


def test_an_sft_config_given_to_the_dpo_recipe_is_one_line(tiny_config):
    result = run_tune(
        "run",
        "full_dpo_single_device",
        "--config",
        tiny_config,
        "loss={_component_: attune.training.ChunkedCrossEntropy}",
    )
    assert result.returncode == 1
    assert "is not a preference loss" in result.stderr
    assert "Traceback" not in result.stderr


def test_allow_import_trusts_a_module_of_the_users(tmp_path, tiny_config):
    (tmp_path / "team_losses.py").write_text(
        "from attune.training import ChunkedCrossEntropy\n\n"
        "class MyLoss(ChunkedCrossEntropy):\n    pass\n"
    )
    override = "loss={_component_: team_losses.MyLoss}"
    env = {"PYTHONPATH": str(tmp_path)}
    refused = run_tune("validate", tiny_config, override, env=env)
    assert refused.returncode == 1 and "--allow-import team_losses" in refused.stderr
    allowed = run_tune("validate", tiny_config, override, "--allow-import", "team_losses", env=env)
    assert allowed.returncode == 0, allowed.stderr
    listed = run_tune("validate", tiny_config, override, "imports=[team_losses]", env=env)
    assert listed.returncode == 0, listed.stderr


@pytest.fixture
def tiny_config(tmp_path):
    """The built-in tiny full fine-tuning config, writing under tmp_path."""
    path = tmp_path / "run.yaml"
    path.write_text(f"base: tiny/full\noutput_dir: {tmp_path / 'out'}\n")
    return str(path)


def test_a_copied_recipe_trusts_the_modules_beside_it(tmp_path, untrusted):
    from tests.recipes.conftest import run_tune_in_process

    folder = tmp_path / "project"
    folder.mkdir()
    assert (
        run_tune_in_process("cp", "full_finetune_single_device", str(folder / "ft.py")).returncode
        == 0
    )
    (folder / "team_loss.py").write_text(
        "from attune.training import ChunkedCrossEntropy\n\nclass MyLoss(ChunkedCrossEntropy):\n    pass\n"
    )
    # batch_size=0 stops the run at the config check, after the loss was judged
    result = run_tune_in_process(
        "run", str(folder / "ft.py"), "--config", "tiny/full", f"output_dir={tmp_path / 'out'}",
        "loss={_component_: team_loss.MyLoss}", "batch_size=0",
    )  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "'batch_size' must be at least 1")
