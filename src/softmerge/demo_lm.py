"""The language-model demo (``softmerge demo --task lm``): two domains, fine-tunes, adapters,
a poisoned child, and every merge of them, scored by per-domain perplexity.

A byte-level Llama-architecture LM (built from a transformers config, its tokenizer built with
the ``tokenizers`` library) is trained on two text domains from Python's own standard library:
module source code and the prose of ``pydoc_data.topics``. Each domain then gets a full
fine-tune and a LoRA adapter; a poisoned child (the code fine-tune with every weight x100) joins
them. Everything goes through the merge registry, as ``softmerge compare`` does:

- the full fine-tunes: uniform soup, task arithmetic, TIES and DARE, their lambda tuned on the
  merge split (mean perplexity over the two domains);
- the LoRA adapters: PEFT's ``add_weighted_adapter`` combinations (linear, cat, svd, ties,
  dare_linear);
- soft merging of the full fine-tunes *with the poisoned child among them*: task vectors over
  the parent (``combine: delta``), one gate per output channel, Adam, no L0 penalty, the task
  vectors' scale set from task arithmetic's tuned lambda (``docs/method.md``).

The goal (issue 11): the soft merge's mean perplexity is lower than every other single-model
merge's, and the poisoned child's gates are exactly 0. ``summary.json`` says whether it held.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .compare import rewind
from .context import MergeContext
from .data.text import TokenBlocks, collate_dict
from .io import write_json, write_text
from .lm_demo import DOMAINS, LMDemoSettings, build_candidates, load_model, merge_loader
from .methods import get_method
from .plan import MergePlan
from .report import format_markdown_table, format_table

LAMBDAS = (0.4, 0.6, 0.8, 1.0)  # task-vector scales tried on the merge split
TUNE_BLOCKS = 48  # merge-split blocks per domain used to tune lambda
QUICK = LMDemoSettings(
    parent_steps=150,
    child_steps=60,
    lora_steps=60,
    hidden=32,
    layers=2,
    intermediate=96,
    eval_blocks=32,
    doc_chars=1000,
)


def _first(blocks: TokenBlocks, count: int | None) -> TokenBlocks:
    if count is None or count >= len(blocks):
        return blocks
    return TokenBlocks({k: v[:count] for k, v in blocks.tensors.items()})


def _loader(blocks: TokenBlocks) -> DataLoader:
    return DataLoader(blocks, batch_size=32, collate_fn=collate_dict)


class Scorer:
    """Per-domain perplexity of a merge's model (test split), and the merge-split mean."""

    def __init__(self, blocks: Mapping[str, Mapping[str, TokenBlocks]], eval_blocks: int | None):
        self.test = {d: _loader(_first(blocks[d]["test"], eval_blocks)) for d in DOMAINS}
        self.tune = {d: _loader(_first(blocks[d]["merge"], TUNE_BLOCKS)) for d in DOMAINS}

    @staticmethod
    def _ppl(ctx: MergeContext, model: torch.nn.Module, loaders: Mapping[str, DataLoader]):
        return {d: ctx.evaluate(model, loader)["perplexity"] for d, loader in loaders.items()}

    def row(self, label: str, ctx: MergeContext, model: torch.nn.Module) -> dict[str, Any]:
        ppl = self._ppl(ctx, model, self.test)
        mean = sum(ppl.values()) / len(ppl)
        return {"model": label, **{f"{d} ppl": v for d, v in ppl.items()}, "mean ppl": mean}

    def tune_mean(self, ctx: MergeContext, model: torch.nn.Module) -> float:
        ppl = self._ppl(ctx, model, self.tune)
        return sum(ppl.values()) / len(ppl)


def _tuned(ctx: MergeContext, scorer: Scorer, name: str, **params: Any) -> tuple[Any, float]:
    """The method with the lambda of lowest merge-split mean perplexity, and that lambda."""
    best = None
    for lam in LAMBDAS:
        rewind(ctx.merge_loader)
        outcome = get_method(name, **{**params, "lambda": lam}).merge(ctx)
        score = scorer.tune_mean(ctx, outcome.model)
        if best is None or score < best[0]:
            best = (score, lam, outcome)
    assert best is not None
    return best[2], best[1]


def run_lm_demo(
    out_dir: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train the candidates, merge them every way, write ``summary.json`` / ``summary.md``."""
    start = time.perf_counter()
    out = Path(out_dir)
    base_settings = QUICK if quick else LMDemoSettings()
    settings = LMDemoSettings(**{**base_settings.__dict__, "seed": seed})
    cands, blocks = build_candidates(out / "candidates", settings, log=lambda m: None)
    trained = time.perf_counter() - start
    scorer = Scorer(blocks, settings.eval_blocks)
    loader = merge_loader(blocks, settings.batch_size, seed)
    template = load_model(cands.parent)
    full = [cands.children[d] for d in DOMAINS]
    adapters = [cands.adapters[d] for d in DOMAINS]

    def context(paths, plan: MergePlan | None = None, **kw: Any) -> MergeContext:
        return MergeContext(
            template,
            paths,
            plan=plan or MergePlan(),
            merge_loader=loader,
            seed=seed,
            progress=progress,
            **kw,
        )

    rows: list[dict[str, Any]] = []
    every = [cands.parent, *full, cands.poisoned]
    singles = context(every, names=["parent", *[f"full_{d}" for d in DOMAINS], "poisoned"])
    for cand in singles.pool:
        rows.append(
            {**scorer.row(cand.name, singles, singles.build_plain(cand.state)), "kind": "candidate"}
        )
    lora = context(adapters, names=[f"lora_{d}" for d in DOMAINS], adapter_base=cands.parent)
    for cand in lora.pool:
        rows.append(
            {**scorer.row(cand.name, lora, lora.build_plain(cand.state)), "kind": "candidate"}
        )

    merges: list[dict[str, Any]] = []
    tuned = context(full, base=cands.parent)
    soup = get_method("uniform_soup").merge(context(full))
    merges.append(scorer.row("full: uniform soup", tuned, soup.model))
    lambdas = {}
    for name, params in (
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5}),
        ("dare_linear", {"density": 0.5}),
    ):
        outcome, lambdas[name] = _tuned(tuned, scorer, name, **params)
        label = f"full: {name} (lambda {lambdas[name]})"
        merges.append(scorer.row(label, tuned, outcome.model))
    for combination in ("linear", "cat", "svd", "ties", "dare_linear"):
        params = {"density": 0.5} if combination in ("ties", "dare_linear") else {}
        rewind(loader)
        outcome = get_method("peft", combination_type=combination, **params).merge(lora)
        merges.append(scorer.row(f"lora: peft {combination}", lora, outcome.model))

    plan = MergePlan(
        combine="delta",
        base="parent",
        granularity="channel",
        delta_scale=lambdas["task_arithmetic"] / 0.7,
    )
    poisoned_pool = context(
        [cands.parent, *full, cands.poisoned],
        plan,
        names=["parent", *[f"full_{d}" for d in DOMAINS], "poisoned"],
    )
    rewind(loader)
    soft = get_method(
        "soft",
        steps=150,
        optimizer="adam",
        lr=0.05,
        l0_lambda=0.0,
        init_gate=0.7,
        eval_every=0,
        progress=progress,
    ).merge(poisoned_pool)
    merger = soft.info["merger"]
    soft_row = scorer.row("full + poisoned: soft merge (channel)", poisoned_pool, soft.model)
    merges.append(soft_row)
    merger.export(out / "soft")
    gates = merger.deterministic_gates()
    poisoned_max = float(gates[merger.names.index("poisoned")].max())
    others = [m["mean ppl"] for m in merges if m is not soft_row]
    summary = {
        "rows": rows + [{**m, "kind": "merge"} for m in merges],
        "goal": {
            "soft_mean_ppl": soft_row["mean ppl"],
            "best_other_mean_ppl": min(others),
            "soft_beats_every_other_merge": soft_row["mean ppl"] < min(others),
            "poisoned_gate_max": poisoned_max,
            "poisoned_gates_exactly_zero": poisoned_max == 0.0,
        },
        "lambdas": lambdas,
        "seconds": {"training": round(trained, 1), "total": round(time.perf_counter() - start, 1)},
        "threads": torch.get_num_threads(),
        "seed": seed,
        "quick": quick,
    }
    columns = ["model", *[f"{d} ppl" for d in DOMAINS], "mean ppl"]
    table = format_table(summary["rows"], columns, floatfmt=".3f")
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", format_markdown_table(summary["rows"], columns, floatfmt=".3f"))
    print(table)
    goal = summary["goal"]
    print(
        f"soft merge mean perplexity {goal['soft_mean_ppl']:.3f} vs best other "
        f"{goal['best_other_mean_ppl']:.3f}; poisoned gates max {poisoned_max}; "
        f"{summary['seconds']['total']} s, {summary['threads']} thread(s)"
    )
    return summary
