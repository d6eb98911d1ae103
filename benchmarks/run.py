"""Run every setting of the benchmark and write ``<out>/results.json`` (then run report.py).

    python benchmarks/run.py [--fresh] [--smoke] [--out bench-out] [--only S1 S3] [--seeds 0 1]
                             [--mnist FOLDER]

MNIST comes from ``--mnist``, else ``$SOFTMERGE_DATA/mnist``, else the user cache, else a
verified download into the cache (``softmerge.data.resolve_mnist``); it is looked for before
anything is trained, so a missing MNIST stops the run at once with the list of places tried.

Settings (docs/results.md explains each choice):

- S1 local optima of one run: children of one parent (MNIST MLP, MNIST CNN, MNIST-1D ResNet-BN).
- S2 independently initialised models (digits MLP, MNIST MLP, MNIST-1D ResNet-BN); every method
  as it is and after weight matching (``plan.align``), plus REPAIR (``plan.repair``) rows.
- S3 S1's MNIST MLP children plus malicious candidates (1, 2 or 3 of 7).
- S4 partial merging: only the plan's layers merged, the rest from one candidate.
- S5 fine-tunes of one parent on different class pairs, merged as task vectors (delta).

Every merge goes through the method registry (``softmerge.methods``) with a fresh context and
a freshly seeded merge loader, so each result reproduces on its own. Each merge is timed and
its peak memory measured by the registry (``softmerge.profiling.measure``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ARCHS, build
from settings import (
    FAMILIES,
    SCALES,
    TASKS,
    Cache,
    FamilyCandidates,
    Scale,
    get_data,
    make_malicious,
)

from softmerge.data import resolve_mnist
from softmerge.errors import DataError
from softmerge.methods import MergeContext, get_method
from softmerge.plan import MergePlan

State = dict[str, torch.Tensor]
GRANULARITIES = ("model", "module", "tensor", "channel")
SETTINGS = ("S1", "S2", "S3", "S4", "S5")
SETTLE_TOL = 0.01  # gates "settled": no later recorded value moves more than this (max-abs)
AUTO_ROW = "soft (tensor), λ auto"  # fit.l0_lambda: auto (the L0 path, issue 14)

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------
# Method specifications


@dataclass
class Spec:
    row: str  # row label in the tables
    method: str  # registry name
    params: dict[str, Any] = field(default_factory=dict)
    granularity: str = "tensor"  # plan granularity (soft: the gate units)
    base: bool = False  # merge with the parent as base (task vectors / delta)
    tune_lambda: bool = False  # pick lambda on the merge split from scale.lambdas
    group: str = "merge"  # reference | merge | soft | ablation
    plan: dict[str, Any] = field(default_factory=dict)  # MergePlan fields of this row


def core_specs(scale: Scale, *, parent: bool, delta: bool = False) -> list[Spec]:
    """The rows of a table. ``parent``: a common parent exists (task-vector methods apply);
    ``delta``: fine-tunes merged as task vectors (soft uses combine='delta')."""
    learn = {} if scale.learn_steps is None else {"steps": scale.learn_steps}
    soft = {"steps": scale.soft_steps}
    specs = [
        Spec("uniform soup", "uniform_soup", group="reference"),
        Spec("greedy soup", "greedy_soup", group="reference"),
        Spec("learned soup", "learned_soup", dict(learn)),
        Spec("output ensemble (N x cost)", "ensemble", group="reference"),
    ]
    if parent:
        specs += [
            Spec("task arithmetic (lambda tuned)", "task_arithmetic", base=True, tune_lambda=True),
            Spec(
                "TIES (density 0.2, lambda tuned)",
                "ties",
                {"density": 0.2},
                base=True,
                tune_lambda=True,
            ),
        ]
    if delta:
        specs += [
            Spec(
                "DARE linear (density 0.5, lambda tuned)",
                "dare_linear",
                {"density": 0.5},
                base=True,
                tune_lambda=True,
            ),
            Spec(
                "DARE TIES (density 0.5, lambda tuned)",
                "dare_ties",
                {"density": 0.5},
                base=True,
                tune_lambda=True,
            ),
        ]
    specs += [
        Spec("AdaMerging task-wise", "task_wise_adamerging", dict(learn), base=parent),
        Spec("AdaMerging layer-wise", "layer_wise_adamerging", dict(learn), base=parent),
    ]
    for g in GRANULARITIES:
        specs.append(
            Spec(f"soft ({g})", "soft", dict(soft), granularity=g, base=delta, group="soft")
        )
    if delta:
        specs += [  # task arithmetic's lambda learned with the gates: no grid search
            Spec(
                f"soft ({g}, delta_scale learned)",
                "soft",
                dict(soft),
                granularity=g,
                base=True,
                group="soft",
                plan={"delta_scale": "learn"},
            )
            for g in ("model", "tensor")
        ]
        specs += [  # lambda of task arithmetic, inside soft merging: plan.delta_scale
            Spec(
                f"soft ({g}, delta_scale tuned)",
                "soft",
                dict(soft),
                granularity=g,
                base=True,
                tune_lambda=True,
                group="soft",
            )
            for g in ("model", "tensor")
        ]
        specs.append(
            Spec(
                "soft (tensor, entropy: no labels)",
                "soft",
                dict(soft, objective="entropy"),
                base=True,
                group="soft",
            )
        )
    # λ chosen along the L0 path on a held-out fifth of the merge split (softmerge.path); the
    # path itself (open gates, exact zeros, test accuracy per λ) is recorded with the row.
    specs.append(Spec(AUTO_ROW, "soft", dict(soft, l0_lambda="auto"), base=delta, group="soft"))
    specs.append(
        Spec(
            "soft (tensor), L0 off (lambda=0)",
            "soft",
            dict(soft, l0_lambda=0.0),
            base=delta,
            group="ablation",
        )
    )
    return specs


ALIGNED = ", aligned"  # suffix of the rows merged after weight matching
REPAIRED = ", aligned + REPAIR"
MERGE_MANY = ", aligned (MergeMany)"
STE = ", aligned (STE)"


def aligned_specs(
    specs: list[Spec], align_steps: int = 1000, ste_repair: bool = False
) -> list[Spec]:
    """S2: every method again after weight matching (the output ensemble is left out: aligning
    changes no candidate's function), REPAIR after the uniform soup and soft (tensor), the
    uniform soup after MergeMany (with and without REPAIR), and the uniform soup and soft
    (tensor) after STE matching (plan.align 'ste'; ``ste_repair`` adds the STE soup with REPAIR:
    ``align_ste.py`` runs it, the whole bench leaves it out for time)."""
    out = []
    for spec in specs:
        if spec.method == "ensemble":
            continue
        plan = {**spec.plan, "align": "weight_matching"}
        out.append(replace(spec, row=spec.row + ALIGNED, plan=plan))
        if spec.row in ("uniform soup", "soft (tensor)"):
            out.append(replace(spec, row=spec.row + REPAIRED, plan={**plan, "repair": True}))
            ste = {**spec.plan, "align": "ste", "align_steps": align_steps}
            out.append(replace(spec, row=spec.row + STE, plan=ste))
        if spec.row == "uniform soup" and ste_repair:
            ste_repaired = {**spec.plan, "align": "ste", "align_steps": align_steps}
            ste_repaired["repair"] = True
            out.append(replace(spec, row=spec.row + STE + " + REPAIR", plan=ste_repaired))
        if spec.row == "uniform soup":  # MergeMany: every candidate to the others' average
            many = {**spec.plan, "align": "merge_many"}
            repaired = {**many, "repair": True}
            out += [
                replace(spec, row=spec.row + MERGE_MANY, plan=many),
                replace(spec, row=spec.row + MERGE_MANY + " + REPAIR", plan=repaired),
            ]
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation helpers


def batches(ds, size: int = 1000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = ds.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@torch.no_grad()
def predict(model: torch.nn.Module, data: list) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(predictions, labels, mean cross-entropy) of ``model`` on pre-cut batches."""
    model.eval()
    preds, labels, loss, count = [], [], 0.0, 0
    for x, y in data:
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1))
        labels.append(y)
        count += len(y)
    return torch.cat(preds), torch.cat(labels), loss / max(count, 1)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((pred == y).float().mean()) if len(y) else math.nan


def task_accuracies(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """S5: accuracy on each task's test samples (10-way prediction) and their mean."""
    out = {}
    for a, b in TASKS:
        mask = (y == a) | (y == b)
        out[f"{a}{b}"] = accuracy(pred[mask], y[mask])
    out["mean"] = statistics.fmean(out.values())
    return out


def model_with(arch: str, state: State) -> torch.nn.Module:
    model = build(arch)
    model.load_state_dict(state)
    return model.eval()


def merge_loader(dataset, seed: int, batch_size: int = 128) -> DataLoader:
    """Shuffled, seeded merge loader; whole batches are sliced out of the tensors at once."""
    sampler = BatchSampler(
        RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), batch_size, False
    )
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def alignment_record(report: Any) -> dict[str, Any]:
    """The alignment of a row: reference, seconds, and the matching cost after / before."""
    others = [c for c in report.candidates if c.name != report.reference_name]
    ratios = [c.cost_after / c.cost_before for c in others if c.cost_before > 0]
    return {
        "reference": report.reference_name,
        "seconds": report.seconds,
        "cost_ratio": statistics.fmean(ratios) if ratios else None,
        "moved_units": sum(c.moved_units for c in others),
        **({"ste": report.ste} if getattr(report, "ste", None) else {}),
    }


def learned_scale(merger: Any) -> dict[str, Any]:
    """plan.delta_scale 'learn': the learned scale per gate unit (mean, min, max)."""
    scale = merger.gates.scale()
    if scale is None:
        return {}
    values = scale.detach().cpu()
    return {
        "delta_scale_learned": {
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    }


def fingerprint(states: list[State]) -> str:
    h = hashlib.sha1()
    for s in states:
        for k in sorted(s):
            h.update(k.encode())
            h.update(s[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settle_step(trajectory: list[torch.Tensor], steps: list[int]) -> int | None:
    """First recorded step after which no recorded deterministic gate moves by more than
    SETTLE_TOL (max-abs over every gate) up to the end; None if nothing was recorded."""
    if not trajectory:
        return None
    final = len(trajectory) - 1
    for i in range(len(trajectory)):
        ref = trajectory[i]
        if all(float((trajectory[j] - ref).abs().max()) <= SETTLE_TOL for j in range(i, final + 1)):
            return steps[i]
    return steps[final]


_PLAIN: dict[str, float] = {}


def plain_step_seconds(arch: str, reps: int) -> float:
    """Median seconds of one plain training step (SGD) at batch 128, measured in this run."""
    if arch not in _PLAIN:
        from step_cost import PlainStep, _batch

        step = PlainStep(arch, _batch(arch))
        for _ in range(5):
            step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        _PLAIN[arch] = statistics.median(times)
    return _PLAIN[arch]


def nan_low(v: float) -> float:
    """NaN ranks below everything (a NaN accuracy never wins a comparison)."""
    return -math.inf if v is None or math.isnan(v) else v


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# One table = one pool of candidates, every method


class Table:
    def __init__(
        self,
        runner: Runner,
        setting: str,
        config: str,
        fam: FamilyCandidates,
        pool: dict[str, State],
        malicious: tuple[str, ...] = (),
        plan: dict[str, Any] | None = None,
    ) -> None:
        self.r, self.setting, self.config, self.fam = runner, setting, config, fam
        self.pool, self.malicious, self.plan_kw = pool, malicious, plan or {}
        self.arch = fam.family.arch
        splits = runner.cache.data(fam.family)
        self.splits = splits
        self.test, self.merge = batches(splits.test), batches(splits.merge)
        self.seed = fam.seed

    def plain_step(self) -> float:
        return plain_step_seconds(self.arch, self.r.scale.plain_reps)

    def record(self, row: str, **values: Any) -> dict[str, Any]:
        rec = {
            "setting": self.setting,
            "config": self.config,
            "family": self.fam.family.key,
            "seed": self.seed,
            "row": row,
            **values,
        }
        self.r.records.append(rec)
        return rec

    def _scores(self, model: torch.nn.Module) -> dict[str, Any]:
        pred, y, loss = predict(model, self.test)
        out = {"test_acc": accuracy(pred, y), "test_loss": loss}
        if self.setting == "S5":
            out["task_acc"] = task_accuracies(pred, y)
        return out

    def candidates(self) -> dict[str, torch.Tensor]:
        """Evaluate every candidate alone, and the best single one (chosen on the merge split)."""
        merge_acc, preds = {}, {}
        for k, (name, state) in enumerate(self.pool.items()):
            model = model_with(self.arch, state)
            mp, my, _ = predict(model, self.merge)
            merge_acc[name] = accuracy(mp, my)
            pred, y, loss = predict(model, self.test)
            preds[name] = pred
            extra: dict[str, Any] = {}
            if self.setting == "S5":
                extra["task_acc"] = task_accuracies(pred, y)
                extra["own_task_acc"] = extra["task_acc"][f"{TASKS[k][0]}{TASKS[k][1]}"]
            self.record(
                name,
                group="candidate",
                merge_acc=merge_acc[name],
                malicious=name in self.malicious,
                test_acc=accuracy(pred, y),
                test_loss=loss,
                **extra,
            )
        if self.fam.parent is not None and self.setting in ("S1", "S5"):
            self.record(
                "parent (not a candidate)",
                group="parent",
                **self._scores(model_with(self.arch, self.fam.parent)),
            )
        best = max(merge_acc, key=lambda n: nan_low(merge_acc[n]))
        rec = self._scores(model_with(self.arch, self.pool[best]))
        self.record("best single (chosen on merge split)", group="reference", chosen=best, **rec)
        return preds

    def context(self, spec: Spec, plan_extra: dict[str, Any] | None = None) -> MergeContext:
        plan_kw = {
            **self.plan_kw,
            "granularity": spec.granularity,
            **spec.plan,
            **(plan_extra or {}),
        }
        cands, names = list(self.pool.values()), list(self.pool)
        if spec.base:
            cands, names = [self.fam.parent, *cands], ["parent", *names]
            plan_kw["base"] = "parent"
            if spec.method == "soft":
                plan_kw["combine"] = "delta"
        return MergeContext(
            model=build(self.arch),
            candidates=cands,
            names=names,
            plan=MergePlan(**plan_kw),
            merge_loader=merge_loader(self.splits.merge, self.seed, self.r.scale.batch_size),
            seed=self.seed,
        )

    def run(self, spec: Spec) -> dict[str, Any] | None:
        try:
            return self._run(spec)
        except Exception as exc:  # a failing method is a result too: record it, go on
            log.error("%s %s seed %d %s: %s", self.setting, self.config, self.seed, spec.row, exc)
            traceback.print_exc()
            return self.record(
                spec.row, group=spec.group, method=spec.method, error=f"{type(exc).__name__}: {exc}"
            )

    def _merge(self, spec: Spec, params: dict[str, Any], plan_extra: dict[str, Any] | None = None):
        ctx = self.context(spec, plan_extra)
        method = get_method(spec.method, **params)
        return method.merge(ctx), ctx, method

    def _run(self, spec: Spec) -> dict[str, Any]:
        params = dict(spec.params)
        extra: dict[str, Any] = {}
        before = fingerprint(list(self.pool.values())) if spec.method == "soft" else None
        if spec.tune_lambda:
            best, seconds, peak, scan = None, 0.0, 0.0, {}
            for lam in self.r.scale.lambdas:
                if spec.method == "soft":  # soft merging's lambda: plan.delta_scale
                    out, ctx, method = self._merge(spec, params, {"delta_scale": float(lam)})
                else:
                    out, ctx, method = self._merge(spec, {**params, "lambda": float(lam)})
                t0 = time.perf_counter()
                mp, my, _ = predict(out.model, self.merge)
                acc = accuracy(mp, my)
                scan[str(lam)] = acc
                seconds += out.seconds + time.perf_counter() - t0
                peak = max(peak, out.peak_mb)
                if best is None or nan_low(acc) > nan_low(best[0]):
                    best = (acc, lam, out)
            assert best is not None
            out = best[2]
            out.seconds, out.peak_mb = seconds, peak
            extra["lambda"] = best[1]
            extra["lambda_scan"] = scan  # merge-split accuracy at each lambda
        else:
            out, ctx, method = self._merge(spec, params)
        rec: dict[str, Any] = {
            "group": spec.group,
            "method": spec.method,
            "params": {k: v for k, v in params.items() if k != "steps"},
            "granularity": spec.granularity,
            "combine": ctx.plan.combine,
            "merge_s": out.seconds,
            "peak_mb": out.peak_mb,
            **extra,
            **self._scores(out.model),
        }
        info = out.info or {}
        if spec.method in ("learned_soup", "task_wise_adamerging", "layer_wise_adamerging"):
            steps = method.params.steps
            rec["steps"] = steps
            rec["step_ratio"] = out.seconds / steps / self.plain_step()
            weights = info.get("mean_coefficient") or info.get("mean_weight") or {}
            rec["weights"] = {k: _finite(float(v)) for k, v in weights.items()}
        if spec.method == "greedy_soup":
            rec["kept"] = info.get("kept")
        if spec.method == "soft":
            rec.update(self._soft_info(info, before))
        if "path" in info:
            rec.update(self._path_info(info, ctx))
        if self.malicious:
            rec["malicious_weight"] = self._malicious_weight(spec, rec)
        if self.plan_kw:
            rec["plan_honoured"] = self._plan_honoured(ctx, out.state)
        if spec.plan:
            rec["plan"] = dict(spec.plan)
        if ctx.alignment is not None:
            rec["alignment"] = alignment_record(ctx.alignment)
        if "repair" in info:
            rec["repair_s"] = info["repair"]["seconds"]
        return self.record(spec.row, **rec)

    def _soft_info(self, info: dict[str, Any], before: str | None) -> dict[str, Any]:
        merger, fit = info["merger"], info["fit"]
        steps = [h["step"] for h in fit.history]
        gates = merger.deterministic_gates()  # (N, U) effective
        active = merger.active
        g = gates[active]
        names = list(merger.names)
        return {
            "steps": fit.steps,
            "fit_s": fit.seconds,
            "step_ratio": fit.seconds / fit.steps / self.plain_step(),
            "settle_step": settle_step(fit.gate_trajectory, steps),
            "frozen": fingerprint(list(self.pool.values())) == before,
            "units": len(merger.layout.units),
            "gate_zero_frac": float((g == 0).float().mean()),
            "gate_one_frac": float((g == 1).float().mean()),
            "gate_open_per_unit": float((gates > 0).float().sum(0).mean()),
            # candidates a unit's merge uses: a convex unit with every gate closed uses one
            "used_per_unit": float(
                ((gates > 0).sum(0).clamp_min(0 if merger.delta else 1)).float().mean()
            ),
            "expected_l0": merger.expected_l0(),
            "gates_max": dict(zip(names, gates.max(1).values.tolist(), strict=True)),
            "gates_mean": dict(zip(names, gates.mean(1).tolist(), strict=True)),
            "trajectory": {
                "steps": steps,
                "mean_gate": {
                    n: [float(t[i].mean()) for t in fit.gate_trajectory]
                    for i, n in enumerate(names)
                },
            },
            "excluded": [n for n, a in zip(names, active.tolist(), strict=True) if not a],
            "open": [n for n, v in zip(names, gates.max(1).values.tolist(), strict=True) if v > 0],
            "reference": fit.reference,
            **learned_scale(merger),
        }

    def _path_info(self, info: dict[str, Any], ctx: MergeContext) -> dict[str, Any]:
        """The L0 path behind an auto-λ row: per λ the open gates, exact zeros and the test
        scores of that point's merge; the choice and the candidates' importance."""
        from softmerge.path import evaluate_points

        merger, path = info["merger"], info["path"]
        recalibrate = ctx.merge_loader if ctx.template is not None else None
        evaluate_points(merger, path, self.test, recalibrate, prefix="test")
        points = []
        for p in path.points:
            point = {
                k: v for k, v in p.to_dict().items() if k not in ("open_units", "learn", "held_out")
            }
            point["test_acc"] = point.pop("test_accuracy")  # the name the tables use
            point["open_candidates"] = [n for n, c in p.open_units.items() if c > 0]
            point["held_out_loss"] = (p.held_out or {}).get("loss")
            point["learn_loss"] = p.learn.get("loss")
            points.append(point)
        return {
            "lambda": path.choice["lambda"],
            "path": points,
            "path_grid": path.grid,
            "path_cost": path.cost,
            "l0_choice": path.choice,
            "importance": path.importance,
            "used_per_unit": path.chosen.used_per_unit,
        }

    def _malicious_weight(self, spec: Spec, rec: dict[str, Any]) -> float | None:
        """How much of the malicious candidates a method kept (max over them): soft = largest
        deterministic gate; learned soup / AdaMerging = mean coefficient; greedy = 1 if kept;
        uniform soup, task vectors, ensemble = 1/N (or 1) by construction."""
        bad = list(self.malicious)
        if spec.method == "soft":
            return max(rec["gates_max"][b] for b in bad)
        if "weights" in rec:
            vals = [rec["weights"].get(b) for b in bad]
            return max((math.inf if v is None else v) for v in vals)
        if spec.method == "greedy_soup":
            return float(any(b in (rec.get("kept") or []) for b in bad))
        return None

    def _plan_honoured(self, ctx: MergeContext, state: State | None) -> dict[str, Any] | None:
        """S4: every parameter outside the plan is bit-identical to one candidate's."""
        if state is None:
            return None
        merged = set(ctx.merged_names)
        params = [n for n, _ in build(self.arch).named_parameters()]
        rest = [n for n in params if n not in merged]
        source = [n for n, s in self.pool.items() if all(torch.equal(state[k], s[k]) for k in rest)]
        changed = any(
            not any(torch.equal(state[k], s[k]) for s in self.pool.values()) for k in merged
        )
        return {
            "rest_identical_to": source,
            "merged_changed": changed,
            "rest": len(rest),
            "merged": len(merged),
        }


# ---------------------------------------------------------------------------------------------
# Settings


class Runner:
    def __init__(self, scale: Scale, out: Path, mnist: Path, only: list[str] | None) -> None:
        self.scale, self.out = scale, out
        self.cache = Cache(out, scale, mnist)
        self.only = only or list(SETTINGS)
        self.records: list[dict[str, Any]] = []
        self.families: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._seen: set[tuple[str, int]] = set()

    def family(self, key: str, seed: int) -> FamilyCandidates:
        t0 = time.perf_counter()
        fam = self.cache.family(key, seed)
        self.timings[f"train {key}"] = self.timings.get(f"train {key}", 0.0) + (
            time.perf_counter() - t0
        )
        if (key, seed) not in self._seen:
            self._seen.add((key, seed))
            self.families.append(
                {
                    "family": key,
                    "seed": seed,
                    "label": fam.family.label,
                    "train_seconds": fam.train_seconds,
                }
            )
        return fam

    def table(self, setting, config, fam, pool, specs, malicious=(), plan=None) -> None:
        t0 = time.perf_counter()
        t = Table(self, setting, config, fam, pool, malicious, plan)
        preds = t.candidates()
        names = [n for n in pool if n not in malicious]
        if setting in ("S1", "S2") and len(names) > 1:
            dis = [
                float((preds[a] != preds[b]).float().mean()) * 100
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            ]
            t.record(
                "pairwise test disagreement (%)",
                group="diagnostic",
                disagreement=statistics.fmean(dis),
            )
        for spec in specs:
            rec = t.run(spec)
            if rec is not None and "test_acc" in rec:
                log.info(
                    "%s %-22s seed %d  %-40s %6.2f %%  %6.1f s",
                    setting,
                    config,
                    t.seed,
                    spec.row,
                    rec["test_acc"],
                    rec.get("merge_s", 0.0),
                )
        key = f"{setting} {config}"
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def run_seed(self, seed: int) -> None:
        sc = self.scale
        if "S1" in self.only or "S3" in self.only or "S4" in self.only:
            for key in ("mnist_mlp", "mnist_cnn", "mnist1d_resnet"):
                fam = self.family(key, seed)
                pool = dict(list(fam.clean.items())[:5])
                if "S1" in self.only:
                    self.table("S1", key, fam, pool, core_specs(sc, parent=True))
                if "S4" in self.only and key in sc.s4_families:
                    self.partial(fam, pool)
                if "S3" in self.only and key == "mnist_mlp":
                    self.malicious(fam)
        if "S2" in self.only:
            for key in sc.s2_families:
                fam = self.family(key, seed)
                specs = core_specs(sc, parent=False)
                aligned = aligned_specs(specs, sc.align_steps)
                self.table("S2", key, fam, dict(fam.clean), specs + aligned)
        if "S5" in self.only:
            fam = self.family("mnist_mlp_ft", seed)
            self.table(
                "S5", "mnist_mlp_ft", fam, dict(fam.clean), core_specs(sc, parent=True, delta=True)
            )

    def malicious(self, fam: FamilyCandidates) -> None:
        """S3: 7 candidates, k of them malicious."""
        clean = list(fam.clean.items())
        specs = core_specs(self.scale, parent=True)
        for config, kinds in self.scale.s3_configs:
            pool = dict(clean[: 7 - len(kinds)])
            for kind in kinds:
                pool[kind] = make_malicious(kind, fam, fam.seed)
            self.table("S3", config, fam, pool, specs, malicious=kinds)

    def partial(self, fam: FamilyCandidates, pool: dict[str, State]) -> None:
        """S4: merge only the body (head from the best candidate), or only the head."""
        head = {"mlp_mnist": "net.5.*", "resnet_mnist1d": "head.*"}[fam.family.arch]
        specs = core_specs(self.scale, parent=True)  # every method, on the plan's part only
        for name, plan in (
            ("body only", {"exclude": [head], "rest_from": "best"}),
            ("head only", {"include": [head], "rest_from": "best"}),
        ):
            self.table("S4", f"{fam.family.key}: {name}", fam, pool, specs, plan=plan)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed (tests)")
    parser.add_argument("--fresh", action="store_true", help="delete the candidate cache first")
    parser.add_argument("--only", nargs="+", choices=SETTINGS)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument(
        "--mnist",
        type=Path,
        help="folder of the MNIST IDX files (default: SOFTMERGE_DATA/mnist, "
        "else the user cache, else a download into it)",
    )
    parser.add_argument("--no-step-cost", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    try:
        mnist = resolve_mnist(args.mnist)
    except DataError as err:
        parser.exit(2, f"bench: {err}\n")
    print(f"bench: MNIST from {mnist}", flush=True)
    scale = SCALES["smoke" if args.smoke else "full"]
    if args.seeds:
        scale = Scale(**{**asdict(scale), "seeds": tuple(args.seeds)})
    start = time.perf_counter()
    if args.fresh and (args.out / "cache").exists():
        shutil.rmtree(args.out / "cache")
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(scale, args.out, mnist, args.only)
    for seed in scale.seeds:
        runner.run_seed(seed)
    step_cost = None
    if not args.no_step_cost:
        from step_cost import measure_all

        t0 = time.perf_counter()
        threads = sorted({1, torch.get_num_threads()})
        if args.smoke:
            step_cost = measure_all(
                threads[:1],
                ["tensor"],
                rounds=2,
                per_round=2,
                warmup=1,
                fit_k=0,
                models=[("mlp_mnist", "MLP", 128)],
            )
        else:
            step_cost = measure_all(threads, ["model", "tensor", "channel"])
        torch.set_num_threads(max(threads))
        runner.timings["step cost"] = time.perf_counter() - t0
    results = {
        "meta": {
            "scale": asdict(scale),
            "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "fresh": args.fresh,
            "settings": runner.only,
            "timings": runner.timings,
            "plain_step_s": _PLAIN,
            "archs": {
                k: {
                    "label": a.label,
                    "family": a.family,
                    "params": sum(p.numel() for p in build(k).parameters()),
                }
                for k, a in ARCHS.items()
            },
            "families": {
                k: {
                    "label": f.label,
                    "kind": f.kind,
                    "count": f.count,
                    "augment": f.augment,
                    "dataset": f.dataset,
                    "arch": f.arch,
                }
                for k, f in FAMILIES.items()
            },
            "data": {k: dict(v) for k, v in scale.data.items()},
            "split_sizes": {
                name: get_data(name, scale.name, str(mnist)).sizes()
                for name in sorted({f.dataset for f in FAMILIES.values()})
            },
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg": os.getloadavg(),
        },
        "families": runner.families,
        "records": runner.records,
        "step_cost": step_cost,
    }
    path = args.out / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)
    mins = results["meta"]["seconds"] / 60
    print(
        f"bench: {len(runner.records)} records in {mins:.1f} min with "
        f"{results['meta']['threads']} thread(s) -> {path}"
    )
    return results


if __name__ == "__main__":
    main()
