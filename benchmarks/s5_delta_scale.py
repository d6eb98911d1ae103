"""S5 follow-up: soft merging of task vectors scaled by s before the gates see them.

docs/results.md finds soft merging (combine='delta') 2.8 points below task arithmetic with a
tuned lambda on S5: sampled hard concrete gates are often exactly 1, so sampled merges add
several whole task vectors, and the expected loss favours closing gates. This script tests the
obvious remedy without changing the library: give the gates theta_0 + s * tau_j as candidates,
so an open gate adds a scaled task vector. It reuses `make bench`'s cached S5 candidates
(bench-out/cache; run `make bench` first) and prints test accuracy per seed, scale and
granularity. Exploratory, and older than issue 13: since then the library's delta merges sample
their gates with shared noise and can learn the scale (``plan.delta_scale: learn``), which the
benchmark's S5 rows measure (docs/method.md).

    python benchmarks/s5_delta_scale.py --scales 1.0 0.4 0.2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import build
from settings import FULL, Cache

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.zoo import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.4, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    cache = Cache(args.cache, FULL)
    print("seed  scale  granularity  test acc (%)  mean gate")
    for seed in args.seeds:
        fam = cache.family("mnist_mlp_ft", seed)
        splits = cache.data(fam.family)
        parent = fam.parent
        assert parent is not None
        for scale in args.scales:
            cands = [
                {k: parent[k] + scale * (t[k] - parent[k]) for k in t} for t in fam.clean.values()
            ]
            for granularity in ("model", "tensor"):
                plan = MergePlan(granularity=granularity, combine="delta", base="parent")
                merger = SoftMerger(build(fam.family.arch, seed=0), cands, plan, base=parent)
                loader = DataLoader(
                    splits.merge,
                    batch_size=128,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(seed),
                )
                merger.fit(loader, config=FitConfig(steps=300, seed=seed, progress=False))
                accuracy = evaluate(merger.merged_model(), splits.test)[0]
                gate = float(merger.deterministic_gates().mean())
                print(f"{seed:4d}  {scale:5.2f}  {granularity:11s}  {accuracy:12.2f}  {gate:9.2f}")


if __name__ == "__main__":
    main()
