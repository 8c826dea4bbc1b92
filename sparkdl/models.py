"""Model registry: built-in models for the bundled data, and user models by name or path.

A model takes the batch dict and returns logits; it declares ``input_columns`` (the batch
keys it reads, checked by batch inference) and ``task`` (binary or multiclass).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

__all__ = ["register_model", "build_model", "registered_models", "FlightsMLP", "DigitsCNN"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return deco


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered name (``flights_mlp``) or ``package.module:factory``."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model {name!r}: cannot import {attr} from {mod}: {e}") from e
        return factory(**kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {registered_models()} (or give 'module:factory')")
    return _REGISTRY[name](**kwargs)


class FlightsMLP(nn.Module):
    """Numeric features plus one embedding per categorical feature, then an MLP; binary logit."""

    task = "binary"

    def __init__(self, numeric_features: list[str], categorical_cardinalities: dict[str, int],
                 embed_dim: int = 8, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        self.numeric_features = list(numeric_features)
        self.categorical_features = list(categorical_cardinalities)
        self.embeddings = nn.ModuleDict({c: nn.Embedding(int(n), embed_dim) for c, n in categorical_cardinalities.items()})
        layers: list[nn.Module] = []
        width = len(self.numeric_features) + embed_dim * len(self.categorical_features)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    @property
    def input_columns(self) -> list[str]:
        return self.numeric_features + self.categorical_features

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [torch.stack([batch[c].float() for c in self.numeric_features], dim=1)] if self.numeric_features else []
        parts += [self.embeddings[c](batch[c].long()) for c in self.categorical_features]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 greyscale digits (uint8 input scaled inside); 10 logits."""

    task = "multiclass"
    input_columns = ["image"]
    input_codecs = {"image": "png"}

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(channels * 16, 64), nn.ReLU(), nn.Linear(64, num_classes),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image"].float().div(255.0)
        return self.net(x.reshape(x.shape[0], 1, 8, 8))


@register_model("flights_mlp")
def flights_mlp(**kwargs) -> nn.Module:
    return FlightsMLP(**kwargs)


@register_model("digits_cnn")
def digits_cnn(**kwargs) -> nn.Module:
    return DigitsCNN(**kwargs)
