"""A key/value cache for incremental decoding: past keys and values are kept, not recomputed."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer.

    Args:
        batch_size: rows decoded together.
        max_len: the most tokens (prompt plus generated) the cache will hold.
        num_layers: decoder layers.
        num_kv_heads: key/value heads per layer.
        head_dim: width of one head.
        dtype: dtype of the cached tensors (the model's).
        device: where they live.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer_index: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's ``[batch, kv_heads, seq, head_dim]`` keys and values after the
        cached ones; return all of them, ``[batch, kv_heads, length + seq, head_dim]``."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens for a cache of {self.max_len}")
        self.keys[layer_index][:, :, self.length : end] = keys
        self.values[layer_index][:, :, self.length : end] = values
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def advance(self, steps: int) -> None:
        """Mark ``steps`` more tokens as cached (after every layer has stored them)."""
        self.length += steps

    def rows(self, index: torch.Tensor) -> KVCache:
        """A new cache holding these batch rows of this one (a row may repeat), with their
        cached tokens: prompts that share a prefix go on from one pass over it."""
        chosen = KVCache.__new__(KVCache)
        chosen.keys = [keys.index_select(0, index) for keys in self.keys]
        chosen.values = [values.index_select(0, index) for values in self.values]
        chosen.max_len = self.max_len
        chosen.length = self.length
        return chosen
