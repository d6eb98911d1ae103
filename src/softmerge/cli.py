"""The ``softmerge`` command: ``merge`` a YAML config, ``inspect`` checkpoints, run the ``demo``.

Every :class:`SoftmergeError` becomes one line on stderr (``softmerge: error: ...``) and exit
code 2. ``merge`` checks the config, the candidates and the data before the gates are trained,
and writes its outputs into a hidden staging folder that is moved into place only once every
file is complete, so a failed or interrupted run leaves the output folder as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import __version__
from .candidates import (
    PICKLE_SUFFIXES,
    Candidate,
    format_inspect,
    inspect_candidates,
    load_candidates,
)
from .checkpoint import checkpoint_path, remove_checkpoint
from .compare import (
    Entry,
    candidate_rows,
    default_entries,
    method_row,
    plain_info,
    split_held_out,
    table_markdown,
    table_text,
)
from .compare import compare as compare_methods
from .config import MergeConfig, load_config
from .data import LOADERS, load_splits
from .errors import ConfigError, DataError, OutputError, PlanError, SoftmergeError
from .io import os_reason, writable_problem, write_json, write_safetensors, write_text
from .methods import METHOD_NAMES, REGISTRY, MergeContext
from .methods.soups import uniform_soup as average_states
from .plan import MergePlan
from .report import format_markdown_table, format_table, gates_to_dict
from .soft import FitConfig, SoftMerger, has_batchnorm, logits_of, recalibrate_batchnorm
from .zoo import evaluate

log = logging.getLogger("softmerge")

RESULT_COLUMNS = ["model", "kind", "accuracy", "loss", "mean_gate"]


# ---------------------------------------------------------------------------------------------
# Data: a built-in data set's merge/test splits, or tensors files.


@dataclass
class MergeData:
    merge: TensorDataset
    eval: TensorDataset | None
    merge_source: str  # names the data in error messages and the summary
    eval_source: str | None


def load_data(cfg: MergeConfig, objective: str, progress: bool = True) -> MergeData:
    """The merge set and the (optional) eval set the config describes. ``progress``: show the
    bar of a data download (MNIST found nowhere else)."""
    data = cfg.data
    if data.dataset == "tensors":
        assert data.merge is not None  # the config checks guarantee it
        why = f"fit.objective {objective!r} needs labels; add 'y' or set fit.objective: entropy"
        merge = read_tensor_file(data.merge, labels_needed=why if objective != "entropy" else None)
        evals = None
        if data.eval is not None:
            evals = read_tensor_file(data.eval, labels_needed="the eval set needs labels")
        return MergeData(merge, evals, str(data.merge), None if evals is None else str(data.eval))
    kwargs: dict[str, Any] = dict(data.kwargs)
    if data.path is not None:
        kwargs["path"] = data.path
    if "progress" in inspect.signature(LOADERS[data.dataset]).parameters:
        kwargs.setdefault("progress", progress)
    try:
        splits = load_splits(data.dataset, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. sizes larger than the data set
        raise ConfigError(f"{cfg.source}: data.kwargs: {exc}") from exc
    return MergeData(
        splits.merge, splits.test, f"{data.dataset} merge split", f"{data.dataset} test split"
    )


def read_tensor_file(path: Path, labels_needed: str | None) -> TensorDataset:
    """A TensorDataset of ``x`` (and ``y``) from a safetensors or weights-only torch file."""
    tensors = _read_tensors(path)
    x, y = tensors.get("x"), tensors.get("y")
    if not isinstance(x, torch.Tensor):
        found = ", ".join(map(str, tensors)) or "nothing"
        raise DataError(f"{path}: no tensor 'x' (the inputs); the file holds: {found}")
    if x.dim() == 0 or len(x) == 0:
        raise DataError(f"{path}: tensor 'x' holds no samples (shape {tuple(x.shape)})")
    if y is None:
        if labels_needed:
            raise DataError(f"{path}: no tensor 'y' (labels): {labels_needed}")
        return TensorDataset(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        what = f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, torch.Tensor) else y
        raise DataError(f"{path}: 'y' must be a 1-D tensor of integer class indices, got {what}")
    if len(y) != len(x):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return TensorDataset(x, y.long())


def _read_tensors(path: Path) -> Mapping[str, Any]:
    name = path.name.lower()
    if not name.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; use .safetensors or "
            f"{', '.join(PICKLE_SUFFIXES)} holding tensors 'x' and 'y'"
        )
    try:
        if name.endswith(".safetensors"):
            obj: Any = load_file(str(path), device="cpu")
        else:  # weights_only: a data file must not be able to run code
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types on bad files
        detail = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise DataError(f"{path}: cannot read tensors: {detail}") from exc
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{path}: expected a dict of named tensors (x, y), got {type(obj).__name__}"
        )
    return obj


def make_loaders(
    data: MergeData, batch_size: int, seed: int
) -> tuple[DataLoader, DataLoader | None]:
    # The last short batch is dropped when there are full ones: a batch of one sample breaks
    # BatchNorm in training mode and makes a noisy gate step.
    merge = DataLoader(
        data.merge,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(data.merge) > batch_size,
    )
    evals = None if data.eval is None else DataLoader(data.eval, batch_size=batch_size)
    return merge, evals


@torch.no_grad()
def check_model_runs(model: nn.Module, dataset: TensorDataset, source: str, factory: str) -> None:
    """Run two samples through the model, so a shape or label mismatch names the data file."""
    batch = dataset[:2]
    x = batch[0]
    was_training = model.training
    model.eval()
    try:
        logits = logits_of(model(x))
    except Exception as exc:  # whatever the model raises on input it cannot take
        detail = next(iter(str(exc).strip().splitlines()), "")
        raise DataError(
            f"{source}: the model from {factory} cannot run on this data (one sample of x has "
            f"shape {tuple(x.shape[1:])}, dtype {x.dtype}): {type(exc).__name__}: {detail}"
        ) from exc
    finally:
        model.train(was_training)
    if len(batch) > 1:
        labels, classes = dataset.tensors[1], logits.shape[-1]
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.numel():
            raise DataError(
                f"{source}: label {int(bad[0])} is outside the model's {classes} outputs "
                f"(0..{classes - 1})"
            )


# ---------------------------------------------------------------------------------------------
# Evaluation: each candidate, the uniform soup, the soft merge.


def _with_state(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def uniform_soup(merger: SoftMerger, merge_loader: DataLoader) -> nn.Module:
    """Plain average of the finite candidates; BatchNorm statistics re-estimated on merge data
    (averaged running statistics do not describe averaged weights)."""
    pool = [c for c, ok in zip(merger.candidates, merger.active.tolist(), strict=True) if ok]
    model = _with_state(merger.model, average_states([c.state for c in pool]))
    if has_batchnorm(model):
        recalibrate_batchnorm(model, merge_loader)
    return model


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN is not valid JSON


def _result_row(name: str, kind: str, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    accuracy, loss = evaluate(model, loader)
    return {"model": name, "kind": kind, "accuracy": accuracy, "loss": _finite(loss)}


def evaluate_all(
    merger: SoftMerger, merge_loader: DataLoader, eval_loader: DataLoader
) -> list[dict[str, Any]]:
    gates = gate_summary(merger)
    pool: list[tuple[Candidate, str]] = [(c, "candidate") for c in merger.candidates]
    if merger.base is not None:
        pool.insert(0, (merger.base, "base"))
    rows = []
    for cand, kind in pool:
        row = _result_row(cand.name, kind, _with_state(merger.model, cand.state), eval_loader)
        rows.append({**row, "mean_gate": gates.get(cand.name, {}).get("mean_gate")})
    soup = uniform_soup(merger, merge_loader)
    rows.append(_result_row("uniform soup", "uniform soup", soup, eval_loader))
    rows.append(_result_row("soft merge", "soft merge", merger.merged_model(), eval_loader))
    return rows


def gate_summary(merger: SoftMerger) -> dict[str, dict[str, Any]]:
    """Per candidate: mean / min / max gate, fraction of units closed and fully open, and the
    candidate-level gate when there is one."""
    summary = gates_to_dict(merger.gate_snapshot())["summary"]
    for name, level in (merger.candidate_gates() or {}).items():
        summary[name]["candidate_gate"] = round(level["gate"], 6)
    return summary


# ---------------------------------------------------------------------------------------------
# Output folder: refuse to overwrite inputs; publish all files at once.


def check_output_dir(out: Path, inputs: list[tuple[str, Path]], label: str) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{label}: {out} exists and is not a folder")
    target = out.resolve()
    for key, path in inputs:
        src = path.resolve()
        if src == target or target in src.parents:
            how = "is" if src == target else "contains"
            raise ConfigError(
                f"{label}: the output folder {out} {how} the input {key} ({path}); "
                "writing there could overwrite it: choose another folder"
            )


def output_dir(cfg: MergeConfig, args: argparse.Namespace) -> tuple[Path, str]:
    """The output folder and how the user named it; refused now if it is an input or cannot be
    written, not after an hour of training."""
    out, label = _output_dir(cfg, args.out)
    check_output_dir(out, cfg.input_paths(), label)
    problem = writable_problem(out.parent) or (writable_problem(out) if out.is_dir() else None)
    if problem:
        raise OutputError(f"{label}: cannot write the output folder {out}: {problem}")
    return out, label


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder; on success move its content into ``out``.

    A failed write (disk full, permissions) is one :class:`OutputError` naming the file the
    user will look for in ``out``, not the staging copy; ``out`` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the outputs: {os_reason(exc)}") from exc
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)  # one atomic rename
            return
        for item in sorted(stage.iterdir()):  # keep unrelated files the folder already has
            dest = out / item.name
            if item.is_dir() and dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    except OutputError as exc:
        raise OutputError(str(exc).replace(str(stage), str(out))) from exc
    except OSError as exc:  # moving the staged files into place
        raise OutputError(f"{out}: cannot write the outputs: {os_reason(exc)}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# softmerge merge


def _fit_config(cfg: MergeConfig, args: argparse.Namespace) -> FitConfig:
    changes: dict[str, Any] = {}
    if args.steps is not None:
        changes.update(steps=args.steps, epochs=None)
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.no_progress or _quiet(args):
        changes["progress"] = False
    return dataclasses.replace(cfg.fit_config(), **changes)


def _output_dir(cfg: MergeConfig, out: Path | None) -> tuple[Path, str]:
    if out is not None:
        return out.absolute(), "--out"
    return cfg.output.dir, f"{cfg.source}: output.dir"


def cmd_merge(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = load_config(args.config)
    out, _ = output_dir(cfg, args)
    if args.resume and cfg.method != "soft":
        raise ConfigError(f"--resume: only method 'soft' checkpoints, not {cfg.method!r}")
    if cfg.method != "soft":
        return merge_with_method(cfg, args, out, start)
    ckpt = checkpoint_path(out)
    if args.resume and not ckpt.is_file():
        raise ConfigError(
            f"--resume: no checkpoint of an interrupted run at {ckpt} (one is written every "
            "fit.checkpoint_every steps, or --checkpoint-every K)"
        )
    try:
        fit_cfg = _fit_config(cfg, args)
    except PlanError as exc:  # the config is valid, so the culprit is a command-line value
        raise PlanError(f"--seed: {exc}" if args.seed is not None else str(exc)) from None
    if args.checkpoint_every is not None:
        fit_cfg = dataclasses.replace(fit_cfg, checkpoint_every=args.checkpoint_every)
    if ckpt.is_file() and not args.resume:
        log.warning("%s: starting over; pass --resume to continue that interrupted run", ckpt)
    model = cfg.build_model()
    log.info("loading %d candidates", len(cfg.candidates))
    try:
        merger = SoftMerger(model, cfg.candidate_paths(), cfg.plan(), names=cfg.candidate_names())
    except PlanError as exc:  # e.g. an include pattern that matches no parameter of the model
        raise PlanError(f"{cfg.source}: {exc}") from None
    data = load_data(cfg, fit_cfg.objective, progress=fit_cfg.progress)
    check_model_runs(model, data.merge, data.merge_source, cfg.model.factory)
    if data.eval is not None:
        check_model_runs(model, data.eval, str(data.eval_source), cfg.model.factory)
    seed = cfg.data.seed if args.seed is None else args.seed
    merge_loader, eval_loader = make_loaders(data, cfg.data.batch_size, seed)
    log.info(
        "learning %d gate units x %d candidates on %d merge samples (%s)",
        len(merger.layout.units),
        len(merger.names),
        len(data.merge),
        data.merge_source,
    )
    val_loader = eval_loader if fit_cfg.eval_every > 0 else None
    checkpointing = bool(fit_cfg.checkpoint_every or args.resume)
    # What else defines the run (a checkpoint of another one is refused): model and data.
    run_key = json.dumps(
        {"model": cfg.model.model_dump(), "data": cfg.data.model_dump(), "data_seed": seed},
        sort_keys=True,
        default=str,
    )
    try:
        merger.fit(
            merge_loader,
            val_loader=val_loader,
            config=fit_cfg,
            checkpoint=ckpt if checkpointing else None,
            resume=args.resume,
            keep_checkpoint=True,  # until the outputs are written
            run_key=run_key,
        )
    except KeyboardInterrupt:
        if checkpointing and ckpt.is_file():
            log.warning("training state kept in %s: add --resume to continue", ckpt)
        raise
    rows: list[dict[str, Any]] = []
    if eval_loader is not None:
        log.info("evaluating on %d samples (%s)", len(eval_loader.dataset), data.eval_source)
        rows = evaluate_all(merger, merge_loader, eval_loader)
    with staged_output(out) as stage:
        files = merger.export(stage, extra={"config": str(cfg.source.absolute())})
        summary = build_summary(cfg, merger, data, rows, out, start)
        summary["files"] = [p.name for p in files.values()] + ["summary.json", "summary.md"]
        write_json(stage / "summary.json", summary)
        write_text(stage / "summary.md", summary_markdown(summary))
    remove_checkpoint(ckpt)
    print_merge_report(summary, out)
    return 0


def build_summary(
    cfg: MergeConfig,
    merger: SoftMerger,
    data: MergeData,
    rows: list[dict[str, Any]],
    out: Path,
    start: float,
) -> dict[str, Any]:
    result = merger.result
    assert result is not None  # fit has run
    evals = None
    if data.eval is not None:
        evals = {"source": data.eval_source, "samples": len(data.eval)}
    return {
        "softmerge_version": __version__,
        "config": str(cfg.source.absolute()),
        "output_dir": str(out),
        "candidates": {c.name: c.source for c in merger.candidates},
        "merge_set": {"source": data.merge_source, "samples": len(data.merge)},
        "eval_set": evals,
        "results": rows,
        "gates": gate_summary(merger),
        "reference": result.reference,
        "steps": result.steps,
        "seconds": {
            "fit": round(result.seconds, 3),
            "total": round(time.perf_counter() - start, 3),
        },
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# softmerge merge",
        "",
        f"- config: `{summary['config']}`",
        f"- steps: {summary['steps']}, fit: {summary['seconds']['fit']:.1f} s, "
        f"total: {summary['seconds']['total']:.1f} s",
        f"- reference (best-ranked) candidate: {summary['reference']}",
        "- merge set: {source} ({samples} samples)".format(**summary["merge_set"]),
        "",
    ]
    if summary["results"]:
        evals = summary["eval_set"]
        lines += [f"## Results on {evals['source']} ({evals['samples']} samples)", ""]
        lines += [format_markdown_table(summary["results"], RESULT_COLUMNS, floatfmt=".3f"), ""]
    gate_rows = [{"candidate": name, **row} for name, row in summary["gates"].items()]
    lines += ["## Gates per candidate", "", format_markdown_table(gate_rows, floatfmt=".3f"), ""]
    return "\n".join(lines)


def print_merge_report(summary: dict[str, Any], out: Path) -> None:
    if summary["results"]:
        print(format_table(summary["results"], RESULT_COLUMNS, floatfmt=".3f"))
    else:
        print("no eval set (data.eval): evaluation skipped")
    print(f"\noutputs in {out}: {', '.join(summary['files'])}")


# ---------------------------------------------------------------------------------------------
# Other registered methods: `method:` in the config (merge), or several at once (compare)


@dataclass
class MethodRun:
    model: nn.Module
    data: MergeData
    loaders: dict[str, DataLoader | None]  # merge, held_out, eval
    seed: int
    progress: bool


def prepare_method_run(cfg: MergeConfig, args: argparse.Namespace) -> MethodRun:
    """Model, data and loaders for registry methods; data.held_out splits the merge set."""
    model = cfg.build_model()
    progress = not (args.no_progress or _quiet(args))
    data = load_data(cfg, cfg.fit.objective, progress=progress)
    check_model_runs(model, data.merge, data.merge_source, cfg.model.factory)
    if data.eval is not None:
        check_model_runs(model, data.eval, str(data.eval_source), cfg.model.factory)
    seed = cfg.fit.seed if args.seed is None else args.seed
    data_seed = cfg.data.seed if args.seed is None else args.seed
    learn, held_out = split_held_out(data.merge, cfg.data.held_out, data_seed)
    merge_loader, eval_loader = make_loaders(
        dataclasses.replace(data, merge=learn), cfg.data.batch_size, data_seed
    )
    held_loader = None if held_out is None else DataLoader(held_out, batch_size=512)
    loaders = {"merge": merge_loader, "held_out": held_loader, "eval": eval_loader}
    return MethodRun(model, data, loaders, seed, progress)


def method_context(cfg: MergeConfig, run: MethodRun, plan: MergePlan) -> MergeContext:
    return MergeContext(
        run.model,
        cfg.candidate_paths(),
        names=cfg.candidate_names(),
        plan=plan,
        merge_loader=run.loaders["merge"],
        held_out_loader=run.loaders["held_out"],
        seed=run.seed,
        progress=run.progress,
    )


def merge_with_method(
    cfg: MergeConfig, args: argparse.Namespace, out: Path, start: float
) -> int:
    """`softmerge merge` with `method:` other than soft: the merged state dict and a summary."""
    method = cfg.build_method(cfg.method, cfg.params)
    if not method.single_model:
        raise ConfigError(
            f"{cfg.source}: method: {cfg.method!r} keeps all {len(cfg.candidates)} models and "
            "has no single merged state dict; compare it with softmerge compare instead"
        )
    if args.steps is not None:
        log.warning("--steps applies to soft merging only; ignored for %s", cfg.method)
    run = prepare_method_run(cfg, args)
    ctx = method_context(cfg, run, cfg.plan())
    log.info("merging %d candidates with %s", len(ctx.pool), method)
    outcome = method.merge(ctx)
    assert outcome.state is not None  # single_model methods always return one
    rows: list[dict[str, Any]] = []
    if run.loaders["eval"] is not None:
        rows = candidate_rows(ctx, run.loaders["eval"])
        rows.append(method_row(cfg.method, method, outcome, ctx, run.loaders["eval"]))
    summary = {
        "softmerge_version": __version__,
        "config": str(cfg.source.absolute()),
        "output_dir": str(out),
        "method": cfg.method,
        "params": method.params.model_dump(by_alias=True),
        "candidates": {c.name: c.source for c in ctx.pool},
        "base": None if ctx.base_candidate is None else ctx.base_candidate.source,
        "results": rows,
        "info": plain_info(outcome.info),
        "seconds": {
            "merge": round(outcome.seconds, 3),
            "total": round(time.perf_counter() - start, 3),
        },
        "files": ["merged.safetensors", "summary.json", "summary.md"],
    }
    with staged_output(out) as stage:
        write_safetensors(stage / "merged.safetensors", outcome.state)
        write_json(stage / "summary.json", summary)
        lines = [f"# softmerge merge ({cfg.method})", "", f"- config: `{summary['config']}`", ""]
        if rows:
            lines += [table_markdown(rows), ""]
        write_text(stage / "summary.md", "\n".join(lines))
    if rows:
        print(table_text(rows))
    print(f"\noutputs in {out}: {', '.join(summary['files'])}")
    return 0


def compare_entries(cfg: MergeConfig, ctx: MergeContext, only: list[str] | None) -> list[Entry]:
    if cfg.methods:
        entries = [
            Entry(
                e.title,
                cfg.build_method(e.method, e.params),
                cfg.plan_for(e) if e.plan else None,
                e.candidates,
            )
            for e in cfg.methods
        ]
    else:
        soft = cfg.fit.model_dump(exclude={"seed", "progress"})
        entries = default_entries(len(ctx.pool), ctx.base_candidate is not None, soft)
    if only:
        known = {e.label for e in entries} | {e.method.name for e in entries}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ConfigError(
                f"--methods: {unknown[0]!r} is not in this comparison "
                f"(choose from: {', '.join(sorted(known))})"
            )
        entries = [e for e in entries if e.label in only or e.method.name in only]
    return entries


def cmd_compare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = load_config(args.config)
    out, _ = output_dir(cfg, args)
    run = prepare_method_run(cfg, args)
    if run.loaders["eval"] is None:
        raise ConfigError(f"{cfg.source}: data.eval: compare needs an eval set to score on")
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    ctx = method_context(cfg, run, cfg.plan())  # loads and checks the candidates once
    entries = compare_entries(cfg, ctx, only)
    rows = compare_methods(
        run.model,
        ctx.pool,
        entries,
        eval_loader=run.loaders["eval"],
        plan=cfg.plan(),
        base=ctx.base_candidate,
        merge_loader=run.loaders["merge"],
        held_out_loader=run.loaders["held_out"],
        seed=run.seed,
        progress=run.progress,
    )
    held = run.loaders["held_out"]
    summary = {
        "softmerge_version": __version__,
        "config": str(cfg.source.absolute()),
        "eval_set": {"source": run.data.eval_source, "samples": len(run.data.eval or [])},
        "merge_set": {"source": run.data.merge_source, "samples": len(run.data.merge)},
        "held_out_samples": 0 if held is None else len(held.dataset),
        "seed": run.seed,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 3),
    }
    with staged_output(out) as stage:
        write_json(stage / "compare.json", summary)
        write_text(stage / "compare.md", "# softmerge compare\n\n" + table_markdown(rows) + "\n")
    print(table_text(rows))
    print(f"\ncompare.json and compare.md in {out}   ({summary['seconds']:.0f} s)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods, what they need and their parameters with defaults."""
    for name in METHOD_NAMES:
        cls = REGISTRY[name]
        needs = [w for w, flag in (("base", cls.needs_base), ("data", cls.needs_data)) if flag]
        print(f"{name:22s} {cls.summary}" + (f"  [needs {', '.join(needs)}]" if needs else ""))
        if args.verbose:
            for key, field in cls.Params.model_fields.items():
                print(f"    {field.alias or key} = {field.default!r}")
    return 0


# ---------------------------------------------------------------------------------------------
# softmerge inspect / demo


def cmd_inspect(args: argparse.Namespace) -> int:
    candidates = load_candidates([Path(p) for p in args.paths], min_count=1)
    report = inspect_candidates(candidates)
    text = json.dumps(report, indent=2) + "\n" if args.json else format_inspect(report)
    sys.stdout.write(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # imported here: the demo's training code is not needed elsewhere

    out = args.out.absolute()
    run_demo(out, quick=args.quick, seed=args.seed, progress=not (args.no_progress or _quiet(args)))
    print(f"demo outputs in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser, logging, entry point


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def build_parser() -> argparse.ArgumentParser:
    # -q is accepted before or after the command; SUPPRESS keeps one from resetting the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print only warnings and errors (also hides progress bars)",
    )
    parser = argparse.ArgumentParser(
        prog="softmerge",
        parents=[common],
        description="Merge checkpoints of one architecture by learning hard concrete (L0) gates.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="merge the checkpoints a YAML config names",
        description="Learn gates over the candidates of CONFIG.yaml, write the merged model, "
        "gates.json, plots and summary.json into the output folder.",
    )
    merge.add_argument("config", type=Path, metavar="CONFIG.yaml")
    merge.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (overrides output.dir)"
    )
    merge.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="gate-training steps (overrides fit.steps and fit.epochs)",
    )
    merge.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of the gate noise and of the merge-data order (overrides fit.seed, data.seed)",
    )
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def steps_or_zero(text: str) -> int:
        if not text.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
        return int(text)

    merge.add_argument(
        "--checkpoint-every",
        type=steps_or_zero,
        metavar="K",
        help="save the training state every K steps, for --resume (overrides "
        "fit.checkpoint_every; 0: never)",
    )
    merge.add_argument(
        "--resume",
        action="store_true",
        help="continue the gate training of an interrupted run from its checkpoint "
        "(.<output folder>.checkpoint.pt beside the output folder)",
    )
    merge.set_defaults(handler=cmd_merge)

    comp = sub.add_parser(
        "compare",
        parents=[common],
        help="run several merge methods on the same candidates and data; one table",
        description="Run the config's `methods:` list (default: every method that applies) on "
        "its candidates and data; print accuracy, loss, merge seconds and peak memory, and "
        "write compare.json and compare.md into the output folder.",
    )
    comp.add_argument("config", type=Path, metavar="CONFIG.yaml")
    comp.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (overrides output.dir)"
    )
    comp.add_argument(
        "--methods", metavar="A,B", help="only these entries (labels or method names)"
    )
    comp.add_argument(
        "--seed", type=int, metavar="S", help="seed of every method and of the data order"
    )
    comp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    comp.set_defaults(handler=cmd_compare)

    methods = sub.add_parser(
        "methods",
        parents=[common],
        help="list the merge methods usable as `method:` in a config",
        description="List every registered merge method; -v adds parameters and defaults.",
    )
    methods.add_argument("-v", "--verbose", action="store_true", help="show parameters")
    methods.set_defaults(handler=cmd_methods)

    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        help="summarise and compare checkpoints",
        description="Tensors, norms and pairwise cosine similarity / L2 distance of checkpoints.",
    )
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint file or HF folder")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=cmd_inspect)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train, poison and merge small models end to end",
        description="Train MNIST-1D candidates, add broken ones, merge them, write a report.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        metavar="DIR",
        help="output folder (default: demo-out)",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=cmd_demo)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"softmerge: {level}{record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(handlers=[handler])  # a no-op when the host already configured logging
    logging.getLogger("softmerge").setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    _setup_logging(_quiet(args))
    try:
        return int(args.handler(args))
    except SoftmergeError as exc:
        print(f"softmerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsoftmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
