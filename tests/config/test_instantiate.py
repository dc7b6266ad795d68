"""``_component_`` instantiation: recursive, call-time arguments, partials, clear import errors."""

import functools

import pytest
import torch
from omegaconf import OmegaConf

from attune.config import allowlist, import_component, instantiate, load_config
from attune.errors import ConfigError
from tests.config.components import Optimizer


def test_builds_with_config_arguments():
    cfg = OmegaConf.create(
        {"model": {"_component_": "tests.config.components.build_model", "num_layers": 3}}
    )
    assert instantiate(cfg.model) == {
        "num_layers": 3,
        "hidden": 8,
        "activation": "relu",
        "dropout": 0.0,
        "name": None,
    }


def test_real_torch_component_with_positional_and_call_time_arguments():
    linear = torch.nn.Linear(4, 2)
    cfg = OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.5})
    optimizer = instantiate(cfg, linear.parameters(), weight_decay=0.0)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.01
    assert optimizer.defaults["weight_decay"] == 0.0  # call time wins over the config


def test_nested_components_in_mappings_and_lists_are_built_first(write):
    path = write(
        "nested.yaml",
        """
        hidden: 16
        outer:
          _component_: tests.config.components.wrap
          scale: 2.0
          inner:
            plain: {a: 1}
            models:
              - _component_: tests.config.components.build_model
                num_layers: 1
                hidden: ${hidden}
              - 5
        """,
    )
    built = instantiate(load_config(str(path)).outer)
    assert built["scale"] == 2.0
    assert built["inner"]["plain"] == {"a": 1}
    assert built["inner"]["models"][0]["hidden"] == 16
    assert built["inner"]["models"][1] == 5


def test_partial_defers_the_call():
    cfg = OmegaConf.create(
        {"_component_": "tests.config.components.Optimizer", "_partial_": True, "lr": 0.1}
    )
    make = instantiate(cfg)
    assert isinstance(make, functools.partial)
    optimizer = make(params=[1, 2])
    assert isinstance(optimizer, Optimizer) and optimizer.lr == 0.1 and optimizer.params == [1, 2]


def test_none_is_an_absent_optional_component():
    assert instantiate(None) is None


def test_not_a_component_node():
    with pytest.raises(ConfigError, match=r"model: expected a component node with '_component_'"):
        instantiate(OmegaConf.create({"model": {"layers": 2}}).model)


def test_wrong_arguments_name_the_node_and_component():
    cfg = OmegaConf.create(
        {"model": {"_component_": "tests.config.components.build_model", "num_layer": 3}}
    )
    with pytest.raises(
        ConfigError, match=r"^model: tests.config.components.build_model: .*num_layer"
    ):
        instantiate(cfg.model)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("torch.optim.AdamWW", r"'torch.optim' has no 'AdamWW'; did you mean 'AdamW'\?"),
        (
            "torch.nn.modules.linearr.Linear",
            r"'torch.nn.modules' has no 'linearr'; did you mean 'linear'\?",
        ),
        ("torch.nosuchmodule.thing", r"'torch' has no 'nosuchmodule'"),
        ("torch.float32", r"'torch.float32' is a dtype, not a class or function"),
        ("torch..nn", r"is not a dotted import path"),
    ],
)
def test_import_errors_are_clear(path, message):
    with pytest.raises(ConfigError, match=message):
        import_component(path)


def test_a_module_that_fails_to_import_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "brokenmod.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(allowlist, "_trusted_modules", {"brokenmod", "raisingmod"})
    with pytest.raises(ConfigError, match="No module named 'not_installed_dependency'"):
        import_component("brokenmod.build")
    (tmp_path / "raisingmod.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(
        ConfigError, match="importing module 'raisingmod' failed: RuntimeError: boom"
    ):
        import_component("raisingmod.build")
