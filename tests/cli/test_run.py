"""``tune run``: in-process, through torchrun on 2 CPU processes, and its errors."""

import json

import pytest

from tests.conftest import ASSETS, assert_one_line_error, run_tune

RECIPE = str(ASSETS / "report_rank_recipe.py")
CONFIG = str(ASSETS / "report_rank.yaml")
# Set, so torchrun does not print its OMP_NUM_THREADS banner over the output under test.
QUIET = {"OMP_NUM_THREADS": "1"}


def run_two_workers(output_dir, *overrides):
    """``tune run --nproc_per_node 2`` of the test recipe."""
    return run_tune(
        "run", "--nproc_per_node", "2", RECIPE, "--config", CONFIG,
        f"output_dir={output_dir}", *overrides, env=QUIET,
    )  # fmt: skip


def reports(folder):
    return sorted(
        (json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"]
    )


def test_registered_recipe_and_builtin_config_run_in_process(tune, catalog, tmp_path):
    code, out, err = tune(
        "run", "report_rank_single_device", "--config", "test/report", f"output_dir={tmp_path}"
    )
    assert (code, err) == (0, "")
    assert out == f"rank 0 of 1: hello from {tmp_path}\n"
    [report] = reports(tmp_path)
    assert report["world_size"] == 1
    assert report["model"] == "Linear(in_features=4, out_features=2, bias=True)"


def test_users_recipe_file_runs_through_the_real_command(tmp_path):
    result = run_tune(
        "run", RECIPE, "--config", CONFIG, f"output_dir={tmp_path}", "model.out_features=3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"rank 0 of 1: hello from {tmp_path}\n"
    [report] = reports(tmp_path)
    assert report["model"] == "Linear(in_features=4, out_features=3, bias=True)"


def test_nproc_per_node_2_launches_two_gloo_processes(tmp_path):
    result = run_two_workers(tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"rank 0 of 2: hello from {tmp_path}",
        f"rank 1 of 2: hello from {tmp_path}",
    ]
    assert [(r["rank"], r["world_size"], r["rank_sum"]) for r in reports(tmp_path)] == [
        (0, 2, 1),
        (1, 2, 1),
    ]


def test_a_failing_worker_is_reported_by_rank(tmp_path):
    result = run_two_workers(tmp_path, "fail_on_rank=1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error [rank 1]: asked to fail on rank 1" in result.stderr.splitlines()
    # rank 0 may finish first or be stopped by torchrun: either way rank 1 is named
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: worker rank 1 failed with exit code 1"), last
    assert last.endswith("; its own error is printed above")


def test_config_mistakes_are_caught_once_before_workers_start(tmp_path):
    result = run_two_workers(tmp_path, "mesage=hi")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "command line 'mesage=hi'", "did you mean 'message'?")
    assert not list(tmp_path.glob("rank*.json"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_recipe", "--config", CONFIG], "no recipe named 'no_such_recipe'"),
        (["missing.py", "--config", CONFIG], "recipe file not found: missing.py"),
        ([RECIPE], "--config is required"),
        ([RECIPE, "--config", "nowhere.yaml"], "config file not found: nowhere.yaml"),
        ([RECIPE, "--config", CONFIG, "oops"], "override 'oops' is not key=value"),
    ],
)
def test_bad_invocations_are_one_line(tune, argv, message):
    code, _, err = tune("run", *argv)
    assert code == 1
    assert len(err.splitlines()) == 1 and message in err, err


def test_launcher_misuse_is_one_line(tune):
    code, _, err = tune("run", "--nproc_per_node")
    assert code == 1
    assert err == (
        "error: tune run: argument --nproc-per-node/--nproc_per_node: expected one argument "
        "(see `tune run --help` and `torchrun --help`)\n"
    )


def test_unknown_recipe_name_suggests(tune, catalog):
    code, _, err = tune("run", "report_rank_single_devise", "--config", "test/report")
    assert code == 1
    assert "did you mean 'report_rank_single_device'?" in err


def test_run_help(tune):
    code, out, _ = tune("run", "--help")
    assert code == 0 and out.startswith("usage: tune run [torchrun options] RECIPE --config")
