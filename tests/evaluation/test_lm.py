"""AttuneLM scores lm-eval's tasks as lm-eval's own HF model does on the same HF folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from attune.evaluation import LOCAL_TASKS, local_task_folder  # noqa: E402
from attune.evaluation.lm import AttuneLM  # noqa: E402
from attune.models import from_pretrained  # noqa: E402
from attune.tokenizer import from_pretrained as tokenizer_from_pretrained  # noqa: E402
from tests.recipes.conftest import small_llama  # noqa: E402

LIMIT = 6


def evaluate(model, tasks_dir: Path) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(LOCAL_TASKS),
        task_manager=TaskManager(include_path=str(tasks_dir)),
        limit=LIMIT,
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
    )


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def test_scores_equal_lm_eval_hf_model(tmp_path):
    folder = small_llama(tmp_path / "model")
    tasks_dir = local_task_folder(tmp_path / "tasks")
    model = from_pretrained(folder, dtype=torch.float32, device="cpu").eval()
    ours = evaluate(AttuneLM(model, tokenizer_from_pretrained(folder), batch_size=4), tasks_dir)
    theirs = evaluate(
        HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4), tasks_dir
    )

    metrics = {
        "attune_reverse_words_mc": ["acc,none", "acc_norm,none"],
        "attune_reverse_words_rolling": [
            "word_perplexity,none",
            "byte_perplexity,none",
            "bits_per_byte,none",
        ],
        "attune_reverse_words_gen": ["exact_match,strip"],
    }
    for task, names in metrics.items():
        for name in names:
            assert close(ours["results"][task][name], theirs["results"][task][name]), (task, name)
    # each request's own answer, not only the averages
    for task in metrics:
        for mine, ref in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert mine["arguments"] == ref["arguments"]  # the same prompts (chat template)
            for a, b in zip(mine["resps"], ref["resps"], strict=True):
                if isinstance(a[0], str):
                    assert a == b
                elif isinstance(a[0], float):
                    assert close(a[0], b[0])
                else:
                    assert close(a[0][0], b[0][0]) and a[0][1] == b[0][1]


def test_chat_template_continues_the_final_message(tmp_path):
    folder = small_llama(tmp_path / "model")
    model = from_pretrained(folder, dtype=torch.float32, device="cpu").eval()
    lm = AttuneLM(model, tokenizer_from_pretrained(folder))
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Repeat these words: red boat sky"},
        {"role": "assistant", "content": "red boat"},
    ]
    for add in (True, False):
        history = chat[:-1] if add else chat
        assert lm.apply_chat_template(history, add_generation_prompt=add) == (
            reference.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add, continue_final_message=not add
            )
        )
    assert lm.chat_template(True) == reference.chat_template
    assert lm.chat_template(False) is None


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=index)
        for index, args in enumerate(arguments)
    ]


def test_every_scoring_path_equals_hflm(tmp_path):
    """Shared prefixes (answers of several tokens, of one token, more answers than a batch),
    requests scored alone, an empty context, and contexts cut to the model's length, on a
    model with wide weights (far from uniform, so that positions and masks matter)."""
    folder = small_llama(tmp_path / "model", initializer_range=0.2)
    model = from_pretrained(folder, dtype=torch.float32, device="cpu").eval()
    ours = AttuneLM(model, tokenizer_from_pretrained(folder), batch_size=4, max_length=40)
    theirs = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4,
                  max_length=40)  # fmt: skip
    question = "Reverse the order of these words: red boat sky dog cat"
    long_context = " ".join(["red boat sky"] * 30)  # longer than max_length: cut on the left
    arguments = [
        *((question, f" {answer}") for answer in ("sky boat red", "red boat sky", "boat")),
        *((question + " Answer:", f" {letter}") for letter in "ABCDEFG"),  # one token each
        *(("Repeat these words: cat dog", f" {answer}") for answer in ("dog cat", "cat dog")),
        *(("Say: red", f" {answer}") for answer in ("red boat", "boat red")),  # batched with ^
        ("Repeat: cat", " dog cat dog"),
        ("", "red boat sky"),
        *((long_context, f" {answer}") for answer in ("sky", "boat red sky")),
    ]
    got = ours.loglikelihood(requests("loglikelihood", arguments))
    expected = theirs.loglikelihood(requests("loglikelihood", arguments))
    assert len(got) == len(expected) == len(arguments)
    rows = zip(got, expected, arguments, strict=True)
    for (score, greedy), (reference, reference_greedy), args in rows:
        assert close(score, reference), args
        assert greedy == reference_greedy, args

    texts = [(question + " " + " ".join(["sky"] * n),) for n in (1, 30, 70)]  # 70: two windows
    got_rolling = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    expected_rolling = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert all(close(a, b) for a, b in zip(got_rolling, expected_rolling, strict=True))


def test_generation_stops_at_a_stop_string(tmp_path):
    """A batch stops decoding once every row has written one of its ``until`` strings, and
    answers as HFLM does."""
    folder = small_llama(tmp_path / "model")
    model = from_pretrained(folder, dtype=torch.float32, device="cpu").eval()
    ours = AttuneLM(model, tokenizer_from_pretrained(folder), batch_size=2)
    theirs = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=2)
    prompts = ["Reverse the order of these words: red boat sky", "Repeat: cat dog"]
    free = ours.generate_until(
        requests("generate_until", [(p, {"until": [], "max_gen_toks": 8}) for p in prompts])
    )
    assert all(len(text) > 2 for text in free)
    stops = [text[1:3] for text in free]  # each answer's second and third characters
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    arguments = [(p, {"until": stops, "max_gen_toks": 8}) for p in prompts]
    got = ours.generate_until(requests("generate_until", arguments))
    assert got == [text[: text.index(stop)] for text, stop in zip(free, stops, strict=True)]
    assert len(forwards) < 8  # not every step of max_gen_toks
    assert got == theirs.generate_until(requests("generate_until", arguments))
