"""Small demo / benchmark models and plain training helpers.

Everything here is deterministic given its seeds and leaves the caller's global RNG alone:
seeded work runs inside ``torch.random.fork_rng`` or draws from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from softmerge.errors import DataError

__all__ = [
    "CNN1D",
    "CNN2D",
    "MLP",
    "MODELS",
    "ResNet1D",
    "build_model",
    "evaluate",
    "predict_logits",
    "seeded",
    "train",
]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    # devices=[]: only the CPU generator is forked (no CUDA warning, nothing else touched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def _as_1d_signal(x: torch.Tensor) -> torch.Tensor:
    """Accept (B, L) or (B, 1, L) for the 1-D nets."""
    return x.unsqueeze(1) if x.dim() == 2 else x


class MLP(nn.Module):
    """Fully connected ReLU net; flattens its input, so it takes any shape of ``in_features``."""

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (512, 512), num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """Three conv1d layers (the last two with stride 2) and a linear head, for MNIST-1D (B, 40)."""

    def __init__(self, num_classes: int = 10, channels: int = 32, length: int = 40) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        out_len = _conv_out(_conv_out(length, 3, 2, 1), 3, 2, 1)
        # A linear head over all positions rather than global pooling: in MNIST-1D where a
        # feature sits carries class information.
        self.head = nn.Linear(c * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_as_1d_signal(x)))


class CNN2D(nn.Module):
    """Two conv + max-pool stages and a two-layer head, for MNIST (B, 1, 28, 28) or (B, 784)."""

    def __init__(self, num_classes: int = 10, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * c * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flattened MNIST
            x = x.view(-1, 1, 28, 28)
        return self.head(self.features(x))


class BasicBlock1D(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm1d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet1D(nn.Module):
    """Tiny ResNet for MNIST-1D (B, 40): stem, two residual blocks, linear head.

    BatchNorm running statistics make it the test case for merging buffers, not just weights.
    """

    def __init__(self, num_classes: int = 10, channels: int = 16, length: int = 40) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2, bias=False), nn.BatchNorm1d(c), nn.ReLU()
        )
        self.block1 = BasicBlock1D(c, c)
        self.block2 = BasicBlock1D(c, 2 * c, stride=2)
        self.head = nn.Linear(2 * c * _conv_out(length, 3, 2, 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block2(self.block1(self.stem(_as_1d_signal(x))))
        return self.head(out.flatten(1))


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet1d": ResNet1D,
}


def build_model(name: str, seed: int | None = None, **kwargs: object) -> nn.Module:
    """Instantiate zoo model ``name``; with ``seed`` its initial weights are reproducible."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; valid names: {valid}") from None
    with seeded(seed):
        return cls(**kwargs)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_nonempty(data: Dataset | DataLoader, what: str) -> None:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:  # an iterable data set has no length: nothing to check up front
        return
    if size == 0:
        raise DataError(f"the {what} set is empty")


def _progress(epochs: int, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(range(epochs))
    from tqdm.auto import tqdm

    return iter(tqdm(range(epochs), desc="train", unit="epoch"))


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    device, total, count = _device(model), 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if augment is not None:
            x = augment(x)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / max(count, 1)


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it (left in train mode).

    Batch order comes from a ``torch.Generator`` seeded with ``seed``. ``augment(x)`` is applied
    to each batch; it may use torch's global RNG, which is seeded from ``seed`` inside a fork,
    so augmented runs are reproducible too and the caller's RNG is not disturbed.
    """
    _check_nonempty(dataset, "training")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = _progress(epochs, progress)
    with seeded(seed):
        for _ in bar:
            loss = _train_epoch(model, loader, optimizer, augment)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}")
    return model


def _loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    return data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the block, then restore the model's previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module, dataset_or_loader: Dataset | DataLoader, batch_size: int = 1024
) -> tuple[float, float]:
    """Return (accuracy in percent, mean cross-entropy) of ``model`` on the data: the one
    evaluation loop (:func:`softmerge.evaluation.evaluate`) with the classification objective."""
    from .evaluation import evaluate as evaluate_with

    _check_nonempty(dataset_or_loader, "evaluation")
    metrics = evaluate_with(model, _loader(dataset_or_loader, batch_size), "classification")
    return metrics["accuracy"], metrics["loss"]


def predict_logits(
    model: nn.Module, dataset: Dataset | DataLoader, batch_size: int = 1024
) -> torch.Tensor:
    """Logits of ``model`` for every sample in order, as one CPU tensor (N, num_classes)."""
    _check_nonempty(dataset, "prediction")
    device = _device(model)
    outputs = []
    with _eval_mode(model):
        for batch in _loader(dataset, batch_size):
            x = batch[0] if isinstance(batch, list | tuple) else batch
            outputs.append(model(x.to(device)).cpu())
    return torch.cat(outputs)
