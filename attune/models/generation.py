"""Batched decoding with the KV cache: greedy or sampled (temperature, top-k, top-p), with stops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attune.distributed import any_rank
from attune.models.decoder import TransformerDecoder


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``[batch, vocab]`` logits.

    Args:
        logits: the next-token logits.
        temperature: 0 for greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the ``top_k`` most likely tokens.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        generator: random source, for reproducible sampling; or one per row, so that a row
            samples alike whatever batch it is decoded in (RL's groups on any number of
            processes).

    Returns:
        ``[batch]`` token ids.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probabilities = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probabilities.cumsum(dim=-1) - probabilities >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probabilities = logits.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
    return torch.cat(
        [
            torch.multinomial(row[None], 1, generator=row_generator)[0]
            for row, row_generator in zip(probabilities, generator, strict=True)
        ]
    )


@torch.no_grad()
def generate(
    model: TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    all_ranks: bool = False,
    stopped: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Continue each prompt, decoding all of them together with one KV cache.

    Prompts are padded on the left, so every row's next token sits in the last column; each
    row's positions count its own tokens only.

    Args:
        model: the decoder.
        prompts: token ids of each prompt.
        max_new_tokens: the most tokens to add to each prompt.
        temperature, top_k, top_p, generator: see :func:`sample_next`.
        stop_tokens: a row ends after producing one of these (it is kept in the output).
        pad_id: filler for the padding (never attended).
        all_ranks: every process of the default group decodes its own prompts in step with
            the others (a sharded model's forward is a collective): decoding goes on until
            every process's rows have finished.
        stopped: given the new tokens so far (``[batch, steps]``) and which rows have
            finished (``[batch]`` bool), which rows end here too (a stop string in their text):
            their last token is kept, and decoding ends when every row has.

    Returns:
        The new tokens of each prompt, up to and including its stop token.
    """
    device = model.embed_tokens.weight.device
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    padding_mask = torch.zeros(batch, prompt_len + max_new_tokens, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), device=device)
        padding_mask[row, prompt_len - len(prompt) :] = True  # generated slots count as real
    positions = (padding_mask[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)
    cache = model.make_cache(batch, prompt_len + max_new_tokens)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens, lengths = [], torch.zeros(batch, dtype=torch.long, device=device)

    logits = model(
        tokens,
        positions=positions,
        padding_mask=padding_mask[:, :prompt_len],
        cache=cache,
        output_last=1,  # the prompt's other logits are not needed
    )[:, -1]
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
        new_tokens.append(next_tokens)
        lengths += ~finished
        finished |= torch.isin(next_tokens, stops)
        if stopped is not None:
            finished |= stopped(torch.stack(new_tokens, dim=1), finished)
        if step == max_new_tokens - 1 or _all_finished(finished, all_ranks):
            break
        positions = positions[:, -1:] + 1
        logits = model(
            next_tokens[:, None],
            positions=positions,
            padding_mask=padding_mask[:, : cache.length + 1],
            cache=cache,
        )[:, -1]
    if not new_tokens:
        return [[] for _ in range(batch)]
    rows = torch.stack(new_tokens, dim=1).tolist()
    return [row[:length] for row, length in zip(rows, lengths.tolist(), strict=True)]


def _all_finished(finished: torch.Tensor, all_ranks: bool) -> bool:
    if not all_ranks:
        return bool(finished.all())
    return not any_rank(not bool(finished.all()))
