"""Soft-merge settings on one STE-aligned S2 pool: which fit gets past the best single model?

    python benchmarks/align_tuning.py [--out bench-out] [--families mnist_mlp_indep ...]

Issue 13 asks the aligned soft merge for best single + 0.5 pt. Per family and seed, this aligns
the five candidates of ``make bench``'s S2 (the same cache under ``--out``) once by STE, with
the candidate of best merge-split accuracy as the reference (``make bench`` ranks by solo loss
instead, so its rows differ), then runs soft merges with the settings of ``VARIANTS`` on that
one pool. ``distill`` rows learn against the output ensemble's mean prediction on the merge
split (``alpha``: the weight of the labels' cross-entropy). ``REFERENCE`` as ``plan.base``
stands for the reference candidate: a delta merge around it. ``unit`` rows gate whole hidden
units (``plan.granularity: unit``: a unit's incoming and outgoing weights by the same gates).
Rows with ``select_every`` hold a seeded fifth of the merge split out (as YAML ``data.held_out:
0.2`` does), learn on the rest and keep the gates of the step with the lowest held-out loss.
The first row, the output ensemble of the aligned candidates (their mean predicted
probabilities), is the bar a merge is measured against, not a merge. Prints test accuracy minus
the best single model, mean and per seed, then the same on the
merge split the gates were fitted on (how much of a gain is overfitting) and the candidates left
open, and writes ``align_tuning.json`` beside the cache.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from align_ste import TUNED_FIT, s2_runner, write_run
from models import build
from run import Runner, accuracy, batches, merge_loader, model_with, predict
from torch.utils.data import TensorDataset

from softmerge.align import align_candidates
from softmerge.compare import split_held_out
from softmerge.methods import MergeContext, get_method
from softmerge.plan import MergePlan

ENSEMBLE = "output ensemble (N models: the bar, not a merge)"
HELD_OUT = 0.2  # the fraction of the merge split early-stopping rows hold out
REFERENCE = "<reference>"  # plan.base: the candidate every other one was aligned to
AROUND_REFERENCE = {"combine": "delta", "base": REFERENCE, "delta_scale": "learn"}

# label -> (granularity, fit, plan, distillation alpha or None)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], float | None]] = {
    "soft (tensor), defaults": ("tensor", {"steps": 300}, {}, None),
    "soft (channel), defaults": ("channel", {"steps": 300}, {}, None),
    "tuned: channel, Adam lr 0.05, 1000 steps": ("channel", TUNED_FIT, {}, None),
    "tuned, 2000 steps": ("channel", {**TUNED_FIT, "steps": 2000}, {}, None),
    "tuned, lr 0.02": ("channel", {**TUNED_FIT, "lr": 0.02}, {}, None),
    "tuned, lr 0.1": ("channel", {**TUNED_FIT, "lr": 0.1}, {}, None),
    "tuned, no warm-up": ("channel", {**TUNED_FIT, "warmup": 0.0}, {}, None),
    "tuned, l0_lambda 0": ("channel", {**TUNED_FIT, "l0_lambda": 0.0}, {}, None),
    "tuned, l0_lambda 0.003": ("channel", {**TUNED_FIT, "l0_lambda": 0.003}, {}, None),
    "tuned, l0_lambda 0.01": ("channel", {**TUNED_FIT, "l0_lambda": 0.01}, {}, None),
    "tuned, no candidate gates": ("channel", TUNED_FIT, {"candidate_gate": False}, None),
    "tuned, module gates": ("module", TUNED_FIT, {}, None),
    "tuned, tensor gates": ("tensor", TUNED_FIT, {}, None),
    "tuned + REPAIR": ("channel", TUNED_FIT, {"repair": True}, None),
    "tuned, distill (alpha 0.5)": ("channel", TUNED_FIT, {}, 0.5),
    "tuned, distill (alpha 0)": ("channel", TUNED_FIT, {}, 0.0),
    "unit gates, tuned fit": ("unit", TUNED_FIT, {}, None),
    "unit gates, 3000 steps": ("unit", {**TUNED_FIT, "steps": 3000}, {}, None),
    "unit gates, 2000 steps, no warm-up, solo_prior 0": (
        "unit",
        {**TUNED_FIT, "steps": 2000, "warmup": 0.0, "solo_prior": 0.0},
        {},
        None,
    ),
    "unit gates, distill (alpha 0.5)": ("unit", TUNED_FIT, {}, 0.5),
    "tuned, early stopping on a held-out fifth": (
        "channel",
        {**TUNED_FIT, "select_every": 25},
        {},
        None,
    ),
    "unit gates, 3000 steps, early stopping on a held-out fifth": (
        "unit",
        {**TUNED_FIT, "steps": 3000, "select_every": 25},
        {},
        None,
    ),
    "tuned, delta around the reference, learned scale": (
        "channel",
        TUNED_FIT,
        AROUND_REFERENCE,
        None,
    ),
}


def distillation(alpha: float):
    """Loss against targets packed as [label, ensemble probabilities...] per sample."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, teacher = target[:, 0].long(), target[:, 1:]
        kl = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean")
        return alpha * F.cross_entropy(logits, labels) + (1 - alpha) * kl

    return loss


def ensemble_targets(arch: str, states: list, merge: TensorDataset) -> TensorDataset:
    x, y = merge.tensors
    with torch.no_grad():
        probs = []
        for state in states:
            probs.append(F.softmax(model_with(arch, state)(x), -1))
    return TensorDataset(x, torch.cat([y.float()[:, None], torch.stack(probs).mean(0)], 1))


def ensemble_record(
    arch: str, states: list, splits: Any, best: tuple[float, float], key: str, seed: int
) -> dict:
    """The output ensemble's row: the mean of the candidates' probabilities (N x the cost)."""

    def scores(dataset: TensorDataset) -> tuple[float, float]:
        x, y = dataset.tensors
        with torch.no_grad():
            probs = torch.stack([F.softmax(model_with(arch, s)(x), -1) for s in states]).mean(0)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
        return accuracy(probs.argmax(1), y), loss

    acc, loss = scores(splits.test)
    rec = {"family": key, "seed": seed, "row": ENSEMBLE, "test_acc": acc, "test_loss": loss}
    rec |= {"gap": acc - best[0], "merge_gap": scores(splits.merge)[0] - best[1]}
    return rec | {"open": len(states), "seconds": 0.0}


def run_family(runner: Runner, key: str, seed: int, out: list[dict]) -> None:
    fam = runner.family(key, seed)
    arch, splits = fam.family.arch, runner.cache.data(fam.family)
    names, states = list(fam.clean), list(fam.clean.values())
    test, merge = batches(splits.test), batches(splits.merge)

    def scores(model: torch.nn.Module, data: list) -> tuple[float, float]:
        pred, y, loss = predict(model, data)
        return accuracy(pred, y), loss

    merge_acc = [scores(model_with(arch, s), merge)[0] for s in states]
    best = max(range(len(states)), key=merge_acc.__getitem__)
    best_acc = scores(model_with(arch, states[best]), test)[0]
    best_merge_acc = merge_acc[best]
    batch = runner.scale.batch_size
    t0 = time.perf_counter()
    aligned, _ = align_candidates(
        build(arch),
        states,
        reference_index=best,
        method="ste",
        loader=merge_loader(splits.merge, seed, batch),
        seed=seed,
    )
    logging.info(
        "%s seed %d: STE %.0f s, best single %.2f", key, seed, time.perf_counter() - t0, best_acc
    )
    distilled = ensemble_targets(arch, aligned, splits.merge)
    out.append(ensemble_record(arch, aligned, splits, (best_acc, best_merge_acc), key, seed))
    for label, (granularity, fit, plan, alpha) in VARIANTS.items():
        data = splits.merge if alpha is None else distilled
        held_out = None
        if fit.get("select_every"):
            data, held = split_held_out(data, HELD_OUT, seed)
            held_out = merge_loader(held, seed, batch)
        if plan.get("base") == REFERENCE:
            plan = {**plan, "base": names[best]}
        objective = "auto" if alpha is None else distillation(alpha)
        ctx = MergeContext(
            model=build(arch),
            candidates=aligned,
            names=names,
            plan=MergePlan(granularity=granularity, **plan),
            merge_loader=merge_loader(data, seed, batch),
            held_out_loader=held_out,
            seed=seed,
            objective=objective,  # ranks the candidates
        )
        t0 = time.perf_counter()
        outcome = get_method("soft", **fit, objective=objective).merge(ctx)
        seconds = time.perf_counter() - t0
        acc, loss = scores(outcome.model, test)
        fitted_acc = scores(outcome.model, merge)[0]
        rec = {"family": key, "seed": seed, "row": label, "test_acc": acc, "test_loss": loss}
        rec |= {"gap": acc - best_acc, "merge_gap": fitted_acc - best_merge_acc}
        gates = outcome.info["merger"].deterministic_gates()
        rec |= {"open": int((gates.max(1).values > 0).sum()), "seconds": seconds}
        logging.info(
            "  %-50s %6.2f %% (%+.2f)  loss %.3f  merge split %+.2f  open %d",
            *(label, acc, rec["gap"], loss, rec["merge_gap"], rec["open"]),
        )
        out.append(rec)


def print_table(records: list[dict], families: list[str], field: str) -> None:
    """One row per variant, one column per family: the mean of ``field`` (and per seed)."""
    print("| row | " + " | ".join(families) + " |")
    print("| --- |" + " ---: |" * len(families))
    for label in [ENSEMBLE, *VARIANTS]:
        cells = []
        for key in families:
            gaps = [r[field] for r in records if r["family"] == key and r["row"] == label]
            if field == "open":
                cells.append("/".join(str(g) for g in gaps))
                continue
            per_seed = "/".join(f"{g:+.2f}" for g in gaps)
            cells.append(f"{statistics.fmean(gaps):+.2f} ({per_seed})")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    args, runner = s2_runner(__doc__.split("\n")[0])
    start = time.perf_counter()
    records: list[dict] = []
    for seed in args.seeds:
        for key in args.families:
            run_family(runner, key, seed, records)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nseeds {args.seeds}, {torch.get_num_threads()} thread(s), {minutes:.1f} min")
    for field, what in (
        ("gap", "test accuracy minus the best single model's"),
        ("merge_gap", "the same on the merge split (what the gates were fitted on)"),
        ("open", "candidates with an open gate"),
    ):
        print(f"\n{what}\n")
        print_table(records, args.families, field)
    write_run(args, "align_tuning.json", minutes, {"records": records})


if __name__ == "__main__":
    main()
