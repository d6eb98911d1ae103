"""S2's alignment rows only, for the MLPs of issue 13: weight matching, MergeMany and STE.

    python benchmarks/align_ste.py [--out bench-out] [--families digits_mlp_indep ...]

The same candidates, merges and best-single choice as ``make bench`` (``run.py``'s Runner and
Table; the candidate cache under ``--out`` is shared with it), restricted to the uniform soup and
soft (tensor) rows, so the alignment methods can be compared in minutes instead of an hour, and
soft merging tuned for an aligned pool (channel gates, Adam, 1000 steps: ``TUNED_FIT``).
Prints test accuracy minus the best single model (chosen on the merge split), mean and std over
seeds, and writes ``align_ste.json`` beside the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from run import STE, Runner, Spec, aligned_specs, core_specs
from settings import SCALES

from softmerge.data import resolve_mnist

KEEP = ("uniform soup", "soft (tensor)", "output ensemble (N x cost)")
BEST = "best single (chosen on merge split)"


# The soft merge as a user would tune it for an aligned pool (measured in issue 13's work):
# one gate per hidden unit and Adam for 1000 steps instead of the defaults (tensor gates, SGD,
# 300 steps), which were chosen on pools that share an initialisation.
TUNED_FIT = {"steps": 1000, "optimizer": "adam", "lr": 0.05}


def tuned_soft_specs(scale) -> list[Spec]:
    """Soft merging with channel gates and ``TUNED_FIT``, after weight matching and after STE."""
    return [
        Spec(
            f"soft (channel, Adam 1000 steps){suffix}",
            "soft",
            dict(TUNED_FIT),
            granularity="channel",
            group="soft",
            plan=plan,
        )
        for suffix, plan in (
            (", aligned", {"align": "weight_matching"}),
            (STE, {"align": "ste", "align_steps": scale.align_steps}),
        )
    ]


def specs_for(scale):
    core = [s for s in core_specs(scale, parent=False) if s.row in KEEP]
    return core + aligned_specs(core, scale.align_steps, ste_repair=True) + tuned_soft_specs(scale)


def gap_table(records: list[dict]) -> tuple[str, dict]:
    """Markdown table of (row accuracy - best single) per family, mean ± std over seeds."""
    by = defaultdict(dict)  # (family, row) -> seed -> test_acc
    for r in records:
        if "test_acc" in r and r["setting"] == "S2" and r.get("group") != "candidate":
            by[(r["config"], r["row"])][r["seed"]] = r["test_acc"]
    families = sorted({f for f, _ in by})
    rows = [r for r in dict.fromkeys(r for _, r in by) if r != BEST]
    summary: dict = {}
    lines = ["| row | " + " | ".join(families) + " |", "| --- |" + " ---: |" * len(families)]
    best_line = [f"{statistics.fmean(by[(f, BEST)].values()):.2f}" for f in families]
    lines.append("| best single (test accuracy, %) | " + " | ".join(best_line) + " |")
    for row in rows:
        cells = []
        for f in families:
            accs, best = by.get((f, row), {}), by[(f, BEST)]
            gaps = [accs[s] - best[s] for s in accs]
            if not gaps:
                cells.append("")
                continue
            mean = statistics.fmean(gaps)
            std = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
            summary.setdefault(f, {})[row] = {"mean": mean, "std": std, "per_seed": gaps}
            cells.append(f"{mean:+.2f} ± {std:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def s2_runner(description: str) -> tuple[argparse.Namespace, Runner]:
    """The command line of the S2 alignment scripts (--out, --mnist, --families, --seeds) and
    a full-scale S2 Runner over the candidate cache under --out; logging set up."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--mnist", type=Path)
    parser.add_argument("--families", nargs="+", default=["digits_mlp_indep", "mnist_mlp_indep"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    mnist = resolve_mnist(args.mnist) if "mnist_mlp_indep" in args.families else None
    return args, Runner(SCALES["full"], args.out, mnist, ["S2"])


def write_run(args: argparse.Namespace, name: str, minutes: float, results: dict) -> None:
    """``results`` with the run's seeds, threads and minutes, as ``name`` under --out, written
    atomically."""
    out = args.out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "minutes": minutes,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, **results}, indent=1, default=str))
    os.replace(tmp, out)


def main() -> None:
    args, runner = s2_runner(__doc__.split("\n")[0])
    scale = runner.scale
    start = time.perf_counter()
    for seed in args.seeds:
        for key in args.families:
            fam = runner.family(key, seed)
            runner.table("S2", key, fam, dict(fam.clean), specs_for(scale))
    table, summary = gap_table(runner.records)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nseeds {args.seeds}, {torch.get_num_threads()} thread(s), {minutes:.1f} min\n")
    print(table)
    records = [
        {k: v for k, v in r.items() if isinstance(v, (int, float, str, list, dict))}
        for r in runner.records
    ]
    write_run(args, "align_ste.json", minutes, {"summary": summary, "records": records})


if __name__ == "__main__":
    main()
