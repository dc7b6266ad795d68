"""Small components with typed signatures, for config tests to instantiate and validate."""

from __future__ import annotations

from typing import Literal

from attune.config import ExistingPath


def build_model(
    num_layers: int,
    hidden: int = 8,
    activation: Literal["relu", "gelu"] = "relu",
    dropout: float = 0.0,
    name: str | None = None,
) -> dict:
    return {
        "num_layers": num_layers,
        "hidden": hidden,
        "activation": activation,
        "dropout": dropout,
        "name": name,
    }


class Optimizer:
    def __init__(self, params: list, lr: float, betas: list[float] | None = None) -> None:
        self.params = params
        self.lr = lr
        self.betas = betas


def load_dataset(tokenizer: object, source: ExistingPath, max_seq_len: int = 16) -> dict:
    return {"tokenizer": tokenizer, "source": source, "max_seq_len": max_seq_len}


def wrap(inner: object, scale: float = 1.0) -> dict:
    return {"inner": inner, "scale": scale}


def anything(**kwargs: object) -> dict:
    return kwargs


def takes_none_default(max_seq_len: int = None) -> int | None:  # noqa: RUF013 - on purpose
    return max_seq_len


def local_or_hub(source: ExistingPath | str) -> str:
    return source
