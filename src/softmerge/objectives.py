"""What a merge minimises and how a merged model is scored: one objective for both.

- ``classification`` (alias ``cross_entropy``): cross-entropy with the class dimension last;
  the metric is accuracy.
- ``causal_lm``: next-token cross-entropy (logits at t predict token t+1), ``ignore_index=-100``,
  padding masked by ``attention_mask``, weighted by tokens across batches; the metric is
  perplexity. Labels are the batch's ``labels`` when it carries them (as Hugging Face's own loss
  would use them) or else its ``input_ids``.
- ``entropy``: the entropy of the predictions (no labels: AdaMerging's objective); per token,
  masked, for language models.
- any callable ``fn(logits, labels) -> scalar loss`` (no metric beyond the loss).

``auto`` follows the model: ``*ForCausalLM`` / ``*LMHeadModel`` classes get ``causal_lm``, every
other model ``classification``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import SplitBatch
from .errors import DataError, PlanError

LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
IGNORE_INDEX = -100
NAMES = ("auto", "classification", "cross_entropy", "causal_lm", "entropy")


@dataclass
class Totals:
    """Sums over batches: the loss summed over its weight (samples or tokens), and hits."""

    loss: float = 0.0
    weight: float = 0.0
    correct: float = 0.0

    def add(self, other: Totals) -> None:
        self.loss += other.loss
        self.weight += other.weight
        self.correct += other.correct


class Objective:
    """A loss to minimise on batches and the metric that scores a model with it."""

    name: str = "objective"
    metric: str = "loss"  # "accuracy", "perplexity" or "loss" (nothing beyond the loss)
    needs_labels: bool = True

    def loss(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        raise NotImplementedError

    def totals(self, logits: torch.Tensor, batch: SplitBatch) -> Totals:
        """Summed loss, its weight and (for accuracy) the hits of one batch."""
        weight = float(max(batch.size, 1))
        return Totals(float(self.loss(logits, batch)) * weight, weight)

    def sample_totals(
        self, logits: torch.Tensor, batch: SplitBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the summed loss and its weight (what ``totals`` adds up), float64 on
        the CPU: two models scored on the same data compare sample by sample (the L0 path's
        choice bounds a loss gap by its standard error). Default: the batch is one sample."""
        t = self.totals(logits, batch)
        return (
            torch.tensor([t.loss], dtype=torch.float64),
            torch.tensor([t.weight], dtype=torch.float64),
        )

    def weight(self, logits: torch.Tensor, batch: SplitBatch) -> float:
        """How many terms ``loss`` averages over: the batch's loss is a mean, and a mean over
        several shares is their means weighted by this (what a distributed run reduces with).
        Samples by default (a callable objective is taken to average over samples)."""
        return float(logits.shape[0]) if logits.dim() else float(batch.size)

    def metrics(self, totals: Totals) -> dict[str, float]:
        mean = totals.loss / totals.weight if totals.weight else math.nan
        out = {"loss": mean}
        if self.metric == "accuracy":
            out["accuracy"] = 100.0 * totals.correct / totals.weight if totals.weight else math.nan
        elif self.metric == "perplexity":
            out["perplexity"] = math.exp(mean) if mean < 700 else math.inf
        return out


class Classification(Objective):
    name = "classification"
    metric = "accuracy"

    def _labels(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        labels = batch.labels
        if labels is None:
            raise DataError(
                "objective 'classification' needs labels but the batch has none; "
                "use objective 'entropy' to merge without labels"
            )
        classes = logits.shape[-1]
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise DataError(
                f"objective 'classification' needs one class index per sample (labels of shape "
                f"({logits.shape[0]},)), got labels of shape {tuple(labels.shape)}; "
                "for a language model use objective 'causal_lm'"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            bad = labels[(labels < 0) | (labels >= classes)][0].item()
            raise DataError(
                f"label {bad} is outside the model's {classes} outputs (0..{classes - 1})"
            )
        return labels

    def loss(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), self._labels(logits, batch))

    def totals(self, logits: torch.Tensor, batch: SplitBatch) -> Totals:
        labels = self._labels(logits, batch)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        return Totals(float(loss), float(labels.numel()), float(correct))

    def sample_totals(
        self, logits: torch.Tensor, batch: SplitBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self._labels(logits, batch)
        loss = F.cross_entropy(logits.float(), labels, reduction="none").detach()
        return loss.double().cpu(), torch.ones(loss.shape, dtype=torch.float64)


class CausalLM(Objective):
    name = "causal_lm"
    metric = "perplexity"

    def _targets(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        """Labels of positions 1..T-1 (what logits 0..T-2 predict), -100 where nothing counts."""
        labels = batch.labels if batch.labels is not None else batch.input_ids
        if labels is None or labels.dim() != 2:
            raise DataError(
                "objective 'causal_lm' needs token ids of shape (batch, sequence): "
                "a batch with input_ids (and optionally labels)"
            )
        labels = labels.clone()
        mask = batch.attention_mask
        if mask is not None and mask.shape == labels.shape:
            labels[mask == 0] = IGNORE_INDEX
        targets = labels[:, 1:]
        if logits.shape[:2] != labels.shape:
            raise DataError(
                f"objective 'causal_lm': logits of shape {tuple(logits.shape)} do not match "
                f"token ids of shape {tuple(labels.shape)}"
            )
        return targets

    def _summed(self, logits: torch.Tensor, batch: SplitBatch) -> tuple[torch.Tensor, int]:
        targets = self._targets(logits, batch)
        count = int((targets != IGNORE_INDEX).sum())
        _require_tokens(count)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        loss = F.cross_entropy(
            flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, count

    def loss(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        total, count = self._summed(logits, batch)
        return total / count

    def weight(self, logits: torch.Tensor, batch: SplitBatch) -> float:
        """Predicted tokens (the loss is a mean over tokens, not sequences)."""
        return float(int((self._targets(logits, batch) != IGNORE_INDEX).sum()))

    def totals(self, logits: torch.Tensor, batch: SplitBatch) -> Totals:
        total, count = self._summed(logits, batch)
        return Totals(float(total), float(count))

    def sample_totals(
        self, logits: torch.Tensor, batch: SplitBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: its summed token losses and its predicted tokens."""
        targets = self._targets(logits, batch)
        counts = (targets != IGNORE_INDEX).sum(1)
        _require_tokens(int(counts.sum()))
        per_token = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).detach()
        return per_token.sum(1).double().cpu(), counts.double().cpu()


def _require_tokens(count: int) -> None:
    if count == 0:
        raise DataError(
            "a batch has no token to predict: every label is -100 (or masked out); "
            "check the data's labels and attention_mask"
        )


class Entropy(Objective):
    name = "entropy"
    metric = "loss"
    needs_labels = False

    def loss(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        per_position = -(logp.exp() * logp).sum(-1)
        mask = batch.attention_mask
        if logits.dim() == 3 and mask is not None and mask.shape == per_position.shape:
            keep = mask.to(per_position.dtype)
            return (per_position * keep).sum() / keep.sum().clamp_min(1.0)
        return per_position.mean()

    def weight(self, logits: torch.Tensor, batch: SplitBatch) -> float:
        """Positions averaged over: unmasked tokens of a language model, else every position."""
        mask = batch.attention_mask
        if logits.dim() == 3 and mask is not None and mask.shape == logits.shape[:2]:
            return float(mask.sum())
        return float(logits[..., 0].numel())


class CallableObjective(Objective):
    """A user's ``fn(logits, labels) -> loss``."""

    metric = "loss"

    def __init__(self, fn: LossFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", "callable")

    def loss(self, logits: torch.Tensor, batch: SplitBatch) -> torch.Tensor:
        return self.fn(logits, batch.labels)


_BUILTIN: dict[str, type[Objective]] = {
    "classification": Classification,
    "cross_entropy": Classification,
    "causal_lm": CausalLM,
    "entropy": Entropy,
}


def is_causal_lm(model: nn.Module | None) -> bool:
    name = type(model).__name__ if model is not None else ""
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def import_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function (for YAML ``objective:``)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PlanError(f"objective {spec!r}: cannot import it: {exc}") from exc
    if not callable(obj):
        raise PlanError(f"objective {spec!r} is not callable")
    return obj


def resolve_objective(spec: str | LossFn | Objective, model: nn.Module | None = None) -> Objective:
    """The objective a name, callable or ``module:function`` string means for ``model``."""
    if isinstance(spec, Objective):
        return spec
    if callable(spec):
        return CallableObjective(spec)
    if spec == "auto":
        spec = "causal_lm" if is_causal_lm(model) else "classification"
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    if isinstance(spec, str) and ":" in spec:
        return CallableObjective(import_callable(spec), spec)
    raise PlanError(
        f"objective must be one of {', '.join(NAMES)}, a callable or 'module:function', "
        f"got {spec!r}"
    )
