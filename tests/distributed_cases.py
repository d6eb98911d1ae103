"""Small merges run both in one process and under torchrun (``tests/test_distributed.py``).

Each case builds its model, candidates and batches from seeds (the same on every process), fits
the gates with the Python API and returns what a merge is judged by: the gate parameters, the
history and the merged state. Run as a script under torchrun, it fits every case inside the
process group and process 0 saves the results::

    torchrun --standalone --nproc-per-node 2 tests/distributed_cases.py OUT.pt [CASE...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from softmerge import FitConfig, MergePlan, SoftMerger


def _perturbed(model: nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
        .detach()
        .clone()
        for k, v in model.state_dict().items()
    }


def _classification_batches(
    seed: int, n: int, batch: int, features: int, classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :classes].argmax(1) + (x[:, -1] > 1).long()) % classes
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _mlp(hidden: int = 13, features: int = 10, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class TinyLMForCausalLM(nn.Module):
    """Embedding -> tanh -> vocabulary: enough for a token-weighted causal-LM objective."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.head(torch.tanh(self.embed(input_ids)))


def _lm_batches(seed: int, count: int, batch: int, length: int) -> list[dict[str, torch.Tensor]]:
    """Sequences with very different amounts of padding, so the two halves of a batch hold very
    different numbers of tokens (a per-sample average would weigh them wrongly)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 11, (batch, length), generator=gen)
        lengths = torch.randint(2, length + 1, (batch,), generator=gen)
        lengths[: batch // 2] = 2  # first half: short sequences; second half: mostly long
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _result(merger: SoftMerger) -> dict[str, Any]:
    result = merger.result
    assert result is not None
    cand = merger.log_alpha_candidate
    return {
        "log_alpha": merger.log_alpha.detach().clone(),
        "log_alpha_candidate": None if cand is None else cand.detach().clone(),
        "gates": merger.deterministic_gates().clone(),
        "history": result.history,
        "candidate_losses": result.candidate_losses,
        "state": merger.merged_state_dict(),
    }


def mlp_channel() -> dict[str, Any]:
    """Channel gates, one candidate noisy enough that its gates must move."""
    model = _mlp()
    cands = [_perturbed(model, s, 0.05) for s in (1, 2)] + [_perturbed(model, 3, 1.0)]
    train = _classification_batches(0, 96, 12, 10, 3)
    val = _classification_batches(1, 40, 10, 10, 3)
    merger = SoftMerger(model, cands, MergePlan(granularity="channel"))
    cfg = FitConfig(steps=30, lr=0.3, eval_every=10, record_every=5, progress=False, seed=3)
    merger.fit(train, val_loader=val, config=cfg)
    return _result(merger)


def mlp_early_stopping() -> dict[str, Any]:
    """fit.select_every: every process scores the held-out data of the whole run, so all take
    the same step, the one a single process takes."""
    model = _mlp()
    cands = [_perturbed(model, s, 0.05) for s in (1, 2)] + [_perturbed(model, 3, 1.0)]
    train = _classification_batches(0, 96, 12, 10, 3)
    held = _classification_batches(2, 40, 10, 10, 3)
    merger = SoftMerger(model, cands, MergePlan(granularity="channel"))
    cfg = FitConfig(steps=30, lr=0.3, select_every=5, progress=False, seed=3)
    merger.fit(train, config=cfg, held_out=held)
    assert merger.result is not None
    return {**_result(merger), "selected_step": merger.result.selected_step}


def bn_tensor() -> dict[str, Any]:
    """BatchNorm in training mode during gate steps (the global batch's statistics), scored on
    whole batches, re-estimated after the fit."""
    model = _bn_net()
    cands = [_perturbed(model, s, 0.2) for s in (1, 2, 3)]
    train = _classification_batches(2, 96, 16, 10, 3)
    val = _classification_batches(3, 45, 15, 10, 3)
    merger = SoftMerger(model, cands, MergePlan(granularity="tensor"))
    cfg = FitConfig(steps=24, lr=0.3, eval_every=8, record_every=4, progress=False)
    merger.fit(train, val_loader=val, config=cfg)
    return _result(merger)


def lm_tokens() -> dict[str, Any]:
    """Causal LM: the loss is a mean over tokens; the shares hold unequal numbers of them."""
    torch.manual_seed(0)
    model = TinyLMForCausalLM()
    cands = [_perturbed(model, s, 0.3) for s in (1, 2, 3)]
    train = _lm_batches(4, 6, 8, 9)
    merger = SoftMerger(model, cands, MergePlan(granularity="tensor"))
    cfg = FitConfig(steps=18, lr=0.5, eval_every=0, record_every=3, progress=False)
    merger.fit(train, config=cfg)
    return _result(merger)


def sharded_delta() -> dict[str, Any]:
    """The stack sharded across processes: task vectors over a base, channel gates, row counts
    that do not divide by the number of processes (13 hidden units, 3 classes)."""
    model = _mlp()
    base = _perturbed(model, 9, 0.0)
    cands = [_perturbed(model, s, 0.1) for s in (4, 5, 6)]
    train = _classification_batches(5, 96, 12, 10, 3)
    val = _classification_batches(6, 40, 10, 10, 3)
    plan = MergePlan(granularity="channel", combine="delta", base="base")
    names = ["a", "b", "c", "base"]
    merger = SoftMerger(model, [*cands, base], plan, names=names, shard_stack=True)
    cfg = FitConfig(steps=24, lr=0.3, eval_every=8, record_every=4, progress=False)
    merger.fit(train, val_loader=val, config=cfg)
    out = _result(merger)
    out["stack_bytes"] = merger.stack.nbytes
    return out


def sharded_bf16() -> dict[str, Any]:
    """A bfloat16 stack, sharded; tensor gates."""
    model = _mlp(hidden=7)
    cands = [_perturbed(model, s, 0.1) for s in (7, 8)] + [_perturbed(model, 9, 2.0)]
    train = _classification_batches(7, 96, 12, 10, 3)
    merger = SoftMerger(
        model, cands, MergePlan(granularity="tensor"), storage_dtype="bfloat16", shard_stack=True
    )
    cfg = FitConfig(steps=24, lr=0.3, eval_every=0, record_every=4, progress=False)
    merger.fit(train, config=cfg)
    out = _result(merger)
    out["stack_bytes"] = merger.stack.nbytes
    return out


def sharded_bf16_model() -> dict[str, Any]:
    """A bfloat16 model: the merged tensors travel in bfloat16 (the same bits as casting the
    whole merge). Its gradients are bfloat16 sums over other shares of the batch, so after a fit
    the gates agree only to bfloat16 precision."""
    model = _mlp(hidden=9).to(torch.bfloat16)
    cands = [_perturbed(model, s, 0.1) for s in (1, 2, 3)]
    merger = SoftMerger(model, cands, MergePlan(granularity="channel"), shard_stack=True)
    with torch.no_grad():
        start = merger.merged_parameters(merger.deterministic_gates())
    train = [(x.to(torch.bfloat16), y) for x, y in _classification_batches(8, 96, 12, 10, 3)]
    cfg = FitConfig(steps=12, lr=0.3, eval_every=0, record_every=4, progress=False)
    merger.fit(train, config=cfg)
    return {**_result(merger), "start": {k: v.clone() for k, v in start.items()}}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    f.__name__: f
    for f in (
        mlp_channel,
        mlp_early_stopping,
        bn_tensor,
        lm_tokens,
        sharded_delta,
        sharded_bf16,
        sharded_bf16_model,
    )
}


def main(argv: list[str]) -> None:
    from softmerge import distributed

    torch.set_num_threads(1)
    out, names = argv[0], argv[1:] or list(CASES)
    distributed.init_from_env()
    try:
        results = {name: CASES[name]() for name in names}
        results["world_size"] = distributed.world_size()
        if distributed.is_writer():
            torch.save(results, out)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
