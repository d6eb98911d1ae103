"""The merge product's two passes as single fused kernels (``torch.compile``), for big stacks.

In eager torch, ``theta = offset + sum_j w_j * stack[j]`` is one operation per candidate, each
a pass over ``theta``, and a half-precision stack first converts its rows into a float32
buffer; the backward ``dL/dw_j = <dL/dtheta, stack[j]>`` is a gemv (or, for half rows,
conversions and gemvs). Inductor turns each pass into one loop that reads every row once and
converts in registers. On the 18.9M-parameter MLP of ``docs/performance.md`` (N=5, 2 threads)
the two passes take 0.65-0.85x the eager time with a float32 stack and 0.4x with bfloat16,
which brings a gate step's overhead over a plain training step under the 1.25x the
bandwidth floor that the engine issue asks for (``benchmarks/engine.py --only step``).

Compiling costs seconds (per process, candidate count and dtype; less with inductor's on-disk
cache), adds about 90 MiB to the peak (inductor's modules and kernels; the memory section
of ``docs/performance.md``), and needs a C++ compiler on CPU. So ``FitConfig.compile_merge``
decides: ``true`` compiles (an error if it cannot), ``false`` never does, and ``"auto"``
compiles on CPU for stacks of 1 GiB or more whose bytes times steps promise to repay it,
falling back to the eager kernels, with a warning, if compiling fails. Channel gates (weights
per output channel) and tensors under :data:`MIN_ELEMENTS` stay eager: their passes are
cheap, and every distinct case would be one more compiled graph.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch

from .errors import ConfigError

log = logging.getLogger("softmerge")

# Tensors smaller than this merge eagerly (a compiled call's guards cost about what they save).
MIN_ELEMENTS = 1 << 16
# "auto" compiles when stack bytes x steps reach this: about 40 ms saved per GiB and step
# against up to 8 s of compiling (both measured on 2 cores; see the module docstring); and
# only for stacks of at least AUTO_MIN_BYTES, next to which inductor's own ~90 MiB of
# resident code and kernels is small.
AUTO_BYTE_STEPS = 200 * 2**30
AUTO_MIN_BYTES = 2**30

CompileSetting = bool | Literal["auto"]


def _mix(w: torch.Tensor, rows: torch.Tensor, offset: torch.Tensor | None, out: torch.Tensor):
    acc = rows[0].to(out.dtype) * w[0]
    for j in range(1, rows.shape[0]):
        acc = acc + rows[j].to(out.dtype) * w[j]
    if offset is not None:
        acc = acc + offset.to(out.dtype)
    out.copy_(acc)


def _weight_grad(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.stack([(rows[j].to(grad.dtype) * grad).sum() for j in range(rows.shape[0])])


@functools.cache
def _compiled(name: str):
    fn = {"mix": _mix, "weight_grad": _weight_grad}[name]
    return torch.compile(fn, dynamic=True)


class FusedMerge:
    """The compiled passes for one fit; ``required`` (``compile_merge: true``) turns a failure
    to compile into an error instead of a fallback to the eager kernels."""

    def __init__(self, required: bool) -> None:
        self.required = required
        self.broken = False

    def applies(self, stack: torch.Tensor, axis: int | None) -> bool:
        return not self.broken and axis is None and stack[0].numel() >= MIN_ELEMENTS

    def mix(
        self,
        w: torch.Tensor,
        stack: torch.Tensor,
        offset: torch.Tensor | None,
        out: torch.Tensor,
    ) -> bool:
        """``out = offset + sum_j w[j] * stack[j]`` (True), or False when compiling failed."""
        flat_offset = None if offset is None else offset.reshape(-1)
        try:
            rows = stack.view(stack.shape[0], -1)
            _compiled("mix")(w.to(out.dtype), rows, flat_offset, out.view(-1))
        except Exception as exc:  # inductor raises many kinds; see _failed
            self._failed(exc)
            return False
        return True

    def weight_grad(self, stack: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """``dL/dw`` (N,) for ``grad = dL/dtheta`` in float32 (or float64), or None."""
        try:
            rows = stack.view(stack.shape[0], -1)
            return _compiled("weight_grad")(rows, grad.reshape(-1))
        except Exception as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        if self.required:
            raise ConfigError(
                f"fit.compile_merge: true, but torch.compile failed ({type(exc).__name__}: "
                f"{exc}); set compile_merge to false or auto"
            ) from exc
        self.broken = True
        log.warning(
            "torch.compile of the merge failed (%s: %s); merging with eager kernels",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )


def fused_merge(
    setting: CompileSetting, stack_bytes: int, steps: int, device: torch.device
) -> FusedMerge | None:
    """The fused passes a fit of ``steps`` steps on a stack of ``stack_bytes`` uses, or None."""
    if setting is True:
        return FusedMerge(required=True)
    big = stack_bytes >= AUTO_MIN_BYTES and stack_bytes * steps >= AUTO_BYTE_STEPS
    if setting == "auto" and device.type == "cpu" and big:
        return FusedMerge(required=False)
    return None
