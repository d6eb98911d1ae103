"""S2 with permutation alignment (issue 13): does aligning independently trained MLPs first
let the uniform soup and soft merging work?

    PYTHONPATH=src python benchmarks/align_s2.py --mnist PATH/TO/mnist [--out bench-out]
        [--seeds 0 1 2] [--only digits mnist] [--align weight_matching] [--reference best]

Same candidates as the benchmark's S2 (``settings.py``: 5 MLPs per seed from different
initialisations, MNIST 784-256-256-10 for 4 epochs on 10k images, digits 64-128-128-10 for 30
epochs; merge / test splits as there; trained candidates are cached under ``<out>/cache`` like
``run.py`` does). Per seed: the best single model (chosen on the merge split), the output
ensemble (N x inference cost, for reference), the uniform soup and soft merging (tensor gates,
``FitConfig(seed=seed)``) without and with alignment, and with REPAIR after the aligned merge.
Prints test accuracy, mean ± std over seeds, and writes ``<out>/align_s2.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import build
from run import merge_loader
from settings import FAMILIES, FULL, Cache

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.align import (
    METHODS,
    align_candidates,
    permutation_spec,
    repair,
    repair_layers,
)
from softmerge.io import write_json
from softmerge.zoo import evaluate

State = dict[str, torch.Tensor]
DATASETS = {"digits": "digits_mlp_indep", "mnist": "mnist_mlp_indep"}
REPAIR_BATCH = 500


def uniform_soup(states: Sequence[State]) -> State:
    return {
        k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype)
        for k in states[0]
    }


def batches(dataset, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_scores(arch: str, state: State, test) -> dict[str, float]:
    model = build(arch)
    model.load_state_dict(state)
    acc, loss = evaluate(model, test)
    return {"acc": acc, "loss": loss}


@torch.no_grad()
def ensemble_scores(arch: str, states: Sequence[State], test) -> dict[str, float]:
    """Mean of the candidates' softmax outputs (N x the inference cost of one model)."""
    x, y = test.tensors
    probs = 0.0
    for state in states:
        model = build(arch)
        model.load_state_dict(state)
        probs = probs + F.softmax(model.eval()(x), dim=-1)
    probs = probs / len(states)
    acc = 100.0 * float((probs.argmax(-1) == y).float().mean())
    return {"acc": acc, "loss": float(F.nll_loss(probs.clamp_min(1e-12).log(), y))}


def soft_merge(
    arch: str, states: Sequence[State], names: Sequence[str], splits, seed: int, args
) -> tuple[State, dict[str, list[float]]]:
    """Soft merge; returns the merged state and, per layer, the candidates' mixing weights
    of that layer's weight tensor (what REPAIR interpolates the statistics with)."""
    plan = MergePlan(granularity=args.granularity)
    merger = SoftMerger(build(arch), list(states), plan, names=list(names))
    loader = merge_loader(splits.merge, seed, FULL.batch_size)
    config = FitConfig(seed=seed, progress=False, l0_lambda=args.l0_lambda, steps=args.steps)
    merger.fit(loader, config=config)
    with torch.no_grad():
        w = merger.mixing_weights(merger.deterministic_gates())
    layer_weights = {}
    for slot in merger.layout.slots:
        if slot.name.endswith(".weight"):
            cols = w[:, slot.start : slot.start + slot.count]
            layer_weights[slot.name.rsplit(".", 1)[0]] = cols.mean(1).tolist()
    return merger.merged_state_dict(), layer_weights


def run_seed(cache: Cache, dataset: str, seed: int, args) -> dict[str, Any]:
    family = FAMILIES[DATASETS[dataset]]
    arch, splits = family.arch, cache.data(family)
    candidates = cache.family(family.key, seed).clean
    names, states = list(candidates), list(candidates.values())
    merge_acc = [test_scores(arch, s, splits.merge)["acc"] for s in states]
    best = max(range(len(states)), key=lambda i: merge_acc[i])
    rows: dict[str, dict[str, float]] = {}
    rows["best single (merge split)"] = test_scores(arch, states[best], splits.test)
    rows["output ensemble (N x cost)"] = ensemble_scores(arch, states, splits.test)

    model = build(arch)
    x_merge = splits.merge.tensors[0]
    spec = permutation_spec(model, x_merge[:2])
    ref = best if args.reference == "best" else 0
    repair_data = batches(splits.merge, REPAIR_BATCH)
    t0 = time.perf_counter()
    aligned, report = align_candidates(
        model,
        states,
        reference_index=ref,
        method=args.align,
        spec=spec,
        loader=repair_data,
        seed=seed,
        names=names,
    )
    align_s = time.perf_counter() - t0
    layers = repair_layers(model, spec)

    def fixed(state: State, weights: Any) -> State:
        return repair(model, state, aligned, weights, repair_data, spec)

    soup = uniform_soup(states)
    soup_aligned = uniform_soup(aligned)
    rows["uniform soup"] = test_scores(arch, soup, splits.test)
    rows["uniform soup, aligned"] = test_scores(arch, soup_aligned, splits.test)
    rows["uniform soup, aligned + REPAIR"] = test_scores(
        arch, fixed(soup_aligned, None), splits.test
    )
    soft, _ = soft_merge(arch, states, names, splits, seed, args)
    rows[f"soft ({args.granularity})"] = test_scores(arch, soft, splits.test)
    soft_al, weights = soft_merge(arch, aligned, names, splits, seed, args)
    rows[f"soft ({args.granularity}), aligned"] = test_scores(arch, soft_al, splits.test)
    per_layer = {name: weights.get(name, [1.0] * len(states)) for name in layers}
    rows[f"soft ({args.granularity}), aligned + REPAIR"] = test_scores(
        arch, fixed(soft_al, per_layer), splits.test
    )
    costs = [(c.cost_before, c.cost_after) for c in report.candidates if c.index != ref]
    return {
        "rows": rows,
        "best": names[best],
        "align_seconds": align_s,
        "cost_before_after": costs,
        "mixing_weights_aligned": weights,
    }


def summarise(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for dataset, runs in results.items():
        best = [r["rows"]["best single (merge split)"]["acc"] for r in runs]
        lines += [
            f"\n{dataset} (test accuracy %, mean ± std over {len(runs)} seeds)\n",
            "| model | acc | − best single |",
            "| --- | ---: | ---: |",
        ]
        for row in runs[0]["rows"]:
            accs = [r["rows"][row]["acc"] for r in runs]
            diff = statistics.fmean(a - b for a, b in zip(accs, best, strict=True))
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {row} | {statistics.fmean(accs):.2f} ± {std:.2f} | {diff:+.2f} |")
        ratios = [a / b for r in runs for b, a in r["cost_before_after"]]
        lines.append(
            f"\nmatching cost after / before (mean over candidates): {statistics.fmean(ratios):.3f}"
            f"; alignment {statistics.fmean(r['align_seconds'] for r in runs):.2f} s per seed"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = os.environ.get("SOFTMERGE_DATA")
    parser.add_argument(
        "--mnist",
        type=Path,
        default=Path(default_data) / "mnist" if default_data else None,
        help="folder of the MNIST IDX files (default: $SOFTMERGE_DATA/mnist)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FULL.seeds))
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=["digits", "mnist"])
    parser.add_argument("--align", choices=METHODS, default="weight_matching")
    parser.add_argument(
        "--reference",
        choices=("best", "first"),
        default="best",
        help="align to the best candidate on the merge split, or to model0",
    )
    parser.add_argument("--granularity", default="tensor")
    default_l0 = FitConfig.model_fields["l0_lambda"].default
    parser.add_argument("--l0-lambda", type=float, default=default_l0)
    parser.add_argument("--steps", type=int, default=FULL.soft_steps)
    args = parser.parse_args(argv)
    if "mnist" in args.only and args.mnist is None:
        parser.error("MNIST needs --mnist PATH (or SOFTMERGE_DATA)")
    return args


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    args = parse(argv)
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    cache = Cache(args.out, FULL, args.mnist or Path("."))
    results: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for dataset in args.only:
        for seed in args.seeds:
            run = run_seed(cache, dataset, seed, args)
            results.setdefault(dataset, []).append(run)
            log(
                f"{dataset} seed {seed}: "
                + ", ".join(f"{k} {v['acc']:.2f}" for k, v in run["rows"].items())
            )
    table = summarise(results)
    log(table)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "mnist")}
    out = {"settings": settings, "seconds": time.perf_counter() - start, "results": results}
    write_json(args.out / "align_s2.json", out)
    return out


if __name__ == "__main__":
    main()
