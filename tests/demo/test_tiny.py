"""The tiny checkpoint: shipped with the package (tokenizer as trained from the demo text,
weights that echo), copied into the cache once however many processes ask at once, and still
buildable from scratch."""

import json
import threading
import time

import pytest

import attune.demo.tiny as tiny
from attune.demo.reverse_words import echo_rows
from attune.models import from_pretrained
from attune.tokenizer import from_pretrained as load_tokenizer
from attune.training import AnswerCheck


def test_concurrent_first_use_builds_the_checkpoint_once(tmp_path, monkeypatch):
    builds = []

    def slow_build(folder):
        builds.append(folder)
        time.sleep(0.3)  # long enough for every other caller to arrive while it builds
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(tiny, "_write_checkpoint", slow_build)
    # flock locks belong to open file descriptions, so threads contend like torchrun ranks
    found = []
    callers = [
        threading.Thread(target=lambda: found.append(tiny.tiny_checkpoint(tmp_path)))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1
    assert found == [tmp_path / f"tiny-v{tiny.VERSION}"] * 4


def test_the_shipped_tokenizer_is_the_one_trained_from_the_demo_text(tmp_path):
    tiny.write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny.SHIPPED / name).read_bytes(), name


def echo_accuracy(folder) -> float:
    model = from_pretrained(folder)
    check = AnswerCheck(echo_rows(48, seed=7), max_new_tokens=12, batch_size=48)
    return check(model, load_tokenizer(folder)).accuracy


def test_the_cached_checkpoint_is_the_shipped_one_and_it_echoes(tmp_path):
    folder = tiny.tiny_checkpoint(tmp_path)
    for name in tiny.SHIPPED_FILES:
        assert (folder / name).read_bytes() == (tiny.SHIPPED / name).read_bytes(), name
    assert echo_accuracy(folder) > 0.9  # the base model's behaviour: repeating its words


@pytest.mark.slow
def test_building_the_tiny_base_from_scratch_gives_an_echoing_model(tmp_path):
    """The pre-training that made the shipped weights still works: the rebuilt model (the
    same one on a CPU of the shipped one's kind, a different one on another) echoes."""
    tiny.build_tiny_base(tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["vocab_size"] == 576
    assert echo_accuracy(tmp_path / "tiny") > 0.9
