"""The candidate stack sharded across the processes of a distributed run (``fit.shard_stack``).

With K ranks, rank r keeps rows ``[r*c, (r+1)*c)`` (``c = ceil(d0 / K)``, dimension 0) of every
merged tensor of every candidate: ``N * P * bytes / K`` per rank instead of ``N * P * bytes``.
The merge is linear in the stack, so each rank mixes its own rows and only the *merged* tensors
travel, never the candidates (an N-fold saving over gathering the stack itself)::

    forward   theta_rows = offset_rows + sum_j w_j * stack_rows[j]    local (the same kernel as
                                                                      CandidateStack: same bits)
              all_gather(theta_rows) -> theta, whole, on every rank   (one call per tensor: the
                                                                      gathered buffer is theta)
    backward  dL/dtheta (this rank's share of the data)
              reduce_scatter -> this rank's rows of the sum over ranks (one call per tensor)
              dL/dw_partial = sum over my rows of stack_rows[j] * g   local
    then      the gate gradients are summed over ranks (softmerge.distributed.reduce_gradients),
              which completes the contraction over all rows.

The all-gather travels in the model's dtype when every merged tensor has the same one (casting
commutes with gathering: the same bits as casting the whole merge); gradients travel in float32.
Memory per rank: the stack's 1/K, plus one whole merged copy of the parameters (in the model's
dtype) and its gradient, plus one tensor's float32 gradient at a time (``docs/scaling.md``, with
the plan for models whose merged copy does not fit one device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .candidates import Candidate
from .distributed import _collective, _dist, collective_device, rank, world_size
from .memory import fix_mmap_threshold, release_memory
from .stack import accumulation_dtype, mix_into, mix_weight_grad, stack_dtype


@dataclass(frozen=True)
class RowShard:
    """Where one tensor's rows live: ``shape`` whole, ``rows`` per rank (the last ranks' are
    padded with zeros), and this rank's ``[start, stop)``."""

    shape: tuple[int, ...]
    rows: int
    start: int
    stop: int

    @property
    def padded(self) -> tuple[int, ...]:
        """Shape of one rank's rows, padding included."""
        return (self.rows, *self.shape[1:])


def _shards(shapes: Mapping[str, tuple[int, ...]], me: int, count: int) -> dict[str, RowShard]:
    out = {}
    for name, shape in shapes.items():
        shape = shape if shape else (1,)  # a 0-d tensor is one row of one element
        rows = -(-shape[0] // count)
        start = min(me * rows, shape[0])
        stop = min(start + rows, shape[0])
        out[name] = RowShard(tuple(shape), rows, start, stop)
    return out


class ShardedStack:
    """The merged tensors of N candidates, this rank's rows of each (see the module docstring).

    Same interface as :class:`~softmerge.stack.CandidateStack` for what soft merging uses:
    ``buffers`` (this rank's rows, padded), ``offset``, ``mix``, ``nbytes``, ``dtype``."""

    sharded = True

    def __init__(
        self,
        candidates: Sequence[Candidate],
        names: Sequence[str],
        *,
        active: Sequence[bool] | None = None,
        base: Candidate | None = None,
        storage_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        self.names = list(names)
        self.count = len(candidates)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank, self.world = rank(), world_size()
        infos = candidates[0].infos
        self.dtype = stack_dtype(candidates, self.names, storage_dtype)
        self.active = list(active) if active is not None else [True] * self.count
        self.shapes = {n: tuple(infos[n].shape) for n in self.names}
        self.layout = _shards(self.shapes, self.rank, self.world)
        self.buffers: dict[str, torch.Tensor] = {}
        self.offset: dict[str, torch.Tensor] = {}
        self.lowrank: dict[str, object] = {}  # adapters are never sharded (context.stack)
        if self.device.type == "cpu":
            fix_mmap_threshold()  # before the heap is shaped (see softmerge.memory)
        names_iter = tqdm(self.names, desc="stacking (shard)", disable=not progress, leave=False)
        for name in names_iter:
            self.buffers[name] = self._rows_of(candidates, name, base)
        for c in [*candidates, *([base] if base is not None else [])]:
            c.close()
        release_memory()
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rows_of(
        self, candidates: Sequence[Candidate], name: str, base: Candidate | None
    ) -> torch.Tensor:
        shard = self.layout[name]
        own = shard.stop - shard.start
        buf = torch.zeros(
            (self.count, shard.rows, *shard.shape[1:]), dtype=self.dtype, device=self.device
        )
        acc = accumulation_dtype(self.dtype)
        theta0 = None
        if base is not None:
            whole = base.tensor(name).reshape(shard.shape)
            theta0 = torch.zeros((shard.rows, *shard.shape[1:]), dtype=whole.dtype)
            theta0[:own] = whole[shard.start : shard.stop]
            self.offset[name] = theta0.to(self.device)
        for j, cand in enumerate(candidates):
            if not self.active[j]:
                continue  # zeros: its weight is always 0, and 0 * NaN would still be NaN
            rows = cand.tensor(name).reshape(shard.shape)[shard.start : shard.stop]
            if theta0 is None:
                buf[j, :own].copy_(rows)
            else:  # the difference in float32: a bf16 subtraction would lose the small deltas
                buf[j, :own].copy_(rows.to(self.device, acc) - theta0[:own].to(self.device, acc))
        return buf

    # -- views -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def mix(
        self,
        weights: Mapping[str, torch.Tensor],
        axes: Mapping[str, int | None] | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        *,
        reuse: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every merged tensor whole, on every rank: ``offset + sum_j weights[name][j] *
        stack[name][j]`` (see :meth:`CandidateStack.mix`). Collective: every rank must call it
        with the same names, and call backward on the results together."""
        names = list(weights)
        axes = axes or {}
        acc = accumulation_dtype(self.dtype)
        wanted = {(dtypes or {}).get(n, acc) for n in names}
        wire = wanted.pop() if len(wanted) == 1 else acc
        thetas = _ShardedMix.apply(
            self, names, [axes.get(n) for n in names], wire, reuse, *(weights[n] for n in names)
        )
        out = {}
        for name, theta in zip(names, thetas, strict=True):
            want = (dtypes or {}).get(name)
            out[name] = theta if want is None or want == theta.dtype else theta.to(want)
        return out

    def _buffers(self, name: str, dtype: torch.dtype, reuse: bool) -> tuple[torch.Tensor, ...]:
        """(this rank's rows, every rank's rows) of one merged tensor, in ``dtype``; the second
        is the merged tensor itself (plus padding rows). ``reuse``: kept from step to step."""
        kept = self._kept.get(name)
        if reuse and kept is not None and kept[0].dtype == dtype:
            return kept
        shard = self.layout[name]
        device = collective_device() if _dist().get_backend() == "nccl" else self.device
        pair = (
            torch.empty(shard.padded, dtype=dtype, device=device),
            torch.empty((self.world * shard.rows, *shard.shape[1:]), dtype=dtype, device=device),
        )
        if reuse:
            self._kept[name] = pair
        return pair

    def release_outputs(self) -> None:
        self._kept = {}


def _all_gather(output: torch.Tensor, local: torch.Tensor) -> None:
    dist = _dist()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _collective("gathering the merged tensors"):
        gather(output, local)


def _reduce_scatter(output: torch.Tensor, full: torch.Tensor) -> None:
    dist = _dist()
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    with _collective("summing the merged tensors' gradients"):
        scatter(output, full)


class _ShardedMix(torch.autograd.Function):
    """Local mix of this rank's rows + all-gather, tensor by tensor; backward: reduce-scatter
    + local dL/dw, tensor by tensor (only one tensor's float32 gradient exists at a time)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        stack: ShardedStack,
        names: list[str],
        axes: list[int | None],
        wire: torch.dtype,
        reuse: bool,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.stack, ctx.names, ctx.axes = stack, names, axes
        ctx.dtypes = [w.dtype for w in weights]
        acc = accumulation_dtype(stack.dtype)
        thetas = []
        for name, axis, w in zip(names, axes, weights, strict=True):
            shard = stack.layout[name]
            send, receive = stack._buffers(name, wire, reuse)
            local = _local_weights(w, axis, shard)
            offset = stack.offset.get(name)
            if wire == acc and send.device == stack.device:
                mix_into(local, stack.buffers[name], axis, offset, out=send)
            else:
                send.copy_(mix_into(local, stack.buffers[name], axis, offset))
            _all_gather(receive, send)
            theta = receive[: shard.shape[0]].view(stack.shapes[name])  # rows are in order
            thetas.append(theta if theta.device == stack.device else theta.to(stack.device))
        return tuple(thetas)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        stack: ShardedStack = ctx.stack
        acc = accumulation_dtype(stack.dtype)
        device = collective_device() if _dist().get_backend() == "nccl" else stack.device
        out = []
        for name, axis, dtype, grad in zip(ctx.names, ctx.axes, ctx.dtypes, grads, strict=True):
            shard = stack.layout[name]
            full = torch.zeros(
                (stack.world * shard.rows, *shard.shape[1:]), dtype=acc, device=device
            )
            if grad is not None:
                full[: shard.shape[0]].copy_(grad.reshape(shard.shape))
            mine = torch.empty(shard.padded, dtype=acc, device=device)
            _reduce_scatter(mine, full)
            del full
            partial = mix_weight_grad(stack.buffers[name], axis, mine.to(stack.device))
            if axis == 0:  # channels are rows: this rank's rows of the (N, C) gradient
                whole = torch.zeros((stack.count, shard.shape[0]), dtype=acc, device=stack.device)
                whole[:, shard.start : shard.stop] = partial[:, : shard.stop - shard.start]
                partial = whole
            out.append(partial.to(dtype))
        return (None, None, None, None, None, *out)


def _local_weights(w: torch.Tensor, axis: int | None, shard: RowShard) -> torch.Tensor:
    """The weights for this rank's rows: per-row (channel axis 0) weights are cut to its rows
    (padding rows get 0: their stack rows are 0 anyway)."""
    if axis != 0:
        return w
    local = torch.zeros((w.shape[0], shard.rows), dtype=w.dtype, device=w.device)
    local[:, : shard.stop - shard.start] = w[:, shard.start : shard.stop]
    return local
