"""AnswerCheck and AnswerLog, with generation replaced by canned answers."""

import json
from types import SimpleNamespace

import pytest
import torch

from attune.training import answer_check
from attune.training.answer_check import AnswerCheck, AnswerLog, AnswerReport

ROWS = [
    {"instruction": "reverse: a b", "output": "b a"},
    {"instruction": "reverse: c d", "output": " d c "},  # ends' whitespace is ignored
    {"instruction": "reverse:", "input": "e f", "output": "f e"},
]


class CharTokenizer:
    """Text <-> character codes; the prompt is the user turn's text."""

    stop_token_ids = (0,)
    padding_id = 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        assert [m["role"] for m in messages] == ["user"]  # the answer is not in the prompt
        return [ord(c) for c in messages[0]["content"]]

    def decode(self, tokens, skip_special_tokens):
        return "".join(chr(t) for t in tokens)


@pytest.fixture
def canned(monkeypatch):
    """generate() answers each prompt from a table; records the batches it was given."""
    batches = []
    answers = {"reverse: a b": " b a\n", "reverse: c d": "c d", "reverse:\n\ne f": "f e"}

    def generate(model, prompts, max_new_tokens, stop_tokens, pad_id):
        assert (max_new_tokens, stop_tokens, pad_id) == (7, (0,), 0)
        assert not model.training
        texts = ["".join(map(chr, prompt)) for prompt in prompts]
        batches.append(texts)
        return [[ord(c) for c in answers[text]] for text in texts]

    monkeypatch.setattr(answer_check, "generate", generate)
    return batches


def test_exact_answers_count_in_batches_and_the_model_goes_back_to_training(canned):
    model = torch.nn.Linear(2, 2).train()
    check = AnswerCheck(ROWS, max_new_tokens=7, show=2, batch_size=2)
    report = check(model, CharTokenizer())
    assert report.accuracy == pytest.approx(2 / 3)
    assert canned == [["reverse: a b", "reverse: c d"], ["reverse:\n\ne f"]]
    assert report.samples == [("reverse: a b", "b a", "b a"), ("reverse: c d", "c d", "d c")]
    assert model.training


def test_the_report_prints_accuracy_then_samples():
    report = AnswerReport(0.5, [("2+2", "4", "4")])
    assert report.lines("after training") == [
        "after training: 50% of held-out answers exact",
        "  '2+2' -> '4' (expected '4')",
    ]


def test_the_log_prints_and_keeps_each_report_on_the_main_process(canned, tmp_path):
    printed = []
    run = SimpleNamespace(output_dir=tmp_path, print=printed.append, is_main=True)
    log = AnswerLog(AnswerCheck(ROWS, max_new_tokens=7, show=1), CharTokenizer(), run)
    model = torch.nn.Linear(2, 2).eval()
    log.record(model, "before")
    log.record(model, "after")
    assert printed[0].startswith("before training: 67% of held-out answers exact")
    saved = json.loads((tmp_path / "answers.json").read_text())
    assert list(saved) == ["before", "after"]
    assert saved["after"]["samples"] == [["reverse: a b", "b a", "b a"]]
    assert not model.training

    other_rank = SimpleNamespace(output_dir=tmp_path / "r1", print=printed.append, is_main=False)
    AnswerLog(AnswerCheck(ROWS, max_new_tokens=7), CharTokenizer(), other_rank).record(model, "x")
    assert not (tmp_path / "r1").exists()
    AnswerLog(None, CharTokenizer(), run).record(model, "never")  # no check configured
    assert len(printed) == 3
