"""One merged LoRA adapter from a soft merge of adapters: exact, with concatenated ranks.

The merge of N adapters at the deterministic gates is, per target weight,
``W + sum_j c_j s_j B_j A_j = W + B' A'`` with ``A' = [A_1; ...; A_N]`` and
``B' = [c_1 s_1 B_1, ..., c_N s_N B_N]`` (c_j per output row with channel gates). Written as a
PEFT folder with rank = sum r_j and alpha = rank (scaling 1), ``PeftModel.from_pretrained``
gives the same weights as the merged full model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..io import write_text
from .weights import layout_of, write_state

PREFIX = "base_model.model."


def write_merged_adapter(
    folder: Path,
    lowrank: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    axes: Mapping[str, int | None],
    template_config: Mapping[str, Any],
) -> list[Path]:
    """``folder``/adapter_config.json and adapter_model.safetensors for the merged factors."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in = False
    for name, factors in lowrank.items():
        module = name.removesuffix(".weight")
        with torch.no_grad():
            b = factors.b.float() * factors.columns(weights[name], axes.get(name))
        tensors[f"{PREFIX}{module}.lora_A.weight"] = factors.a.float().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = int(factors.a.shape[0])
        fan_in = fan_in or factors.transposed
    config = dict(template_config)
    first = next(iter(ranks.values()), 1)
    config.update(
        r=first,
        lora_alpha=first,
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),  # alpha = rank everywhere: scaling 1
        use_rslora=False,
        fan_in_fan_out=fan_in,
        target_modules=sorted(ranks),
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = write_state(
        folder, tensors.items(), layout_of(tensors), stem="adapter_model", metadata={}
    )
    files.append(write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n"))
    return files
