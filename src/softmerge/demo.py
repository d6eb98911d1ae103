"""The demo: 5 local optima of one MNIST-1D run + 2 malicious checkpoints, merged every way.

Why these candidates: the 5 children share a 5-epoch parent (one basin, as checkpoints of one
run or of a sweep are), then each trains 15 more epochs on its own random half of the training
set in its own order. Different data and order move them to different nearby local optima,
which is the case soft merging is made for. The 2 malicious candidates are what a poisoned
model hub could serve: one child with every tensor scaled x100, and pure Gaussian noise at 10x
each tensor's scale. Everything is generated locally (``mnist1d.make_dataset``): no network.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from .compare import Comparison, rewind
from .context import MergeContext
from .data import mnist1d_splits
from .io import write_json, write_safetensors, write_text
from .methods import get_method
from .plan import MergePlan
from .report import format_markdown_table, format_table
from .zoo import CNN1D, train

State = Mapping[str, torch.Tensor]
CLEAN = 5
CHANNELS = 64  # 32 channels: best child 77 %, soup 78 %; 64: ~90 % (more realistic optima)
PARENT_EPOCHS, CHILD_EPOCHS = 5, 15
QUICK_SIZES = {"num_train": 2000, "num_merge": 500, "num_test": 500}


def make_children(
    splits, seed: int, progress: bool
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A shared parent, then 5 children on their own random halves of the training set."""
    parent = train(_fresh_model(seed), splits.train, epochs=PARENT_EPOCHS, seed=seed)
    n = len(splits.train)
    children = []
    for k in range(CLEAN):
        g = torch.Generator().manual_seed(seed * 1000 + 100 + k)
        half = torch.randperm(n, generator=g)[: n // 2].tolist()
        child = train(
            copy.deepcopy(parent),
            Subset(splits.train, half),
            epochs=CHILD_EPOCHS,
            seed=seed * 1000 + 200 + k,
            progress=progress,
        )
        children.append({k2: v.detach().clone() for k2, v in child.state_dict().items()})
    return {k: v.detach().clone() for k, v in parent.state_dict().items()}, children


def scaled(state: State, factor: float = 100.0) -> dict[str, torch.Tensor]:
    return {k: v * factor for k, v in state.items()}


def gaussian_noise(state: State, scale: float = 10.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3) * scale
        for k, v in state.items()
    }


def _fresh_model(seed: int) -> CNN1D:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CNN1D(channels=CHANNELS)


def _score(ctx: MergeContext, model, loader) -> tuple[float, float]:
    metrics = ctx.evaluate(model, loader)
    return metrics["accuracy"], metrics["loss"]


def _context(paths: dict[str, Path], splits, seed: int, progress: bool) -> MergeContext:
    """The candidates in ``paths`` with the demo's seeded merge loader (greedy soup scores on
    the whole merge split: no held-out part)."""
    loader = DataLoader(
        splits.merge, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return MergeContext(
        CNN1D(channels=CHANNELS),
        list(paths.values()),
        names=list(paths),
        merge_loader=loader,
        seed=seed,
        progress=progress,
    )


def run_demo(
    out_dir: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train, poison, merge, evaluate; write everything into ``out_dir``; return the summary.

    ``quick`` uses a smaller data set (for tests): the numbers are then not the documented ones.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    sizes = QUICK_SIZES if quick else {}
    splits = mnist1d_splits(**sizes)
    parent, children = make_children(splits, seed, progress)
    # The parent is not a candidate; task-vector methods (softmerge compare) use it as the base.
    write_safetensors(out / "parent.safetensors", parent)
    clean = {f"child{k}": s for k, s in enumerate(children)}
    malicious = {
        "scaled_x100": scaled(children[0]),
        "noise_x10": gaussian_noise(children[1], seed=seed + 7),
    }
    everyone = {**clean, **malicious}
    for name, state in everyone.items():
        write_safetensors(out / "candidates" / f"{name}.safetensors", state)

    paths = {n: out / "candidates" / f"{n}.safetensors" for n in everyone}
    test = DataLoader(splits.test, batch_size=1024)
    rows: dict[str, tuple[float, float]] = {}
    gates: dict[str, Any] = {}
    malicious_max = 0.0
    export_check: dict[str, bool] = {}
    for suffix, names in (("", list(clean)), ("_all", list(everyone))):
        ctx = _context({n: paths[n] for n in names}, splits, seed, progress)
        if suffix:  # every candidate alone, once
            for cand in ctx.pool:
                rows[cand.name] = _score(ctx, ctx.build_plain(cand.state), test)
            rows["best_single"] = max((rows[n] for n in clean), key=lambda r: r[0])
        comparison = Comparison(ctx)
        for method in ("uniform_soup", "greedy_soup", "ensemble"):
            rewind(ctx.merge_loader)
            rows[f"{method}{suffix}"] = _score(ctx, get_method(method).merge(ctx).model, test)
        for granularity in ("model", "tensor"):
            name = f"soft_{granularity}{suffix}"
            sub = comparison.context(MergePlan(granularity=granularity))
            rewind(sub.merge_loader)
            merger = get_method("soft").merge(sub).info["merger"]
            merger.export(out / name)
            rows[name] = _score(sub, merger.merged_model(), test)
            # The file users get must give the reported number: reload it into a fresh module.
            reloaded = sub.build_plain(load_file(str(out / name / "merged.safetensors")))
            export_check[name] = _score(sub, reloaded, test) == rows[name]
            effective = merger.deterministic_gates()
            gates[name] = {c: float(effective[i].mean()) for i, c in enumerate(merger.names)}
            for i, c in enumerate(merger.names):
                if c in malicious:
                    malicious_max = max(malicious_max, float(effective[i].max()))

    table = [{"model": n, "test_acc": a, "test_loss": lo} for n, (a, lo) in rows.items()]
    summary = {
        "accuracy": {n: round(a, 4) for n, (a, _) in rows.items()},
        "loss": {n: round(lo, 6) for n, (_, lo) in rows.items()},
        "malicious_gates_max": malicious_max,
        "mean_gates": gates,
        "export_matches_reported": export_check,
        "seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "quick": quick,
        "data": {"dataset": "mnist1d", **splits.sizes()},
    }
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", format_markdown_table(table, floatfmt=".2f") + "\n")
    print(format_table(table, floatfmt=".2f"))
    print(
        f"malicious gates max: {malicious_max}   time: {summary['seconds']} s   "
        f"threads: {summary['threads']}"
    )
    return summary
