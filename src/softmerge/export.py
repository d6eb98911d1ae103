"""Write a fitted merge to disk: weights, gates.json, plots, history (each file atomically)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .io import atomic_write, write_json, write_safetensors
from .report import plot_convergence, plot_gate_heatmap, write_gates_json

if TYPE_CHECKING:
    from .soft import SoftMerger

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def copy_hf_folder(src: Path, dest: Path, state: Mapping[str, Any]) -> Path:
    """A Hugging Face folder for the merge: the source's config/tokenizer files + new weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if (
            not item.is_file()
            or item.suffix in WEIGHT_SUFFIXES
            or item.name.endswith(".index.json")
        ):
            continue  # weights (and shard indexes) are replaced by the merged model.safetensors
        atomic_write(dest / item.name, lambda tmp, item=item: shutil.copyfile(item, tmp))
    write_safetensors(dest / "model.safetensors", state, metadata={"format": "pt"})
    return dest


def export_merge(
    merger: SoftMerger, out_dir: Path, extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = merger.merged_state_dict()
    info = merger.describe()
    result = merger.result
    if result is not None:
        info.update(
            steps=result.steps,
            seconds=round(result.seconds, 3),
            candidate_losses=result.candidate_losses,
        )
    info.update(dict(extra or {}))
    meta = {"format": "pt", "softmerge_version": __version__, "plan": json.dumps(info["plan"])}
    paths = {"weights": write_safetensors(out_dir / "merged.safetensors", state, metadata=meta)}
    hf_src = merger.candidates[0].hf_folder
    if hf_src is not None:
        paths["hf_folder"] = copy_hf_folder(Path(hf_src), out_dir / "hf", state)
    snap = merger.gate_snapshot()
    paths["gates"] = write_gates_json(out_dir / "gates.json", snap, extra={"merge": info})
    paths["heatmap"] = plot_gate_heatmap(out_dir / "gates.png", snap)
    if result is not None and result.history:
        paths["history"] = write_json(out_dir / "history.json", result.history)
        paths["convergence"] = plot_convergence(
            out_dir / "convergence.png", result.history, candidates=merger.names
        )
    return paths
