"""The candidates' merged tensors, stacked once into their final buffers.

A :class:`CandidateStack` holds, for every tensor the plan merges, one ``(N, *shape)`` buffer in
``storage_dtype`` on ``device``: the candidates' values (or, with a base, their task vectors
``theta_j - theta_0``). It is filled tensor by tensor straight from the candidates' readers, so no
second copy of any candidate ever exists, and it is the only copy every learning method (soft
merging, learned soup, AdaMerging) works from.

:meth:`CandidateStack.mix` is the merge product ``theta = offset + sum_j w_j * stack[j]`` for
any weights ``w`` (one per candidate, or one per candidate and output channel). It is a custom
autograd function: its backward reads the stack once more to get ``dL/dw`` and saves nothing
but ``w``, and bf16/fp16 stacks are converted to float32 chunk by chunk, so a half-precision
stack never has a float32 twin. :meth:`CandidateStack.mix_leaves` is the same product for a
training step with each merged tensor a leaf of the step's graph: its gradient becomes
``dL/dw`` the moment autograd has it, so the model's backward holds one weight gradient at a
time (the largest one is the floor of ``docs/performance.md``), not all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .candidates import Candidate
from .errors import PlanError
from .fused import FusedMerge
from .memory import fix_mmap_threshold, release_memory

log = logging.getLogger("softmerge")

# Elements of a half-precision stack converted to float32 at a time (8 MiB in all): on 2
# threads 2M-element chunks convert and add 1.6x faster than 1M (fewer thread wake-ups).
_SCRATCH = 1 << 21
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``; a non-floating dtype is a
    PlanError naming the choices."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise PlanError(f"storage_dtype must be a floating type, got {value}")
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in FLOAT_DTYPES:
        raise PlanError(
            f"storage_dtype must be a floating type ({', '.join(sorted(set(FLOAT_DTYPES)))}), "
            f"got {value!r}"
        )
    return FLOAT_DTYPES[key]


def parse_device(value: str | torch.device | None) -> torch.device | None:
    """A device that exists here, or a PlanError saying why not (``cuda`` without a GPU...)."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise PlanError(
            f"device must be a device name (cpu, cuda, cuda:1...), got {value!r}"
        ) from exc
    if device.type == "cpu" or device.type == "meta":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)
    if not available():
        raise PlanError(f"device {value!r} is not available on this machine: no {device.type}")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise PlanError(
            f"device {value!r} does not exist: this machine has {count} {device.type} device(s)"
        )
    return device


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stack_dtype(
    candidates: Sequence[Candidate], names: Sequence[str], storage_dtype: torch.dtype | None
) -> torch.dtype:
    """``storage_dtype``, else the candidates' own dtype when it is floating, else float32."""
    own = candidates[0].infos[names[0]].dtype if names else torch.float32
    return storage_dtype or (own if own.is_floating_point else torch.float32)


class _StackedMix(torch.autograd.Function):
    """theta = offset + sum_j w_j * stack[j] (w broadcast along ``axis``), accumulated in float32.

    ``out``: a buffer to write theta into (reused from step to step: a freshly allocated tensor
    of this size costs more in page faults than the arithmetic); ``scratch``: a float32 buffer
    half-precision rows are converted into, in forward and backward (one per stack: 8 MiB
    allocated and freed per tensor and step would fragment the heap). Backward reads the
    stack once more for dL/dw and saves nothing but ``w``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        w: torch.Tensor,
        stack: torch.Tensor,
        axis: int | None,
        offset: torch.Tensor | None,
        out: torch.Tensor | None,
        scratch: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.stack, ctx.axis, ctx.scratch = stack, axis, scratch
        ctx.save_for_backward(w)
        out = mix_into(w, stack, axis, offset, out, scratch)
        return out.view(out.shape)  # a view: each step's output is its own autograd tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        dw = mix_weight_grad(ctx.stack, ctx.axis, grad, ctx.scratch).to(w.dtype)
        return dw, None, None, None, None, None


def mix_into(
    w: torch.Tensor,
    stack: torch.Tensor,
    axis: int | None,
    offset: torch.Tensor | None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = offset + sum_j w[j] * stack[j]`` in the accumulation dtype (w: (N,), or (N, C)
    broadcast along ``axis``); ``out`` is allocated when None, and so is ``scratch`` (at least
    ``_SCRATCH`` elements of the accumulation dtype) when a half-precision stack needs one."""
    acc = accumulation_dtype(stack.dtype)
    w = w.to(acc)
    if out is None:
        out = torch.empty(stack.shape[1:], dtype=acc, device=stack.device)
    if axis is None:
        _weighted_rows(out.view(-1), stack.view(stack.shape[0], -1), w, offset, scratch)
    else:
        if offset is None:
            out.zero_()
        else:
            out.copy_(offset)
        for j in range(stack.shape[0]):
            out.addcmul_(stack[j].to(acc), _along(w[j], axis, out.dim()))
    return out


def mix_weight_grad(
    stack: torch.Tensor,
    axis: int | None,
    grad: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dL/dw`` of :func:`mix_into` for ``grad = dL/dout``: (N,), or (N, C) along ``axis``;
    in the accumulation dtype. Reads the stack once (half stacks in float32 chunks, converted
    into ``scratch`` when given)."""
    acc = accumulation_dtype(stack.dtype)
    grad = grad.to(acc)
    if axis is None:
        flat, g = stack.view(stack.shape[0], -1), grad.reshape(-1)
        if stack.dtype == acc:
            return torch.mv(flat, g)
        total = torch.zeros(flat.shape[0], dtype=acc, device=stack.device)
        for part, start, stop in _upcast_chunks(flat, acc, scratch):
            total += torch.mv(part, g[start:stop])
        return total
    dims = [d for d in range(grad.dim()) if d != axis]
    # (sum over an empty list of dims would reduce everything: a 1-D tensor has none)
    rows = [
        (stack[j].to(acc) * grad).sum(dim=dims) if dims else stack[j].to(acc) * grad
        for j in range(stack.shape[0])
    ]
    return torch.stack(rows)


def _weighted_rows(
    out: torch.Tensor,
    flat: torch.Tensor,
    w: torch.Tensor,
    offset: torch.Tensor | None,
    scratch: torch.Tensor | None = None,
) -> None:
    """out = offset + sum_j w[j] * flat[j], row by row (one pass over each candidate; faster
    here than mv on the (P, N) transpose; the weights stay tensors, so no device
    synchronisation). Half-precision rows are converted in column chunks into a small reused
    float32 buffer; full-precision rows go whole (smaller chunks cost more in per-operation
    thread wake-ups than they save in cache traffic: measured on 2 threads)."""
    count, total = flat.shape
    width = max(total, 1)  # (an empty tensor: one empty chunk, not a 0 step)
    if flat.dtype == out.dtype:
        scratch = None
    else:
        width = max(min(_SCRATCH, total), 1)
        scratch = _scratch(scratch, width, out.dtype, flat.device)
    for start in range(0, total, width):
        stop = min(start + width, total)
        segment = out[start:stop]
        for j in range(count):
            row = flat[j, start:stop]
            if scratch is not None:
                row = scratch[: stop - start].copy_(row)
            if j > 0:
                segment.addcmul_(row, w[j])
            elif offset is None:
                torch.mul(row, w[0], out=segment)
            else:
                segment.copy_(offset.reshape(-1)[start:stop]).addcmul_(row, w[0])


def _upcast_chunks(flat: torch.Tensor, acc: torch.dtype, scratch: torch.Tensor | None = None):
    """(chunk in ``acc``, start, stop) over the columns of ``flat`` (N, P), converted into one
    reused scratch buffer: no allocation per chunk, so a half-precision stack's steps do not
    fragment the heap, and the float32 copy never exceeds ``_SCRATCH`` elements."""
    count, total = flat.shape
    width = max(1, _SCRATCH // count)
    cols = min(width, total)
    buf = _scratch(scratch, count * cols, acc, flat.device).view(count, cols)
    for start in range(0, total, width):
        stop = min(start + width, total)
        part = buf[:, : stop - start]
        part.copy_(flat[:, start:stop])
        yield part, start, stop


def _scratch(
    given: torch.Tensor | None, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The first ``size`` elements of ``given`` when it is big enough, else a new buffer."""
    if given is not None and given.numel() >= size and given.dtype == dtype:
        return given[:size]
    return torch.empty(size, dtype=dtype, device=device)


def _cast(theta: torch.Tensor, want: torch.dtype | None) -> torch.Tensor:
    """``theta`` in the dtype the model wants (unchanged when it wants none or has it)."""
    return theta if want is None or want == theta.dtype else theta.to(want)


def _along(w: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``w`` (C,) shaped to broadcast along dimension ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return w.view(shape)


@dataclass
class LowRank:
    """LoRA factors of N adapters for one weight, concatenated along the rank (R = sum r_j):
    delta = (B * col) @ A with col[k] = w[owner[k]] * scale[k] (per output row with channel
    weights), transposed for weights stored (in, out). Autograd differentiates through it."""

    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (out, R)
    owner: torch.Tensor  # (R,) the candidate each rank row belongs to
    scale: torch.Tensor  # (R,) that candidate's alpha / r
    transposed: bool

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def columns(self, w: torch.Tensor, axis: int | None) -> torch.Tensor:
        """The factor each column of B is multiplied by: (R,) or (out, R) for channel gates."""
        if axis is None:
            return w.float()[self.owner] * self.scale
        return w.float().t()[:, self.owner] * self.scale

    def delta(self, w: torch.Tensor, axis: int | None) -> torch.Tensor:
        product = (self.b.float() * self.columns(w, axis)) @ self.a.float()
        return product.t() if self.transposed else product


class PendingWeightGrads:
    """``dL/dw`` of the leaves :meth:`CandidateStack.mix_leaves` made, gathered by their
    gradient hooks; :meth:`backward` sends them on into the weights' own graph."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.grads: list[torch.Tensor | None] = []

    def watch(
        self,
        leaf: torch.Tensor,
        w: torch.Tensor,
        weight_grad: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """On ``leaf``'s gradient g: gather ``weight_grad(g)`` (dL/dw) and free g."""
        slot = len(self.weights)
        self.weights.append(w)
        self.grads.append(None)

        def take(t: torch.Tensor) -> None:
            grad = weight_grad(t.grad).to(w.dtype)
            previous = self.grads[slot]
            self.grads[slot] = grad if previous is None else previous + grad
            t.grad = None  # the whole point: the tensor's gradient goes now

        leaf.register_post_accumulate_grad_hook(take)

    def backward(self) -> None:
        """Accumulate the gathered ``dL/dw`` into the weights' graph (once)."""
        pairs = [(w, g) for w, g in zip(self.weights, self.grads, strict=True) if g is not None]
        self.weights, self.grads = [], []
        if pairs:
            torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])


class CandidateStack:
    """Every merged tensor of N candidates in one ``(N, *shape)`` buffer each.

    ``deltas``: with a base, rows hold ``theta_j - theta_0`` and ``offset`` holds theta_0 (in its
    own dtype), so ``mix`` gives ``theta_0 + sum_j w_j tau_j``. Rows of ``inactive`` candidates
    (non-finite values) are zeros: their weight is always 0, and 0 * NaN would still be NaN."""

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
        self.dtype = stack_dtype(candidates, self.names, storage_dtype)
        self.active = list(active) if active is not None else [True] * self.count
        self.buffers: dict[str, torch.Tensor] = {}
        self.offset: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._conversion: torch.Tensor | None = None
        # Compiled merge passes for training steps (softmerge.fused), set by the fit.
        self.fused: FusedMerge | None = None
        if self.device.type == "cpu":
            fix_mmap_threshold()  # before the heap is shaped (see softmerge.memory)
        names_iter: Iterable[str] = tqdm(
            self.names, desc="stacking", disable=not progress, leave=False
        )
        adapters = bool(candidates) and all(c.is_adapter for c in candidates)
        self.lowrank: dict[str, LowRank] = {}
        for name in names_iter:
            if adapters:  # LoRA candidates: their factors, not N full-size deltas
                self.lowrank[name] = self._stack_factors(candidates, name)
            else:
                self.buffers[name] = self._stack_one(candidates, name, base)
        for c in [*candidates, *([base] if base is not None else [])]:
            c.close()
        release_memory()

    def _stack_one(
        self, candidates: Sequence[Candidate], name: str, base: Candidate | None
    ) -> torch.Tensor:
        shape = candidates[0].infos[name].shape
        buf = torch.empty((self.count, *shape), dtype=self.dtype, device=self.device)
        theta0 = None
        if base is not None:
            theta0 = base.tensor(name).to(self.device)
            self.offset[name] = theta0
        acc = accumulation_dtype(self.dtype)
        for j, cand in enumerate(candidates):
            if not self.active[j]:
                buf[j].zero_()
            elif theta0 is None:
                buf[j].copy_(cand.tensor(name))
            else:  # the difference in float32: a bf16 subtraction would lose the small deltas
                buf[j].copy_(cand.tensor(name).to(self.device, acc) - theta0.to(acc))
        return buf

    def _stack_factors(self, candidates: Sequence[Candidate], name: str) -> LowRank:
        """Every adapter's A and B for weight ``name``, concatenated along the rank; the base
        weight (the adapters' own base) becomes the offset."""
        parts = [
            c.reader.factors(name) if self.active[j] else None for j, c in enumerate(candidates)
        ]
        present = [(j, f) for j, f in enumerate(parts) if f is not None]
        base_reader = candidates[0]._inner_reader().base  # type: ignore[attr-defined]
        self.offset[name] = base_reader.read(name).to(self.device)
        shape = candidates[0].infos[name].shape
        transposed = bool(present) and present[0][1].transposed
        out_dim, in_dim = (shape[-1], shape[0]) if transposed else (shape[0], shape[-1])
        a = [f.a.to(self.device, self.dtype) for _, f in present]
        b = [f.b.to(self.device, self.dtype) for _, f in present]
        owner = [j for j, f in present for _ in range(f.rank)]
        scale = [f.scale for _, f in present for _ in range(f.rank)]
        return LowRank(
            a=torch.cat(a) if a else torch.zeros(0, in_dim, dtype=self.dtype, device=self.device),
            b=torch.cat(b, 1)
            if b
            else torch.zeros(out_dim, 0, dtype=self.dtype, device=self.device),
            owner=torch.tensor(owner, dtype=torch.long, device=self.device),
            scale=torch.tensor(scale, dtype=torch.float32, device=self.device),
            transposed=transposed,
        )

    # -- views -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        dense = sum(b.numel() * b.element_size() for b in self.buffers.values())
        return dense + sum(f.nbytes for f in self.lowrank.values())

    @property
    def names_stacked(self) -> list[str]:
        return [*self.buffers, *self.lowrank]

    def candidate(self, j: int) -> dict[str, torch.Tensor]:
        """Candidate j's merged tensors (views of the stack, plus theta_0 with a base)."""
        out = {}
        for name, buf in self.buffers.items():
            row = buf[j]
            out[name] = row + self.offset[name].to(row.dtype) if name in self.offset else row
        for name, factors in self.lowrank.items():
            w = torch.zeros(self.count, device=self.device)
            w[j] = 1.0
            out[name] = self.offset[name].float() + factors.delta(w, None)
        return out

    def mix(
        self,
        weights: Mapping[str, torch.Tensor],
        axes: Mapping[str, int | None] | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        *,
        reuse: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``theta[name] = offset + sum_j weights[name][j] * stack[name][j]`` for every name in
        ``weights``: a weight vector (N,) per tensor, or (N, C) per output channel with the
        channel dimension in ``axes[name]``. Differentiable in the weights; results in float32
        (float64 stacks: float64), cast to ``dtypes[name]`` when given.

        ``reuse``: write into buffers kept from one call to the next (training steps, whose
        results are dead by the next step); a later call overwrites what an earlier returned."""
        out = {}
        for name, w in weights.items():
            axis = (axes or {}).get(name)
            if self._per_entry(name, w, axis):
                out[name] = _cast(self._mix_entries(name, w), (dtypes or {}).get(name))
                continue
            if name in self.lowrank:
                theta = self.offset[name].float() + self.lowrank[name].delta(w, axis)
                out[name] = _cast(theta, (dtypes or {}).get(name))
                continue
            buffer = self._output(name) if reuse else None
            offset = self.offset.get(name)
            stack = self.buffers[name]
            scratch = self._scratch_for(stack)
            theta = _StackedMix.apply(w, stack, axis, offset, buffer, scratch)
            out[name] = _cast(theta, (dtypes or {}).get(name))
        return out

    def mix_leaves(
        self,
        weights: Mapping[str, torch.Tensor],
        axes: Mapping[str, int | None] | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> tuple[dict[str, torch.Tensor], PendingWeightGrads]:
        """:meth:`mix` for a training step (into the reused buffers), with each stacked tensor
        a leaf of the step's graph: the moment autograd has a tensor's gradient, a hook turns it
        into ``dL/dw`` and frees it. Autograd runs the merge's own backward only after the
        model's whole backward (its nodes were made first), so through :meth:`mix` every
        weight's gradient is alive at once; here one at a time. The returned
        :class:`PendingWeightGrads` carries the ``dL/dw`` on into the weights' graph after
        the model's backward. LoRA factors go through ordinary autograd."""
        pending = PendingWeightGrads()
        lowrank = {n: w for n, w in weights.items() if n in self.lowrank}
        out = self.mix(lowrank, axes, dtypes) if lowrank else {}
        for name, w in weights.items():
            if name in lowrank:
                continue
            axis = (axes or {}).get(name)
            entries = self._per_entry(name, w, axis)
            with torch.no_grad():
                theta = self._mix_entries(name, w) if entries else self._mix_step(name, w, axis)
                theta = _cast(theta, (dtypes or {}).get(name))
            leaf = theta.detach().requires_grad_(w.requires_grad)
            if w.requires_grad:
                grad_of = self._entry_grad(name) if entries else self._weight_grad_step(name, axis)
                pending.watch(leaf, w, grad_of)
            out[name] = leaf
        return out, pending

    def _per_entry(self, name: str, w: torch.Tensor, axis: int | None) -> bool:
        """Weights (N, *shape), one per entry (granularity unit), rather than (N,) per tensor
        or (N, C) along ``axis``."""
        return axis is None and w.dim() > 1 and name not in self.lowrank

    def _mix_entries(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``offset + sum_j w[j] * stack[j]`` with a weight per entry, by ordinary autograd
        (one float32 copy of the stack's tensor per call: meant for the small aligned models
        that granularity unit is for)."""
        stack = self.buffers[name]
        theta = (w * stack.to(accumulation_dtype(stack.dtype))).sum(0)
        offset = self.offset.get(name)
        return theta if offset is None else theta + offset

    def _entry_grad(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``dL/dtheta -> dL/dw`` for weights per entry: ``dL/dw[j] = dL/dtheta * stack[j]``."""
        stack = self.buffers[name]
        return lambda grad: grad.unsqueeze(0) * stack.to(grad.dtype)

    def _mix_step(self, name: str, w: torch.Tensor, axis: int | None) -> torch.Tensor:
        """One training step's merge of ``name`` into its reused buffer (fused when on)."""
        stack, offset, out = self.buffers[name], self.offset.get(name), self._output(name)
        fused = self.fused
        if fused is not None and fused.applies(stack, axis) and fused.mix(w, stack, offset, out):
            return out
        return mix_into(w, stack, axis, offset, out, self._scratch_for(stack))

    def _weight_grad_step(
        self, name: str, axis: int | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``dL/dtheta -> dL/dw`` for ``name`` (fused when on)."""
        stack = self.buffers[name]

        def weight_grad(grad: torch.Tensor) -> torch.Tensor:
            fused = self.fused
            if fused is not None and fused.applies(stack, axis):
                dw = fused.weight_grad(stack, grad)
                if dw is not None:
                    return dw
            return mix_weight_grad(stack, axis, grad, self._scratch_for(stack))

        return weight_grad

    def _output(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            buf = self.buffers[name]
            acc = accumulation_dtype(buf.dtype)
            self._outputs[name] = torch.empty(buf.shape[1:], dtype=acc, device=buf.device)
        return self._outputs[name]

    def _scratch_for(self, stack: torch.Tensor) -> torch.Tensor | None:
        """The float32 buffer ``stack``'s rows are converted into when it is half-precision
        (``_SCRATCH`` elements, kept until :meth:`release_outputs`); None otherwise, and while
        fused kernels merge the big tensors (the small ones then convert in small buffers)."""
        if stack.dtype == accumulation_dtype(stack.dtype):
            return None
        if self.fused is not None and not self.fused.broken:
            return None
        if self._conversion is None:
            self._conversion = torch.empty(_SCRATCH, dtype=torch.float32, device=self.device)
        return self._conversion

    def release_outputs(self) -> None:
        """Drop the reused output buffers of training steps (one merged copy's worth) and the
        conversion buffer."""
        self._outputs = {}
        self._conversion = None
