"""Command-line overrides: typed set, nested create, delete, component swap, errors."""

import pytest
from omegaconf import OmegaConf

from attune.config import load_config, source_of
from attune.errors import ConfigError

BASE = """
output_dir: /tmp/run
seed: 1
model:
  _component_: tests.config.components.build_model
  num_layers: 2
  hidden: 8
layers: [a, b, c]
"""


@pytest.fixture
def config_file(write):
    return str(write("run.yaml", BASE))


def test_values_are_typed_like_yaml(config_file):
    cfg = load_config(
        config_file,
        ["seed=7", "lr=1e-4", "name=abc", "flag=true", "nothing=null", "pair=[1, 2]", "empty="],
    )
    assert cfg.seed == 7
    assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(1e-4)
    assert cfg.name == "abc" and cfg.flag is True and cfg.nothing is None
    assert list(cfg.pair) == [1, 2]
    assert cfg.empty == ""


def test_nested_set_creates_missing_levels_and_indexes_lists(config_file):
    cfg = load_config(config_file, ["model.hidden=16", "extra.deep.key=3", "layers.1=z"])
    assert cfg.model.hidden == 16
    assert cfg.extra.deep.key == 3
    assert list(cfg.layers) == ["a", "z", "c"]


def test_hydra_plus_prefixes_are_accepted(config_file):
    cfg = load_config(config_file, ["+new_key=1", "++seed=9"])
    assert cfg.new_key == 1 and cfg.seed == 9


def test_value_may_contain_equals_and_interpolation(config_file):
    cfg = load_config(config_file, ["note=a=b", "log_dir=${output_dir}/logs"])
    assert cfg.note == "a=b"
    assert cfg.log_dir == "/tmp/run/logs"


def test_delete_with_tilde(config_file):
    cfg = load_config(config_file, ["~model.hidden", "~seed"])
    assert "hidden" not in cfg.model and "seed" not in cfg


def test_delete_missing_key_suggests_the_close_one(config_file):
    with pytest.raises(
        ConfigError, match=r"no key 'model.hiden' to delete; did you mean 'hidden'\?"
    ):
        load_config(config_file, ["~model.hiden"])


def test_setting_a_string_on_a_component_swaps_it_and_keeps_arguments(config_file):
    cfg = load_config(config_file, ["model=tests.config.components.anything"])
    assert OmegaConf.to_container(cfg.model) == {
        "_component_": "tests.config.components.anything",
        "num_layers": 2,
        "hidden": 8,
    }
    assert (
        source_of(cfg, "model._component_")
        == "command line 'model=tests.config.components.anything'"
    )
    assert load_config(config_file, ["model=null"]).model is None


def test_later_override_wins_and_records_its_source(config_file):
    cfg = load_config(config_file, ["seed=2", "seed=3"])
    assert cfg.seed == 3
    assert source_of(cfg, "seed") == "command line 'seed=3'"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed", r"override 'seed' is not key=value"),
        ("~seed=1", r"deleting takes no value"),
        ("bad key=1", r"'bad key' is not a valid key"),
        ("seed.sub=1", r"'seed' is a value, not a mapping"),
        ("layers.5=x", r"index 5 is past the end of 'layers' \(3 items\)"),
    ],
)
def test_malformed_overrides_are_one_clear_error(config_file, override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config_file, [override])
    assert "\n" not in str(error.value)


def test_integer_keys_are_reached_by_their_digits(write):
    path = write("int_keys.yaml", "lr_per_layer:\n  0: 0.1\n  1: 0.2\n")
    cfg = load_config(str(path), ["lr_per_layer.0=0.5", "~lr_per_layer.1"])
    assert OmegaConf.to_container(cfg.lr_per_layer) == {0: 0.5}
