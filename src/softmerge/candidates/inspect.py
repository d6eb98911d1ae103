"""``softmerge inspect``: per-candidate tensor norms and NaN/Inf counts, pairwise similarity.

Candidates are read one tensor at a time; the pairwise statistics accumulate chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .candidate import Candidate
from .validate import dtype_name

# Values per candidate per step of the pairwise pass: bounds memory at ~4 MB per candidate.
_CHUNK = 1 << 19


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
            "num_elements": sum(candidates[0].infos[k].numel for k in keys),
            "cosine": cosine,
            "l2_distance": distance,
        },
    }


def _describe(c: Candidate) -> dict[str, Any]:
    tensors = {}
    for key, info in c.infos.items():
        norm, bad = _finite_norm(c.tensor(key))
        tensors[key] = {
            "shape": list(info.shape),
            "dtype": dtype_name(info.dtype),
            "norm": norm,
            "nonfinite": bad,
        }
    c.close()
    return {
        "name": c.name,
        "source": c.source,
        "hf_folder": str(c.hf_folder) if c.hf_folder is not None else None,
        "num_tensors": len(c.infos),
        # A state dict does not say which tensors are buffers, so this counts every element.
        "num_params": sum(i.numel for i in c.infos.values()),
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
    first = candidates[0].infos
    return [
        k
        for k, t in first.items()
        if t.dtype.is_floating_point
        and all(
            k in c.infos and c.infos[k].dtype.is_floating_point and c.infos[k].shape == t.shape
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
        flats = [c.tensor(key).reshape(-1) for c in candidates]
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
