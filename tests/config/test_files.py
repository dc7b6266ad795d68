"""Reading YAML configs: syntax errors, built-in names, ``base:`` inheritance, source lines."""

import pytest
from omegaconf import OmegaConf

from attune.config import files, load_config, source_of
from attune.errors import ConfigError


def test_loads_typed_yaml_with_interpolation(write):
    path = write(
        "run.yaml",
        """
        output_dir: /tmp/out
        log_dir: ${output_dir}/logs
        lr: 1e-4
        steps: 10
        flags: [true, null]
        """,
    )
    cfg = load_config(str(path))
    assert cfg.log_dir == "/tmp/out/logs"
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.steps == 10
    assert list(cfg.flags) == [True, None]


def test_yaml_syntax_error_names_file_line_and_column(write):
    path = write("broken.yaml", "model:\n  layers: 2\n  bad: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}:4:")
    assert "YAML syntax error" in message
    assert "\n" not in message


def test_duplicate_key_is_refused_with_both_lines(write):
    path = write("dup.yaml", "seed: 1\nepochs: 2\nseed: 3\n")
    with pytest.raises(
        ConfigError, match=r"dup.yaml:3: key 'seed' is given twice \(first on line 1\)"
    ):
        load_config(str(path))


def test_top_level_must_be_a_mapping(write):
    path = write("list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of keys to values, not a list"):
        load_config(str(path))


def test_empty_file_is_an_empty_config(write):
    assert OmegaConf.to_container(load_config(str(write("empty.yaml", "")))) == {}


def test_missing_file_and_unknown_builtin_name(tmp_path, monkeypatch, write):
    monkeypatch.setattr(files, "BUILTIN_CONFIG_DIR", tmp_path / "builtin")
    write("builtin/tiny/lora.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(
        ConfigError, match=r"no config named 'tiny/lorra'; did you mean 'tiny/lora'\?"
    ):
        load_config("tiny/lorra")
    assert load_config("tiny/lora").seed == 1


def test_base_relative_to_file_deep_merges(write):
    write(
        "configs/base.yaml",
        """
        seed: 1
        optimizer:
          _component_: torch.optim.AdamW
          lr: 0.001
          weight_decay: 0.01
        """,
    )
    child = write(
        "configs/child.yaml",
        """
        base: base.yaml
        seed: 2
        optimizer:
          lr: 0.0002
        """,
    )
    cfg = load_config(str(child))
    assert "base" not in cfg
    assert cfg.seed == 2
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_component_": "torch.optim.AdamW",
        "lr": 0.0002,
        "weight_decay": 0.01,
    }
    # every key remembers the file and line it came from
    assert source_of(cfg, "seed") == f"{child}:2"
    assert source_of(cfg, "optimizer.lr") == f"{child}:4"
    assert source_of(cfg, "optimizer.weight_decay").endswith("base.yaml:5")


def test_base_by_builtin_name_and_list_of_bases_in_order(tmp_path, monkeypatch, write):
    monkeypatch.setattr(files, "BUILTIN_CONFIG_DIR", tmp_path / "builtin")
    write("builtin/family/_base.yaml", "a: 1\nb: 1\nc: 1\n")
    write("elsewhere/second.yaml", "b: 2\nc: 2\n")
    child = write("mine/run.yaml", "base: [family/_base, ../elsewhere/second.yaml]\nc: 3\n")
    cfg = load_config(str(child))
    assert OmegaConf.to_container(cfg) == {"a": 1, "b": 2, "c": 3}


def test_child_changing_a_component_deep_merges_unless_marked_replace(write):
    write(
        "base.yaml",
        """
        dataset:
          _component_: pkg.alpaca_dataset
          source: tatsu-lab/alpaca
          train_on_input: false
        """,
    )
    merged = write(
        "merged.yaml",
        """
        base: base.yaml
        dataset:
          _component_: pkg.chat_dataset
          source: my.jsonl
        """,
    )
    # as in OmegaConf and Hydra: the base's other arguments stay (validation names leftovers)
    assert OmegaConf.to_container(load_config(str(merged)).dataset) == {
        "_component_": "pkg.chat_dataset",
        "source": "my.jsonl",
        "train_on_input": False,
    }
    replaced = write(
        "replaced.yaml",
        """
        base: base.yaml
        dataset:
          _replace_: true
          _component_: pkg.chat_dataset
          source: my.jsonl
        """,
    )
    cfg = load_config(str(replaced))
    assert OmegaConf.to_container(cfg.dataset) == {
        "_component_": "pkg.chat_dataset",
        "source": "my.jsonl",
    }
    assert source_of(cfg, "dataset.train_on_input") == f"{replaced}:2"  # falls back to the node


def test_dates_stay_strings_and_odd_files_are_one_line(write, tmp_path):
    cfg = load_config(str(write("d.yaml", "run_name: 2024-01-01\n")), ["tag=2024-05-01"])
    assert cfg.run_name == "2024-01-01" and cfg.tag == "2024-05-01"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 9\)"):
        load_config(str(latin1))
    with pytest.raises(ConfigError, match=r"k.yaml:1: a key must be a plain name"):
        load_config(str(write("k.yaml", "? [a, b]\n: 1\n")))


def test_base_is_looked_up_beside_the_file_not_in_the_working_directory(
    write, tmp_path, monkeypatch
):
    write("cwd/common.yaml", "x: 1\n")
    child = write("configs/child.yaml", "base: common.yaml\n")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ConfigError, match=r"configs/common.yaml"):
        load_config(str(child))


def test_base_cycle_and_missing_base_are_reported(write):
    write("a.yaml", "base: b.yaml\nx: 1\n")
    b = write("b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="extend each other in a cycle"):
        load_config(str(b))
    orphan = write("orphan.yaml", "x: 1\nbase: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml:2: base config file not found"):
        load_config(str(orphan))
    wrong = write("wrong.yaml", "base: {a: 1}\n")
    with pytest.raises(ConfigError, match="'base' must be a config name or a list of them"):
        load_config(str(wrong))
