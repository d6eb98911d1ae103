"""The :class:`Splits` container and helpers shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass
class Splits:
    """A data set cut into train / merge / test parts of ``(x float32, y int64)`` tensors."""

    name: str
    train: TensorDataset
    merge: TensorDataset  # held out: used to learn merge gates / pick greedy soups
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]  # shape of one x, e.g. (40,) or (1, 28, 28)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "merge": len(self.merge), "test": len(self.test)}


def _as_tensor(a: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    arr = np.ascontiguousarray(a, dtype=dtype)
    if not arr.flags.writeable:  # e.g. a cached array: copy rather than share it
        arr = arr.copy()
    return torch.from_numpy(arr)


def tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """Wrap arrays as a float32 / int64 TensorDataset.

    Shares memory with ``x`` / ``y`` when they already have the right dtype and are writable (no
    100+ MB copies for MNIST): callers pass freshly indexed arrays that nothing else holds.
    """
    return TensorDataset(_as_tensor(x, np.dtype(np.float32)), _as_tensor(y, np.dtype(np.int64)))


def check_sizes(total: int | None, **sizes: int | None) -> None:
    """Raise ValueError on negative sizes, or when they ask for more than ``total`` samples."""
    for key, value in sizes.items():
        if value is not None and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    wanted = sum(v for v in sizes.values() if v is not None)
    if total is not None and wanted > total:
        parts = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
        raise ValueError(f"{parts} asks for {wanted} samples but only {total} are available")


def permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` from its own generator (the global numpy RNG is untouched)."""
    return np.random.default_rng(seed).permutation(n)
