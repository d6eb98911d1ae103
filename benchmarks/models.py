"""The architectures of the benchmark, by key: one builder per (model, data set input shape)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from softmerge.zoo import CNN1D, CNN2D, MLP, ResNet1D, seeded


@dataclass(frozen=True)
class Arch:
    label: str  # shown in tables
    family: str  # MLP / CNN / ResNet-BN
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    lr: float = 1e-3  # Adam learning rate of candidate training


ARCHS: dict[str, Arch] = {
    "mlp_mnist": Arch("MLP 784-256-256-10", "MLP", lambda: MLP(784, (256, 256)), (1, 28, 28)),
    "cnn_mnist": Arch(
        "CNN 2 conv (8, 16 ch) + 2 fc", "CNN", lambda: CNN2D(channels=8, hidden=64), (1, 28, 28)
    ),
    "mlp_digits": Arch("MLP 64-128-128-10", "MLP", lambda: MLP(64, (128, 128)), (64,)),
    "cnn_mnist1d": Arch("CNN1D 3 conv (32 ch) + fc", "CNN", lambda: CNN1D(channels=32), (40,)),
    "resnet_mnist1d": Arch(
        "ResNet1D-BN 2 blocks (16, 32 ch)", "ResNet-BN", lambda: ResNet1D(channels=16), (40,)
    ),
}


def build(arch: str, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed`` its initial weights are reproducible."""
    with seeded(seed):
        return ARCHS[arch].make()
