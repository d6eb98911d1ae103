"""LoRA adapters (PEFT folders) as candidates: a base model plus ``s · B @ A`` per target.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``)
with ``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r).
Its candidate reads like a full checkpoint of the base model: a targeted weight is
``W + s · B @ A`` (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D), computed
when read; every other tensor is the base's. The merge engine asks for the factors instead
(:meth:`AdapterReader.factors`), so the stack holds the adapters, not N full-size deltas.

``s`` is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-module overrides from
``rank_pattern`` / ``alpha_pattern`` included. DoRA adapters and ``modules_to_save`` are
refused with a clear error (their weights are not a low-rank product).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CandidateError
from .readers import Reader, TensorInfo, open_weights_file

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$"
)


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


@dataclass(frozen=True)
class LoRAFactors:
    """One adapter's factors for one weight: delta = scale · B @ A (transposed if ``fan_in``)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    transposed: bool  # the weight is stored (in, out): delta = (scale · B @ A).T

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        product = self.scale * (self.b.float() @ self.a.float())
        return product.t() if self.transposed else product


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CandidateError(f"{path}: cannot read the adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise CandidateError(f"{path}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CandidateError(f"{path}: peft_type {kind!r}: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise CandidateError(f"{path}: a DoRA adapter: its weights are not a low-rank product")
    if config.get("modules_to_save"):
        raise CandidateError(
            f"{path}: modules_to_save {config['modules_to_save']}: full weights in an adapter "
            "are not supported; save the merged model instead"
        )
    return config


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module overrides: the longest pattern key the module name ends with."""
    hits = [
        k for k in pattern if module == k or module.endswith("." + k) or re.fullmatch(k, module)
    ]
    return pattern[max(hits, key=len)] if hits else default


class AdapterReader(Reader):
    """The base model with one LoRA adapter applied, read tensor by tensor."""

    def __init__(self, folder: Path, base: Reader) -> None:
        self.folder = folder
        self.base = base
        self.source = str(folder)
        self.config = read_adapter_config(folder)
        weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
        if weights is None:
            raise CandidateError(
                f"{folder}: adapter folder without weights: looked for {', '.join(WEIGHTS)}"
            )
        self.file = open_weights_file(weights)
        self._factors = self._pair_factors()

    def _pair_factors(self) -> dict[str, tuple[str, str, float]]:
        """{base weight name: (A key, B key, scale)}, every pair checked against the base."""
        parts: dict[str, dict[str, str]] = {}
        for key in self.file.infos():
            found = _KEY.match(key)
            if found is None:
                raise CandidateError(
                    f"{self.file.source}: tensor '{key}' is not a LoRA factor (lora_A/lora_B)"
                )
            parts.setdefault(found["module"], {})[found["part"]] = key
        base = self.base.infos()
        r0, alpha0 = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        out = {}
        for module, pair in parts.items():
            target = f"{module}.weight"
            if target not in base:
                raise CandidateError(
                    f"{self.source}: the adapter targets '{module}', which the base model "
                    f"({self.base.source}) does not have: an adapter for another base or other "
                    "target modules"
                )
            if set(pair) != {"A", "B"}:
                raise CandidateError(f"{self.source}: '{module}' has lora_{next(iter(pair))} only")
            self._check_shapes(module, pair, base[target])
            rank = _pattern_value(self.config.get("rank_pattern") or {}, module, r0)
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, alpha0)
            denominator = math.sqrt(rank) if self.config.get("use_rslora") else rank
            out[target] = (pair["A"], pair["B"], float(alpha) / float(denominator))
        if not out:
            raise CandidateError(f"{self.source}: the adapter holds no LoRA factors")
        return out

    def _check_shapes(self, module: str, pair: dict[str, str], weight: TensorInfo) -> None:
        a, b = self.file.infos()[pair["A"]].shape, self.file.infos()[pair["B"]].shape
        out_dim, in_dim = weight.shape[0], weight.shape[-1]
        if self.config.get("fan_in_fan_out"):
            out_dim, in_dim = in_dim, out_dim
        if len(a) != 2 or len(b) != 2 or a[1] != in_dim or b[0] != out_dim or a[0] != b[1]:
            raise CandidateError(
                f"{self.source}: factors of '{module}' (A {tuple(a)}, B {tuple(b)}) do not fit "
                f"the base weight {weight.shape} of {self.base.source}: an adapter trained for "
                "another base model"
            )

    # -- the Reader interface: the base with this adapter applied -----------------------------

    def infos(self) -> dict[str, TensorInfo]:
        return self.base.infos()

    def read(self, key: str) -> torch.Tensor:
        weight = self.base.read(key)
        factors = self.factors(key)
        if factors is None:
            return weight
        return (weight.float() + factors.delta()).to(weight.dtype)

    def factors(self, key: str) -> LoRAFactors | None:
        """This adapter's factors for base weight ``key`` (None: the adapter leaves it alone)."""
        if key not in self._factors:
            return None
        a_key, b_key, scale = self._factors[key]
        transposed = bool(self.config.get("fan_in_fan_out"))
        return LoRAFactors(self.file.read(a_key), self.file.read(b_key), scale, transposed)

    @property
    def targets(self) -> list[str]:
        return list(self._factors)

    def close(self) -> None:
        self.file.close()
        self.base.close()


def adapter_base(folder: Path) -> Path | None:
    """The local base model an adapter names (``base_model_name_or_path``), if it exists."""
    name = read_adapter_config(folder).get("base_model_name_or_path")
    if not name:
        return None
    path = Path(name) if Path(name).is_absolute() else folder / name
    return path if path.exists() else None
