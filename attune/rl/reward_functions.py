"""Built-in verifiable rewards, called as TRL calls reward functions
(``function(prompts=[...], completions=[...], **columns) -> list of floats``) and named in a
config through :class:`attune.rl.FunctionReward`::

    reward:
      _component_: attune.rl.Rewards
      sources:
        - _component_: attune.rl.FunctionReward
          function: {_component_: attune.rl.math_answer_reward, _partial_: true}
        - _component_: attune.rl.FunctionReward
          function:
            _component_: attune.rl.format_reward
            _partial_: true
            pattern: '(?s).*\\\\boxed\\{.+\\}.*'
      weights: [1.0, 0.1]

The demo's word-reversal reward is :func:`attune.demo.reverse_words_reward`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from attune.errors import ConfigError

GSM8K_ANSWER_MARK = "####"


def _require_math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        raise ConfigError(
            'attune.rl.math_answer_reward needs math-verify: pip install "attune[rl]" (or pip '
            "install math-verify)"
        ) from None
    return math_verify


def reference_answer(answer: str) -> str:
    """The final answer of a reference solution: what follows GSM8K's ``####`` when there is
    one (commas in numbers dropped), else the whole text."""
    if GSM8K_ANSWER_MARK in answer:
        answer = answer.rsplit(GSM8K_ANSWER_MARK, 1)[1].strip().replace(",", "")
    return answer


def math_answer_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answer: Sequence[str],
    **columns: Any,
) -> list[float]:
    """1.0 where a completion's final answer equals the reference ``answer`` mathematically,
    else 0.0, as `math-verify <https://github.com/huggingface/Math-Verify>`_ judges it (the
    completion's last boxed or plain expression against the reference's; ``\\frac12``,
    ``0.5`` and ``1/2`` agree). A GSM8K answer column (a worked solution ending ``#### 72``) is
    read as its final number.

    Args:
        prompts: the prompts (unused).
        completions: the decoded completions.
        answer: the reference answers, one per completion (the dataset's ``answer`` column).
    """
    math_verify = _require_math_verify()
    # math-verify bounds its work with SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        text = reference_answer(str(reference))
        gold = math_verify.parse(text, parsing_timeout=timeout) or math_verify.parse(
            f"${text}$", parsing_timeout=timeout
        )
        if not gold:  # a reference math-verify cannot read: compare the text
            rewards.append(float(completion.strip() == text.strip()))
            continue
        guess = math_verify.parse(completion, parsing_timeout=timeout)
        verified = bool(guess) and math_verify.verify(gold, guess, timeout_seconds=timeout)
        rewards.append(float(verified))
    return rewards


def format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    pattern: str = r"(?s)<think>.*?</think>\s*<answer>.*?</answer>",
    **columns: Any,
) -> list[float]:
    """1.0 where the whole completion matches the regular expression ``pattern`` (by default
    DeepSeek-R1's ``<think>...</think><answer>...</answer>``), else 0.0.

    Args:
        prompts: the prompts (unused).
        completions: the decoded completions.
        pattern: the format, matched against the whole completion (``re.fullmatch``; add
            ``(?s)`` for ``.`` to cross lines).
    """
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"format_reward: pattern {pattern!r} is not a regex: {error}") from None
    return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]
