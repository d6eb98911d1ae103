"""The candidate stack sharded across the processes of a distributed run (``fit.shard_stack``).

With K ranks, rank r keeps rows ``[r*c, (r+1)*c)`` (``c = ceil(d0 / K)``, dimension 0) of every
merged tensor of every candidate: ``N * P * bytes / K`` per rank instead of ``N * P * bytes``.
The merge is linear in the stack, so each rank mixes its own rows and only the *merged* tensors
travel, never the candidates (an N-fold saving over gathering the stack itself)::

    forward   theta_rows = offset_rows + sum_j w_j * stack_rows[j]    local (the same kernel as
                                                                      CandidateStack: same bits)
              all_gather(theta_rows) -> theta, whole, on every rank   one call for every tensor
    backward  dL/dtheta (this rank's share of the data)
              reduce_scatter -> this rank's rows of the sum over ranks one call for every tensor
              dL/dw_partial = sum over my rows of stack_rows[j] * g   local
    then      the gate gradients are summed over ranks (softmerge.distributed.reduce_gradients),
              which completes the contraction over all rows.

The all-gather travels in the model's dtype when every merged tensor has the same one (casting
commutes with gathering: the same bits as casting the whole merge); gradients travel in float32.
Memory per rank: the stack's 1/K, plus one whole merged copy of the parameters and its gradient
(``docs/scaling.md``: the plan for models whose merged copy does not fit one device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .candidates import Candidate
from .distributed import _collective, _dist, collective_device, rank, world_size
from .memory import release_memory
from .stack import accumulation_dtype, mix_into, mix_weight_grad


@dataclass(frozen=True)
class RowShard:
    """Where one tensor's rows live: ``shape`` whole, ``rows`` per rank (padded), this rank's
    ``[start, stop)``, and its segment ``[offset, offset + rows * inner)`` in the flat buffers."""

    shape: tuple[int, ...]
    rows: int
    start: int
    stop: int
    offset: int

    @property
    def inner(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def length(self) -> int:
        return self.rows * self.inner


def _shards(shapes: Mapping[str, tuple[int, ...]], me: int, count: int) -> dict[str, RowShard]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        shape = shape if shape else (1,)  # a 0-d tensor is one row of one element
        rows = -(-shape[0] // count)
        start = min(me * rows, shape[0])
        stop = min(start + rows, shape[0])
        out[name] = RowShard(tuple(shape), rows, start, stop, offset)
        offset += rows * math.prod(shape[1:])
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
        own = infos[self.names[0]].dtype if self.names else torch.float32
        self.dtype = storage_dtype or (own if own.is_floating_point else torch.float32)
        self.active = list(active) if active is not None else [True] * self.count
        self.shapes = {n: tuple(infos[n].shape) for n in self.names}
        self.layout = _shards(self.shapes, self.rank, self.world)
        self.length = sum(s.length for s in self.layout.values())  # per rank, padded
        self.buffers: dict[str, torch.Tensor] = {}
        self.offset: dict[str, torch.Tensor] = {}
        names_iter = tqdm(self.names, desc="stacking (shard)", disable=not progress, leave=False)
        for name in names_iter:
            self.buffers[name] = self._rows_of(candidates, name, base)
        for c in [*candidates, *([base] if base is not None else [])]:
            c.close()
        release_memory()
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def _buffers(self, dtype: torch.dtype, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(send: this rank's rows of every tensor, receive: every rank's), in ``dtype``."""
        if reuse and self._gather is not None and self._gather[0].dtype == dtype:
            return self._gather
        device = collective_device() if _dist().get_backend() == "nccl" else self.device
        pair = (
            torch.empty(self.length, dtype=dtype, device=device),
            torch.empty(self.world * self.length, dtype=dtype, device=device),
        )
        if reuse:
            self._gather = pair
        return pair

    def release_outputs(self) -> None:
        self._gather = None


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


def _rank_blocks(flat: torch.Tensor, stack: ShardedStack, shard: RowShard) -> torch.Tensor:
    """View (K, rows, *inner) of one tensor's segment in a (K * length) rank-major buffer."""
    per_rank = flat.view(stack.world, stack.length)
    block = per_rank[:, shard.offset : shard.offset + shard.length]
    return block.view(stack.world, shard.rows, *shard.shape[1:])


class _ShardedMix(torch.autograd.Function):
    """Local mix of this rank's rows + all-gather; backward: reduce-scatter + local dL/dw."""

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
        send, receive = stack._buffers(wire, reuse)
        for name, axis, w in zip(names, axes, weights, strict=True):
            shard = stack.layout[name]
            segment = send[shard.offset : shard.offset + shard.length]
            segment = segment.view(shard.rows, *shard.shape[1:])
            local = _local_weights(w, axis, shard)
            offset = stack.offset.get(name)
            if wire == acc and segment.device == stack.device:
                mix_into(local, stack.buffers[name], axis, offset, out=segment)
            else:
                segment.copy_(mix_into(local, stack.buffers[name], axis, offset))
        _all_gather(receive, send)
        thetas = []
        for name in names:
            shard = stack.layout[name]
            blocks = _rank_blocks(receive, stack, shard)
            theta = torch.empty(shard.shape, dtype=wire, device=stack.device)
            for q, (start, stop) in enumerate(_row_ranges(shard, stack.world)):
                theta[start:stop].copy_(blocks[q, : stop - start])
            thetas.append(theta.view(stack.shapes[name]))
        return tuple(thetas)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        stack: ShardedStack = ctx.stack
        acc = accumulation_dtype(stack.dtype)
        device = collective_device() if _dist().get_backend() == "nccl" else stack.device
        send = torch.zeros(stack.world * stack.length, dtype=acc, device=device)
        for name, grad in zip(ctx.names, grads, strict=True):
            if grad is None:
                continue
            shard = stack.layout[name]
            blocks = _rank_blocks(send, stack, shard)
            whole = grad.reshape(shard.shape)
            for q, (start, stop) in enumerate(_row_ranges(shard, stack.world)):
                blocks[q, : stop - start].copy_(whole[start:stop])
        mine = torch.empty(stack.length, dtype=acc, device=device)
        _reduce_scatter(mine, send)
        mine = mine.to(stack.device)
        out = []
        for name, axis, dtype in zip(ctx.names, ctx.axes, ctx.dtypes, strict=True):
            shard = stack.layout[name]
            g = mine[shard.offset : shard.offset + shard.length].view(shard.rows, *shard.shape[1:])
            partial = mix_weight_grad(stack.buffers[name], axis, g)
            if axis == 0:  # channels are rows: this rank's rows of the (N, C) gradient
                whole = torch.zeros((stack.count, shard.shape[0]), dtype=acc, device=stack.device)
                whole[:, shard.start : shard.stop] = partial[:, : shard.stop - shard.start]
                partial = whole
            out.append(partial.to(dtype))
        return (None, None, None, None, None, *out)


def _row_ranges(shard: RowShard, world: int) -> list[tuple[int, int]]:
    """[start, stop) of every rank's rows of one tensor (the last ranks' may be empty)."""
    rows = shard.shape[0]
    return [(min(q * shard.rows, rows), min((q + 1) * shard.rows, rows)) for q in range(world)]


def _local_weights(w: torch.Tensor, axis: int | None, shard: RowShard) -> torch.Tensor:
    """The weights for this rank's rows: per-row (channel axis 0) weights are cut to its rows
    (padding rows get 0: their stack rows are 0 anyway)."""
    if axis != 0:
        return w
    local = torch.zeros((w.shape[0], shard.rows), dtype=w.dtype, device=w.device)
    local[:, : shard.stop - shard.start] = w[:, shard.start : shard.stop]
    return local
