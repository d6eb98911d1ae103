"""One pipeline for every command: config -> candidates -> method -> merged state -> outputs.

``softmerge merge`` and ``softmerge compare`` (and the demo and the benchmarks, through the same
registry) go through :func:`prepare_run`, which builds the model template, the data and its
loaders once, and :meth:`Run.context`, which opens the candidates. The merge set is split the
same way for both commands (``data.held_out``), and a soft merge's data order does not depend on
what ran before it, so one config gives the same soft merge in ``merge`` and in ``compare``.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import __version__, distributed
from .batches import logits_of, split_batch
from .compare import (
    Comparison,
    Entry,
    candidate_rows,
    default_entries,
    method_row,
    plain_info,
    split_held_out,
    table_markdown,
    table_text,
)
from .config import MergeConfig
from .context import CheckpointSpec, MergeContext
from .data import LOADERS, load_splits
from .data.tensors import read_tensor_file
from .errors import ConfigError, DataError, PlanError
from .evaluation import skeleton
from .export import TensorEntry, write_merged
from .io import staged_output, write_json, write_text
from .methods import MergeMethod, MergeOutcome, get_method
from .objectives import Objective, resolve_objective
from .report import format_markdown_table, format_table, gates_to_dict

log = logging.getLogger("softmerge")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class RunData:
    merge: Dataset
    eval: Dataset | None
    merge_source: str  # names the data in error messages and the summary
    eval_source: str | None


def load_data(cfg: MergeConfig, objective: Objective, progress: bool = True) -> RunData:
    """The merge set and the (optional) eval set the config's data section describes."""
    data = cfg.data
    assert data is not None
    if data.dataset == "tensors":
        assert data.merge is not None  # the config checks guarantee it
        why = (
            f"fit.objective {objective.name!r} needs labels; add 'y' or set fit.objective: entropy"
        )
        merge = read_tensor_file(data.merge, labels_needed=why if objective.needs_labels else None)
        evals = None
        if data.eval is not None:
            evals = read_tensor_file(data.eval, labels_needed="the eval set needs labels")
        return RunData(merge, evals, str(data.merge), None if evals is None else str(data.eval))
    if data.dataset in ("text", "hf"):
        return load_text_data(cfg, objective)
    kwargs: dict[str, Any] = dict(data.kwargs)
    if data.path is not None:
        kwargs["path"] = data.path
    if "progress" in inspect.signature(LOADERS[data.dataset]).parameters:
        kwargs.setdefault("progress", progress)  # the bar of a data download (MNIST)
    try:
        splits = load_splits(data.dataset, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. sizes larger than the data set
        raise ConfigError(f"{cfg.source}: data.kwargs: {exc}") from exc
    return RunData(
        splits.merge, splits.test, f"{data.dataset} merge split", f"{data.dataset} test split"
    )


def load_text_data(cfg: MergeConfig, objective: Objective) -> RunData:
    """Text files or a ``save_to_disk`` folder, tokenised: causal-LM blocks for language models,
    padded sequences with their labels for classifiers."""
    from .data import text

    data, model = cfg.data, cfg.model
    assert data is not None and model is not None
    folder = data.tokenizer or model.hf
    assert folder is not None  # the config checks guarantee it
    tokenizer = text.load_tokenizer(folder)
    config = _model_config(cfg)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        text.check_tokenizer_fits(tokenizer, int(vocab))
    positions = _max_positions(config)
    block = data.block_size or min(positions or 512, 512)
    text.check_block_size(block, positions)
    column, label = data.columns.get("text"), data.columns.get("label")
    if objective.name == "classification" and label is None and data.dataset == "hf":
        label = "label"

    def tokenised(dataset: Any) -> Dataset:
        if objective.name == "classification":
            return text.tokenize_classification(
                dataset, tokenizer, block, column="text", label_column="label"
            )
        return text.tokenize_blocks(dataset, tokenizer, block, column="text")

    def read(key: str) -> tuple[Dataset | None, str | None]:
        if data.dataset == "hf":
            split = data.split.get(key)
            if key == "eval" and split is None:
                return None, None
            roles = {"text": column or "text", **({"label": label} if label else {})}
            loaded = text.load_hf_disk(data.path, split=split, columns=roles)
            return tokenised(loaded), f"{data.path} ({split or 'the data set'})"
        files = getattr(data, key)
        if files is None:
            return None, None
        files = files if isinstance(files, list) else [files]
        loaded = text.load_text_files(files, column=column, label_column=label)
        return tokenised(loaded), ", ".join(str(f) for f in files)

    merge, merge_source = read("merge")
    evals, eval_source = read("eval")
    assert merge is not None and merge_source is not None
    return RunData(merge, evals, merge_source, eval_source)


def _model_config(cfg: MergeConfig) -> Any:
    if cfg.model is None or cfg.model.hf is None:
        return None
    import transformers

    return transformers.AutoConfig.from_pretrained(str(cfg.model.hf), local_files_only=True)


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def merge_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    # The last short batch is dropped when there are full ones: a batch of one sample breaks
    # BatchNorm in training mode and makes a noisy gate step.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(dataset) > batch_size,  # type: ignore[arg-type]
    )


@torch.no_grad()
def check_model_runs(model: nn.Module, dataset: Dataset, source: str, factory: str) -> None:
    """Run two samples through the model, so a shape or label mismatch names the data file."""
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    b = split_batch(batch)
    if b.kwargs:
        from .data.text import check_batch_fields

        check_batch_fields(model, list(batch))
    was_training = model.training
    model.eval()
    try:
        logits = logits_of(model(*b.args, **b.kwargs))
    except Exception as exc:  # whatever the model raises on input it cannot take
        x = b.args[0] if b.args else None
        shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else "?"
        dtype = x.dtype if isinstance(x, torch.Tensor) else "?"
        detail = next(iter(str(exc).strip().splitlines()), "")
        raise DataError(
            f"{source}: the model from {factory} cannot run on this data (one sample of x has "
            f"shape {shape}, dtype {dtype}): {type(exc).__name__}: {detail}"
        ) from exc
    finally:
        model.train(was_training)
    labels = b.labels
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        labels = dataset.tensors[1]  # every label, not just the two samples run
    if labels is not None and labels.dim() == 1 and logits.dim() == 2:
        classes = logits.shape[-1]
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.numel():
            raise DataError(
                f"{source}: label {int(bad[0])} is outside the model's {classes} outputs "
                f"(0..{classes - 1})"
            )


# ---------------------------------------------------------------------------------------------
# A prepared run


@dataclass
class Run:
    """What every method of one config merges with: the model template, data and loaders."""

    cfg: MergeConfig
    template: nn.Module | None
    data: RunData | None
    merge: DataLoader | None
    held_out: DataLoader | None
    eval: DataLoader | None
    progress: bool

    @property
    def seed(self) -> int:
        return self.cfg.fit.seed

    def context(self, checkpoint: CheckpointSpec | None = None) -> MergeContext:
        cfg = self.cfg
        try:
            return self._context(checkpoint)
        except PlanError as exc:  # e.g. an include pattern that matches no parameter
            raise PlanError(f"{cfg.source}: {exc}") from None

    def _context(self, checkpoint: CheckpointSpec | None) -> MergeContext:
        cfg = self.cfg
        return MergeContext(
            self.template,
            cfg.candidate_paths(),
            names=cfg.candidate_names(),
            plan=cfg.plan(),
            merge_loader=self.merge,
            held_out_loader=self.held_out,
            seed=self.seed,
            progress=self.progress,
            objective=cfg.fit.objective,
            device=cfg.fit.device,
            storage_dtype=cfg.fit.storage_dtype,
            rank_batches=cfg.fit.rank_batches,
            val_loader=self.eval if cfg.fit.eval_every else None,
            checkpoint=checkpoint,
        )


def prepare_run(cfg: MergeConfig, *, progress: bool = True) -> Run:
    """Model template, data and loaders of a config (``data.held_out`` splits the merge set)."""
    template = None
    if cfg.model is not None:
        # The template's weights are never used: keep a weightless copy, free the rest.
        template = skeleton(cfg.build_model())
    if cfg.data is None:
        return Run(cfg, template, None, None, None, None, progress)
    assert template is not None and cfg.model is not None  # the config checks guarantee it
    objective = resolve_objective(cfg.fit.objective, template)
    data = load_data(cfg, objective, progress)
    runnable = cfg.build_model()  # two samples through a real model name a bad data file
    check_model_runs(runnable, data.merge, data.merge_source, cfg.model.factory)
    if data.eval is not None:
        check_model_runs(runnable, data.eval, str(data.eval_source), cfg.model.factory)
    del runnable
    learn, held = split_held_out(data.merge, cfg.data.held_out, cfg.data.seed)
    loader = merge_loader(learn, cfg.data.batch_size, cfg.data.seed)
    held_loader = None if held is None else DataLoader(held, batch_size=512)
    evals = None if data.eval is None else DataLoader(data.eval, batch_size=cfg.data.batch_size)
    return Run(cfg, template, data, loader, held_loader, evals, progress)


# ---------------------------------------------------------------------------------------------
# softmerge merge


def run_merge(
    cfg: MergeConfig, out: Path, *, progress: bool, checkpoint: CheckpointSpec | None = None
) -> dict[str, Any]:
    """One method (``cfg.method``) on the config's candidates; outputs staged into ``out``."""
    start = time.perf_counter()
    method = cfg.build_method(cfg.method, cfg.params)
    if not method.single_model:
        raise ConfigError(
            f"{cfg.source}: method: {cfg.method!r} keeps all {len(cfg.candidates)} models and "
            "has no single merged state dict; compare it with softmerge compare instead"
        )
    run = prepare_run(cfg, progress=progress)
    distributed.prepare_writer_wait()
    ctx = run.context(checkpoint if cfg.method == "soft" else None)
    log.info("merging %d candidates with %s", len(ctx.pool), method)
    outcome = method.merge(ctx)
    if not distributed.is_writer():
        distributed.wait_for_writer()  # rank 0 evaluates and writes; the others wait for it
        return {}
    with distributed.writing():
        rows = merge_rows(run, ctx, method, outcome)
        summary = merge_summary(cfg, run, ctx, method, outcome, rows, out)
        with staged_output(out) as stage:
            files = write_outcome(stage, ctx, method, outcome, cfg)
            if ctx.pool[0].hf_folder is not None:  # a Hugging Face folder gets its model card
                write_text(stage / "README.md", card_of(summary))
                files.append("README.md")
            summary["seconds"]["total"] = round(time.perf_counter() - start, 3)
            summary["files"] = [*files, "summary.json", "summary.md"]
            write_json(stage / "summary.json", summary)
            write_text(stage / "summary.md", summary_markdown(summary))
    print_merge_report(summary, out)
    return summary


def merge_rows(
    run: Run, ctx: MergeContext, method: MergeMethod, outcome: MergeOutcome
) -> list[dict[str, Any]]:
    """Each candidate, the uniform soup (the plain reference) and the merge, on the eval set."""
    if run.eval is None:
        return []
    log.info(
        "evaluating on %d samples (%s)", len(run.eval.dataset), run.data and run.data.eval_source
    )
    rows = candidate_rows(ctx, run.eval, key="model")
    gates = gate_summary(outcome)
    for r in rows:
        r["mean_gate"] = gates.get(r["model"], {}).get("mean_gate")
    if method.name != "uniform_soup":
        soup = get_method("uniform_soup")
        rows.append(method_row("uniform soup", soup, soup.merge(ctx), ctx, run.eval, key="model"))
    label = "soft merge" if method.name == "soft" else method.name
    rows.append(method_row(label, method, outcome, ctx, run.eval, key="model"))
    for r in rows:  # the run's costs are in the summary's seconds; rows are results only
        for key in ("info", "seconds", "peak_mb", "models"):
            r.pop(key, None)
    return rows


def gate_summary(outcome: MergeOutcome) -> dict[str, dict[str, Any]]:
    """Per candidate: mean / min / max gate, fraction of units closed and fully open, and the
    candidate-level gate when there is one (empty for methods without gates)."""
    merger = outcome.info.get("merger")
    if merger is None:
        return {}
    summary = gates_to_dict(merger.gate_snapshot())["summary"]
    for name, level in (merger.candidate_gates() or {}).items():
        summary[name]["candidate_gate"] = round(level["gate"], 6)
    return summary


def write_outcome(
    stage: Path, ctx: MergeContext, method: MergeMethod, outcome: MergeOutcome, cfg: MergeConfig
) -> list[str]:
    """The merged weights (streamed when the method streams), plus gates and plots for soft."""
    merger = outcome.info.get("merger")
    extra = {"config": str(cfg.source.absolute())}
    if merger is not None:
        from .export import export_soft_merge

        paths = export_soft_merge(merger, stage, extra=extra, shard_size=cfg.output.shard_size)
        return sorted({p.name for p in paths.values()})
    infos = ctx.pool[0].infos
    layout = [TensorEntry(k, infos[k].shape, infos[k].dtype) for k in ctx.output_keys()]
    written = write_merged(
        stage,
        outcome.items(),
        layout,
        hf_source=ctx.pool[0].hf_folder,
        shard_size=cfg.output.shard_size,
        info={"method": method.name, "params": method.params.model_dump(by_alias=True)},
    )
    return sorted(p.name for group in written.values() for p in group)


def card_of(summary: dict[str, Any]) -> str:
    """The README.md model card of a merged Hugging Face folder, from the run's summary."""
    from .hf import model_card

    return model_card(
        summary["method"],
        summary["candidates"],
        base=summary["base"],
        params=summary["params"],
        gates=summary.get("gates"),
        results=summary["results"],
    )


def merge_summary(
    cfg: MergeConfig,
    run: Run,
    ctx: MergeContext,
    method: MergeMethod,
    outcome: MergeOutcome,
    rows: list[dict[str, Any]],
    out: Path,
) -> dict[str, Any]:
    data = run.data
    result = outcome.info.get("fit")
    summary: dict[str, Any] = {
        "softmerge_version": __version__,
        "config": str(cfg.source.absolute()),
        "output_dir": str(out),
        "method": cfg.method,
        "params": method.params.model_dump(by_alias=True, exclude={"objective"})
        if cfg.method != "soft"
        else cfg.fit.model_dump(exclude={"objective"}),
        "candidates": {c.name: c.source for c in ctx.pool},
        "base": None if ctx.base_candidate is None else ctx.base_candidate.source,
        "merge_set": None
        if data is None
        else {
            "source": data.merge_source,
            "samples": len(data.merge),  # type: ignore[arg-type]
            "held_out": 0 if run.held_out is None else len(run.held_out.dataset),  # type: ignore[arg-type]
        },
        "eval_set": None
        if data is None or data.eval is None
        else {"source": data.eval_source, "samples": len(data.eval)},  # type: ignore[arg-type]
        "evaluation": "done" if rows else "skipped: no eval set (data.eval or a data section)",
        "results": rows,
        "info": plain_info(outcome.info),
        "seconds": {"merge": round(outcome.seconds, 3)},
        "threads": torch.get_num_threads(),
        "processes": distributed.world_size(),
    }
    if ctx.alignment is not None:  # plan.align: permutations, cost before / after
        summary["alignment"] = ctx.alignment.to_dict()
    if result is not None:
        summary.update(
            gates=gate_summary(outcome),
            reference=result.reference,
            steps=result.steps,
        )
        summary["seconds"]["fit"] = round(result.seconds, 3)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# softmerge merge ({summary['method']})",
        "",
        f"- config: `{summary['config']}`",
        f"- merge: {summary['seconds']['merge']:.1f} s, total: {summary['seconds']['total']:.1f} s",
    ]
    if "reference" in summary:
        lines.append(
            f"- steps: {summary['steps']}; reference (best-ranked) candidate: "
            f"{summary['reference']}"
        )
    info = summary.get("info", {})
    if "selected_step" in info:  # fit.select_every
        lines.append(
            f"- early stopping: the gates of step {info['selected_step']} were kept "
            f"(lowest held-out loss, {info['held_out_loss']:.4g})"
        )
    if summary["merge_set"]:
        merge_set = summary["merge_set"]
        held = f"; {merge_set['held_out']} of them held out" if merge_set.get("held_out") else ""
        lines.append(f"- merge set: {merge_set['source']} ({merge_set['samples']} samples{held})")
    lines += alignment_lines(summary.get("alignment"))
    lines.append("")
    if summary["results"]:
        evals = summary["eval_set"]
        lines += [f"## Results on {evals['source']} ({evals['samples']} samples)", ""]
        lines += [table_markdown(summary["results"], key="model"), ""]
    else:
        lines += [f"Evaluation {summary['evaluation']}.", ""]
    lines += _path_lines(summary.get("info", {}))
    if summary.get("gates"):
        gate_rows = [{"candidate": name, **row} for name, row in summary["gates"].items()]
        lines += ["## Gates per candidate", "", format_markdown_table(gate_rows, floatfmt=".3f")]
        lines.append("")
    return "\n".join(lines)


def alignment_lines(alignment: dict[str, Any] | None) -> list[str]:
    """One line per aligned candidate: squared distance to the reference before -> after."""
    if not alignment:
        return []
    lines = [f"- aligned by {alignment['method']} to {alignment['reference_name']}:"]
    entries = [*alignment["candidates"], *([alignment["base"]] if alignment["base"] else [])]
    for e in entries:
        if e["name"] != alignment["reference_name"]:
            lines.append(
                f"  - {e['name']}: distance {e['cost_before']:.4g} -> {e['cost_after']:.4g} "
                f"({e['moved_units']} units moved)"
            )
    return lines


def _path_lines(info: dict[str, Any]) -> list[str]:
    """The λ chosen along the L0 path and the candidates' importance (l0_lambda: auto)."""
    if "l0_choice" not in info:
        return []
    from .path import choice_text, importance_text

    return [
        "## λ chosen on held-out data (fit.l0_lambda: auto)",
        "",
        choice_text(info["l0_choice"]) + f"; held-out data: {info['l0_choice'].get('held_out')}",
        "",
        "Candidate importance (the λ at which its gates close along the L0 path):",
        "",
        "```",
        importance_text({"importance": info.get("importance", [])}),
        "```",
        "",
    ]


def print_merge_report(summary: dict[str, Any], out: Path) -> None:
    for line in _path_lines(summary.get("info", {}))[2:3]:
        print(line)
    if summary["results"]:
        cols = [
            c
            for c in ("model", "kind", "accuracy", "perplexity", "loss", "mean_gate")
            if any(c in r for r in summary["results"])
        ]
        print(format_table(summary["results"], cols, floatfmt=".3f"))
    else:
        print(f"evaluation {summary['evaluation']}")
    for line in alignment_lines(summary.get("alignment")):
        print(line)
    print(f"\noutputs in {out}: {', '.join(summary['files'])}")


# ---------------------------------------------------------------------------------------------
# softmerge compare


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
        adapters = all(c.is_adapter for c in ctx.pool)
        entries = default_entries(len(ctx.pool), ctx.base_candidate is not None, soft, adapters)
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


def run_compare(
    cfg: MergeConfig, out: Path, *, progress: bool, only: list[str] | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    run = prepare_run(cfg, progress=progress)
    if run.eval is None:
        raise ConfigError(f"{cfg.source}: data.eval: compare needs an eval set to score on")
    ctx = run.context()  # opens and checks the candidates once
    entries = compare_entries(cfg, ctx, only)
    comparison = Comparison(ctx)
    rows = candidate_rows(ctx, run.eval)
    rows += [comparison.run(entry, run.eval) for entry in entries]
    data = run.data
    assert data is not None
    summary = {
        "softmerge_version": __version__,
        "config": str(cfg.source.absolute()),
        "eval_set": {"source": data.eval_source, "samples": len(data.eval or [])},  # type: ignore[arg-type]
        "merge_set": {"source": data.merge_source, "samples": len(data.merge)},  # type: ignore[arg-type]
        "held_out_samples": 0 if run.held_out is None else len(run.held_out.dataset),  # type: ignore[arg-type]
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
    return summary


def run_key(cfg: MergeConfig) -> str:
    """What, besides candidates, plan and fit settings, defines a run: model and data."""
    return json.dumps(
        {
            "model": None if cfg.model is None else cfg.model.model_dump(),
            "data": None if cfg.data is None else cfg.data.model_dump(),
        },
        sort_keys=True,
        default=str,
    )


# ---------------------------------------------------------------------------------------------
# softmerge path


def run_path(cfg: MergeConfig, out: Path, *, progress: bool) -> dict[str, Any]:
    """The L0 path of the config's soft merge (:mod:`softmerge.path`): path.json, path.png and
    path.md staged into ``out``; the table and the importance order printed."""
    from .path import choice_text, importance_text, merge_path, table_rows, write_path_outputs

    if cfg.method != "soft":
        raise ConfigError(
            f"{cfg.source}: method: softmerge path follows soft merging's gates; "
            f"{cfg.method!r} has none"
        )
    run = prepare_run(cfg, progress=progress)
    ctx = run.context()
    fit = cfg.build_method("soft", cfg.params).fit_config(ctx)  # type: ignore[attr-defined]
    _, path = merge_path(ctx, fit, eval_loader=run.eval)
    with staged_output(out) as stage:
        files = write_path_outputs(stage, path)
    print(format_table(table_rows(path), floatfmt=".4g"))
    print("\n" + choice_text(path.choice))
    print("\ncandidate importance (most important first):\n" + importance_text(path))
    print(f"\n{', '.join(p.name for p in files.values())} in {out}")
    return path.to_dict()
