"""Exploration for the LM demo (issue 11): which soft-merge settings beat every other merge?

Builds (or reuses) the demo's candidates with softmerge.lm_demo: a byte-level Llama parent
trained on two stdlib domains (code, prose), one full fine-tune and one LoRA adapter per domain,
and a poisoned child (the code fine-tune x100). Then merges them every way with the CURRENT
public API and prints per-domain test perplexity:

- each candidate, the parent;
- full fine-tunes: uniform soup, task arithmetic, TIES, DARE (softmerge.methods.tensorwise),
  each hyper-parameter tuned on the merge split (mean perplexity over domains);
- LoRA adapters: PEFT's add_weighted_adapter (linear, cat, ties, dare_linear, svd), weight
  (and density) tuned the same way;
- soft merging (SoftMerger, combine="delta" over the parent) of the full fine-tunes, of the
  LoRA adapters materialised as full state dicts (merge_and_unload), and of both, each pool
  with the poisoned child in it.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lm_demo_explore.py --out /tmp/lm/run0

Exploratory: not part of the test suite or the docs' numbers.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from softmerge import FitConfig, MergePlan, SoftMerger
from softmerge.data.text import TokenBlocks
from softmerge.lm_demo import (
    DOMAINS,
    LMCandidates,
    LMDemoSettings,
    build_candidates,
    byte_tokenizer,
    causal_lm_loss,
    domain_blocks,
    load_model,
    merge_loader,
    perplexity,
    stdlib_corpus,
)
from softmerge.methods import tensorwise

State = dict[str, torch.Tensor]
MERGE_EVAL_BLOCKS = 96  # merge-split blocks per domain used to tune hyper-parameters


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- candidates


def candidates(out: Path, settings: LMDemoSettings, rebuild: bool):
    """Train and save the candidates, or reuse a folder built with the same settings."""
    manifest = out / "candidates.json"
    corpus = stdlib_corpus(settings.seed, doc_chars=settings.doc_chars)
    fingerprint = hashlib.sha256(json.dumps(corpus).encode()).hexdigest()
    if manifest.exists() and not rebuild:
        saved = json.loads(manifest.read_text())
        same_settings = saved["settings"] == json.loads(json.dumps(settings.__dict__))
        if same_settings and saved.get("corpus_sha256") == fingerprint:
            log(f"reusing candidates in {out}")
            tokenizer = byte_tokenizer()
            blocks = domain_blocks(corpus, tokenizer, settings.block_size)
            cands = LMCandidates(
                root=out,
                parent=Path(saved["parent"]),
                children={k: Path(v) for k, v in saved["children"].items()},
                poisoned=Path(saved["poisoned"]),
                adapters={k: Path(v) for k, v in saved["adapters"].items()},
                settings=settings,
                seconds=saved["seconds"],
            )
            return cands, blocks
    cands, blocks = build_candidates(out, settings, log=log)
    manifest.write_text(json.dumps({**cands.to_json(), "corpus_sha256": fingerprint}, indent=1))
    return cands, blocks


def state_of(model: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_state(parent: torch.nn.Module, adapter: Path) -> State:
    """The adapter's B @ A * scale added into a copy of the parent: a full state dict."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(parent), str(adapter)).merge_and_unload()
    return state_of(merged)


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """Per-domain perplexity of a state dict on the test (or merge) blocks."""

    def __init__(self, model: torch.nn.Module, blocks, eval_blocks: int | None) -> None:
        self.model = model
        self.test = {d: _first(blocks[d]["test"], eval_blocks) for d in DOMAINS}
        self.merge = {d: _first(blocks[d]["merge"], MERGE_EVAL_BLOCKS) for d in DOMAINS}

    def _ppl(self, state: State | None, parts: Mapping[str, TokenBlocks]) -> dict[str, float]:
        if state is not None:
            self.model.load_state_dict(state, strict=True)
        out = {d: perplexity(self.model, parts[d]) for d in DOMAINS}
        out["mean"] = statistics.fmean(out[d] for d in DOMAINS)
        return out

    def test_ppl(self, state: State | None) -> dict[str, float]:
        return self._ppl(state, self.test)

    def merge_mean(self, state: State | None) -> float:
        return self._ppl(state, self.merge)["mean"]


def _first(blocks: TokenBlocks, count: int | None) -> TokenBlocks:
    return TokenBlocks({k: v[:count] for k, v in blocks.tensors.items()})


def tune(
    name: str,
    grid: Sequence[dict],
    make: Callable[..., State],
    evaluator: Evaluator,
) -> tuple[State, dict, float]:
    """The grid point with the lowest mean merge-split perplexity."""
    best = None
    for params in grid:
        state = make(**params)
        score = evaluator.merge_mean(state)
        log(f"  {name} {params}: merge ppl {score:.4f}")
        if best is None or score < best[2]:
            best = (state, params, score)
    assert best is not None
    return best


# --------------------------------------------------------------------------- merges


def per_tensor(fn, states: Sequence[State], base: State, **params) -> State:
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        out[k] = fn(base=v, tensors=[s[k] for s in states], **params)
    return out


def uniform(states: Sequence[State]) -> State:
    return {k: tensorwise.linear([s[k] for s in states]) for k in states[0]}


def baselines(pool: Mapping[str, State], parent: State, ev: Evaluator, seed: int):
    """Uniform soup, task arithmetic, TIES and DARE over ``pool``, tuned on the merge split."""
    states = list(pool.values())
    rows = {"uniform soup": (uniform(states), {})}
    lambdas = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
    st, p, _ = tune(
        "task_arithmetic",
        [{"lambda_": lam} for lam in lambdas],
        lambda lambda_: per_tensor(tensorwise.task_arithmetic, states, parent, lambda_=lambda_),
        ev,
    )
    rows["task arithmetic"] = (st, p)
    st, p, _ = tune(
        "ties",
        [{"density": d, "lambda_": lam} for d in (0.2, 0.5, 0.8) for lam in (0.4, 0.6, 1.0, 1.4)],
        lambda density, lambda_: per_tensor(
            tensorwise.ties, states, parent, density=density, lambda_=lambda_
        ),
        ev,
    )
    rows["TIES"] = (st, p)

    def dare(density: float, lambda_: float) -> State:
        gen = torch.Generator().manual_seed(seed)
        return per_tensor(
            tensorwise.dare, states, parent, density=density, lambda_=lambda_, generator=gen
        )

    st, p, _ = tune(
        "dare_linear",
        [{"density": d, "lambda_": lam} for d in (0.3, 0.6) for lam in (0.3, 0.45, 0.6, 0.8, 1.0)],
        dare,
        ev,
    )
    rows["DARE (linear)"] = (st, p)
    return rows


def peft_combinations(parent_model, adapters: Mapping[str, Path], ev: Evaluator):
    """PEFT's add_weighted_adapter combinations of the LoRA adapters, each tuned."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(
        copy.deepcopy(parent_model), str(adapters[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    rows = {}
    grids = {
        "linear": [{"weight": w} for w in (0.5, 0.75, 1.0, 1.25)],
        "cat": [{"weight": w} for w in (0.5, 0.75, 1.0, 1.25)],
        "svd": [{"weight": w} for w in (0.5, 0.75, 1.0, 1.25)],
        "ties": [{"weight": w, "density": d} for w in (0.75, 1.0, 1.5) for d in (0.3, 0.7)],
        "dare_linear": [{"weight": w, "density": d} for w in (0.75, 1.0, 1.25) for d in (0.5, 0.8)],
    }
    for combo, grid in grids.items():

        def make(weight: float, density: float | None = None, combo: str = combo) -> State:
            if "merged" in model.peft_config:
                model.delete_adapter("merged")
            torch.manual_seed(0)  # dare draws its masks from the global RNG
            model.add_weighted_adapter(
                names,
                [weight] * len(names),
                adapter_name="merged",
                combination_type=combo,
                density=density,
            )
            model.set_adapter("merged")
            merged = copy.deepcopy(model).merge_and_unload()
            return state_of(merged)

        st, p, _ = tune(f"peft {combo}", grid, make, ev)
        rows[f"PEFT {combo}"] = (st, p)
    return rows


def soft_merge(
    model: torch.nn.Module,
    pool: Mapping[str, State],
    parent_dir: Path,
    loader: DataLoader,
    args: argparse.Namespace,
    scale: float,
):
    plan = MergePlan(
        combine="delta",
        base=str(parent_dir),
        granularity=args.granularity,
        delta_scale=scale,
    )
    merger = SoftMerger(model, list(pool.values()), plan, names=list(pool))
    config = FitConfig(
        steps=args.soft_steps,
        lr=args.soft_lr,
        l0_lambda=args.l0,
        seed=args.seed,
        progress=False,
        eval_every=0,
        optimizer=args.optimizer,
        warmup=args.warmup,
        init_gate=args.init_gate,
        grad_clip=args.grad_clip,
    )
    merger.fit(loader, config=config, loss_fn=causal_lm_loss)
    return merger


def poisoned_gate_max(merger: SoftMerger, name: str = "poisoned") -> float:
    index = merger.names.index(name)
    return float(merger.deterministic_gates()[index].max())


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lm/run0"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--granularity", default="channel")
    parser.add_argument("--soft-steps", type=int, default=150)
    parser.add_argument("--soft-lr", type=float, default=0.05)
    parser.add_argument("--l0", type=float, default=0.0)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--init-gate", type=float, default=0.7)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--scale", default="ta", help="delta_scale: a number, or 'ta' (tuned lambda / init-gate)"
    )
    parser.add_argument("--pools", default="full,lora,all")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    for name, value in LMDemoSettings().__dict__.items():
        if name != "seed":
            kind = type(value) if value is not None else int
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    settings = LMDemoSettings(
        **{k: getattr(args, k) for k in LMDemoSettings().__dict__ if k != "seed"}, seed=args.seed
    )
    torch.manual_seed(args.seed)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    cands, blocks = candidates(args.out, settings, args.rebuild)
    seconds.update({f"train/{k}": v for k, v in cands.seconds.items()})
    clock = time.perf_counter()
    parent_model = load_model(cands.parent)
    parent = state_of(parent_model)
    full = {f"full_{d}": state_of(load_model(p)) for d, p in cands.children.items()}
    poisoned = state_of(load_model(cands.poisoned))
    lora = {f"lora_{d}": lora_state(parent_model, p) for d, p in cands.adapters.items()}
    ev = Evaluator(copy.deepcopy(parent_model), blocks, settings.eval_blocks)
    lap("load")

    table: dict[str, dict] = {}

    def add(name: str, state: State | None, **extra) -> None:
        table[name] = {**ev.test_ppl(state), **extra}
        row = table[name]
        shown = " ".join(f"{k}={row[k]:.4f}" for k in (*DOMAINS, "mean"))
        log(f"{name:40s} {shown}")

    add("parent", parent)
    for name, st in {**full, **lora, "poisoned": poisoned}.items():
        add(name, st)
    lap("eval candidates")

    ta_lambda: dict[str, float] = {}  # task arithmetic's tuned lambda, per pool
    if not args.skip_baselines:
        clean_pools = {"full": full, "lora": lora, "all": {**full, **lora}}
        for pool_name, pool in clean_pools.items():
            for name, (st, params) in baselines(pool, parent, ev, args.seed).items():
                add(f"{pool_name}: {name}", st, params=params)
                if name == "task arithmetic":
                    ta_lambda[pool_name] = params["lambda_"]
            lap(f"baselines {pool_name}")
        poisoned_pool = {**full, "poisoned": poisoned}
        add("full+poisoned: uniform soup", uniform(list(poisoned_pool.values())))
        add(
            "full+poisoned: task arithmetic",
            per_tensor(
                tensorwise.task_arithmetic,
                list(poisoned_pool.values()),
                parent,
                lambda_=ta_lambda["full"],
            ),
        )
        for name, (st, params) in peft_combinations(parent_model, cands.adapters, ev).items():
            add(f"lora: {name}", st, params=params)
        lap("peft combinations")

    loader = merge_loader(blocks, args.batch, args.seed)
    pools = {
        "full": {**full, "poisoned": poisoned},
        "lora": {**lora, "poisoned": poisoned},
        "all": {**full, **lora, "poisoned": poisoned},
    }
    for pool_name in args.pools.split(","):
        # "ta": the deterministic start (every gate at init_gate) is the tuned task arithmetic.
        scale = ta_lambda[pool_name] / args.init_gate if args.scale == "ta" else float(args.scale)
        start = time.perf_counter()
        merger = soft_merge(
            copy.deepcopy(parent_model), pools[pool_name], cands.parent, loader, args, scale
        )
        fit_s = time.perf_counter() - start
        gates = merger.deterministic_gates()
        summary = {n: round(float(gates[i].mean()), 3) for i, n in enumerate(merger.names)}
        label = f"s={scale:g} lr={args.soft_lr:g} l0={args.l0:g} init={args.init_gate:g}"
        add(
            f"{pool_name}+poisoned: soft ({args.granularity}, {label})",
            merger.merged_state_dict(),
            poisoned_gate_max=poisoned_gate_max(merger),
            mean_gates=summary,
            fit_seconds=round(fit_s, 1),
        )
        log(f"  gates {summary} poisoned max {poisoned_gate_max(merger)} fit {fit_s:.1f}s")
        lap(f"soft {pool_name}")

    merges = {
        k: v
        for k, v in table.items()
        if ":" in k and "poisoned: uniform" not in k and "poisoned: task" not in k
    }
    soft = {k: v["mean"] for k, v in merges.items() if "soft" in k}
    others = {k: v["mean"] for k, v in merges.items() if "soft" not in k}
    best_soft = min(soft.items(), key=lambda kv: kv[1]) if soft else None
    best_other = min(others.items(), key=lambda kv: kv[1]) if others else None
    log("\n| model | " + " | ".join(DOMAINS) + " | mean |")
    log("|---|" + "---:|" * (len(DOMAINS) + 1))
    for name, row in table.items():
        cells = " | ".join(f"{row[d]:.3f}" for d in (*DOMAINS, "mean"))
        log(f"| {name} | {cells} |")
    log(f"\nbest soft: {best_soft}\nbest other merge: {best_other}")
    if best_soft and best_other:
        log(f"goal (soft mean < every other merge's): {best_soft[1] < best_other[1]}")
    gates = [v["poisoned_gate_max"] for k, v in table.items() if "soft" in k]
    log(f"poisoned gates exactly 0 in every soft merge: {all(g == 0.0 for g in gates)}")
    log(f"seconds: {json.dumps(seconds)}")
    (args.out / "explore.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "table": table,
                "seconds": seconds,
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
