"""Mixture-of-experts blocks: a top-k router, experts stored as grouped tensors, and the
router's load-balancing loss.

Experts keep one ``[experts, out, in]`` weight per projection (transformers 5's layout:
``experts.gate_up_proj`` holds each expert's gate rows then its up rows, ``experts.down_proj``
its down projection), so a checkpoint maps onto them by name and FSDP2 shards them like any
other parameter. Tokens are sorted by the expert they go to and each projection is one grouped
matrix product over the sorted rows (``torch._grouped_mm``, offsets marking each expert's
rows) — no Python loop over experts. Where the backend has no grouped product, the rows are
laid out ``[experts, capacity, in]`` (capacity = the busiest expert's row count) and multiplied
with one ``bmm``: more arithmetic, the same result.

Under expert parallelism (:class:`ExpertParallel`) each process of an expert group runs
``experts / group size`` whole experts and only those: every process sends each of its sorted
rows to the process running its expert (one all-to-all), runs what it receives with the same
grouped product, and sends the results back (the reverse all-to-all), where they are weighted
and summed as on one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from attune.models.config import DecoderConfig

_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_function():
    """torch's grouped matrix product: public from 2.10, private before; None if absent."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    grouped_mm = _grouped_mm_function()
    if grouped_mm is None:
        return False
    try:
        rows = torch.ones(32, 16, device=device, dtype=dtype, requires_grad=True)
        weight = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([16, 32], device=device, dtype=torch.int32)
        out = grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
        out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@torch.compiler.disable
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matrix product runs forward and backward here (torch 2.8 has
    it on Hopper GPUs only, later versions on more devices and dtypes): tried once per device
    type and dtype on a tiny problem, in a thread of its own, so that the caller's autograd
    state (no_grad, inference mode, activation checkpointing's hooks) neither fails the probe
    nor sees its backward pass."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        with ThreadPoolExecutor(max_workers=1) as pool:
            _GROUPED_MM_WORKS[key] = pool.submit(_probe_grouped_mm, device, dtype).result()
    return _GROUPED_MM_WORKS[key]


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each expert's rows times its weight, transposed (``F.linear`` per expert).

    Args:
        rows: ``[rows, in]``, sorted by expert (expert 0's rows first).
        weight: ``[experts, out, in]``.
        counts: ``[experts]`` int, how many rows each expert has (summing to ``rows``).

    Returns:
        ``[rows, out]``, in the autocast dtype under autocast, else the weight's.
    """
    # the grouped product is not autocast-aware: cast as autocast casts a linear layer
    if torch.is_autocast_enabled(rows.device.type):
        dtype = torch.get_autocast_dtype(rows.device.type)
        rows, weight = rows.to(dtype), weight.to(dtype)
    else:
        rows = rows.to(weight.dtype)
    grouped_mm = _grouped_mm_function()
    if torch.compiler.is_compiling():  # no probing inside a graph; inductor lowers bf16 on GPUs
        use_grouped = rows.is_cuda and rows.dtype == torch.bfloat16
    else:
        use_grouped = _grouped_mm_works(rows.device, rows.dtype)
    # the grouped kernels read rows and weights in 16-byte strides
    aligned = all(size * rows.element_size() % 16 == 0 for size in weight.shape[1:])
    if grouped_mm is not None and use_grouped and aligned:
        offsets = counts.cumsum(0).to(torch.int32)
        return grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
    return _padded_linear(rows, weight, counts)


def _padded_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    experts = weight.shape[0]
    capacity = int(counts.max()) if rows.shape[0] else 0
    starts = counts.cumsum(0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=rows.device), counts)
    slot = torch.arange(rows.shape[0], device=rows.device) - starts[expert_of_row]
    padded = rows.new_zeros(experts, capacity, rows.shape[1])
    padded = padded.index_put((expert_of_row, slot), rows)
    return torch.bmm(padded, weight.transpose(-2, -1))[expert_of_row, slot]


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the best ``top_k``.

    Args:
        config: the decoder's shape (``num_experts``, ``num_experts_per_tok``,
            ``norm_topk_prob``, ``router_weights_in_float``).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        assert config.num_experts is not None
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weights_in_float = config.router_weights_in_float
        bound = 1 / math.sqrt(config.hidden_size)
        self.weight = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size).uniform_(-bound, bound)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[tokens, hidden]`` -> router logits ``[tokens, experts]``, the chosen experts'
        weights ``[tokens, top_k]`` and their indices ``[tokens, top_k]``."""
        logits = F.linear(x, self.weight)
        probabilities = logits.float().softmax(dim=-1)
        weights, indices = probabilities.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_in_float:
            weights = weights.to(logits.dtype)
        return logits, weights, indices


class _ScaledGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class ExpertParallel:
    """Experts split over the processes of ``group`` (expert parallelism): its ``j``-th process
    runs experts ``j * local .. (j + 1) * local - 1`` (``local = experts / group size``) on the
    rows every process of the group routes to them.

    Each ``[experts, ...]`` parameter is a DTensor sharded on its first dimension over all the
    processes. When ``group`` has them all, a process's shard is its experts; when ``group``
    has a share of them, each of its processes stands for the ``replica_group`` of processes
    whose shards together make its experts, gathered for the forward pass (their gradients
    summed back into the shards: FSDP over the replicas, expert parallelism across them).

    Args:
        group: the processes the experts are split over.
        replica_group: the processes whose shards make up this one's experts (None: it alone).
        gradient_scale: what each expert gradient is multiplied by. The experts' gradients sum
            the contributions of every process's tokens (the all-to-all's backward brings them
            home), where data parallelism averages each process's own: with a loss already
            scaled for that average, ``1 / processes`` (all of them) makes the two agree.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        replica_group: dist.ProcessGroup | None = None,
        gradient_scale: float = 1.0,
    ):
        self.group = group
        self.size = dist.get_world_size(group)
        self.replica_group = replica_group
        self.gradient_scale = gradient_scale

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's experts of an ``[experts, ...]`` parameter (its DTensor's local
        shard, or its replica group's shards gathered), with the gradient scaled by
        :attr:`gradient_scale`."""
        from torch.distributed import _functional_collectives as collectives

        shard = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if self.replica_group is not None and dist.get_world_size(self.replica_group) > 1:
            gather = (
                collectives.all_gather_tensor_autograd
                if shard.requires_grad
                else collectives.all_gather_tensor
            )
            shard = gather(shard.contiguous(), 0, self.replica_group)
        if not shard.requires_grad:
            return shard
        return _ScaledGradient.apply(shard, self.gradient_scale)

    @torch.compiler.disable
    def run(
        self,
        mlp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rows: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """The experts' outputs for this process's rows, computed where the experts are.

        Args:
            mlp: ``(rows, counts)`` -> outputs, run on this process's experts (rows sorted by
                local expert, ``counts`` per local expert).
            rows: ``[rows, hidden]``, sorted by expert (over all experts).
            counts: ``[experts]`` int, this process's rows per expert.

        Returns:
            ``[rows, hidden]``: each row's output, in the order of ``rows``.
        """
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        processes = self.size
        local = counts.numel() // processes
        # what every process sends each of this one's experts: [source, local expert]
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts.detach(), group=self.group)
        received_counts = received_counts.view(processes, local)
        sent = counts.view(processes, local).sum(dim=1).tolist()
        received = received_counts.sum(dim=1).tolist()
        arrived = all_to_all_single_autograd(rows, received, sent, self.group)
        # the rows arrive by (source, expert): sort them by expert, stably (source by source)
        expert_of_row = torch.arange(local, device=rows.device).repeat(processes)
        expert_of_row = expert_of_row.repeat_interleave(received_counts.reshape(-1))
        order = expert_of_row.argsort(stable=True)
        out = mlp(arrived[order], received_counts.sum(dim=0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # (a functional collective's result waits for its data on first use)
        return all_to_all_single_autograd(out[inverse].contiguous(), sent, received, self.group)


class GroupedExperts(nn.Module):
    """The experts' gated MLPs, one ``[experts, ...]`` tensor per projection.

    Args:
        config: the decoder's shape (``num_experts``, ``moe_intermediate_size``,
            ``activation``).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        from attune.models.layers import ACTIVATIONS

        assert config.num_experts is not None and config.moe_intermediate_size is not None
        experts, hidden, inner = (
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
        )
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        self.activation = ACTIVATIONS[config.activation]
        # set by attune.training.sharding.shard_model under expert parallelism
        self.expert_parallel: ExpertParallel | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's projections as ``nn.Linear`` starts its weight."""
        for weight in (self.gate_up_proj, self.down_proj):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The experts of an ``[experts, ...]`` parameter this process runs: all of them, or
        under expert parallelism its own (see :meth:`ExpertParallel.local`)."""
        return tensor if self.expert_parallel is None else self.expert_parallel.local(tensor)

    def project(self, name: str, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One projection (``gate_up_proj`` or ``down_proj``) of expert-sorted rows; LoRA
        overrides it to add its update."""
        return grouped_linear(rows, self.local(getattr(self, name)), counts)

    def mlp(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's gated MLP over its rows (sorted by expert, ``counts`` per expert)."""
        gate, up = self.project("gate_up_proj", rows, counts).chunk(2, dim=-1)
        return self.project("down_proj", self.activation(gate) * up, counts)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            x: ``[tokens, hidden]``.
            indices: ``[tokens, top_k]`` the experts each token goes to.
            weights: ``[tokens, top_k]`` how much each chosen expert's output counts.

        Returns:
            ``[tokens, hidden]``: the weighted sum of each token's experts' outputs.
        """
        top_k = indices.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token_of_row = order // top_k
        # a scatter-add rather than bincount, which waits on the GPU to size its output
        counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        rows = x[token_of_row]
        if self.expert_parallel is None:
            out = self.mlp(rows, counts)
        else:  # the rows go to the processes holding their experts, and come back
            out = self.expert_parallel.run(self.mlp, rows, counts)
        out = out * weights.reshape(-1)[order, None]
        # back to (token, slot) order and summed per token: deterministic, unlike an
        # index_add_ of the sorted rows (atomic adds on GPUs)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out[inverse].view(-1, top_k, x.shape[-1]).sum(dim=1).to(x.dtype)


class SparseMoE(nn.Module):
    """A mixture-of-experts block in place of the dense MLP (HF's ``*SparseMoeBlock``), with
    Qwen2-MoE's shared expert, gated by a sigmoid, when the config has one.

    In training mode it keeps the router logits of its last forward pass (``router_logits``,
    ``[tokens, experts]``), from which :func:`router_aux_loss` computes the load-balancing
    loss.

    Args:
        config: the decoder's shape.
        layer_index: position of its layer in the stack (names its metrics).
    """

    def __init__(self, config: DecoderConfig, layer_index: int = 0):
        super().__init__()
        from attune.models.layers import GatedMLP

        self.layer_index = layer_index
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = TopKRouter(config)
        self.experts = GroupedExperts(config)
        self.jitter_noise = config.router_jitter_noise
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``."""
        shape = x.shape
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative noise
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        tokens = x.reshape(-1, shape[-1])
        logits, weights, indices = self.gate(tokens)
        self.router_logits = logits if self.training else None
        out = self.experts(tokens, indices, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(tokens)
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        return out.reshape(shape)


def sparse_blocks(model: nn.Module) -> Iterator[SparseMoE]:
    """The model's mixture-of-experts blocks, in order."""
    return (module for module in model.modules() if isinstance(module, SparseMoE))


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss, as transformers' ``load_balancing_loss_func``
    computes it: over every layer's tokens together, the share of routing slots each expert
    gets times its mean router probability, summed and scaled by the number of experts.

    Args:
        router_logits: per layer ``[tokens, experts]``.
        top_k: experts per token.
        token_mask: ``[tokens]`` bool, the tokens that count (padding aside); None: all.

    Returns:
        A scalar (1.0 when routing is perfectly balanced).
    """
    logits = torch.cat([layer.float() for layer in router_logits])
    experts = logits.shape[-1]
    probabilities = logits.softmax(dim=-1)
    chosen = probabilities.topk(top_k, dim=-1).indices
    slots = F.one_hot(chosen, experts).float()  # [tokens, top_k, experts]
    if token_mask is None:
        slot_share = slots.mean(dim=0)
        probability = probabilities.mean(dim=0)
    else:
        mask = token_mask.float().repeat(len(router_logits))
        slot_share = (slots * mask[:, None, None]).sum(0) / mask.sum()
        probability = (probabilities * mask[:, None]).sum(0) / mask.sum()
    return (slot_share * probability[None]).sum() * experts


def router_aux_loss(
    model: nn.Module, token_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The load-balancing loss of the model's last training forward pass (None for a dense
    model or outside training mode).

    Args:
        model: the decoder (or anything holding its :class:`SparseMoE` blocks).
        token_mask: ``[batch, seq]`` bool, the tokens that count; None (or a mask of another
            shape than the last forward pass's tokens): all.
    """
    blocks = list(sparse_blocks(model))
    logits = [block.router_logits for block in blocks if block.router_logits is not None]
    if not logits:
        return None
    mask = None
    if token_mask is not None and token_mask.numel() == logits[0].shape[0]:
        mask = token_mask.reshape(-1).to(logits[0].device)
    return load_balancing_loss(logits, blocks[0].gate.top_k, mask)


def aux_loss_coef(model: nn.Module) -> float:
    """The weight of the router's load-balancing loss in the training loss (the config's
    ``router_aux_loss_coef``; 0.0 for a dense model)."""
    return next((block.aux_loss_coef for block in sparse_blocks(model)), 0.0)


@torch.no_grad()
def expert_load(model: nn.Module) -> dict[str, float]:
    """Per MoE layer, the busiest expert's share of routing slots over the uniform share (1.0:
    perfectly balanced), from the last training forward pass; keys ``moe/layer_<i>/max_load``."""
    figures = {}
    for block in sparse_blocks(model):
        if block.router_logits is None:
            continue
        logits = block.router_logits.float()
        experts = logits.shape[-1]
        chosen = logits.topk(block.gate.top_k, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=experts).float() / max(chosen.numel(), 1)
        figures[f"moe/layer_{block.layer_index}/max_load"] = float(share.max() * experts)
    return figures
