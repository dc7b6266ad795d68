"""An lm-evaluation-harness model over an attune decoder and tokenizer.

:class:`AttuneLM` answers lm-eval's three request types on attune's own forward pass and KV-cache
generation, with the conventions of lm-eval's ``HFLM`` (the context/continuation split, the
prefix token of an empty context, rolling windows, stop strings), so a task scores the same as
``HFLM`` on the same HF folder.

On several processes (``world``), lm-eval gives each rank its share of every task's documents
(``rank`` / ``world_size``) and gathers the per-document metrics on rank 0 through
:meth:`AttuneLM.all_gather`, :meth:`AttuneLM.gather_object` and :meth:`AttuneLM.barrier`, the
collectives lm-eval's evaluator calls (``HFLM`` answers them through accelerate). Each rank
holds the whole model and answers its own requests alone: the forward passes need no
collectives, so ranks may hold different numbers of requests and batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from attune.distributed import World, collective_device
from attune.models import TransformerDecoder, generate
from attune.tokenizer import Tokenizer
from attune.tokenizer.chat_template import ChatTemplateError
from attune.training import unsharded_root

Request = tuple[Any, list[int], list[int]]
CHUNK_LOGITS = 2**25  # logits computed at once when scoring (128 MiB in float32)


class AttuneLM(TemplateLM):  # type: ignore[misc]
    """lm-eval's ``LM`` for an attune model.

    Args:
        model: the decoder (in eval mode, on its device).
        tokenizer: the model's tokenizer.
        batch_size: requests scored or generated together.
        max_length: the longest input; by default the model's ``max_seq_len`` (HF
            ``max_position_embeddings``, as ``HFLM`` reads it).
        max_gen_toks: the most tokens a generation request adds when it names no limit.
        name: the tokenizer's name in lm-eval's request cache (by default its fingerprint).
        world: the processes to split the requests across, each holding the whole model (the
            eval recipe under torchrun). None: this process answers every request, as a
            sharded model's ranks must (their forward passes are collectives).
    """

    def __init__(
        self,
        model: TransformerDecoder,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        name: str | None = None,
        world: World | None = None,
    ) -> None:
        super().__init__()
        if world is not None and world.distributed:
            self._rank = world.rank
            self._world_size = world.world_size
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len
        self.max_gen_toks = max_gen_toks
        self._name = name
        self._device = next(model.parameters()).device
        self.answered = 0  # requests this process has answered (lm-eval's padding included)

    # Processes ---------------------------------------------------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` from every rank, concatenated along its first dimension (a number becomes
        one row), on this rank's device, as accelerate's ``gather``."""
        if self.world_size == 1:
            return tensor
        local = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
        local = local.to(collective_device())
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on ``dst``, None on the others."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size > 1:
            dist.barrier()

    # Tokens ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token (the tokenizer's EOS)."""
        eos = self.tokenizer.eos_id
        return self.tokenizer.padding_id if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context: BOS, else EOS (as ``HFLM``)."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string``; the tokenizer's special tokens unless it starts with BOS.

        Args:
            string: the text.
            add_special_tokens: None for the tokenizer's default.
            left_truncate_len: keep only the last this many tokens.
            **kwargs: ignored (lm-eval's interface).

        Returns:
            The token ids.
        """
        add = True if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.special_tokens.get("bos_token")
        if add_special_tokens is None and has_bos_prefix(string, bos):
            add = False
        ids = self.tokenizer.encode(string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # Log-likelihoods ---------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        """Each ``(context, continuation)`` request's log-likelihood and greedy flag."""
        self.answered += len(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)  # type: ignore[no-any-return]

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        greedy: bool = True,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of each continuation's log-probabilities and whether it is the greedy answer.

        Each request is scored on ``(context + continuation)[-(max_length + 1):][:-1]``, as
        ``HFLM`` scores it. Requests that share everything before their continuation's second
        token (a multiple-choice question's answers, its few-shot examples included), when that
        prefix is longer than what follows it, are scored from one pass over the prefix, each
        answer's tail going on from a copy of its KV cache; the others (rolling windows) are
        batched longest first, right-padded. Either way the output head and the log-softmax run
        on the scored positions only. ``greedy=False`` leaves out the greedy test (every flag
        False), which rolling windows do not use."""
        rows = [
            (context + continuation)[-(self.max_length + 1) :][:-1]
            for _, context, continuation in requests
        ]
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        alone: list[int] = []
        for index, ((_, _, continuation), row) in enumerate(zip(requests, rows, strict=True)):
            split = len(row) - len(continuation) + 1  # the prefix ends at the first prediction
            if split < 1:
                alone.append(index)
            else:
                by_prefix.setdefault(tuple(row[:split]), []).append(index)
        shared: list[tuple[tuple[int, ...], list[int]]] = []
        for prefix, members in by_prefix.items():
            longest_tail = max(len(rows[index]) - len(prefix) for index in members)
            if len(members) > 1 and len(prefix) > longest_tail:  # a pass over it pays
                for start in range(0, len(members), self.batch_size):
                    shared.append((prefix, members[start : start + self.batch_size]))
            else:
                alone += members
        scored: dict[int, tuple[float, bool]] = {}
        # a continuation longer than the model's length: its last tokens, the ones it can score
        targets = [
            continuation[-len(row) :]
            for (_, _, continuation), row in zip(requests, rows, strict=True)
        ]

        alone.sort(key=lambda index: (-len(rows[index]), rows[index]))
        for start in range(0, len(alone), self.batch_size):
            batch = alone[start : start + self.batch_size]
            hidden = self._hidden_right_padded([rows[index] for index in batch])
            states = [
                hidden[row, len(rows[index]) - len(targets[index]) : len(rows[index])]
                for row, index in enumerate(batch)
            ]
            scores = self._score(states, [targets[index] for index in batch], greedy)
            scored.update(zip(batch, scores, strict=True))

        shared.sort(key=lambda group: (-len(group[0]), group[0]))
        for groups in self._batches_of_groups(shared):
            states, members = self._hidden_from_shared_prefixes(groups, rows)
            scores = self._score(states, [targets[index] for index in members], greedy)
            scored.update(zip(members, scores, strict=True))

        results = [scored[index] for index in range(len(requests))]
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def _batches_of_groups(
        self, groups: list[tuple[tuple[int, ...], list[int]]]
    ) -> list[list[tuple[tuple[int, ...], list[int]]]]:
        """Groups of requests (``batch_size`` at most each), a batch at a time: at most
        ``batch_size`` requests in a batch."""
        batches: list[list[tuple[tuple[int, ...], list[int]]]] = []
        size = 0
        for group in groups:
            if not batches or size + len(group[1]) > self.batch_size:
                batches.append([])
                size = 0
            batches[-1].append(group)
            size += len(group[1])
        return batches

    def _hidden_right_padded(self, rows: list[list[int]]) -> torch.Tensor:
        """The final hidden states ``[batch, longest, hidden]`` of right-padded ``rows``."""
        longest = max(len(row) for row in rows)
        pad = self.tokenizer.padding_id
        tokens = torch.tensor(
            [row + [pad] * (longest - len(row)) for row in rows], device=self._device
        )
        # right padding: a causal model's real positions never see it
        with torch.inference_mode():
            return self.model(tokens, return_hidden=True)

    def _hidden_from_shared_prefixes(
        self, groups: list[tuple[tuple[int, ...], list[int]]], rows: list[list[int]]
    ) -> tuple[list[torch.Tensor], list[int]]:
        """The hidden states that predict each member's continuation: the prefixes are run
        once (left-padded, so that every tail goes on from the same column), then each
        member's tail from a copy of its prefix's KV cache. Returns them with the members'
        indices, in the same order."""
        prefixes = [list(prefix) for prefix, _ in groups]
        tails = [rows[index][len(prefix) :] for prefix, members in groups for index in members]
        owner = [group for group, (_, members) in enumerate(groups) for _ in members]
        members = [index for _, group_members in groups for index in group_members]
        longest, tail_length = max(map(len, prefixes)), max(map(len, tails))
        device, pad = self._device, self.tokenizer.padding_id
        tokens = torch.full((len(prefixes), longest), pad, dtype=torch.long, device=device)
        real = torch.ones(len(prefixes), longest + tail_length, dtype=torch.bool, device=device)
        for row, prefix in enumerate(prefixes):
            tokens[row, longest - len(prefix) :] = torch.tensor(prefix, device=device)
            real[row, : longest - len(prefix)] = False
        positions = (real[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            cache = (
                self.model.make_cache(len(prefixes), longest + tail_length) if tail_length else None
            )
            last = self.model(
                tokens,
                positions=positions,
                padding_mask=real[:, :longest],
                cache=cache,
                return_hidden=True,
                output_last=1,
            )[:, -1]
            if cache is None:
                return [last[group : group + 1] for group in owner], members
            rows_of = torch.tensor(owner, device=device)
            tail_tokens = torch.tensor(
                [tail + [pad] * (tail_length - len(tail)) for tail in tails], device=device
            )
            starts = torch.tensor([len(prefixes[group]) for group in owner], device=device)
            hidden = self.model(
                tail_tokens,
                positions=starts[:, None] + torch.arange(tail_length, device=device),
                padding_mask=real.index_select(0, rows_of),
                cache=cache.rows(rows_of),
                return_hidden=True,
            )
        states = [
            torch.cat([last[group : group + 1], hidden[row, : len(tail)]])
            for row, (group, tail) in enumerate(zip(owner, tails, strict=True))
        ]
        return states, members

    def _score(
        self, states: list[torch.Tensor], targets: list[list[int]], greedy: bool = True
    ) -> list[tuple[float, bool]]:
        """Each request's summed log-probability of its ``targets`` and whether they are the
        greedy choices, from the hidden states that predict them (``[len(targets), hidden]``
        each): the output head and a float32 log-softmax on those positions alone, a chunk of
        positions at a time so that the logits stay small for large vocabularies. (A sharded
        model's head is gathered for it: every rank scores the same requests.)"""
        hidden = torch.cat(states)
        wanted = torch.tensor([t for target in targets for t in target], device=self._device)
        chunk = max(1, CHUNK_LOGITS // self.model.config.vocab_size)
        picked, chosen = [], []
        with unsharded_root(self.model), torch.inference_mode():
            for start in range(0, len(wanted), chunk):
                logits = self.model.output(hidden[start : start + chunk]).float()
                part = wanted[start : start + chunk]
                logprobs = F.log_softmax(logits, dim=-1)
                picked.append(logprobs.gather(-1, part[:, None]).squeeze(-1))
                chosen.append(logits.argmax(dim=-1) == part if greedy else part < 0)
        all_picked, all_greedy = torch.cat(picked), torch.cat(chosen)
        results, start = [], 0
        for target in targets:
            end = start + len(target)
            results.append((float(all_picked[start:end].sum()), bool(all_greedy[start:end].all())))
            start = end
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens (each
        window's first token predicted from the prefix token), as ``HFLM``."""
        self.answered += len(requests)
        windows: list[Request] = []
        counts: list[int] = []
        for (string,) in [request.args for request in requests]:
            rolling = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows.extend((None, context, continuation) for context, continuation in rolling)
            counts.append(len(rolling))
        scores = [score for score, _ in self._loglikelihood_tokens(windows, greedy=False)]
        totals: list[float] = []
        start = 0
        for request, count in zip(requests, counts, strict=True):
            totals.append(sum(scores[start : start + count]))
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    # Generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation with the KV cache, cut at the request's ``until``
        strings (and EOS), at most ``max_gen_toks`` tokens; requests with the same generation
        settings are batched, longest first, and a batch stops decoding once every row has
        written a stop string or EOS."""
        self.answered += len(requests)

        def by_length(request: tuple[str, dict]) -> tuple[int, str]:
            return -len(self.tok_encode(request[0])), request[0]

        order = Collator(
            [request.args for request in requests],
            sort_fn=by_length,
            group_by="gen_kwargs",
            group_fn=lambda request: request[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            options = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            max_gen_toks = int(options.pop("max_gen_toks"))
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks ({max_gen_toks}) must be less than the model's maximum "
                    f"length ({self.max_length})"
                )
            prompts = [
                self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
                for context in contexts
            ]
            temperature = float(options.get("temperature") or 0.0)
            with torch.inference_mode():
                answers = generate(
                    self.model,
                    prompts,
                    max_gen_toks,
                    temperature=temperature if options.get("do_sample") else 0.0,
                    top_k=options.get("top_k"),
                    top_p=options.get("top_p"),
                    stop_tokens=[self.eot_token_id],
                    pad_id=self.tokenizer.padding_id,
                    stopped=self._stop_strings(until),
                )
            for context, kwargs, answer in zip(contexts, all_kwargs, answers, strict=True):
                text = postprocess_generated_text(
                    self.tok_decode(answer), stop=until, think_end_token=None
                )
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return order.get_original(results)

    def _stop_strings(
        self, until: list[str]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Which unfinished rows' text holds one of ``until`` (their text is cut there)."""

        def stopped(new_tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            ended = finished.clone()
            rows = new_tokens.tolist()
            for row in (~finished).nonzero().flatten().tolist():
                text = self.tok_decode(rows[row])
                ended[row] = any(stop in text for stop in until)
            return ended

        return stopped

    # Chat --------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name in lm-eval's request cache."""
        return self._name or self.tokenizer.fingerprint()

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's chat template, or None when lm-eval asks for none."""
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered with the model's template, as ``HFLM`` renders it through
        transformers: with the assistant's header, or (``add_generation_prompt=False``) ending
        inside the last message so that the model continues it. A template that rejects a
        system message renders the conversation without it."""
        try:
            return self._render(chat_history, add_generation_prompt)
        except ChatTemplateError:
            without_system = [message for message in chat_history if message["role"] != "system"]
            return self._render(without_system, add_generation_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )
        if add_generation_prompt or not messages:
            return text
        # transformers' continue_final_message: cut the text after the last message's content
        final = messages[-1]["content"]
        at = text.rindex(final.strip())
        if text[at : at + len(final.lstrip())] == final:
            return text[: at + len(final.lstrip())]
        return text[: at + len(final.strip())]
