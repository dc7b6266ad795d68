"""Rollouts: a batch of prompts continued by the policy with the KV cache, laid out for scoring.

A :class:`Rollout` holds each prompt padded on the left and its response padded on the right,
``[batch, prompt_len + response_len]``, so that every response starts in the same column and
the positions that predict response tokens are one slice, ``prompt_len - 1 : -1``. Positions
count each row's own tokens only, so a row scores as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attune.models import TransformerDecoder, generate
from attune.precision import Precision, entered
from attune.rl.logprobs import (
    tempered,
    token_kl,
    token_logprobs,
    token_logprobs_and_entropy,
    token_statistics,
)


@dataclass
class Rollout:
    """Prompts and the responses generated for them.

    Attributes:
        tokens: ``[batch, prompt_len + response_len]`` prompts (left-padded) then responses
            (right-padded after their stop token).
        padding_mask: ``[batch, prompt_len + response_len]`` True for real tokens.
        prompt_len: the width of the prompt part.
        response_mask: ``[batch, response_len]`` True for response tokens, up to and including
            the stop token.
        stopped: ``[batch]`` whether each response ended with a stop token.
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    stopped: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        """``[batch, length]`` each token's position within its own row (0 at its first)."""
        return (self.padding_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def responses(self) -> torch.Tensor:
        """``[batch, response_len]`` the response tokens (padding after each one's end)."""
        return self.tokens[:, self.prompt_len :]

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[batch]`` tokens in each response, its stop token included."""
        return self.response_mask.sum(-1)

    def response_ids(self) -> list[list[int]]:
        """Each response's token ids, its stop token included, the padding after it not."""
        lengths = self.response_lengths.tolist()
        return [row[:length] for row, length in zip(self.responses.tolist(), lengths, strict=True)]

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """The rollout of some rows (a minibatch)."""
        return Rollout(
            self.tokens[rows],
            self.padding_mask[rows],
            self.prompt_len,
            self.response_mask[rows],
            self.stopped[rows],
        )

    @classmethod
    def from_tokens(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        stop_tokens: Sequence[int],
        pad_id: int,
        device: torch.device | str = "cpu",
    ) -> Rollout:
        """Lay out prompts and their responses (each ending at its stop token, if any)."""
        prompt_len = max(len(prompt) for prompt in prompts)
        response_len = max(1, max(len(response) for response in responses))
        batch = len(prompts)
        tokens = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            start = prompt_len - len(prompt)
            tokens[row, start:prompt_len] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, start:prompt_len] = True
            end = prompt_len + len(response)
            tokens[row, prompt_len:end] = torch.as_tensor(list(response), dtype=torch.long)
            mask[row, prompt_len:end] = True
        stops = set(stop_tokens)
        stopped = torch.tensor([bool(r) and r[-1] in stops for r in responses], dtype=torch.bool)
        return cls(
            tokens.to(device),
            mask.to(device),
            prompt_len,
            mask[:, prompt_len:].to(device),
            stopped.to(device),
        )


@torch.no_grad()
def generate_rollout(
    model: TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    all_ranks: bool = False,
) -> Rollout:
    """Continue every prompt with ``model`` (in eval mode, no gradients, one KV cache that is
    freed on return). Sampling arguments and ``all_ranks`` (every process decodes in step, as
    a sharded model needs) as :func:`attune.models.generate`."""
    was_training = model.training
    model.eval()
    try:
        responses = generate(
            model,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            generator=generator,
            all_ranks=all_ranks,
        )
    finally:
        model.train(was_training)
    device = model.embed_tokens.weight.device
    return Rollout.from_tokens(prompts, responses, stop_tokens, pad_id, device)


def response_hidden(
    model: TransformerDecoder,
    rollout: Rollout,
    precision: Precision | None = None,
) -> torch.Tensor:
    """``[batch, response_len, hidden]``: the final hidden states at the positions that
    predict each response token (a policy's next-token distribution, a value model's value of
    the state before the token)."""
    with entered(precision):
        hidden = model(
            rollout.tokens,
            positions=rollout.positions,
            padding_mask=rollout.padding_mask,
            return_hidden=True,
        )
    return hidden[:, rollout.prompt_len - 1 : -1]


def response_logprobs(
    model: TransformerDecoder,
    rollout: Rollout,
    precision: Precision | None = None,
    chunk_size: int = 1024,
    *,
    hidden: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Each response token's log-probability under ``model``, ``[batch, response_len]`` fp32
    (0 past a response's end), projected to the vocabulary only where there are response
    tokens. ``hidden``: the model's :func:`response_hidden`, when already computed;
    ``temperature``: the sampling temperature the distribution is taken at (:func:`tempered`)."""
    if hidden is None:
        hidden = response_hidden(model, rollout, precision)
    mask = rollout.response_mask
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    head = tempered(model.output, temperature)
    return logprobs.masked_scatter(
        mask, token_logprobs(hidden[mask], rollout.responses[mask], head, chunk_size)
    )


def response_logprobs_and_entropy(
    hidden: torch.Tensor,
    rollout: Rollout,
    output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response token's log-probability (differentiable) and the policy's entropy where
    it was sampled (no gradient), each ``[batch, response_len]`` fp32, 0 past a response's end.

    Args:
        hidden: the policy's :func:`response_hidden`.
        rollout: the rollout they score.
        output: the policy's output head.
        chunk_size: positions projected at once.
    """
    mask = rollout.response_mask
    logprobs, entropy = token_logprobs_and_entropy(
        hidden[mask], rollout.responses[mask], output, chunk_size
    )
    empty = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return empty.masked_scatter(mask, logprobs), empty.masked_scatter(mask, entropy)


@dataclass(frozen=True)
class RolloutScores:
    """What a rollout's response tokens are worth to the policy and its reference, each
    ``[batch, response_len]`` fp32, 0 past a response's end."""

    logprobs: torch.Tensor
    reference_logprobs: torch.Tensor
    entropy: torch.Tensor
    kl_vocab: torch.Tensor


def score_rollout(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    rollout: Rollout,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> RolloutScores:
    """The policy's and the reference's log-probabilities of the sampled tokens, the policy's
    entropy and the exact KL to the reference at every response position, with each output
    head projected once (no gradient).

    Args:
        hidden, reference_hidden: the policy's and the reference's :func:`response_hidden`.
        rollout: the rollout they score.
        output, reference_output: their output heads.
        chunk_size: positions projected at once.
    """
    mask = rollout.response_mask
    statistics = token_statistics(
        hidden[mask],
        reference_hidden[mask],
        rollout.responses[mask],
        output,
        reference_output,
        chunk_size,
    )
    empty = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    columns = [empty.masked_scatter(mask, statistics[:, index]) for index in range(4)]
    return RolloutScores(*columns)


def response_kl(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    rollout: Rollout,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``[batch, response_len]`` fp32: KL(policy || reference) of the next-token distributions
    at each response position, summed exactly over the vocabulary (0 past a response's end);
    differentiable in the policy's ``hidden``. Summed over a response, its mean over sampled
    responses is the sequences' KL, with less noise than the sampled tokens' estimate.

    Args:
        hidden, reference_hidden: the policy's and the reference's :func:`response_hidden`.
        rollout: the rollout they score.
        output, reference_output: their output heads.
        chunk_size: positions projected at once.
    """
    mask = rollout.response_mask
    kl = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    divergences = token_kl(
        hidden[mask], reference_hidden[mask], output, reference_output, chunk_size
    )
    return kl.masked_scatter(mask, divergences)


def response_values(
    model: TransformerDecoder,
    rollout: Rollout,
    precision: Precision | None = None,
) -> torch.Tensor:
    """A value model's estimate of each response state, ``[batch, response_len]`` fp32
    (0 past a response's end): the score head read where each response token is predicted."""
    hidden = response_hidden(model, rollout, precision)
    values = model.output(hidden).squeeze(-1).float()
    return values.masked_fill(~rollout.response_mask, 0.0)


def sequence_end_scores(
    model: TransformerDecoder,
    rollout: Rollout,
    precision: Precision | None = None,
) -> torch.Tensor:
    """A reward model's score of each whole sequence, ``[batch]`` fp32: its score head read at
    the response's last token (the stop token, when it stopped), where attune's reward models
    are trained to read it."""
    with entered(precision):
        hidden = model(
            rollout.tokens,
            positions=rollout.positions,
            padding_mask=rollout.padding_mask,
            return_hidden=True,
        )
    rows = torch.arange(rollout.tokens.shape[0], device=hidden.device)
    last = rollout.prompt_len + rollout.response_lengths.clamp(min=1) - 1
    return model.output(hidden[rows, last]).squeeze(-1).float()
