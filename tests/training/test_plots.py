"""curves.png and ``tune plot``: real PNGs, opened and looked at; bad input."""

from __future__ import annotations

import json

import pytest

from attune.training import plots
from tests.conftest import assert_one_line_error

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def write_metrics(folder, shift=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "step": step,
            "loss": 2.0 / step + shift,
            "lr": 1e-3 * step,
            "rewards/chosen": 0.1 * step,
            "rewards/rejected": -0.1 * step,
            "rewards/margin": 0.2 * step + shift,
            "kl": 0.01 * step,
            "tokens_per_second": 1000.0,
        }
        for step in range(1, 9)
    ]
    lines.append({"step": 8, "val_loss": 1.5, "eval/task/acc": 0.5})
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 9, "lo'  # a torn line
    )
    return folder


def looks_drawn(path, width, height):
    image = Image.open(path).convert("RGB")
    assert image.size == (width, height)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, text and axes, not a blank page
    assert max(count for count, _ in colors) < 0.95 * width * height


def test_a_run_s_curves_have_a_panel_for_each_signal_it_logged(tmp_path):
    run = write_metrics(tmp_path / "run")
    records = plots.read_metrics(run)
    assert plots.panels([records]) == [
        ("loss", ["loss", "val_loss"]),
        ("learning rate", ["lr"]),
        ("reward", ["rewards/chosen", "rewards/rejected"]),
        ("reward margin", ["rewards/margin"]),
        ("KL", ["kl"]),
        ("eval scores", ["eval/task/acc"]),
    ]
    assert plots.draw_run(run) == run / "curves.png"
    looks_drawn(run / "curves.png", 1200, 960)  # two columns, three rows
    assert not list(run.glob(".*partial"))


def test_tune_plot_draws_two_runs_into_one_image(tmp_path, tune, monkeypatch):
    first = write_metrics(tmp_path / "a")
    second = write_metrics(tmp_path / "b", shift=0.5)
    output = tmp_path / "both.png"
    code, out, err = tune("plot", str(first), str(second), "--output", str(output))
    assert (code, out.strip(), err) == (0, f"wrote {output}", "")
    looks_drawn(output, 1200, 960)

    monkeypatch.chdir(tmp_path)  # the default output: curves.png here
    assert tune("plot", "a")[0] == 0 and (tmp_path / "curves.png").is_file()


def test_tune_plot_on_a_folder_without_metrics_is_one_line(tmp_path, tune, monkeypatch):
    (tmp_path / "empty").mkdir()
    code, _, err = tune("plot", str(tmp_path / "empty"))
    assert code == 1
    assert_one_line_error(err, "no metrics.jsonl", str(tmp_path / "empty"))
    code, _, err = tune("plot", str(tmp_path / "missing"))
    assert code == 1
    assert_one_line_error(err, "is not a folder")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "note": "x"}\n')
    code, _, err = tune("plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png"))
    assert code == 1
    assert_one_line_error(err, "no loss, learning rate or other curve")
    code, _, err = tune("plot", str(write_metrics(tmp_path / "run")), "-o", str(tmp_path))
    assert code == 1
    assert_one_line_error(err, "is a folder; give a file name")

    monkeypatch.setattr(plots, "available", lambda: False)
    code, _, err = tune("plot", str(write_metrics(tmp_path / "run")))
    assert code == 1
    assert_one_line_error(err, 'pip install "attune[plot]"')
