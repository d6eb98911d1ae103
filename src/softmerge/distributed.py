"""Gate training on several processes (and machines) with torch.distributed, launched by torchrun.

Data parallel, the way softmerge does it::

    every rank:  same loader (same data, same shuffle seed) -> the same global batch
                 shard_batch(batch): a contiguous share of its samples (torch.tensor_split)
                 same gate noise (a CPU generator seeded identically on every rank)
                 backward of  w_r * mean loss of its share      (w_r: samples, or tokens)
    all-reduce:  [sum_r w_r * grad_r, sum_r w_r, sum_r w_r * loss_r]   (one call, float64)
    every rank:  grad = sum_r w_r grad_r / sum_r w_r  ==  the gradient of the global batch's
                 mean loss, what one process computes on the whole batch

``w_r`` is the objective's own weight of the share (:meth:`Objective.weight`): the number of
samples for a classifier, the number of predicted tokens for a causal language model (whose loss
is a mean over tokens), so the reduction is exact for every built-in objective. Scoring,
candidate ranking and BatchNorm re-estimation share out *whole* batches (batch ``i`` goes to
rank ``i % K``: a BatchNorm layer in training mode sees the same batch as in one process) and
sum their totals across ranks, so every rank gets the same numbers. Rank 0 alone writes
(checkpoints, outputs); the other ranks wait for it at the end (:func:`writing`,
:func:`wait_for_writer`) and learn whether it succeeded.

A lost peer ends the run: under torchrun the agent stops every rank as soon as one exits with an
error or is killed; a collective whose peer has gone raises :class:`DistributedError`; a peer that
hangs is given up on after the process group's timeout (``SOFTMERGE_DIST_TIMEOUT`` seconds,
default 600, or ``init_from_env(timeout=...)``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError, DistributedError

log = logging.getLogger("softmerge")

ENV_TIMEOUT = "SOFTMERGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for a peer that neither answers nor exits
# How long the other ranks wait for rank 0 to evaluate and write the outputs (a 70B model's
# safetensors take minutes): a separate gloo group, so the main group's timeout stays short.
WRITER_TIMEOUT = datetime.timedelta(hours=24)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------
# Who am I


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """A process group with more than one process is initialised: collectives are needed."""
    return is_initialized() and _dist().get_world_size() > 1


def launched_by_torchrun() -> bool:
    """The environment describes a process group (torchrun, or any launcher setting RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    return all(k in os.environ for k in _TORCHRUN_VARS)


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's environment, else 0."""
    if is_initialized():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def world_size() -> int:
    if is_initialized():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_writer() -> bool:
    """Rank 0 writes checkpoints and outputs; the other ranks write nothing."""
    return rank() == 0


def timeout_from_env() -> datetime.timedelta:
    text = os.environ.get(ENV_TIMEOUT)
    if text is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        seconds = float(text)
        if not 0 < seconds < 1e9:  # (nan and inf included: timedelta cannot hold them)
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{ENV_TIMEOUT}={text!r}: expected a positive number of seconds"
        ) from None
    return datetime.timedelta(seconds=seconds)


_OWN_GROUP = False  # whether init_from_env created the group (and shutdown destroys it)


def init_from_env(
    device: str | torch.device | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> torch.device:
    """Join the process group torchrun describes in the environment; returns this rank's device.

    Backend: ``nccl`` when ``device`` is a CUDA device (each rank then runs on
    ``cuda:LOCAL_RANK``), ``gloo`` otherwise. ``timeout`` (seconds; default
    ``$SOFTMERGE_DIST_TIMEOUT`` or 600) bounds how long a collective waits for a silent peer.
    A group initialised already (by the caller) is used as it is."""
    global _OWN_GROUP
    want = torch.device(device) if device is not None else torch.device("cpu")
    if want.type == "cuda":
        want = torch.device("cuda", local_rank())
        torch.cuda.set_device(want)
    if is_initialized():
        return want
    if not launched_by_torchrun():
        missing = ", ".join(k for k in _TORCHRUN_VARS if k not in os.environ)
        raise ConfigError(
            f"no process group to join: {missing} not set; launch with torchrun "
            "(torchrun --nproc-per-node K -m softmerge merge cfg.yaml) or softmerge merge "
            "--nproc-per-node K"
        )
    if timeout is None:
        span = timeout_from_env()
    elif isinstance(timeout, datetime.timedelta):
        span = timeout
    else:
        span = datetime.timedelta(seconds=float(timeout))
    backend = "nccl" if want.type == "cuda" else "gloo"
    _dist().init_process_group(backend=backend, timeout=span)
    _OWN_GROUP = True
    return want


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    global _OWN_GROUP, _CONTROL
    if _OWN_GROUP and is_initialized():
        _dist().destroy_process_group()
    _OWN_GROUP, _CONTROL = False, None


# ---------------------------------------------------------------------------------------------
# Collectives, with one clear error when a peer has gone


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and gloo/nccl failures
        line = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        # gloo's "[.../pair.cc:553] Connection closed by peer [...]. This is typically...":
        # the first sentence, without the source location.
        detail = re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]
        raise DistributedError(
            f"{what} failed: another process failed, was killed or stopped answering (see its "
            f"own message): {detail}"
        ) from exc


def collective_device() -> torch.device:
    """Where tensors must be for the default group's collectives (CUDA for nccl)."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``min`` or ``max``) on the default group, moving the tensor
    to the backend's device and back when needed."""
    dist = _dist()
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    device = collective_device()
    work = tensor if tensor.device == device else tensor.to(device)
    with _collective("all_reduce"):
        dist.all_reduce(work, op=reduce_op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """True on every rank iff ``flag`` is true on every rank (a step is skipped by all or none)."""
    value = flag.detach().to(torch.int32).reshape(1).clone()
    all_reduce_(value, "min")
    return value[0] > 0


def sum_across(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64); the same list on every rank."""
    if not is_distributed():
        return [float(v) for v in values]
    pack = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return [float(v) for v in all_reduce_(pack)]


def barrier(what: str = "barrier") -> None:
    if is_distributed():
        with _collective(what):
            _dist().barrier()


# ---------------------------------------------------------------------------------------------
# Sharing out the data


def _leading(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value
    if isinstance(value, Mapping):
        return next((t for v in value.values() if (t := _leading(v)) is not None), None)
    if isinstance(value, (list, tuple)):
        return next((t for v in value if (t := _leading(v)) is not None), None)
    return None


def shard_batch(batch: Any, index: int | None = None, count: int | None = None) -> Any:
    """Rank ``index``'s contiguous share of a batch (default: this rank's): every tensor whose
    first dimension is the batch's size is cut with ``torch.tensor_split`` (the first ``B % K``
    ranks get one sample more); other values are kept whole. Dicts, tuples, lists and bare
    tensors keep their form. A batch with fewer samples than ranks is a DataError."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if count == 1:
        return batch
    first = _leading(batch)
    if first is None:
        return batch
    size = int(first.shape[0])
    if size < count:
        raise DataError(
            f"a merge batch of {size} sample(s) cannot be shared by {count} processes: use a "
            f"batch size of at least {count} (data.batch_size)"
        )

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() > 0 and value.shape[0] == size:
                return torch.tensor_split(value, count)[index]
            return value
        if isinstance(value, Mapping):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cut(v) for v in value)
        return value

    return cut(batch)


def my_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """This rank's whole batches: batch ``i`` goes to rank ``i % K`` (all batches without a
    process group). Every rank still iterates the loader, so its shuffle stays in step."""
    count, me = world_size(), rank()
    for i, batch in enumerate(batches):
        if not is_distributed() or i % count == me:
            yield batch


def batch_digest(batch: Any) -> int:
    """A 63-bit hash of a batch's tensors (shapes, dtypes and bytes)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for k in sorted(value, key=str):
                digest.update(str(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                feed(v)

    feed(batch)
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def check_same_batches(batch: Any) -> None:
    """DataError on every rank unless every rank's loader gave this same (first) batch: each
    rank must iterate the same global batches (it takes its own share of each)."""
    if not is_distributed():
        return
    mine = batch_digest(batch)
    low = all_reduce_(torch.tensor([mine], dtype=torch.int64), "min")
    high = all_reduce_(torch.tensor([mine], dtype=torch.int64), "max")
    if int(low[0]) != int(high[0]):
        raise DataError(
            "the merge loader yields different batches on different processes: give every "
            "process the same data, batch size and shuffle seed (softmerge shares out each "
            "batch itself; do not use a DistributedSampler)"
        )


# ---------------------------------------------------------------------------------------------
# Gradients


def reduce_gradients(
    params: Sequence[nn.Parameter], weight: float, sums: Sequence[float] = ()
) -> tuple[float, list[float]]:
    """Average the gradients of ``weight * loss_r`` over the ranks, weighted: afterwards every
    parameter's ``.grad`` is ``sum_r grad_r / sum_r weight_r`` on every rank. ``sums`` (e.g.
    ``weight * task_loss``) travel in the same call. Returns the total weight and the summed
    ``sums``. Parameters without a gradient (the same on every rank) are left alone."""
    grads = [p.grad for p in params if p.grad is not None]
    extras = torch.tensor([float(weight), *map(float, sums)], dtype=torch.float64)
    pack = torch.cat([*(g.detach().reshape(-1).cpu().double() for g in grads), extras])
    all_reduce_(pack)
    tail = pack[-len(extras) :]
    total = float(tail[0])
    if not total > 0:
        raise DataError(
            "a merge batch has nothing to learn from on any process (weight 0: every label "
            "-100 or masked out?); check the data's labels and attention_mask"
        )
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_((pack[offset : offset + n] / total).view(g.shape))
        offset += n
    return total, [float(v) for v in tail[1:]]


# ---------------------------------------------------------------------------------------------
# BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any]) -> bool:
    """:func:`softmerge.evaluation.recalibrate_batchnorm` shared out: each rank runs its whole
    batches, then every BatchNorm's running mean and variance are averaged over the ranks,
    weighted by their batch counts: the cumulative average one process takes over every batch."""
    from .evaluation import recalibrate_batchnorm as recalibrate

    if not is_distributed():
        return recalibrate(model, loader)
    found = recalibrate(model, my_batches(loader))
    if not found:
        return False
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    parts = []
    for m in bns:
        count = m.num_batches_tracked.double()
        parts += [m.running_mean.double() * count, m.running_var.double() * count, count.view(1)]
    pack = all_reduce_(torch.cat([p.reshape(-1).cpu() for p in parts]))
    offset = 0
    for m in bns:
        c = m.running_mean.numel()
        mean, var = pack[offset : offset + c], pack[offset + c : offset + 2 * c]
        total = pack[offset + 2 * c]
        offset += 2 * c + 1
        if total > 0:
            m.running_mean.copy_(mean / total)
            m.running_var.copy_(var / total)
        m.num_batches_tracked.fill_(int(total))
    return True


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(grad.contiguous().clone())


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the *global* batch (the shares of
    every rank together), as one process would see it; eval mode is plain BatchNorm. Used only
    for gate-training steps, where every rank runs one forward per step."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.running_mean is None) or not is_distributed():
            return super().forward(input)
        x = input.float()
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        # Two passes (mean, then squared deviations), as torch does: no cancellation.
        first = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        total = first[-1]
        mean = first[:-1] / total
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / total
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def with_global_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no BatchNorm, else a weightless copy whose BatchNorm layers
    normalise with the global batch's statistics (same names, parameters and buffers)."""
    from .evaluation import has_batchnorm, skeleton

    if not has_batchnorm(model):
        return model
    copy = skeleton(model)
    for module in copy.modules():
        kind = type(module)
        # Only the stock layers (BatchNorm1d/2d/3d): a subclass may normalise differently.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and kind.forward is (
            nn.modules.batchnorm._BatchNorm.forward
        ):
            if kind not in _GLOBAL_KINDS:
                _GLOBAL_KINDS[kind] = type(f"Global{kind.__name__}", (_GlobalBatchNorm, kind), {})
            module.__class__ = _GLOBAL_KINDS[kind]
    return copy


_GLOBAL_KINDS: dict[type, type] = {}


# ---------------------------------------------------------------------------------------------
# Checkpoints and outputs: one writer


def _broadcast_bytes(data: bytes | None, what: str) -> bytes:
    """Rank 0's bytes on every rank (``data`` is ignored elsewhere)."""
    dist = _dist()
    device = collective_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    with _collective(what):
        dist.broadcast(size, src=0)
        buf = torch.empty(int(size[0]), dtype=torch.uint8, device=device)
        if rank() == 0 and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes()


def load_checkpoint_shared(path: Any) -> dict[str, Any]:
    """The checkpoint at ``path`` on every rank: rank 0 reads it (only its machine needs the
    file) and sends it to the others, who read it back with ``torch.load(weights_only=True)``.
    An unreadable checkpoint is the same ConfigError on every rank."""
    from .checkpoint import load_checkpoint

    if not is_distributed():
        return load_checkpoint(path)
    payload: bytes | None = None
    if rank() == 0:
        try:
            buffer = io.BytesIO()
            torch.save({"ok": True, "checkpoint": load_checkpoint(path)}, buffer)
        except ConfigError as exc:
            buffer = io.BytesIO()
            torch.save({"ok": False, "error": str(exc)}, buffer)
        payload = buffer.getvalue()
    received = _broadcast_bytes(payload, "sending the checkpoint")
    message = torch.load(io.BytesIO(received), map_location="cpu", weights_only=True)
    if not message["ok"]:
        raise ConfigError(message["error"])
    return message["checkpoint"]


def combined_digest(text: str) -> str:
    """SHA-256 over every rank's ``text`` in rank order (the same string on every rank)."""
    if not is_distributed():
        return text
    dist = _dist()
    mine = hashlib.sha256(text.encode()).digest()
    device = collective_device()
    local = torch.tensor(list(mine), dtype=torch.uint8, device=device)
    gathered = torch.empty(world_size() * len(mine), dtype=torch.uint8, device=device)
    with _collective("comparing fingerprints"):
        dist.all_gather_into_tensor(gathered, local)
    return hashlib.sha256(gathered.cpu().numpy().tobytes()).hexdigest()


_CONTROL: tuple[Any, Any] | None = None  # (the default group it belongs to, the group)


def _control_group() -> Any:
    """A gloo group with a long timeout, for waiting on rank 0's writing (every rank must
    create it at the same point: :func:`prepare_writer_wait`)."""
    global _CONTROL
    world = _dist().group.WORLD
    if _CONTROL is None or _CONTROL[0] is not world:
        _CONTROL = (world, _dist().new_group(backend="gloo", timeout=WRITER_TIMEOUT))
    return _CONTROL[1]


def prepare_writer_wait() -> None:
    """Create the group the ranks use to wait for the writer (collective: call on every rank)."""
    if is_distributed():
        with _collective("creating the control group"):
            _control_group()


def _send_status(ok: bool) -> bool:
    dist = _dist()
    status = torch.tensor([1 if ok else 0], dtype=torch.int32)
    with _collective("waiting for process 0 to write the outputs"):
        dist.broadcast(status, src=0, group=_control_group())
    return bool(status[0])


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Rank 0's writing of the outputs: on leaving, the waiting ranks learn whether it worked."""
    if not is_distributed():
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(DistributedError):
            _send_status(False)
        raise
    _send_status(True)


def wait_for_writer() -> None:
    """Every rank but 0: wait until rank 0 has written the outputs; DistributedError if it
    failed (its own message says why)."""
    if not is_distributed():
        return
    if not _send_status(True):
        raise DistributedError(
            "process 0 failed to evaluate or write the outputs (see its message); nothing was "
            "written"
        )
