"""The recipe entry point: ``--config`` and overrides in, a checked config to the recipe."""

import pytest

from attune import config
from attune.errors import AttuneError

SCHEMA = {"output_dir": str, "steps": int}


@pytest.fixture
def run_file(write):
    return str(write("run.yaml", "output_dir: /tmp/x\nsteps: 3\n"))


def test_parse_passes_the_loaded_config(run_file):
    seen = {}

    @config.parse(SCHEMA)
    def recipe_main(cfg):
        seen["steps"] = cfg.steps
        return "done"

    assert recipe_main(["--config", run_file, "steps=5"]) == "done"
    assert seen == {"steps": 5}
    assert recipe_main.schema is SCHEMA
    assert config.find_recipe_entry({"x": 1, "main": recipe_main}) is recipe_main


def test_bare_decorator_works(run_file):
    @config.parse
    def recipe_main(cfg):
        return cfg.output_dir

    assert recipe_main(["--config", run_file]) == "/tmp/x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["steps=5"], "--config is required"),
        (["--config", "RUN", "--lr", "1"], "unknown option --lr"),
        (["--config", "RUN", "steps=five"], "'steps' must be int, got 'five' (str)"),
    ],
)
def test_bad_arguments_end_before_the_recipe_runs(run_file, argv, message, capsys, monkeypatch):
    monkeypatch.setenv("ATTUNE_DEBUG", "")  # restored at teardown, even if set inside
    ran = []

    @config.parse(SCHEMA)
    def recipe_main(cfg):
        ran.append(cfg)

    with pytest.raises(SystemExit) as exit_info:
        recipe_main([run_file if a == "RUN" else a for a in argv])
    assert exit_info.value.code == 1
    assert not ran
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err


def test_user_errors_during_the_run_are_one_line_with_the_rank(run_file, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("ATTUNE_DEBUG", "")  # restored at teardown, even if set inside

    @config.parse(SCHEMA)
    def recipe_main(cfg):
        raise AttuneError("data.jsonl:3: malformed JSON line")

    with pytest.raises(SystemExit):
        recipe_main(["--config", run_file])
    assert capsys.readouterr().err == "error [rank 1]: data.jsonl:3: malformed JSON line\n"


def test_overrides_may_come_before_and_after_the_config(run_file):
    assert config.recipe_arguments(["a=1", "--config", run_file, "~b", "c=2"]) == (
        run_file,
        ["a=1", "~b", "c=2"],
        [],
    )
    assert config.recipe_arguments([f"--config={run_file}"]) == (run_file, [], [])
    assert config.recipe_arguments(
        ["--allow-import", "my.losses", f"--config={run_file}", "--allow-import=other"]
    ) == (run_file, [], ["my.losses", "other"])


def test_launcher_options_after_the_recipe_get_a_hint():
    with pytest.raises(AttuneError, match="torchrun options such as --nproc_per_node go before"):
        config.recipe_arguments(["--config", "c.yaml", "--nproc_per_node", "2"])


def test_debug_after_the_config_shows_tracebacks(run_file, capsys, monkeypatch):
    monkeypatch.setenv("ATTUNE_DEBUG", "")  # restored at teardown, even if set inside

    @config.parse(SCHEMA)
    def recipe_main(cfg):
        raise AttuneError("bad row")

    with pytest.raises(SystemExit):
        recipe_main(["--config", run_file, "--debug"])
    assert "Traceback" in capsys.readouterr().err
