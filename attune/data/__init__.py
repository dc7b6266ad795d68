"""Data: samplers, and (next) formats, datasets, packing and collation."""

from attune.data.sampler import GlobalOrderSampler

__all__ = ["GlobalOrderSampler"]
