"""AttuneLM scores lm-eval's tasks as lm-eval's own HF model does on the same HF folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

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
