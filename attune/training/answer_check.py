"""Answers to held-out prompts before and after training: the evidence a run learned.

Each row is an instruction and its expected output (Alpaca columns). The prompt is rendered with
the chat template and answered greedily with the KV cache; an answer counts when it equals the
expected output (whitespace at the ends ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attune import config
from attune.data.formats import instruction_messages
from attune.models import TransformerDecoder, generate
from attune.tokenizer import Tokenizer


@dataclass
class AnswerReport:
    """Exact-match accuracy and a few (prompt, answer, expected) samples."""

    accuracy: float
    samples: list[tuple[str, str, str]]

    def lines(self, label: str) -> list[str]:
        out = [f"{label}: {self.accuracy:.0%} of held-out answers exact"]
        out += [f"  {prompt!r} -> {answer!r} (expected {expected!r})"
                for prompt, answer, expected in self.samples]  # fmt: skip
        return out


class AnswerCheck:
    """Greedy answers to held-out instruction rows (the ``answer_check`` config component).

    Args:
        rows: ``instruction`` / ``output`` (and optional ``input``) rows.
        max_new_tokens: the longest answer.
        show: how many samples a report prints.
        batch_size: prompts answered together.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 32,
        show: int = 3,
        batch_size: int = 32,
    ):
        self.rows = list(rows)
        self.max_new_tokens = max_new_tokens
        self.show = show
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: TransformerDecoder, tokenizer: Tokenizer) -> AnswerReport:
        was_training = model.training
        model.eval()
        prompts, expected = [], []
        for row in self.rows:
            messages = instruction_messages(row)
            prompts.append(
                tokenizer.apply_chat_template(
                    messages[:-1], add_generation_prompt=True, tokenize=True
                )
            )
            expected.append(messages[-1]["content"].strip())
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            outputs = generate(
                model,
                prompts[start : start + self.batch_size],
                self.max_new_tokens,
                stop_tokens=tokenizer.stop_token_ids,
                pad_id=tokenizer.padding_id,
            )
            answers += [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
        model.train(was_training)
        correct = sum(a == e for a, e in zip(answers, expected, strict=True))
        samples = [
            (instruction_messages(row)[-2]["content"], answer, want)
            for row, answer, want in zip(self.rows[: self.show], answers, expected, strict=False)
        ]
        return AnswerReport(correct / max(len(self.rows), 1), samples)


class AnswerLog:
    """A run's answer checks: printed, and kept in ``output_dir/answers.json`` (rank 0).

    Args:
        check: the ``answer_check`` component, or None (then nothing happens).
        tokenizer: the model's tokenizer.
        run: the run (its ``output_dir``, ``print`` and ``is_main``).
    """

    def __init__(self, check: AnswerCheck | None, tokenizer: Tokenizer, run: Any):
        self.check = check
        self.tokenizer = tokenizer
        self.run = run
        self.reports: dict[str, AnswerReport] = {}

    @classmethod
    def at_start(
        cls, cfg: Any, tokenizer: Tokenizer, run: Any, model: TransformerDecoder, resumed: bool
    ) -> AnswerLog:
        """The config's ``answer_check`` (None: nothing happens), with the model's answers
        recorded as ``before`` unless the run resumes one that recorded them."""
        answers = cls(config.instantiate(cfg.get("answer_check")), tokenizer, run)
        if not resumed:
            answers.record(model, "before")
        return answers

    def record(self, model: TransformerDecoder, when: str) -> None:
        """Answer the held-out prompts now and report it as ``when`` (``before``, ``after``)."""
        if self.check is None:
            return
        report = self.check(model, self.tokenizer)
        self.reports[when] = report
        self.run.print("\n".join(report.lines(f"{when} training")))
        if self.run.is_main:
            saved = {name: vars(value) for name, value in self.reports.items()}
            (self.run.output_dir / "answers.json").write_text(json.dumps(saved, indent=2) + "\n")
