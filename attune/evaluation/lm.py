"""An lm-evaluation-harness model over an attune decoder and tokenizer.

:class:`AttuneLM` answers lm-eval's three request types on attune's own forward pass and KV-cache
generation, with the conventions of lm-eval's ``HFLM`` (the context/continuation split, the
prefix token of an empty context, rolling windows, stop strings), so a task scores the same as
``HFLM`` on the same HF folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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

from attune.models import TransformerDecoder, generate
from attune.tokenizer import Tokenizer
from attune.tokenizer.chat_template import ChatTemplateError

Request = tuple[Any, list[int], list[int]]


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
    """

    def __init__(
        self,
        model: TransformerDecoder,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len
        self.max_gen_toks = max_gen_toks
        self._name = name
        self._device = next(model.parameters()).device

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

    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-probabilities ``[batch, longest, vocab]`` of right-padded ``rows``."""
        longest = max(len(row) for row in rows)
        pad = self.tokenizer.padding_id
        tokens = torch.tensor(
            [row + [pad] * (longest - len(row)) for row in rows], device=self._device
        )
        # right padding: a causal model's real positions never see it
        with torch.inference_mode():
            logits = self.model(tokens)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether it is the greedy answer,
        longest requests first, ``batch_size`` at a time (one pass for requests that share a
        context and differ in one last token, as ``HFLM``)."""

        def by_length(request: Request) -> tuple[int, tuple[int, ...]]:
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        def shared_context(request: Request) -> list[int]:
            return request[-2] + request[-1][:-1]

        order = Collator(requests, sort_fn=by_length, group_by="contexts", group_fn=shared_context)
        results: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            inputs = [
                (context + continuation)[-(self.max_length + 1) :][:-1]
                for _, context, continuation in chunk
            ]
            logprobs = self._logprobs(inputs)
            for (key, context, continuation), row, row_logprobs in zip(
                chunk, inputs, logprobs, strict=True
            ):
                scored = row_logprobs[len(row) - len(continuation) : len(row)].unsqueeze(0)
                greedy = scored.argmax(dim=-1)
                for request_key, tokens, logits in order.get_cache(
                    req_str=key, cxt_toks=context, cont_toks=continuation, logits=scored
                ):
                    target = torch.tensor(tokens, device=self._device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -target.shape[1] :] == target).all())
                    total = float(torch.gather(logits, 2, target.unsqueeze(-1)).sum())
                    results.append((total, is_greedy))
                    if request_key is not None:
                        self.cache_hook.add_partial("loglikelihood", request_key, results[-1])
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens (each
        window's first token predicted from the prefix token), as ``HFLM``."""
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
        scores = [score for score, _ in self._loglikelihood_tokens(windows)]
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
        settings are batched, longest first."""

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
                )
            for context, kwargs, answer in zip(contexts, all_kwargs, answers, strict=True):
                text = postprocess_generated_text(
                    self.tok_decode(answer), stop=until, think_end_token=None
                )
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return order.get_original(results)

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
