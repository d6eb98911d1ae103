"""Load, check and inspect the candidate checkpoints that softmerge merges.

Every candidate becomes a plain ``{name: tensor}`` state dict on the CPU, whatever it came from
(a safetensors file, a pickled PyTorch checkpoint, a Hugging Face model folder, a module or a
dict in memory). Loading is strict: pickles are only ever opened with ``weights_only=True``,
and every problem becomes a :class:`CandidateError` that names the file and what is wrong, so
the CLI can print it as one line. Non-finite values are counted, not rejected: the merge
engine decides what to do with such candidates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from softmerge.errors import CandidateError

logger = logging.getLogger("softmerge")

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUPPORTED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
INDEX_SUFFIX = ".index.json"
# Looked for in this order: safetensors first because it cannot execute code.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Training checkpoints often wrap the model's state dict under one of these keys.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
DDP_PREFIX = "module."
# Values per candidate per step of the pairwise pass: bounds memory at ~4 MB per candidate.
_CHUNK = 1 << 19


@dataclass
class Candidate:
    """One checkpoint to merge: its full state dict (parameters and buffers) and its origin."""

    name: str
    state: dict[str, torch.Tensor]
    source: str
    nonfinite: dict[str, int] = field(default_factory=dict)
    hf_folder: Path | None = None

    @property
    def is_finite(self) -> bool:
        return not self.nonfinite


CandidateSource: TypeAlias = (
    str | os.PathLike[str] | torch.nn.Module | Mapping[str, torch.Tensor] | Candidate
)


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or Hugging Face model folder into a CPU state dict."""
    p = Path(path)
    if p.is_dir():
        state = _read_hf_folder(p)
    elif not p.exists():
        raise CandidateError(f"{p}: no such file or folder")
    else:
        state = _read_file(p)
    return _finalize(state, str(p), copy=False)


def _read_file(p: Path) -> dict[str, Any]:
    """Dispatch on the file name: safetensors, a pickled checkpoint, or a shard index."""
    if p.name.lower().endswith(INDEX_SUFFIX):
        return _read_index(p)
    return _read_weights(p)


def _read_weights(p: Path) -> dict[str, Any]:
    """Read one weights file (also used for shards, which must not be indexes themselves)."""
    name = p.name.lower()
    if name.endswith(".safetensors"):
        return _read_safetensors(p)
    if name.endswith(PICKLE_SUFFIXES):
        return _read_pickle(p)
    raise CandidateError(
        f"{p}: unsupported file type '{p.suffix}'; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
        f"a '*{INDEX_SUFFIX}' shard index, or a Hugging Face model folder"
    )


def _read_safetensors(p: Path) -> dict[str, Any]:
    try:
        # safetensors reports any failure to open (EACCES included) as "No such file or
        # directory"; opening it here first gives the true reason.
        with open(p, "rb"):
            pass
        return load_file(str(p), device="cpu")
    except SafetensorError as exc:
        raise CandidateError(
            f"{p}: not a valid safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    except OSError as exc:
        raise CandidateError(f"{p}: cannot read: {exc.strerror or exc}") from exc


def _read_pickle(p: Path) -> dict[str, Any]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CandidateError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises many types (KeyError, EOFError...) on corrupt files
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and _is_refusal(text):
            raise CandidateError(_refused_message(p, text)) from exc
        detail = _load_error_detail(text) or type(exc).__name__
        raise CandidateError(
            f"{p}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {detail}"
        ) from exc
    state = _unwrap(obj, p)
    _require_tensors(state, str(p))
    return state


def _is_refusal(text: str) -> bool:
    """Tell "weights_only met an object it will not build" from a plain corrupt stream.

    Both raise UnpicklingError; only the first names a GLOBAL or an unallowlisted class.
    """
    return "weights only load failed" in text.lower() and (
        "GLOBAL " in text or "allowlisted" in text
    )


def _load_error_detail(text: str) -> str:
    """One informative line from torch's error; its weights-only preamble would only mislead."""
    found = re.search(r"WeightsUnpickler error:[ \t]*(\S[^\n]*)", text)
    if found:
        return found.group(1).strip()
    if "weights only load failed" in text.lower():
        return "not a valid pickle stream"
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # torch appends advice sentences to some errors ("This is an internal miniz error. If...").
    return re.split(r"(?<=[a-z)])\. (?=[A-Z])", line, maxsplit=1)[0]


def _refused_message(p: Path, detail: str) -> str:
    found = re.search(r"GLOBAL (\S+)", detail)
    what = f" (it references {found.group(1)})" if found else ""
    return (
        f"{p}: refused to load: the pickle contains non-tensor objects that could execute code "
        f"when loaded{what}. Only plain tensor state dicts are accepted; if you trust the file, "
        f"load it yourself and save the state dict with safetensors.torch.save_file"
    )


def _unwrap(obj: Any, p: Path) -> Mapping[str, Any]:
    """Return the model's state dict from a bare state dict or a training-checkpoint wrapper."""
    if not isinstance(obj, Mapping):
        raise CandidateError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    # Count only keys whose value really is a state dict, so {"model": "resnet18", ...} works.
    wrapped = [k for k in WRAPPER_KEYS if k in obj and _is_tensor_dict(obj[k])]
    if len(wrapped) == 1:
        return obj[wrapped[0]]
    if len(wrapped) > 1:
        raise CandidateError(
            f"{p}: ambiguous checkpoint: keys {wrapped} all hold state dicts; "
            "save the model's state dict on its own"
        )
    return obj


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _read_hf_folder(folder: Path) -> dict[str, Any]:
    for fname in HF_WEIGHT_FILES:
        if (folder / fname).is_file():
            return _read_file(folder / fname)
    present = sorted(
        f.name for f in folder.iterdir() if f.name.lower().endswith(SUPPORTED_SUFFIXES)
    )
    hint = f" (it has: {', '.join(present[:5])}{', ...' * (len(present) > 5)})" if present else ""
    raise CandidateError(
        f"{folder}: no model weights found in folder; looked for {', '.join(HF_WEIGHT_FILES)}{hint}"
    )


def _read_index(index: Path) -> dict[str, Any]:
    """Load every shard a ``*.index.json`` names and check each listed tensor is in its shard."""
    weight_map = _read_weight_map(index)
    state: dict[str, Any] = {}
    for shard in dict.fromkeys(weight_map.values()):
        part = _read_weights(_shard_path(index, shard))
        listed = [k for k, s in weight_map.items() if s == shard]
        missing = [k for k in listed if k not in part]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CandidateError(
                f"{index}: tensor '{missing[0]}' is listed in weight_map for shard '{shard}' "
                f"but that shard does not contain it{more}"
            )
        clash = next((k for k in part if k in state), None)
        if clash is not None:
            raise CandidateError(f"{index}: tensor '{clash}' appears in more than one shard")
        state.update(part)
    return state


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CandidateError(f"{index}: cannot read shard index: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CandidateError(
            f"{index}: shard index has no 'weight_map' mapping tensor names to shard files"
        )
    return weight_map


def _shard_path(index: Path, shard: str) -> Path:
    # A shard name must stay inside the index's folder: the index is untrusted input.
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise CandidateError(f"{index}: shard '{shard}' points outside the index's folder")
    path = index.parent / shard
    if not path.is_file():
        raise CandidateError(f"{index}: shard '{shard}' listed in weight_map is missing")
    return path


# --------------------------------------------------------------------------- normalising


def _require_tensors(state: Mapping[Any, Any], origin: str) -> None:
    """Reject non-string keys and anything but dense tensors, naming the offending key."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise CandidateError(f"{origin}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CandidateError(
                f"{origin}: key '{key}' holds a {type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided:
            raise CandidateError(f"{origin}: tensor '{key}' is {value.layout}; only dense tensors")
        if value.is_meta:
            raise CandidateError(f"{origin}: tensor '{key}' is on the meta device and has no data")


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DistributedDataParallel adds, but only if every key has it."""
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def _finalize(state: Mapping[Any, Any], origin: str, *, copy: bool) -> dict[str, torch.Tensor]:
    """Check, strip ``module.`` and make every tensor CPU, detached and contiguous.

    ``copy`` forces fresh storage, for tensors the caller still owns (modules, dicts in memory),
    so later in-place changes on either side cannot leak into the other.
    """
    if not state:
        raise CandidateError(f"{origin}: state dict is empty (no tensors)")
    _require_tensors(state, origin)
    owned = {k: _own(v, copy=copy) for k, v in state.items()}
    return _strip_ddp_prefix(owned)


def _own(t: torch.Tensor, *, copy: bool) -> torch.Tensor:
    return t.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=copy)


def count_nonfinite(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Count NaN/Inf values per floating (or complex) tensor; only tensors with some are listed."""
    counts: dict[str, int] = {}
    for key, t in state.items():
        if t.is_floating_point() or t.is_complex():
            n = t.numel() - int(torch.isfinite(t).sum())
            if n:
                counts[key] = n
    return counts


# --------------------------------------------------------------------------- loading candidates


def load_candidate(source: CandidateSource, name: str | None = None) -> Candidate:
    """Load one candidate from a path, module, tensor mapping or existing Candidate."""
    return _load_one(source, name if name is not None else _default_name(source, 0))


def _load_one(source: CandidateSource, name: str) -> Candidate:
    if isinstance(source, Candidate):
        # Re-check and recount: a hand-built Candidate may carry a stale or empty ``nonfinite``.
        state = _finalize(source.state, source.source, copy=False)
        return dataclasses.replace(source, name=name, state=state, nonfinite=count_nonfinite(state))
    if isinstance(source, torch.nn.Module):
        origin = f"<memory:{name}>"
        state = _finalize(source.state_dict(), origin, copy=True)
        return Candidate(name, state, origin, count_nonfinite(state))
    if isinstance(source, Mapping):
        origin = f"<memory:{name}>"
        state = _finalize(source, origin, copy=True)
        return Candidate(name, state, origin, count_nonfinite(state))
    if isinstance(source, (str, os.PathLike)):
        state = read_state_dict(source)
        folder = Path(source) if Path(source).is_dir() else None
        return Candidate(name, state, os.fspath(source), count_nonfinite(state), folder)
    raise CandidateError(
        f"cannot load a candidate from a {type(source).__name__}; "
        "give a file or folder path, an nn.Module, a dict of tensors or a Candidate"
    )


def _default_name(source: CandidateSource, index: int) -> str:
    """File stem, folder name, the Candidate's own name, or ``candidate{index}`` for memory."""
    if isinstance(source, Candidate):
        return source.name
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return p.resolve().name or str(p)
        if p.name.lower().endswith(INDEX_SUFFIX):  # model.safetensors.index.json -> model
            return Path(p.name[: -len(INDEX_SUFFIX)]).stem
        return p.stem
    return f"candidate{index}"


def _describe_source(source: CandidateSource, name: str) -> str:
    if isinstance(source, Candidate):
        return source.source
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<memory:{name}>"


def load_candidates(
    sources: Sequence[CandidateSource],
    names: Sequence[str] | None = None,
    *,
    min_count: int = 2,
) -> list[Candidate]:
    """Load and validate all candidates; names are unique (auto names get ``-1``, ``-2``...)."""
    if isinstance(sources, (str, os.PathLike, Mapping, torch.nn.Module, Candidate)):
        raise CandidateError("sources must be a list of candidates, not a single one")
    sources = list(sources)
    final_names = _choose_names(sources, names)
    if len(sources) < min_count:
        got = ", ".join(_describe_source(s, n) for s, n in zip(sources, final_names, strict=True))
        raise CandidateError(
            f"need at least {min_count} candidates to merge, got {len(sources)}"
            + (f": {got}" if got else "")
        )
    candidates = [_load_one(s, n) for s, n in zip(sources, final_names, strict=True)]
    validate_candidates(candidates)
    return candidates


def _choose_names(sources: Sequence[CandidateSource], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return _dedupe([_default_name(s, i) for i, s in enumerate(sources)])
    names = list(names)
    if len(names) != len(sources):
        raise CandidateError(f"got {len(names)} names for {len(sources)} candidates")
    if any(not isinstance(n, str) or not n for n in names):
        raise CandidateError(f"candidate names must be non-empty strings, got {names}")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise CandidateError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
    return names


def _dedupe(names: list[str]) -> list[str]:
    """Number every repeated name ``name-1``, ``name-2``..., skipping names already taken."""
    counts = Counter(names)
    taken = set(names)
    last: Counter[str] = Counter()
    out = []
    for n in names:
        if counts[n] == 1:
            out.append(n)
            continue
        k = last[n] + 1
        while f"{n}-{k}" in taken:
            k += 1
        last[n] = k
        taken.add(f"{n}-{k}")
        out.append(f"{n}-{k}")
    return out


# --------------------------------------------------------------------------- validation


def validate_candidates(candidates: Sequence[Candidate]) -> None:
    """Raise CandidateError unless names are unique and all agree on keys, shapes and dtypes.

    Each check runs over all candidates (each against the first) before the next starts, so
    the most basic mismatch is reported first. Non-finite values only log a warning: the
    merge engine, not loading, decides what to do with such candidates.
    """
    dupes = sorted(n for n, c in Counter(c.name for c in candidates).items() if c > 1)
    if dupes:
        raise CandidateError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
    if candidates:
        ref = candidates[0]
        for check in (_check_keys, _check_shapes, _check_dtypes):
            for other in candidates[1:]:
                check(ref, other)
    for c in candidates:
        _warn_nonfinite(c)


def _check_keys(a: Candidate, b: Candidate) -> None:
    only_a, only_b = a.state.keys() - b.state.keys(), b.state.keys() - a.state.keys()
    if not only_a and not only_b:
        return
    key = min(only_a | only_b)
    has, lacks = (a, b) if key in only_a else (b, a)
    raise CandidateError(
        f"{b.source} and {a.source} have different tensors: '{key}' is in {has.source} "
        f"but not in {lacks.source} ({len(only_a)} only in {a.source}, "
        f"{len(only_b)} only in {b.source})"
    )


def _check_shapes(a: Candidate, b: Candidate) -> None:
    for key in sorted(a.state):
        sa, sb = tuple(a.state[key].shape), tuple(b.state[key].shape)
        if sa != sb:
            raise CandidateError(
                f"{b.source}: tensor '{key}' has shape {sb} but {a.source} has {sa}"
            )


def _check_dtypes(a: Candidate, b: Candidate) -> None:
    for key in sorted(a.state):
        da, db = a.state[key].dtype, b.state[key].dtype
        if da != db:
            raise CandidateError(
                f"{b.source}: tensor '{key}' has dtype {_dtype_name(db)} "
                f"but {a.source} has {_dtype_name(da)}"
            )


def _warn_nonfinite(c: Candidate) -> None:
    if c.is_finite:
        return
    shown = ", ".join(f"'{k}' ({n})" for k, n in list(c.nonfinite.items())[:5])
    more = f" and {len(c.nonfinite) - 5} more" if len(c.nonfinite) > 5 else ""
    logger.warning(
        "%s: candidate '%s' has non-finite values (NaN/Inf) in %d tensor(s): %s%s",
        c.source,
        c.name,
        len(c.nonfinite),
        shown,
        more,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- inspection


def inspect_candidates(candidates: Sequence[Candidate]) -> dict[str, Any]:
    """Summarise each candidate and compare them pairwise; the result is JSON-serialisable.

    The pairwise cosine similarity and L2 distance run over every floating tensor that all
    candidates share with one shape, flattened; a position is skipped for a pair when either
    value is NaN/Inf. Undefined cosines (a zero vector) are ``None``.
    """
    keys = _common_float_keys(candidates)
    cosine, distance = _pairwise(candidates, keys)
    return {
        "candidates": [_describe(c) for c in candidates],
        "pairwise": {
            "names": [c.name for c in candidates],
            "num_elements": sum(candidates[0].state[k].numel() for k in keys) if keys else 0,
            "cosine": cosine,
            "l2_distance": distance,
        },
    }


def _describe(c: Candidate) -> dict[str, Any]:
    tensors = {}
    for key, t in c.state.items():
        norm, bad = _finite_norm(t)
        tensors[key] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "norm": norm,
            "nonfinite": bad,
        }
    return {
        "name": c.name,
        "source": c.source,
        "hf_folder": str(c.hf_folder) if c.hf_folder is not None else None,
        "num_tensors": len(c.state),
        # A state dict does not say which tensors are buffers, so this counts every element.
        "num_params": sum(t.numel() for t in c.state.values()),
        "nonfinite_total": sum(v["nonfinite"] for v in tensors.values()),
        "tensors": tensors,
    }


def _finite_norm(t: torch.Tensor) -> tuple[float, int]:
    """L2 norm over the finite values (float64) and how many values were not finite."""
    x = (t.abs() if t.is_complex() else t).detach().to(torch.float64)
    finite = torch.isfinite(x)
    bad = x.numel() - int(finite.sum())
    values = x[finite] if bad else x
    return float(torch.linalg.vector_norm(values)), bad


def _common_float_keys(candidates: Sequence[Candidate]) -> list[str]:
    if not candidates:
        return []
    first = candidates[0].state
    return [
        k
        for k, t in first.items()
        if t.is_floating_point()
        and all(
            k in c.state and c.state[k].is_floating_point() and c.state[k].shape == t.shape
            for c in candidates
        )
    ]


def _pairwise(
    candidates: Sequence[Candidate], keys: list[str]
) -> tuple[list[list[float | None]], list[list[float]]]:
    """Pairwise cosine and L2 distance in float64, accumulated chunk by chunk.

    Per pair (i, j) only positions finite in both count. Cosine comes from Gram matrices:
    cos_ij = dot_ij / sqrt(S_ij S_ji) with S_ij = sum x_i^2 over positions finite in x_j.
    Distances sum (x_i - x_j)^2 directly rather than S_ij + S_ji - 2 dot_ij, whose difference
    of two large norms would blur near-identical candidates (and not give 0 for equal ones).
    """
    n = len(candidates)
    stats = _PairStats(n)
    for key in keys:
        flats = [c.state[key].reshape(-1) for c in candidates]
        for start in range(0, flats[0].numel(), _CHUNK):
            stats.add(torch.stack([f[start : start + _CHUNK] for f in flats]).to(torch.float64))
    left, right = stats.pairs
    dist = torch.zeros(n, n, dtype=torch.float64)
    dist[left, right] = dist[right, left] = stats.pair_d2.sqrt()
    return _cosine_matrix(stats.dot, stats.sq), dist.tolist()


class _PairStats:
    """Running sums for :func:`_pairwise`: dot products, masked squared norms, distances."""

    def __init__(self, n: int) -> None:
        self.pairs = torch.triu_indices(n, n, offset=1)  # pdist's order: (0,1), (0,2)...
        self.dot = torch.zeros(n, n, dtype=torch.float64)
        self.sq = torch.zeros(n, n, dtype=torch.float64)
        self.pair_d2 = torch.zeros(self.pairs.shape[1], dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Add one (n, chunk) block; the masked path only runs for blocks with NaN/Inf."""
        finite = torch.isfinite(x)
        if bool(finite.all()):
            gram = x @ x.T
            self.dot += gram
            self.sq += gram.diagonal()[:, None]
            if len(x) > 1:
                self.pair_d2 += torch.pdist(x).square()
            return
        m = finite.to(torch.float64)
        x = torch.where(finite, x, 0.0)
        self.dot += x @ x.T
        self.sq += (x * x) @ m.T
        for p, (i, j) in enumerate(self.pairs.T.tolist()):
            d = (x[i] - x[j]) * (m[i] * m[j])
            self.pair_d2[p] += torch.dot(d, d)


def _cosine_matrix(dot: torch.Tensor, sq: torch.Tensor) -> list[list[float | None]]:
    n = dot.shape[0]
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            denom = math.sqrt(float(sq[i, j]) * float(sq[j, i]))
            if denom > 0:
                out[i][j] = 1.0 if i == j else max(-1.0, min(1.0, float(dot[i, j]) / denom))
    return out


# --------------------------------------------------------------------------- text report

_WIDTH = 100


def format_inspect(report: dict[str, Any]) -> str:
    """Render an :func:`inspect_candidates` report as plain text for a 100-column terminal."""
    cands = report["candidates"]
    labels = _column_labels([c["name"] for c in cands])
    sections = [
        _format_summary(cands, labels),
        _format_tensor_table(cands, labels),
        _format_matrix(
            f"Pairwise cosine similarity (over {report['pairwise']['num_elements']:,} "
            "floating values, NaN/Inf skipped):",
            labels,
            report["pairwise"]["cosine"],
            lambda v: "n/a" if v is None else f"{v:.6f}",
        ),
        _format_matrix(
            "Pairwise L2 distance:", labels, report["pairwise"]["l2_distance"], lambda v: f"{v:.4g}"
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _column_labels(names: list[str]) -> list[str]:
    """Candidate names as column headers, or ``#i`` when some name is too long for a column."""
    if all(len(n) <= 12 for n in names):
        return list(names)
    return [f"#{i}" for i in range(len(names))]


def _format_summary(cands: list[dict[str, Any]], labels: list[str]) -> str:
    lines = [f"Candidates ({len(cands)}):"]
    name_w = max((len(c["name"]) for c in cands), default=4)
    for i, c in enumerate(cands):
        tag = f"#{i}" if labels[i] != c["name"] else ""
        bad = c["nonfinite_total"]
        flag = f"  NON-FINITE: {bad:,} values" if bad else ""
        head = (
            f"  {tag:>3} {c['name']:<{name_w}}  {c['num_tensors']:>5} tensors "
            f"{c['num_params']:>13,} params{flag}  "
        )
        lines.append(head + _clip_left(c["source"], max(12, _WIDTH - len(head))))
    return "\n".join(lines)


def _format_tensor_table(cands: list[dict[str, Any]], labels: list[str]) -> str:
    keys = list(dict.fromkeys(k for c in cands for k in c["tensors"]))
    rows = []
    for key in keys:
        info = next(c["tensors"][key] for c in cands if key in c["tensors"])
        cells = [_norm_cell(c["tensors"].get(key)) for c in cands]
        rows.append([key, _shape_text(info["shape"]), info["dtype"], *cells])
    header = ["tensor", "shape", "dtype", *labels]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rest = sum(widths[1:]) + 2 * (len(widths) - 1)
    widths[0] = min(widths[0], max(16, _WIDTH - rest))
    lines = ['Tensor L2 norms (finite values only; "!N" marks N NaN/Inf values):']
    for row in [header, *rows]:
        row = [_clip_left(row[0], widths[0]), *row[1:]]
        left = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}", f"{row[2]:<{widths[2]}}"]
        right = [f"{cell:>{w}}" for cell, w in zip(row[3:], widths[3:], strict=True)]
        lines.append("  ".join(left + right).rstrip())
    return "\n".join(lines)


def _norm_cell(info: dict[str, Any] | None) -> str:
    if info is None:
        return "-"
    text = f"{info['norm']:.4g}"
    return f"{text}!{info['nonfinite']}" if info["nonfinite"] else text


def _format_matrix(title: str, labels: list[str], matrix: list[list[Any]], fmt: Any) -> str:
    cells = [[fmt(v) for v in row] for row in matrix]
    w = max([len(x) for x in labels] + [len(x) for row in cells for x in row] + [1])
    lw = max((len(x) for x in labels), default=1)
    lines = [title, " " * lw + "".join(f"  {x:>{w}}" for x in labels)]
    for label, row in zip(labels, cells, strict=True):
        lines.append(f"{label:<{lw}}" + "".join(f"  {x:>{w}}" for x in row))
    return "\n".join(lines)


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def _clip_left(text: str, width: int) -> str:
    """Keep the end of long names/paths: it is the distinctive part (layer, file name)."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


# --------------------------------------------------------------------------- candidates vs model


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def check_fits_model(cand: Candidate, model: torch.nn.Module) -> None:
    """Raise CandidateError unless ``cand`` has the model's keys, shapes and kinds of dtype
    (a float16 checkpoint fits a float32 model; an integer tensor for a float one does not)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(cand.state))
    extra = sorted(set(cand.state) - set(expected))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has unexpected key '{extra[0]}'"
        raise CandidateError(
            f"{cand.source}: checkpoint does not fit the model: it {what} "
            f"({len(missing)} missing, {len(extra)} unexpected keys)"
        )
    for key, ref in expected.items():
        got = cand.state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CandidateError(
                f"{cand.source}: tensor '{key}' has shape {tuple(got.shape)} "
                f"but the model expects {tuple(ref.shape)}"
            )
        if _dtype_kind(got.dtype) != _dtype_kind(ref.dtype):
            raise CandidateError(
                f"{cand.source}: tensor '{key}' has dtype {_dtype_name(got.dtype)} but the "
                f"model expects {_dtype_name(ref.dtype)} ({_dtype_kind(ref.dtype)} values)"
            )


def split_base(
    candidates: list[Candidate], wanted: CandidateSource
) -> tuple[Candidate, list[Candidate]]:
    """theta_0 of task vectors: a candidate's name (it leaves the pool) or a checkpoint."""
    if isinstance(wanted, str) and wanted in {c.name for c in candidates}:
        base = next(c for c in candidates if c.name == wanted)
        return base, [c for c in candidates if c.name != wanted]
    base = load_candidate(wanted, name="base")
    validate_candidates([candidates[0], base])  # same keys, shapes, dtypes
    if not base.is_finite:
        raise CandidateError(f"{base.source}: the base model has non-finite values")
    return base, candidates
