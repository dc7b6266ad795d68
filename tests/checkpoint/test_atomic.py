"""Atomic folder writes: a failed save leaves the previous checkpoint whole."""

import pytest

from attune.checkpoint import atomic_folder


def test_a_failed_write_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "step_10"
    with atomic_folder(final) as staging:
        (staging / "model.safetensors").write_text("good")
    with pytest.raises(OSError, match="No space left"), atomic_folder(final) as staging:
        (staging / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")
    assert (final / "model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["step_10"]


def test_a_complete_write_replaces_the_folder(tmp_path):
    final = tmp_path / "latest"
    for content in ("first", "second"):
        with atomic_folder(final) as staging:
            (staging / "weights").write_text(content)
    assert (final / "weights").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
