"""Groups of completions: a prompt answered ``num_generations`` times, the unit of GRPO.

Every completion is sampled from a generator of its own, seeded by the run's seed, the step, its
prompt's row in the dataset and its place in the group (:func:`completion_seed`), never by the
process: a prompt is answered alike on any number of processes, so a run can change its
process count mid-way and stay the same run. A group leaves the process that sampled it as
plain data (:class:`Group`), which is what lets DAPO's dynamic sampling fill the global batch
with the first groups that teach something, in the global order of their prompts, and deal
them out to the processes as a run on one process would have them (:func:`batch_groups`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attune.distributed import every_rank
from attune.errors import ConfigError
from attune.models import TransformerDecoder
from attune.rl.rollout import Rollout, generate_rollout


def completion_seed(seed: int, step: int, prompt_index: int, completion: int) -> int:
    """The seed of one completion's sampling: a hash of the run's seed, the step, the prompt's
    row in the dataset and the completion's place in its group (a 63-bit integer)."""
    text = f"{seed}/{step}/{prompt_index}/{completion}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@dataclass
class Group:
    """One prompt and its completions, scored.

    Attributes:
        order: ``(round, position)``: the sampling round of the step and the prompt's position
            in the global batch, which orders groups as one process would have them.
        prompt: the prompt's token ids.
        text: the prompt's last message.
        columns: the prompt row's other columns (for the reward functions).
        responses: each completion's token ids, up to and including its stop token.
        scores: ``[sources][completions]`` each reward source's scores, unweighted.
        rewards: ``[completions]`` the rewards the advantages come from (weighted, with any
            length penalty).
    """

    order: tuple[int, int]
    prompt: list[int]
    text: str
    columns: dict[str, Any]
    responses: list[list[int]]
    scores: list[list[float]]
    rewards: list[float]

    @property
    def varied(self) -> bool:
        """Whether its rewards differ (a group whose rewards are all equal has no advantage)."""
        return max(self.rewards) - min(self.rewards) > 1e-6


Scorer = Callable[[Rollout, list[str], list[dict[str, Any]]], tuple[torch.Tensor, torch.Tensor]]
"""``(rollout, prompt texts, columns) -> ([sources, n] scores, [n] rewards)``."""


def sample_groups(
    policy: TransformerDecoder,
    micro_batches: Sequence[dict[str, Any]],
    score: Scorer,
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: dict[str, Any],
    stop_tokens: Sequence[int],
    pad_id: int,
    seed: int,
    step: int,
    round_index: int,
    rank: int = 0,
    world_size: int = 1,
    all_ranks: bool = False,
) -> list[Group]:
    """Answer each prompt of a step's micro-batches ``num_generations`` times and score the
    completions.

    Args:
        policy: the model sampling.
        micro_batches: prompt batches (:func:`attune.data.prompt_collate`'s: ``prompts``,
            ``texts``, ``columns``, ``indices``).
        score: scores a rollout of the groups' completions.
        num_generations: completions per prompt.
        max_new_tokens: the longest completion.
        sampling: ``temperature``, ``top_k``, ``top_p``.
        stop_tokens, pad_id: the tokenizer's.
        seed, step: seed the completions (with each prompt's row and place in its group).
        round_index: the sampling round within the step (DAPO's refills).
        rank, world_size: this process's place: its ``k``-th prompt is the global batch's
            ``k * world_size + rank``-th, as the data sampler deals them.
        all_ranks: every process decodes in step (a sharded policy).
    """
    prompts = [prompt for batch in micro_batches for prompt in batch["prompts"]]
    texts = [text for batch in micro_batches for text in batch["texts"]]
    columns = [row for batch in micro_batches for row in batch["columns"]]
    indices = [index for batch in micro_batches for index in batch["indices"]]
    if None in indices:
        raise ConfigError(
            "the prompt dataset's rows carry no 'index' (their place in the dataset, which seeds "
            "their completions); build it with attune.data.prompt_dataset or add the field"
        )
    device = policy.embed_tokens.weight.device
    generators = [
        torch.Generator(device).manual_seed(completion_seed(seed, step, index, completion))
        for index in indices
        for completion in range(num_generations)
    ]
    rollout = generate_rollout(
        policy,
        [prompt for prompt in prompts for _ in range(num_generations)],
        max_new_tokens,
        **sampling,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        generator=generators,
        all_ranks=all_ranks,
    )
    repeated_texts = [text for text in texts for _ in range(num_generations)]
    repeated_columns = [row for row in columns for _ in range(num_generations)]
    scores, rewards = score(rollout, repeated_texts, repeated_columns)
    responses = rollout.response_ids()
    groups = []
    for k, (prompt, text, row) in enumerate(zip(prompts, texts, columns, strict=True)):
        span = slice(k * num_generations, (k + 1) * num_generations)
        groups.append(
            Group(
                order=(round_index, k * world_size + rank),
                prompt=list(prompt),
                text=text,
                columns=row,
                responses=responses[span],
                scores=scores[:, span].tolist(),
                rewards=rewards[span].tolist(),
            )
        )
    return groups


def batch_groups(
    groups: list[Group], groups_per_process: int, rank: int, world_size: int
) -> tuple[list[Group], int, int]:
    """DAPO's dynamic sampling: the global batch's groups, from the groups every process
    sampled this step (a collective), this process's share.

    The groups whose rewards differ come first, in the global order of their prompts; a batch
    still short of ``groups_per_process * world_size`` of them is filled with the earliest of
    the others. Each process takes every ``world_size``-th, from its rank.

    Returns:
        ``(this process's groups, groups sampled but left out of the batch, groups filled in
        while unvaried)``, the counts over all processes.
    """
    everyone = sorted((g for share in every_rank(groups) for g in share), key=lambda g: g.order)
    wanted = groups_per_process * world_size
    varied = [group for group in everyone if group.varied]
    chosen = varied[:wanted]
    filled = 0
    if len(chosen) < wanted:
        unvaried = [group for group in everyone if not group.varied]
        filled = wanted - len(chosen)
        chosen = sorted(chosen + unvaried[:filled], key=lambda g: g.order)
    dropped = len(everyone) - len(chosen)  # sampled, left out of the batch
    return chosen[rank::world_size], dropped, filled


def varied_count(groups: Sequence[Group]) -> int:
    """How many of ``groups`` have rewards that differ."""
    return sum(group.varied for group in groups)


@dataclass
class GroupBatch:
    """A process's groups laid out for the update, completions of a group consecutive.

    Attributes:
        rollout: the completions, ``[groups * num_generations, ...]``.
        scores: ``[sources, n]`` fp32 each reward source's scores.
        rewards: ``[n]`` fp32 the rewards.
    """

    rollout: Rollout
    scores: torch.Tensor
    rewards: torch.Tensor

    @classmethod
    def of(
        cls,
        groups: Sequence[Group],
        stop_tokens: Sequence[int],
        pad_id: int,
        device: torch.device,
    ) -> GroupBatch:
        prompts = [group.prompt for group in groups for _ in group.responses]
        responses = [response for group in groups for response in group.responses]
        rollout = Rollout.from_tokens(prompts, responses, stop_tokens, pad_id, device)
        scores = torch.tensor(
            [[score for group in groups for score in group.scores[source]]
             for source in range(len(groups[0].scores))],
            dtype=torch.float32, device=device,
        )  # fmt: skip
        rewards = torch.tensor(
            [reward for group in groups for reward in group.rewards],
            dtype=torch.float32,
            device=device,
        )
        return cls(rollout, scores, rewards)
