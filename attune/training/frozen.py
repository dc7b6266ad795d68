"""The models a recipe reads but does not train (an RL reference and reward model, a
distillation teacher), and where they live between uses."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from attune.peft import disabled_adapters
from attune.training.run import Run
from attune.training.sharding import unsharded_root


@contextlib.contextmanager
def brought_to(module: nn.Module | None, device: torch.device, offload: bool = True):
    """With ``offload``, ``module`` on ``device`` for the block and back on the CPU after it
    (also when the block raises), so that it holds no device memory between uses; without (or
    for no module), nothing moves."""
    if module is not None and offload:
        module.to(device)
    try:
        yield
    finally:
        if module is not None and offload:
            module.to("cpu")


class FrozenModels:
    """The models an RL recipe only reads: the reference (a frozen copy, or a LoRA policy with
    its adapters off) and a reward source (with a ``prepare(device, dtype)`` method, and its
    model, if any, as ``model``); with ``offload``, the copy and the reward model stay on the
    CPU between uses, so the update phase has the device to itself.

    Args:
        reference: the reference model (from :func:`attune.training.reference_model`).
        adapters_off: whether the reference is the policy with its adapters switched off.
        reward: the reward source (:class:`attune.rl.ModelReward`, ``FunctionReward``).
        run: the run (its device and dtype).
        offload: keep the frozen models on the CPU between uses.
    """

    def __init__(
        self, reference: nn.Module, adapters_off: bool, reward: Any, run: Run, offload: bool
    ):
        self.reference_copy = None if adapters_off else reference
        self.reward_source = reward
        self.device = run.device
        self.offload = offload
        home = torch.device("cpu") if offload else run.device
        reward.prepare(home, run.dtype)
        if self.reference_copy is not None and offload:
            self.reference_copy.to(home)

    def _on_device(self, module):
        return brought_to(module, self.device, self.offload)

    @contextlib.contextmanager
    def reference(self, policy):
        """The reference model on the device: the copy, or the policy (adapters off)."""
        with self._on_device(self.reference_copy):
            yield self.reference_copy if self.reference_copy is not None else policy

    def head_of(self, model):
        """The reference's output head: a LoRA policy's own, run with its adapters off."""
        if self.reference_copy is not None:
            return model.output

        def base_output(hidden):
            with disabled_adapters(model.lm_head):
                return model.output(hidden)

        return base_output

    @contextlib.contextmanager
    def reference_head(self, policy):
        """The reference's output head, callable outside the reference's forward pass for
        the whole block (a sharded copy's root gathered; a collective on entry)."""
        with self.reference(policy) as model:
            if self.reference_copy is None:  # the policy's own head, whole after its forward
                yield self.head_of(model)
                return
            with unsharded_root(model):
                yield self.head_of(model)

    @contextlib.contextmanager
    def reward(self):
        """The reward source, its model on the device."""
        with self._on_device(getattr(self.reward_source, "model", None)):
            yield self.reward_source
