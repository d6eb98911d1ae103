"""Issue 14's table: does the L0 term act? A λ sweep on the demo's 5 clean children.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/l0_sweep.py \
        [--candidates demo-out/candidates] [--out bench-out/l0-sweep] [--quick]

Each λ is an independent (cold) soft merge: tensor gates, 600 steps, seed 0, the demo's merge
loader (batch 128, shuffled with seed 0) and its test split. Per λ: open gates per tensor
(candidates whose deterministic gate is > 0, mean over the tensors, of 5), the fraction of
deterministic gates exactly 0, and test accuracy. Without ``--candidates`` the 5 children are
trained here exactly as ``softmerge demo`` trains them (seed 0; ~90 s at full size, ``--quick``
for the demo's smaller data) and kept in ``<out>/candidates`` for the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.data import mnist1d_splits
from softmerge.demo import CHANNELS, QUICK_SIZES, make_children
from softmerge.io import write_json, write_safetensors, write_text
from softmerge.report import format_markdown_table, format_table
from softmerge.zoo import CNN1D, evaluate

LAMBDAS = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
NAMES = [f"child{k}" for k in range(5)]


def children(folder: Path | None, out: Path, splits, seed: int) -> dict[str, dict]:
    """The 5 clean children: read from ``folder``, else from ``out``'s cache, else trained."""
    source = folder or out / "candidates"
    paths = {n: source / f"{n}.safetensors" for n in NAMES}
    if all(p.is_file() for p in paths.values()):
        return {n: load_file(str(p)) for n, p in paths.items()}
    if folder is not None:
        missing = [str(p) for p in paths.values() if not p.is_file()]
        raise SystemExit(f"l0_sweep: missing candidates: {', '.join(missing)}")
    t0 = time.perf_counter()
    _, states = make_children(splits, seed, progress=False)
    print(f"trained 5 children in {time.perf_counter() - t0:.0f} s", flush=True)
    for name, state in zip(NAMES, states, strict=True):
        write_safetensors(paths[name], state)
    return dict(zip(NAMES, states, strict=True))


def sweep_one(candidates: dict, splits, lam: float, steps: int, seed: int) -> dict[str, Any]:
    loader = DataLoader(
        splits.merge, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    merger = SoftMerger(
        CNN1D(channels=CHANNELS),
        list(candidates.values()),
        MergePlan(granularity="tensor"),
        names=list(candidates),
    )
    cfg = FitConfig(steps=steps, seed=seed, l0_lambda=lam, progress=False, eval_every=0)
    t0 = time.perf_counter()
    merger.fit(loader, config=cfg)
    seconds = time.perf_counter() - t0
    gates = merger.deterministic_gates()
    model = CNN1D(channels=CHANNELS)
    model.load_state_dict(merger.merged_state_dict())
    accuracy, loss = evaluate(model, splits.test)
    open_per_unit = (gates > 0).sum(0).float()
    return {
        "lambda": lam,
        "open_gates_per_tensor": float(open_per_unit.mean()),
        "open_min": int(open_per_unit.min()),
        "open_max": int(open_per_unit.max()),
        "zero_fraction": float((gates == 0).float().mean()),
        "candidates_open": [n for i, n in enumerate(merger.names) if float(gates[i].max()) > 0],
        "test_acc": accuracy,
        "test_loss": loss,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=Path, help="folder of child0..child4.safetensors")
    parser.add_argument("--out", type=Path, default=Path("bench-out/l0-sweep"))
    parser.add_argument("--quick", action="store_true", help="the demo's small data sizes")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    args = parser.parse_args(argv)
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    splits = mnist1d_splits(**(QUICK_SIZES if args.quick else {}))
    cands = children(args.candidates, args.out, splits, args.seed)
    rows = []
    for lam in args.lambdas:
        rows.append(sweep_one(cands, splits, lam, args.steps, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    shown = ["lambda", "open_gates_per_tensor", "open_min", "open_max", "zero_fraction"]
    shown += ["test_acc", "seconds"]
    table = [{k: r[k] for k in shown} for r in rows]
    print(format_table(table, floatfmt=".4g"))
    meta = {
        "steps": args.steps,
        "seed": args.seed,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "candidates": str(args.candidates or args.out / "candidates"),
    }
    write_json(args.out / "l0_sweep.json", {"meta": meta, "rows": rows})
    write_text(args.out / "l0_sweep.md", format_markdown_table(table, floatfmt=".4g") + "\n")
    return rows


if __name__ == "__main__":
    main()
