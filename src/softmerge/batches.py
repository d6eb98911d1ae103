"""Batches as the merge sees them: ``(x, y)`` tuples, bare tensors, or dicts (Hugging Face).

One batch is split into what the model is called with and the labels the objective compares
against; everything else (the objective's masks, the device) works from that split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import DataError

Batch = Any
T = TypeVar("T")


@dataclass
class SplitBatch:
    """A batch cut into the model's inputs and the objective's labels."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    labels: torch.Tensor | None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        mask = self.kwargs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None

    @property
    def input_ids(self) -> torch.Tensor | None:
        ids = self.kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids
        return self.args[0] if self.args and isinstance(self.args[0], torch.Tensor) else None

    @property
    def size(self) -> int:
        first = self.input_ids if self.input_ids is not None else self.labels
        if first is None:
            first = next((v for v in self.kwargs.values() if isinstance(v, torch.Tensor)), None)
        return 0 if first is None else int(first.shape[0])


def split_batch(batch: Batch) -> SplitBatch:
    """(args, kwargs, labels) of a batch. Labels are never passed to the model: the objective
    computes the loss itself (a model given labels would compute a second, unused loss)."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return SplitBatch((), kwargs, batch.get("labels"))
    if isinstance(batch, (list, tuple)):
        return SplitBatch((batch[0],), {}, batch[1] if len(batch) > 1 else None)
    return SplitBatch((batch,), {}, None)


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """Move every tensor of a (nested) batch to ``device`` (a no-op when it is already there)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def split_on(batch: Batch, device: torch.device | str | None) -> SplitBatch:
    return split_batch(to_device(batch, device))


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, ``.logits`` (Hugging Face), or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"cannot find logits in a model output of type {type(output).__name__}")


def cycle_batches(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, pass after pass; an empty loader is a DataError."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the merge data loader yields no batch (empty data set)")


def first_batches(loader: Iterable[Batch], count: int) -> list[Batch]:
    """The first ``count`` batches of one pass; an empty loader is a DataError."""
    out: list[Batch] = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    if not out:
        raise DataError("the merge data loader yields no batch (empty data set)")
    return out


def untouched_order(loader: Iterable[Batch], work: Callable[[], T]) -> T:
    """Run ``work`` (which iterates ``loader``) without moving the loader's shuffle generator:
    ranking candidates on the first batches must not change the order training sees."""
    generator = getattr(loader, "generator", None)
    if not isinstance(generator, torch.Generator):
        return work()
    state = generator.get_state()
    try:
        return work()
    finally:
        generator.set_state(state)
