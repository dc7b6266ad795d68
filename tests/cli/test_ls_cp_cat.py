"""``tune ls``, ``tune cp`` and ``tune cat``."""

import pytest

from attune.cli.catalog import recipes
from attune.config import builtin_config_names
from tests.cli.conftest import REPORT_CONFIG
from tests.conftest import ASSETS


def test_ls_lists_every_recipe_with_its_configs(tune, catalog):
    code, out, _ = tune("ls")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["RECIPE", "CONFIG"],
        ["report_rank_single_device", "test/report"],
        ["report_rank_distributed", "test/report"],
        ["test/other"],
    ]


def test_every_registered_recipe_and_config_exists():
    for recipe in recipes():
        assert recipe.path.is_file(), recipe
        for name in recipe.configs:
            assert name in builtin_config_names(), (recipe.name, name)


def test_cp_recipe_into_a_folder_and_run_the_copy(tune, catalog, tmp_path):
    code, out, _ = tune("cp", "report_rank_single_device", str(tmp_path))
    copied = tmp_path / "report_rank_single_device.py"
    assert code == 0 and str(copied) in out
    assert copied.read_text() == (ASSETS / "report_rank_recipe.py").read_text()
    config = tmp_path / "run.yaml"
    tune("cp", "test/report", str(config))
    code, out, _ = tune("run", str(copied), "--config", str(config), f"output_dir={tmp_path}/o")
    assert code == 0
    assert (tmp_path / "o" / "rank0.json").is_file()


def test_cp_config_adds_the_suffix_and_keeps_the_text(tune, catalog, tmp_path):
    code, _, _ = tune("cp", "test/report", str(tmp_path / "mine"))
    assert code == 0
    assert (tmp_path / "mine.yaml").read_text() == REPORT_CONFIG


def test_cp_refuses_to_overwrite_unless_forced(tune, catalog, tmp_path):
    target = tmp_path / "mine.yaml"
    target.write_text("keep me\n")
    code, _, err = tune("cp", "test/report", str(target))
    assert code == 1
    assert err == f"error: {target} already exists; pass --force to overwrite it\n"
    assert target.read_text() == "keep me\n"
    code, _, _ = tune("cp", "--force", "test/report", str(target))
    assert code == 0 and target.read_text() == REPORT_CONFIG


def test_cp_needs_the_parent_folder_or_make_parents(tune, catalog, tmp_path):
    target = tmp_path / "a" / "b" / "c.yaml"
    code, _, err = tune("cp", "test/report", str(target))
    assert code == 1 and "does not exist; create it or pass --make-parents" in err
    code, _, _ = tune("cp", "--make-parents", "test/report", str(target))
    assert code == 0 and target.is_file()


def test_cp_unknown_name_suggests(tune, catalog, tmp_path):
    code, _, err = tune("cp", "report_rank_single_devise", str(tmp_path))
    assert code == 1
    assert (
        "no recipe or built-in config named 'report_rank_single_devise'; did you mean 'report_rank_single_device'?"
        in err
    )


def test_cat_prints_the_file_as_written(tune, catalog):
    code, out, _ = tune("cat", "test/report")
    assert code == 0 and out == REPORT_CONFIG


def test_cat_resolved_merges_bases_and_overrides(tune, catalog):
    code, out, _ = tune("cat", "test/report", "model.out_features=8", "~model.in_features")
    assert code == 0
    assert out.splitlines() == [
        "output_dir: /tmp/attune-report",
        "message: hello from ${output_dir}",
        "model:",
        "  _component_: torch.nn.Linear",
        "  out_features: 8",
    ]
    code, resolved, _ = tune("cat", "--resolved", "test/report")
    assert "in_features: 4" in resolved


def test_cat_unknown_config(tune, catalog):
    code, _, err = tune("cat", "test/reprt")
    assert code == 1
    assert err.startswith("error: no config named 'test/reprt'; did you mean 'test/report'?")


@pytest.mark.parametrize("name", builtin_config_names())
def test_every_shipped_config_validates(tune, name):
    code, _, err = tune("validate", name)
    assert code == 0, err


def test_cp_to_a_new_folder_with_a_slash_and_to_a_dotted_name(tune, catalog, tmp_path):
    code, _, _ = tune("cp", "--make-parents", "test/report", f"{tmp_path}/new/")
    assert code == 0 and (tmp_path / "new" / "report.yaml").read_text() == REPORT_CONFIG
    code, _, _ = tune("cp", "test/report", str(tmp_path / "my_v1.2"))
    assert code == 0 and (tmp_path / "my_v1.2.yaml").is_file()


def test_cat_resolved_resolves_interpolations_and_overrides_may_follow_options(tune, catalog):
    code, out, _ = tune("cat", "test/report", "--resolved", "output_dir=/data/run")
    assert code == 0
    assert "message: hello from /data/run" in out.splitlines()


def test_command_line_misuse_is_one_line(tune, catalog):
    code, _, err = tune("cp", "test/report")
    assert code == 1
    assert err == (
        "error: tune cp: the following arguments are required: destination (see `tune cp --help`)\n"
    )
    code, _, err = tune("cat", "test/report", "--resolvd")
    assert code == 1 and err.startswith("error: tune: unrecognized arguments: --resolvd")
