"""MetricsWriter: the metrics.jsonl lines, resuming, non-finite values, the extra logger."""

import json

import pytest

from attune.training.metrics import METRICS_FILE, MetricsWriter, append_metrics


def records(folder):
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


class RecordingLogger:
    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.calls.append("closed")


def test_each_log_is_one_json_line_with_its_fields_written_at_once(tmp_path):
    writer = MetricsWriter(tmp_path / "run", total_steps=3, progress=False)
    writer.log({"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_second": 900})
    # flushed per line: a run killed now keeps its metrics
    assert records(tmp_path / "run") == [
        {"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_second": 900}
    ]
    writer.log({"step": 2, "loss": 2.0, "lr": 1e-4, "note": "text"})
    writer.close()
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
    assert records(tmp_path / "run")[1]["note"] == "text"


def test_non_finite_values_are_written_as_null(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=1, progress=False)
    writer.log({"step": 1, "loss": float("inf"), "grad_norm": float("-inf"), "lr": 0.5})
    writer.close()
    append_metrics(tmp_path, {"step": 1, "eval_loss": float("nan")})
    text = (tmp_path / METRICS_FILE).read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    assert records(tmp_path) == [
        {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5},
        {"step": 1, "eval_loss": None},
    ]


def test_a_fresh_run_starts_the_file_over_and_a_resumed_one_drops_torn_lines(tmp_path):
    (tmp_path / METRICS_FILE).write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo'
    )
    resumed = MetricsWriter(tmp_path, total_steps=4, resume_step=2, progress=False)
    resumed.log({"step": 3, "loss": 1.0})
    resumed.close()
    assert records(tmp_path) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 1.0},
    ]
    fresh = MetricsWriter(tmp_path, total_steps=4, progress=False)
    fresh.log({"step": 1, "loss": 9.0})
    fresh.close()
    assert records(tmp_path) == [{"step": 1, "loss": 9.0}]


def test_the_extra_logger_gets_the_numbers_without_step_and_is_closed(tmp_path):
    extra = RecordingLogger()
    writer = MetricsWriter(tmp_path, total_steps=2, extra=extra, progress=False)
    writer.log({"step": 2, "loss": 1.5, "lr": 0.1})
    assert extra.calls == [(2, {"loss": 1.5, "lr": 0.1})]
    writer.close()
    assert extra.calls[-1] == "closed"


def test_a_writer_off_rank_zero_writes_nothing(tmp_path, capsys):
    extra = RecordingLogger()
    writer = MetricsWriter(tmp_path / "run", total_steps=2, extra=extra, enabled=False)
    writer.log({"step": 1, "loss": 1.0})
    writer.write("hello")
    writer.advance()
    writer.close()
    assert not (tmp_path / "run").exists()
    assert extra.calls == []
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("progress", [False, True])
def test_lines_are_printed_with_or_without_the_progress_bar(tmp_path, capsys, progress):
    writer = MetricsWriter(tmp_path, total_steps=4, resume_step=1, progress=progress)
    writer.log({"step": 2, "loss": 0.25, "lr": 1e-5, "tokens_per_second": 1234.4})
    writer.advance(2)
    writer.write("step 2: loss 0.25")
    if progress:
        assert writer.bar.n == 3  # from the resumed step, on by two
        assert writer.bar.postfix == "loss=0.25 lr=1.00e-05 tokens_per_second=1234"
    writer.close()
    assert capsys.readouterr().out == "step 2: loss 0.25\n"
