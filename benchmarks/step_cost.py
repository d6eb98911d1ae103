"""Cost of one gate-training step against one plain training step of the same model.

Acceptance (issue 4): "gate-training step time <= 1.25x a plain training step at N = 5,
batch 128, on the MLP and the CNN (a ratio measured in one run)".

In one process, for each model and thread count, two kinds of step are timed *interleaved*
(blocks of steps alternate, so drifting machine load hits both alike) and the median over many
steps after a warm-up is kept:

- plain: ``loss = CE(model(x), y)``; zero_grad; backward; SGD (momentum 0.9) step on the weights;
- gate: one soft-merging step, ``FitLoop.train_step`` of the loop :meth:`SoftMerger.fit` runs
  (sample the gates, merge from the candidate stack, ``functional_call`` forward, task loss +
  lambda * expected L0, finiteness check, backward, gradient clipping, SGD step on the gates,
  NaN check of the gates).

A third number adds the loop's own bookkeeping: ``fit`` run for ``2K`` and for ``K``
steps, the difference divided by ``K`` (ranking, set-up and BatchNorm re-estimation cancel out;
the per-step recording every ``record_every`` steps stays in). Inputs are random tensors of the
data's shape (timing does not depend on values).

    python benchmarks/step_cost.py [--threads 1 2] [--out bench-out/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ARCHS, build

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.evaluation import set_gate_training_mode

N_CANDIDATES = 5
BATCH = 128
# (model key, label, batch): the acceptance criterion names the MLP and the CNN at batch 128;
# ResNet-BN and the MLP at batch 512 are information (the merge costs the same at any batch).
MODELS = [
    ("mlp_mnist", "MLP", BATCH),
    ("cnn_mnist", "CNN", BATCH),
    ("resnet_mnist1d", "ResNet-BN", BATCH),
    ("mlp_mnist", "MLP", 512),
]


def _candidates(arch: str, n: int) -> list[dict[str, torch.Tensor]]:
    """n distinct candidates of one architecture (different initialisations)."""
    return [build(arch, seed=100 + j).state_dict() for j in range(n)]


def _batch(arch: str, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *ARCHS[arch].input_shape), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, y


class PlainStep:
    def __init__(self, arch: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model = build(arch, seed=0).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.batch = batch

    def __call__(self) -> None:
        x, y = self.batch
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        loss.item()


class GateStep:
    """One step of ``SoftMerger.fit``'s own loop (``FitLoop.train_step``), after the warm-up
    (unit gates train too)."""

    def __init__(self, arch: str, batch, granularity: str, n: int = N_CANDIDATES) -> None:
        self.merger = SoftMerger(
            build(arch, seed=0), _candidates(arch, n), MergePlan(granularity=granularity)
        )
        self.cfg = FitConfig(progress=False, warmup=0.0)
        self.loop = self.merger.make_loop([batch], self.cfg)
        self.batch = batch
        set_gate_training_mode(self.merger.model)

    def __call__(self) -> None:
        self.loop.step += 1
        self.loop.train_step(self.batch)


class MergeOnly:
    """The merge alone: ``merged_parameters`` forward and its backward to the gates."""

    def __init__(self, gate: GateStep) -> None:
        self.m = gate.merger
        z = self.m.sample_gates(torch.Generator().manual_seed(1)).detach()
        self.z = z
        g = torch.Generator().manual_seed(2)
        self.grads = {
            s.name: torch.randn(self.m.stacked[s.name].shape[1:], generator=g)
            for s in self.m.layout.slots
        }

    def __call__(self) -> None:
        z = self.z.clone().requires_grad_(True)
        merged = self.m.merged_parameters(z)
        torch.autograd.backward(list(merged.values()), [self.grads[k] for k in merged])


class GateOps:
    """The gate bookkeeping of a step without the model: sampling, penalty, clip, SGD step."""

    def __init__(self, gate: GateStep) -> None:
        self.m, self.cfg = gate.merger, gate.cfg
        self.opt = torch.optim.SGD(self.m.gate_parameters, lr=self.cfg.lr, momentum=0.9)
        self.gen = torch.Generator().manual_seed(3)

    def __call__(self) -> None:
        m = self.m
        z = m.sample_gates(self.gen)
        w = m.mixing_weights(z)
        loss = (w * 1e-3).sum() + self.cfg.l0_lambda * m.l0_penalty()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.gate_parameters, self.cfg.grad_clip or 1.0)
        self.opt.step()
        loss.item()


class PlainOpt:
    """The plain step's optimiser update alone (a cost the gate step does not pay)."""

    def __init__(self, plain: PlainStep) -> None:
        self.plain = plain
        plain()  # gradients exist

    def __call__(self) -> None:
        for p in self.plain.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.plain.opt.step()


def _time_block(step, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(steps: dict[str, object], rounds: int, per_round: int, warmup: int) -> dict:
    """Median seconds per step of each callable, blocks alternating between them."""
    for step in steps.values():
        _time_block(step, warmup)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for key in order:
            times[key] += _time_block(steps[key], per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def fit_step_seconds(arch: str, granularity: str, k: int) -> float:
    """(fit with 2k steps - fit with k steps) / k: the per-step time of the real fit loop.

    The loader is a list of ready batches, so no data-loading cost is counted."""
    x, y = _batch(arch, BATCH * 4)
    loader = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
    cands = _candidates(arch, N_CANDIDATES)

    def run(steps: int) -> float:
        merger = SoftMerger(build(arch, seed=0), cands, MergePlan(granularity=granularity))
        cfg = FitConfig(steps=steps, progress=False, eval_every=0, rank_batches=1)
        t0 = time.perf_counter()
        merger.fit(loader, config=cfg)
        return time.perf_counter() - t0

    run(k // 4)  # warm-up
    return (run(2 * k) - run(k)) / k


def measure_all(
    threads: list[int],
    granularities: list[str],
    rounds: int = 10,
    per_round: int = 10,
    warmup: int = 10,
    fit_k: int = 60,
    models: list[tuple[str, str, int]] | None = None,
) -> list[dict]:
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for arch, label, size in models or MODELS:
            batch = _batch(arch, size)
            plain = PlainStep(arch, batch)
            steps: dict[str, object] = {"plain": plain}
            for g in granularities:
                steps[g] = GateStep(arch, batch, g)
            breakdown = size == BATCH and "tensor" in granularities
            if breakdown:  # where the extra time of a gate step goes (tensor gates)
                steps["merge"] = MergeOnly(steps["tensor"])
                steps["ops"] = GateOps(GateStep(arch, batch, "tensor"))
                steps["plain_opt"] = PlainOpt(PlainStep(arch, batch))
            med = interleaved(steps, rounds, per_round, warmup)
            for g in granularities:
                row = {
                    "model": label,
                    "arch": arch,
                    "threads": nt,
                    "granularity": g,
                    "N": N_CANDIDATES,
                    "batch": size,
                    "params": sum(p.numel() for p in steps["plain"].model.parameters()),
                    "units": len(steps[g].merger.layout.units),
                    "plain_ms": 1e3 * med["plain"],
                    "gate_ms": 1e3 * med[g],
                    "ratio": med[g] / med["plain"],
                    "steps_timed": rounds * per_round,
                }
                if breakdown and g == "tensor":
                    merged = sum(t[0].numel() for t in steps[g].merger.stacked.values())
                    row["merge_ms"] = 1e3 * med["merge"]
                    row["gate_ops_ms"] = 1e3 * med["ops"]
                    row["plain_opt_ms"] = 1e3 * med["plain_opt"]
                    row["merge_read_mb"] = 2 * N_CANDIDATES * merged * 4 / 1e6
                if fit_k and g == "tensor" and size == BATCH:
                    fit_s = fit_step_seconds(arch, g, fit_k)
                    row["fit_loop_ms"] = 1e3 * fit_s
                    row["fit_loop_ratio"] = fit_s / med["plain"]
                rows.append(row)
                print(
                    json.dumps(
                        {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                    ),
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--granularities", nargs="+", default=["model", "tensor", "channel"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-out/step_cost.json"))
    args = parser.parse_args(argv)
    logging.getLogger("softmerge").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    rows = measure_all(args.threads, args.granularities, args.rounds, args.per_round)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
