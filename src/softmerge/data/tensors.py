"""Merge and eval sets given as tensor files: ``x`` (inputs) and ``y`` (labels)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

from ..candidates import PICKLE_SUFFIXES
from ..errors import DataError


def read_tensor_file(path: Path, labels_needed: str | None) -> Dataset:
    """A data set from a safetensors or weights-only torch file: ``x`` (and ``y``) tensors, or
    tokenised fields (``input_ids``, and ``attention_mask``, ``labels``...) whose batches are
    dicts for a Hugging Face model.

    ``labels_needed``: why ``y`` is required (the error says so), or None when it is not."""
    tensors = _read_tensors(path)
    if "input_ids" in tensors:
        return _token_fields(path, tensors)
    x, y = tensors.get("x"), tensors.get("y")
    if not isinstance(x, torch.Tensor):
        found = ", ".join(map(str, tensors)) or "nothing"
        raise DataError(f"{path}: no tensor 'x' (the inputs); the file holds: {found}")
    if x.dim() == 0 or len(x) == 0:
        raise DataError(f"{path}: tensor 'x' holds no samples (shape {tuple(x.shape)})")
    if y is None:
        if labels_needed:
            raise DataError(f"{path}: no tensor 'y' (labels): {labels_needed}")
        return TensorDataset(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        what = f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, torch.Tensor) else y
        raise DataError(f"{path}: 'y' must be a 1-D tensor of integer class indices, got {what}")
    if len(y) != len(x):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return TensorDataset(x, y.long())


def _token_fields(path: Path, tensors: Mapping[str, Any]) -> Dataset:
    """Pre-tokenised data: every tensor a field, one row per sample."""
    from .text import TokenBlocks

    rows = {k: len(v) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.dim()}
    if len(set(rows.values())) != 1 or len(rows) != len(tensors):
        raise DataError(f"{path}: tokenised fields must be tensors of as many rows: {rows}")
    if next(iter(rows.values())) == 0:
        raise DataError(f"{path}: 'input_ids' holds no samples")
    labels = tensors.get("labels")
    if isinstance(labels, torch.Tensor) and bool((labels == -100).all()):
        raise DataError(
            f"{path}: every label is -100 (ignored): nothing to learn from or to score; "
            "check the labels (or leave them out: a language model predicts its input_ids)"
        )
    return TokenBlocks({k: v for k, v in tensors.items()})


def _read_tensors(path: Path) -> Mapping[str, Any]:
    name = path.name.lower()
    if not name.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; use .safetensors or "
            f"{', '.join(PICKLE_SUFFIXES)} holding tensors 'x' and 'y' (or input_ids...)"
        )
    try:
        if name.endswith(".safetensors"):
            obj: Any = load_file(str(path), device="cpu")
        else:  # weights_only: a data file must not be able to run code
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types on bad files
        detail = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise DataError(f"{path}: cannot read tensors: {detail}") from exc
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{path}: expected a dict of named tensors (x, y), got {type(obj).__name__}"
        )
    return obj
