"""Shared test helpers: run ``tune`` for real (a subprocess) or in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from attune.cli.main import main

# With several test workers (pytest -n), each gets one core's worth of threads: torch's default
# of one thread per core in every worker would oversubscribe the cores and slow all of them.
# Subprocesses (tune run, torchrun workers) inherit it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ASSETS = Path(__file__).parent / "assets"


def tune_command() -> list[str]:
    """The installed ``tune`` console script (falls back to ``python -m attune``)."""
    script = Path(sysconfig.get_path("scripts")) / "tune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "attune"]


def run_tune(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout=240):
    """Run the real ``tune`` command line in a subprocess; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "ATTUNE_DEBUG"}
    full_env.update(env or {})
    return subprocess.run(
        [*tune_command(), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """A user error: exactly one line (no traceback), containing every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def tune(capsys, monkeypatch):
    """Run ``tune`` in-process: ``tune("ls")`` -> (exit code, stdout, stderr)."""
    # set (to off), not deleted: ``tune --debug`` sets it in os.environ for torchrun's workers,
    # and monkeypatch then removes it again at teardown, so it cannot leak into later tests
    monkeypatch.setenv("ATTUNE_DEBUG", "")

    def call(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return (code if isinstance(code, int) else 1), out, err

    return call


@pytest.fixture
def write(tmp_path):
    """Write a dedented text file under tmp_path: ``write("a.yaml", "...")`` -> its Path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return _write


# The slowest tests first, so that with several workers (pytest -n) the longest one starts at
# once instead of being left for last while the other workers sit idle.
SLOW_FIRST = (
    "tests/recipes/test_demo.py",
    "tests/recipes/test_kd.py",
    "tests/recipes/test_qat.py",
    "tests/recipes/test_eval_during_training.py",
)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(SLOW_FIRST))
