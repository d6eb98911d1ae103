"""Run several merge methods on the same candidates and data; one table of results.

>>> rows = compare(model, candidates, [Entry("uniform soup", get_method("uniform_soup")),
...                                    Entry("soft", get_method("soft"))],
...                merge_loader=merge, eval_loader=test)   # doctest: +SKIP

Every method gets the same :class:`~softmerge.methods.MergeContext` (one per distinct plan), so
the candidates are loaded once; each row has accuracy and loss on the eval set, the merge's
wall time, its peak memory and how many models inference needs (1, or N for the ensemble).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .errors import ConfigError
from .methods import MergeContext, MergeMethod, MergeOutcome, get_method
from .plan import MergePlan
from .report import format_markdown_table, format_table
from .zoo import evaluate

log = logging.getLogger("softmerge")

COLUMNS = ["method", "accuracy", "loss", "seconds", "peak_mb", "models"]

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


def default_entries(
    candidates: int, has_base: bool, soft_params: dict[str, Any] | None = None
) -> list[Entry]:
    """Every method that applies: task-vector methods need a base, SLERP exactly 2 models."""
    entries: list[Entry] = []
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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN is not valid JSON


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
) -> list[dict[str, Any]]:
    """One row per candidate (when asked) and per entry, in order."""
    contexts: dict[tuple[str, tuple[str, ...] | None], MergeContext] = {}

    def context(p: MergePlan, subset: list[str] | None = None) -> MergeContext:
        key = (repr(asdict(p)), None if subset is None else tuple(subset))
        if key not in contexts:
            first = next(iter(contexts.values()), None)  # later contexts reuse its loaded pool
            contexts[key] = MergeContext(
                model,
                candidates if first is None else _subset(first, subset),
                names=names if first is None else None,
                plan=p,
                base=base if first is None else _same_base(first, p),
                merge_loader=merge_loader,
                held_out_loader=held_out_loader,
                seed=seed,
                progress=progress,
            )
        return contexts[key]

    shared = context(plan or MergePlan())
    rows = candidate_rows(shared, eval_loader) if include_candidates else []
    for entry in entries:
        log.info("running %s", entry.label)
        ctx = context(entry.plan or shared.plan, entry.candidates)
        rewind(merge_loader)
        outcome = entry.method.merge(ctx)
        rows.append(method_row(entry.label, entry.method, outcome, ctx, eval_loader))
    return rows


def rewind(loader: Iterable[Any] | None) -> None:
    """Reset a seeded DataLoader's shuffle generator to its seed, so that every method sees the
    merge data in the same order whatever ran before it (each pass over a DataLoader draws from
    that generator)."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(generator.initial_seed())


def _same_base(first: MergeContext, plan: MergePlan) -> Any:
    """The loaded base, unless this plan names another one (or none): then the plan's."""
    return first.base_candidate if plan.base == first.plan.base else None


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


def candidate_rows(ctx: MergeContext, eval_loader: Iterable[Any]) -> list[dict[str, Any]]:
    """Each candidate alone (with its own BatchNorm statistics)."""
    return [
        _row(c.name, "candidate", ctx.build_plain(c.state), eval_loader, None) for c in ctx.pool
    ]


def method_row(
    label: str,
    method: MergeMethod,
    outcome: MergeOutcome,
    ctx: MergeContext,
    eval_loader: Iterable[Any],
) -> dict[str, Any]:
    return _row(
        label,
        method.name,
        outcome.model,
        eval_loader,
        {
            "seconds": round(outcome.seconds, 3),
            "peak_mb": round(outcome.peak_mb, 1),
            "models": 1 if method.single_model else len(ctx.pool),
            "info": plain_info(outcome.info),
        },
    )


def _row(label: str, kind: str, model, loader, extra: dict[str, Any] | None) -> dict[str, Any]:
    accuracy, loss = evaluate(model, loader)
    row = {"method": label, "kind": kind, "accuracy": accuracy, "loss": _finite(loss)}
    row.update(extra or {"seconds": None, "peak_mb": None, "models": 1})
    return row


def plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a method's info (no modules, tensors or histories)."""
    keep = {}
    for key, value in info.items():
        if key in ("history", "merger", "fit"):
            continue
        if isinstance(value, (int, float, str, bool, list, dict)) or value is None:
            keep[key] = value
    return keep


def table_text(rows: Sequence[dict[str, Any]]) -> str:
    return format_table(list(rows), COLUMNS, floatfmt=".3f")


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    return format_markdown_table(list(rows), COLUMNS, floatfmt=".3f")
