"""Writing merges: weights (sharded safetensors), Hugging Face folders, gates and plots.

For inputs that are Hugging Face folders the output folder is itself one (``model.safetensors``
or shards with their index, the inputs' config and tokenizer files), so ``from_pretrained``
loads it; otherwise the weights are ``merged.safetensors`` (or its shards).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from ..io import write_json
from ..report import plot_convergence, plot_gate_heatmap, write_gates_json
from .hf import copy_hf_files
from .weights import (
    DEFAULT_SHARD_SIZE,
    ShardedWriter,
    TensorEntry,
    layout_of,
    parse_size,
    write_state,
)

if TYPE_CHECKING:
    from ..soft import SoftMerger

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ShardedWriter",
    "TensorEntry",
    "export_soft_merge",
    "layout_of",
    "parse_size",
    "write_merged",
    "write_state",
]


def write_merged(
    out_dir: Path,
    items: Iterable[tuple[str, torch.Tensor]],
    layout: Sequence[TensorEntry],
    *,
    hf_source: Path | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    info: Mapping[str, Any] | None = None,
) -> dict[str, list[Path]]:
    """The merged weights (streamed) and, for Hugging Face inputs, the folder's other files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"softmerge_version": __version__}
    if info:
        meta["softmerge"] = json.dumps(dict(info), default=str)
    stem = "model" if hf_source is not None else "merged"
    paths = {
        "weights": write_state(
            out_dir, items, layout, stem=stem, shard_size=shard_size, metadata=meta
        )
    }
    if hf_source is not None:
        paths["hf_files"] = copy_hf_files(hf_source, out_dir)
    return paths


def export_soft_merge(
    merger: SoftMerger,
    out_dir: Path,
    extra: Mapping[str, Any] | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> dict[str, Path]:
    """Weights, gates.json, gates.png, history.json and convergence.png of a fitted merge."""
    state = merger.merged_state_dict()
    state = {k: v for k, v in state.items() if k not in merger.ctx.tied}  # re-tied on load
    info = merger.describe()
    result = merger.result
    if result is not None:
        info.update(
            steps=result.steps,
            seconds=round(result.seconds, 3),
            candidate_losses=result.candidate_losses,
        )
        if result.selected_step is not None:  # fit.select_every: the gates of this step
            info.update(selected_step=result.selected_step, held_out_loss=result.held_out_loss)
    info.update(dict(extra or {}))
    written = write_merged(
        out_dir,
        state.items(),
        layout_of(state),
        hf_source=merger.candidates[0].hf_folder,
        shard_size=shard_size,
        info={"plan": info["plan"]},
    )
    files = written["weights"]
    # "weights": the file (or shard index) a user loads; the other files by name.
    paths: dict[str, Path] = {"weights": files[-1] if len(files) > 1 else files[0]}
    paths.update({p.name: p for group in written.values() for p in group})
    if merger.stack.lowrank:  # a soft merge of LoRA adapters is also one adapter
        from ..candidates.adapters import read_adapter_config
        from .adapter import write_merged_adapter

        with torch.no_grad():
            weights, axes = merger.slot_weights(merger.deterministic_gates())
        template = read_adapter_config(Path(merger.candidates[0].source))
        for p in write_merged_adapter(
            out_dir / "adapter", merger.stack.lowrank, weights, axes, template
        ):
            paths[f"adapter/{p.name}"] = p
    snap = merger.gate_snapshot()
    gate_extra: dict[str, Any] = {"merge": info}
    path = getattr(merger, "path", None)
    if path is not None:  # an L0 path was run (l0_lambda: auto): its importance and choice
        from ..path import write_path_outputs

        gate_extra["path"] = path.summary()
        paths.update(write_path_outputs(out_dir, path))
    paths["gates"] = write_gates_json(out_dir / "gates.json", snap, extra=gate_extra)
    paths["heatmap"] = plot_gate_heatmap(out_dir / "gates.png", snap)
    if result is not None and result.history:
        paths["history"] = write_json(out_dir / "history.json", result.history)
        paths["convergence"] = plot_convergence(
            out_dir / "convergence.png",
            result.history,
            candidates=merger.names,
            selected_step=result.selected_step,
        )
    return paths
