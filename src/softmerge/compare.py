"""Run several merge methods on the same candidates and data; one table of results.

>>> rows = compare(model, candidates, [Entry("uniform soup", get_method("uniform_soup")),
...                                    Entry("soft", get_method("soft"))],
...                merge_loader=merge, eval_loader=test)   # doctest: +SKIP

Every method gets a :class:`~softmerge.context.MergeContext` (one per distinct plan and
candidate subset, all sharing the candidates opened once); each row has the objective's metric
(accuracy, or perplexity for language models) and loss on the eval set, the merge's wall time,
its peak memory and how many models inference needs (1, or N for the ensemble).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .context import MergeContext
from .errors import ConfigError
from .methods import MergeMethod, MergeOutcome, get_method
from .plan import MergePlan
from .report import format_markdown_table, format_table

log = logging.getLogger("softmerge")

# Settings for a comparison nobody configured: FusionBench's usual ones for the task-vector
# methods (lambda 0.3; TIES keeps 20 %; DARE drops half), defaults for the rest.
DEFAULT_ENTRIES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("uniform soup", "uniform_soup", {}),
    ("greedy soup", "greedy_soup", {}),
    ("learned soup", "learned_soup", {}),
    ("slerp", "slerp", {}),
    ("task arithmetic", "task_arithmetic", {"lambda": 0.3}),
    ("ties", "ties", {"density": 0.2, "lambda": 0.3}),
    ("dare linear", "dare_linear", {"density": 0.5, "lambda": 0.3}),
    ("dare ties", "dare_ties", {"density": 0.5, "lambda": 0.3}),
    ("model stock", "model_stock", {}),
    ("adamerging (task-wise)", "task_wise_adamerging", {}),
    ("adamerging (layer-wise)", "layer_wise_adamerging", {}),
    ("output ensemble", "ensemble", {}),
    ("soft merging", "soft", {}),
)


@dataclass
class Entry:
    """One row of a comparison: a method, and optionally its own plan or candidate subset."""

    label: str
    method: MergeMethod
    plan: MergePlan | None = None  # None: the comparison's plan
    candidates: list[str] | None = None  # names; None: every candidate (SLERP needs two)


# PEFT's own combinations, added when every candidate is a LoRA adapter.
PEFT_ENTRIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
)


def default_entries(
    candidates: int,
    has_base: bool,
    soft_params: dict[str, Any] | None = None,
    adapters: bool = False,
) -> list[Entry]:
    """Every method that applies: task-vector methods need a base, SLERP exactly 2 models,
    PEFT's combinations LoRA adapters."""
    entries: list[Entry] = []
    if adapters:
        for combination, params in PEFT_ENTRIES:
            method = get_method("peft", combination_type=combination, **params)
            entries.append(Entry(f"peft {combination}", method))
    for label, name, params in DEFAULT_ENTRIES:
        method = get_method(name, **((soft_params or {}) if name == "soft" else params))
        if method.needs_base and not has_base:
            log.info("skipping %s: it needs a base (plan.base)", label)
            continue
        if name == "slerp" and candidates + has_base != 2:
            continue  # SLERP interpolates two models
        entries.append(Entry(label, method))
    return entries


def split_held_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(learn, held-out): a seeded random ``fraction`` of ``dataset`` held out of learning."""
    if fraction <= 0:
        return dataset, None
    n = len(dataset)  # type: ignore[arg-type]
    k = max(1, round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[k:]), Subset(dataset, order[:k])


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN is not valid JSON


class Comparison:
    """Contexts for every (plan, candidate subset) of one comparison, opened from one pool."""

    def __init__(self, first: MergeContext) -> None:
        self.first = first
        self.contexts: dict[tuple[str, tuple[str, ...] | None], MergeContext] = {
            (repr(first.plan.model_dump()), None): first
        }

    def context(self, plan: MergePlan | None, subset: list[str] | None = None) -> MergeContext:
        first = self.first
        plan = plan or first.plan
        key = (repr(plan.model_dump()), None if subset is None else tuple(subset))
        if key not in self.contexts:
            self.contexts[key] = MergeContext(
                first.template,
                _subset(first, subset),
                plan=plan,
                base=first.base_candidate if plan.base == first.plan.base else None,
                merge_loader=first.merge_loader,
                held_out_loader=first.held_out_loader,
                seed=first.seed,
                progress=first.progress,
                objective=first.objective_fn,
                device=first.device,
                storage_dtype=first.storage_dtype,
                rank_batches=first.rank_batches,
            )
        return self.contexts[key]

    def run(self, entry: Entry, eval_loader: Iterable[Any] | None) -> dict[str, Any]:
        log.info("running %s", entry.label)
        ctx = self.context(entry.plan, entry.candidates)
        for other in self.contexts.values():
            if other is not ctx:
                other.release_stack()  # one stack in memory at a time
        rewind(ctx.merge_loader)
        outcome = entry.method.merge(ctx)
        return method_row(entry.label, entry.method, outcome, ctx, eval_loader)


def compare(
    model: torch.nn.Module,
    candidates: Sequence[Any],
    entries: Sequence[Entry],
    *,
    eval_loader: Iterable[Any],
    names: Sequence[str] | None = None,
    plan: MergePlan | None = None,
    base: Any = None,
    merge_loader: Iterable[Any] | None = None,
    held_out_loader: Iterable[Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    include_candidates: bool = True,
    objective: Any = "auto",
) -> list[dict[str, Any]]:
    """One row per candidate (when asked) and per entry, in order."""
    first = MergeContext(
        model,
        candidates,
        names=names,
        plan=plan or MergePlan(),
        base=base,
        merge_loader=merge_loader,
        held_out_loader=held_out_loader,
        seed=seed,
        progress=progress,
        objective=objective,
    )
    return compare_in(first, entries, eval_loader, include_candidates=include_candidates)


def compare_in(
    first: MergeContext,
    entries: Sequence[Entry],
    eval_loader: Iterable[Any] | None,
    *,
    include_candidates: bool = True,
) -> list[dict[str, Any]]:
    """The rows of :func:`compare` for contexts derived from ``first``."""
    comparison = Comparison(first)
    rows = candidate_rows(first, eval_loader) if include_candidates and eval_loader else []
    return rows + [comparison.run(entry, eval_loader) for entry in entries]


def rewind(loader: Iterable[Any] | None) -> None:
    """Reset a seeded DataLoader's shuffle generator to its seed, so that every method sees the
    merge data in the same order whatever ran before it (each pass over a DataLoader draws from
    that generator)."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(generator.initial_seed())


def _subset(ctx: MergeContext, names: list[str] | None) -> list[Any]:
    if names is None:
        return ctx.pool
    known = {c.name: c for c in ctx.pool}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(
            f"candidate {missing[0]!r} is not one of the candidates ({', '.join(known)})"
        )
    return [known[n] for n in names]


def row(label: str, kind: str, metrics: dict[str, float] | None, key: str = "method") -> dict:
    """One table row: label, kind, the objective's metric and loss (None when not evaluated)."""
    out: dict[str, Any] = {key: label, "kind": kind}
    for name, value in (metrics or {}).items():
        out[name] = finite_or_none(value)
    return out


def candidate_rows(
    ctx: MergeContext, eval_loader: Iterable[Any] | None, key: str = "method"
) -> list[dict[str, Any]]:
    """Each candidate alone (with its own BatchNorm statistics)."""
    if eval_loader is None:
        return []
    rows = []
    for c in ctx.pool:
        metrics = ctx.evaluate(ctx.build_plain(c.state), eval_loader)
        c.close()
        rows.append({**row(c.name, "candidate", metrics, key), **_no_cost()})
    return rows


def _no_cost() -> dict[str, Any]:
    return {"seconds": None, "peak_mb": None, "models": 1}


def method_row(
    label: str,
    method: MergeMethod,
    outcome: MergeOutcome,
    ctx: MergeContext,
    eval_loader: Iterable[Any] | None,
    key: str = "method",
) -> dict[str, Any]:
    metrics = ctx.evaluate(outcome.model, eval_loader) if eval_loader is not None else None
    return {
        **row(label, method.name, metrics, key),
        "seconds": round(outcome.seconds, 3),
        "peak_mb": round(outcome.peak_mb, 1),
        "models": 1 if method.single_model else len(ctx.pool),
        "info": plain_info(outcome.info),
    }


def plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a method's info (no modules, tensors or histories)."""
    keep = {}
    for key, value in info.items():
        if key in ("history", "merger", "fit"):
            continue
        if isinstance(value, (int, float, str, bool, list, dict)) or value is None:
            keep[key] = value
    return keep


def columns(rows: Sequence[dict[str, Any]], key: str = "method") -> list[str]:
    """The table's columns: the metrics present in the rows, then the costs."""
    metric = [m for m in ("accuracy", "perplexity") if any(m in r for r in rows)]
    return [key, *metric, "loss", "seconds", "peak_mb", "models"]


def table_text(rows: Sequence[dict[str, Any]], key: str = "method") -> str:
    return format_table(list(rows), columns(rows, key), floatfmt=".3f")


def table_markdown(rows: Sequence[dict[str, Any]], key: str = "method") -> str:
    return format_markdown_table(list(rows), columns(rows, key), floatfmt=".3f")
