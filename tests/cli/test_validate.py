"""``tune validate``: checks without training, all problems at once."""

from tests.conftest import ASSETS, assert_one_line_error, run_tune


def test_valid_builtin_config_checked_against_its_recipe(tune, catalog):
    code, out, err = tune("validate", "test/report")
    assert (code, err) == (0, "")
    assert out == "config OK: test/report against report_rank_recipe.py\n"


def test_problems_are_listed_together(tune, catalog):
    code, _, err = tune(
        "validate", "test/report", "mesage=x", "model.in_feature=3", "fail_on_rank=one"
    )
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "error: config has 3 problems:"
    assert (
        "  command line 'mesage=x': unknown key 'mesage'; did you mean 'message'? (the recipe does not read it)"
        in lines
    )
    assert (
        "  command line 'fail_on_rank=one': 'fail_on_rank' must be int | None, got 'one' (str)"
        in lines
    )
    assert (
        "  command line 'model.in_feature=3': model.in_feature: torch.nn.Linear takes no "
        "argument 'in_feature'; did you mean 'in_features'?"
    ) in lines


def test_recipe_option_takes_a_users_file(tune, write):
    path = write("mine.yaml", "output_dir: /tmp/x\n")
    recipe = str(ASSETS / "report_rank_recipe.py")
    code, _, err = tune("validate", str(path), "--recipe", recipe, "mesage=hi")
    assert code == 1
    assert "unknown key 'mesage'; did you mean 'message'?" in err
    assert "missing key 'message' (str)" in err


def test_a_recipe_file_that_does_not_load_is_one_line(tune, write):
    broken = write("broken_recipe.py", "def recipe_main(:\n")
    path = write("mine.yaml", "x: 1\n")
    code, _, err = tune("validate", str(path), "--recipe", str(broken))
    assert code == 1
    assert err == f"error: {broken}:1: syntax error in recipe: invalid syntax\n"


def test_without_a_recipe_components_are_still_checked(tune, write):
    path = write("mine.yaml", "head:\n  _component_: torch.nn.Linear\n  in_features: wide\n")
    code, _, err = tune("validate", str(path))
    assert code == 1
    assert (
        err
        == f"error: config: {path}:3: head.in_features: torch.nn.Linear expects int, got 'wide' (str)\n"
    )


def test_yaml_syntax_error_through_the_real_command(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: 1\nb: [2\n")
    result = run_tune("validate", str(path))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{path}:3:", "YAML syntax error")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [\n")
    result = run_tune("--debug", "validate", str(path))
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: {path}:")
