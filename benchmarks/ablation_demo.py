"""Ablations of our formulation choices on the demo's 7 candidates (docs/method.md cites these).

Run after `make demo` (it reads demo-out/candidates):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/ablation_demo.py [--candidates demo-out/candidates]
Each row: test accuracy of soft merging with and without the 2 malicious candidates, and the
largest deterministic gate any malicious candidate keeps. Seed 0 throughout.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.data import mnist1d_splits
from softmerge.demo import CHANNELS
from softmerge.report import format_markdown_table
from softmerge.zoo import CNN1D, evaluate

CLEAN = [f"child{k}" for k in range(5)]
ALL = [*CLEAN, "scaled_x100", "noise_x10"]
VARIANTS = {
    "default": {},
    "Adam lr 0.05": {"optimizer": "adam", "lr": 0.05},
    "lambda 0 (no L0)": {"l0_lambda": 0.0},
    "lambda 1e-2": {"l0_lambda": 1e-2},
    "no solo prior": {"solo_prior": 0.0},
    "no solo prior, no warm-up": {"solo_prior": 0.0, "warmup": 0.0},
}


def run(candidates: dict, splits, granularity: str, pool: list[str], **overrides) -> tuple:
    loader = DataLoader(
        splits.merge, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    plan_kwargs = {"candidate_gate": overrides.pop("candidate_gate", True)}
    merger = SoftMerger(
        CNN1D(channels=CHANNELS),
        [candidates[n] for n in pool],
        MergePlan(granularity=granularity, **plan_kwargs),
        names=pool,
    )
    merger.fit(loader, config=FitConfig(seed=0, progress=False, **overrides))
    model = CNN1D(channels=CHANNELS)
    model.load_state_dict(merger.merged_state_dict())
    gates = merger.deterministic_gates()
    return evaluate(model, splits.test)[0], float(gates[len(CLEAN) :].max()) if len(pool) > 5 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", type=Path, default=Path("demo-out/candidates"))
    args = parser.parse_args()
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    candidates = {n: load_file(str(args.candidates / f"{n}.safetensors")) for n in ALL}
    splits = mnist1d_splits()
    variants = dict(VARIANTS, **{"one gate level": {"candidate_gate": False}})
    rows = []
    for name, overrides in variants.items():
        for granularity in ("model", "tensor"):
            clean, _ = run(candidates, splits, granularity, CLEAN, **dict(overrides))
            dirty, worst = run(candidates, splits, granularity, ALL, **dict(overrides))
            rows.append(
                {
                    "variant": name,
                    "granularity": granularity,
                    "clean": clean,
                    "with_malicious": dirty,
                    "malicious_gate_max": worst,
                }
            )
            print(rows[-1], flush=True)
    print(format_markdown_table(rows, floatfmt=".2f"))
    print(f"threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
