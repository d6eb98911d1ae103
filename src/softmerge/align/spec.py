"""Permutation groups of a network: which state-dict axes must be permuted together.

A hidden unit of a network (a row of a Linear, an output channel of a convolution) can be moved
to another position without changing the function the network computes, provided every tensor
that reads or writes that unit is permuted the same way: the producing layer's output rows, its
bias, the BatchNorm / LayerNorm entries of the unit, and the consuming layers' input columns.
Such a set of (state-dict key, axis) pairs is a *permutation group*. Residual additions add two
streams unit by unit, so they tie the groups of both operands into one group.

:func:`permutation_spec` derives the groups of a model by tracing it with ``torch.fx`` and
following, through the graph, which dimension of every intermediate tensor carries which group.
The network's inputs and outputs are never permuted: a group that reaches an output (or is
added to an input) is dropped. Operations the analysis does not understand raise a
:class:`~softmerge.errors.PlanError` naming the node; a hand-written :class:`PermutationSpec`
(see :meth:`PermutationSpec.from_dict`) can then be passed instead.

Supported: ``nn.Linear``; ``nn.Conv1d/2d/3d`` (``groups=1``); ``nn.BatchNorm1d/2d/3d``
(weight, bias, running_mean, running_var; ``num_batches_tracked`` is left alone);
``nn.LayerNorm``; elementwise activations (module or function form); dropout and identity;
max / average / adaptive pooling; residual ``+`` / ``-``; multiplication or division by a
constant; flatten / view / reshape into a Linear (a flattened C x L feature map permutes the
Linear's input columns in blocks of L); reductions (``mean`` / ``sum``) over unpermuted dims.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from softmerge.errors import PlanError

__all__ = ["AxisRef", "PermGroup", "PermutationSpec", "permutation_spec"]

HAND_WRITTEN_HINT = (
    "pass a hand-written spec instead (softmerge.align.PermutationSpec.from_dict, "
    "see docs/alignment.md)"
)


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class AxisRef:
    """Axis ``axis`` of state entry ``key``, permuted in blocks of ``block`` consecutive entries.

    ``block`` > 1 is a Linear reading a flattened C x L feature map: input column ``c * L + j``
    belongs to channel ``c``, so the columns move L at a time."""

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class PermGroup:
    """One permutation group: ``size`` units and every axis they index."""

    name: str
    size: int
    axes: tuple[AxisRef, ...]


@dataclass(frozen=True)
class ActivationPoint:
    """Where a group's units can be observed: output of module ``module``, dimension ``dim``
    (negative, counted from the end), ``block`` consecutive entries per unit."""

    module: str
    dim: int
    block: int = 1


@dataclass
class PermutationSpec:
    """Permutation groups of a model, by name (in the order of the layers that produce them).

    ``buffers`` names the permuted state entries that are statistics rather than weights
    (BatchNorm running mean / variance): they are permuted but not used by weight matching.
    ``points`` (derived specs only) says where activation matching observes each group."""

    groups: dict[str, PermGroup]
    buffers: frozenset[str] = frozenset()
    points: dict[str, tuple[ActivationPoint, ...]] = field(default_factory=dict)

    def permuted_keys(self) -> list[str]:
        """Every permuted state key, in group order, without repeats."""
        seen: dict[str, None] = {}
        for group in self.groups.values():
            for ref in group.axes:
                seen.setdefault(ref.key, None)
        return list(seen)

    def axes_by_key(self) -> dict[str, list[tuple[str, AxisRef]]]:
        """key -> [(group name, axis ref)] for every permuted axis of that key."""
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for name, group in self.groups.items():
            for ref in group.axes:
                out.setdefault(ref.key, []).append((name, ref))
        return out

    def check(self, state: Mapping[str, torch.Tensor], what: str = "state dict") -> None:
        """PlanError unless every axis of the spec exists in ``state`` with the right size."""
        for name, group in self.groups.items():
            for ref in group.axes:
                if ref.key not in state:
                    raise PlanError(
                        f"permutation group {name!r}: key {ref.key!r} is not in the {what}"
                    )
                shape = tuple(state[ref.key].shape)
                if not -len(shape) <= ref.axis < len(shape):
                    raise PlanError(
                        f"permutation group {name!r}: {ref.key} has shape {shape}, "
                        f"no axis {ref.axis}"
                    )
                if shape[ref.axis] != group.size * ref.block:
                    raise PlanError(
                        f"permutation group {name!r} has {group.size} units (block "
                        f"{ref.block}) but axis {ref.axis} of {ref.key} has size "
                        f"{shape[ref.axis]} (shape {shape})"
                    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` reads it back."""
        return {
            "groups": {
                name: {
                    "size": g.size,
                    "axes": [[r.key, r.axis, r.block] for r in g.axes],
                }
                for name, g in self.groups.items()
            },
            "buffers": sorted(self.buffers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """A hand-written spec. Either ``{"groups": {...}, "buffers": [...]}`` or just the groups:

        ``{"h1": {"size": 256, "axes": [["fc1.weight", 0], ["fc1.bias", 0], ["fc2.weight", 1]]}}``

        Each axis is ``[key, axis]`` or ``[key, axis, block]``."""
        groups_data = data.get("groups", data) if isinstance(data, Mapping) else None
        if not isinstance(groups_data, Mapping):
            raise PlanError("a permutation spec is a mapping of group name -> {size, axes}")
        buffers = data.get("buffers", []) if "groups" in data else []
        groups = {}
        for name, entry in groups_data.items():
            groups[str(name)] = _group_from_dict(str(name), entry)
        return cls(groups=groups, buffers=frozenset(str(b) for b in buffers))


def _group_from_dict(name: str, entry: Any) -> PermGroup:
    if not isinstance(entry, Mapping) or "size" not in entry or "axes" not in entry:
        raise PlanError(f"permutation group {name!r}: expected {{'size': n, 'axes': [...]}}")
    size = entry["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise PlanError(f"permutation group {name!r}: size must be a positive integer")
    axes = []
    for item in entry["axes"]:
        ok = isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3)
        if not ok or not isinstance(item[0], str) or not all(isinstance(v, int) for v in item[1:]):
            raise PlanError(
                f"permutation group {name!r}: axis entry {item!r} is not [key, axis(, block)]"
            )
        block = item[2] if len(item) == 3 else 1
        if block < 1:
            raise PlanError(f"permutation group {name!r}: block of {item[0]} must be >= 1")
        axes.append(AxisRef(item[0], item[1], block))
    if not axes:
        raise PlanError(f"permutation group {name!r} permutes no axis")
    return PermGroup(name, size, tuple(axes))


# ---------------------------------------------------------------------------------------------
# Tracing


MAX_BRANCHES = 1000  # shape-dependent conditions resolved per trace (each costs a retrace)


class _Undecided(Exception):
    """Raised inside a trace at a condition not decided yet; carries the graph up to it."""

    def __init__(self, graph: fx.Graph, node: fx.Node) -> None:
        super().__init__(f"undecided condition at node {node.name}")
        self.graph = graph
        self.node = node


class _ExampleTracer(fx.Tracer):
    """``torch.fx`` tracer for models with shape-dependent control flow (``if x.dim() == 2``).

    The plain tracer cannot turn a traced value into a bool. This one answers each condition
    from ``decisions`` (in the order they are asked); an unknown one aborts the trace with the
    graph built so far, which :func:`_trace` evaluates on the example input (outside the trace,
    where modules run normally) before tracing again. The graph is the path the example takes.
    """

    def __init__(self, decisions: list[bool]) -> None:
        super().__init__()
        self.decisions = decisions
        self.asked = 0

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.asked < len(self.decisions):
            self.asked += 1
            return self.decisions[self.asked - 1]
        graph, env = fx.Graph(), {}
        for node in self.graph.nodes:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node is obj.node:
                break
        graph.output(env[obj.node])
        raise _Undecided(graph, obj.node)


def _trace_graph(root: nn.Module, example: tuple[torch.Tensor, ...] | None) -> fx.Graph:
    decisions: list[bool] = []
    while len(decisions) <= MAX_BRANCHES:
        try:
            return _ExampleTracer(decisions).trace(root)
        except _Undecided as undecided:
            if example is None:
                node = undecided.node
                raise PlanError(
                    f"cannot trace {type(root).__name__}: its control flow depends on the "
                    f"input (node {node.name}: {node.format_node()}); pass example_input"
                ) from None
            with torch.no_grad():
                value = fx.GraphModule(root, undecided.graph)(*example)
            decisions.append(bool(value))
    raise PlanError(f"{type(root).__name__}: more than {MAX_BRANCHES} traced conditions")


def _trace(model: nn.Module, example: tuple[torch.Tensor, ...] | None) -> fx.GraphModule:
    # A copy in eval mode: evaluating branches or propagating shapes must not touch the user's
    # BatchNorm statistics.
    root = copy.deepcopy(model).eval()
    try:
        graph = _trace_graph(root, example)
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"torch.fx cannot trace {type(model).__name__}: {exc}; {HAND_WRITTEN_HINT}"
        ) from exc
    gm = fx.GraphModule(root, graph, type(model).__name__)
    if example is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example)
        except Exception as exc:
            raise PlanError(
                f"the example input does not run through {type(model).__name__}: {exc}"
            ) from exc
    return gm


# ---------------------------------------------------------------------------------------------
# Values flowing through the graph


@dataclass(frozen=True)
class _Perm:
    group: int
    block: int | None  # None: a flatten whose trailing sizes are unknown (no example input)


@dataclass(frozen=True)
class _Tensor:
    perms: dict[int, _Perm]  # negative dim -> the group it carries
    ndim: int | None
    shape: tuple[int, ...] | None = None


_META = object()  # a non-tensor value: a size, a dim count, a dtype...

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
POOL_MODULES: dict[type[nn.Module], int] = {  # module -> number of trailing pooled dims
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.abs,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.tanh,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    operator.neg,
    operator.pos,
}
ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "sigmoid",
    "abs",
    "neg",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
}
POOL_FUNCTIONS: dict[Callable[..., Any], int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
ADD_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}
ADD_METHODS = {"add", "sub", "add_", "sub_"}
SCALE_FUNCTIONS = {operator.mul, operator.truediv, operator.imul, torch.mul, torch.div}
SCALE_METHODS = {"mul", "div", "mul_", "div_"}
META_METHODS = {"size", "dim", "numel"}
META_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


def _describe(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(module).__name__})"
    if node.op == "call_method":
        return f"node {node.name!r} (method .{node.target}())"
    if node.op == "get_attr":
        return f"node {node.name!r} (attribute {node.target!r} used outside its module)"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({target})"


def _unsupported(node: fx.Node, module: nn.Module | None = None, why: str = "") -> PlanError:
    reason = f": {why}" if why else ""
    return PlanError(
        f"weight matching cannot derive permutations through {_describe(node, module)}"
        f"{reason}; {HAND_WRITTEN_HINT}"
    )


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------
# The analysis


class _Analysis:
    """Walks the traced graph once, creating a group per Linear / Conv output and uniting
    groups that must move together (union-find; group 0 is "fixed": never permuted)."""

    FIXED = 0

    def __init__(self, gm: fx.GraphModule, state_keys: set[str]) -> None:
        self.gm = gm
        self.state_keys = state_keys
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = [0]
        self.sizes: list[int] = [0]
        self.names: list[str] = ["(fixed)"]
        self.axes: dict[tuple[str, int], tuple[int, int]] = {}  # (key, axis) -> (group, block)
        self.buffers: set[str] = set()
        self.points: list[tuple[int, ActivationPoint]] = []
        self.values: dict[fx.Node, Any] = {}

    # -- union-find ----------------------------------------------------------------------------

    def new_group(self, size: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra != self.FIXED and rb != self.FIXED and self.sizes[ra] != self.sizes[rb]:
            raise PlanError(
                f"{where} ties groups {self.names[ra]!r} ({self.sizes[ra]} units) and "
                f"{self.names[rb]!r} ({self.sizes[rb]} units) of different sizes"
            )
        low, high = sorted((ra, rb))  # the lower id is the root: fixed wins, then the older
        self.parent[high] = low

    def record(self, key: str, axis: int, perm: _Perm, where: str) -> None:
        if key not in self.state_keys:
            return  # e.g. a Linear without bias, a BatchNorm without running stats
        if perm.block is None:
            raise PlanError(
                f"{where}: the block size of a flattened input is unknown; pass example_input"
            )
        seen = self.axes.get((key, axis))
        if seen is None:
            self.axes[(key, axis)] = (perm.group, perm.block)
            return
        if seen[1] != perm.block:
            raise PlanError(
                f"{where}: {key} axis {axis} is read in blocks of {seen[1]} and {perm.block}"
            )
        self.union(seen[0], perm.group, where)  # a module called twice shares its weights

    # -- walking -------------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)

    def tensor_of(self, node: fx.Node, perms: dict[int, _Perm], ndim: int | None) -> _Tensor:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shape = tuple(int(s) for s in meta.shape)
            return _Tensor(perms, len(shape), shape)
        return _Tensor(perms, ndim)

    def input_of(self, node: fx.Node, value: Any) -> _Tensor:
        if not isinstance(value, fx.Node) or not isinstance(self.values.get(value), _Tensor):
            module = self.modules.get(str(node.target))
            raise _unsupported(node, module, why="its input is not a tensor")
        return self.values[value]

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.tensor_of(node, {}, None)
        if node.op == "output":
            self.fix_outputs(node)
            return None
        if node.op == "get_attr":
            raise _unsupported(node)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        return self.visit_function(node)

    def fix_outputs(self, node: fx.Node) -> None:
        def fix(arg: Any) -> Any:
            value = self.values.get(arg) if isinstance(arg, fx.Node) else None
            if isinstance(value, _Tensor):
                for perm in value.perms.values():
                    self.union(self.FIXED, perm.group, "the output")
            return arg

        fx.node.map_aggregate(node.args, fix)

    # -- modules -------------------------------------------------------------------------------

    def visit_module(self, node: fx.Node, module: nn.Module) -> _Tensor:
        x = self.input_of(node, node.args[0] if node.args else None)
        name = str(node.target)
        if isinstance(module, nn.Linear):
            out = self.linear(node, name, module, x)
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            out = self.conv(node, name, module, x)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            out = self.batchnorm(node, name, module, x)
        elif isinstance(module, nn.LayerNorm):
            out = self.layernorm(node, name, module, x)
        elif isinstance(module, ELEMENTWISE_MODULES):
            out = self.tensor_of(node, dict(x.perms), x.ndim)
        elif type(module) in POOL_MODULES:
            out = self.pool(node, x, POOL_MODULES[type(module)], module)
        elif isinstance(module, nn.Flatten):
            out = self.flatten(node, x, module.start_dim, module.end_dim, module)
        elif isinstance(module, nn.Softmax | nn.LogSoftmax):
            out = self.tensor_of(node, dict(x.perms), x.ndim)  # equivariant along any dim
        else:
            raise _unsupported(node, module)
        for dim, perm in out.perms.items():
            if perm.block is not None:
                self.points.append((perm.group, ActivationPoint(name, dim, perm.block)))
        return out

    def linear(self, node: fx.Node, name: str, module: nn.Linear, x: _Tensor) -> _Tensor:
        where = _describe(node, module)
        perms = {d: p for d, p in x.perms.items() if d != -1}  # other dims pass through
        if -1 in x.perms:
            perm = x.perms[-1]
            size = self.sizes[perm.group]
            block = perm.block
            if block is None:  # flatten of a feature map without example input: infer
                block, rest = divmod(module.in_features, size)
                if rest or block < 1:
                    raise PlanError(
                        f"{where}: {module.in_features} inputs do not split into "
                        f"{size} channels; pass example_input"
                    )
            if size * block != module.in_features:
                raise PlanError(
                    f"{where}: input group of {size} units x block {block} does "
                    f"not match in_features {module.in_features}"
                )
            self.record(f"{name}.weight", 1, _Perm(perm.group, block), where)
        group = self.new_group(module.out_features, name)
        self.record(f"{name}.weight", 0, _Perm(group, 1), where)
        self.record(f"{name}.bias", 0, _Perm(group, 1), where)
        perms[-1] = _Perm(group, 1)
        return self.tensor_of(node, perms, x.ndim)

    def conv(self, node: fx.Node, name: str, module: nn.Module, x: _Tensor) -> _Tensor:
        where = _describe(node, module)
        if module.groups != 1:
            raise _unsupported(node, module, f"grouped convolution (groups={module.groups})")
        channel = -(len(module.kernel_size) + 1)
        spatial = [d for d in x.perms if d != channel]
        if spatial:
            raise _unsupported(node, module, f"its input is permuted along dim {spatial[0]}")
        if channel in x.perms:
            perm = x.perms[channel]
            if perm.block != 1:
                raise _unsupported(node, module, "its input channels come from a flatten")
            self.record(f"{name}.weight", 1, perm, where)
        group = self.new_group(module.out_channels, name)
        self.record(f"{name}.weight", 0, _Perm(group, 1), where)
        self.record(f"{name}.bias", 0, _Perm(group, 1), where)
        ndim = x.ndim if x.ndim is not None else len(module.kernel_size) + 2
        return self.tensor_of(node, {channel: _Perm(group, 1)}, ndim)

    def batchnorm(self, node: fx.Node, name: str, module: nn.Module, x: _Tensor) -> _Tensor:
        where = _describe(node, module)
        if x.ndim is None:
            if isinstance(module, nn.BatchNorm1d):  # (B, C) or (B, C, L): cannot tell
                raise PlanError(f"{where}: input rank unknown; pass example_input")
            ndim = 4 if isinstance(module, nn.BatchNorm2d) else 5
        else:
            ndim = x.ndim
        channel = 1 - ndim
        if channel in x.perms:
            perm = x.perms[channel]
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                self.record(f"{name}.{suffix}", 0, perm, where)
            self.buffers.update({f"{name}.running_mean", f"{name}.running_var"})
        return self.tensor_of(node, dict(x.perms), ndim)

    def layernorm(self, node: fx.Node, name: str, module: nn.LayerNorm, x: _Tensor) -> _Tensor:
        where = _describe(node, module)
        normed = len(module.normalized_shape)
        for dim, perm in x.perms.items():
            if dim >= -normed:  # LayerNorm is symmetric in its units: only its affine moves
                self.record(f"{name}.weight", dim + normed, perm, where)
                self.record(f"{name}.bias", dim + normed, perm, where)
        return self.tensor_of(node, dict(x.perms), x.ndim)

    def pool(self, node: fx.Node, x: _Tensor, pooled: int, module: nn.Module | None = None):
        bad = [d for d in x.perms if d >= -pooled]
        if bad:
            raise _unsupported(node, module, f"it pools over the permuted dim {bad[0]}")
        return self.tensor_of(node, dict(x.perms), x.ndim)

    def flatten(
        self, node: fx.Node, x: _Tensor, start: int, end: int, module: nn.Module | None = None
    ) -> _Tensor:
        if x.ndim is None:
            if x.perms:
                raise PlanError(
                    f"{_describe(node, module)}: input rank unknown; pass example_input"
                )
            if end != -1 or start < 0:
                return self.tensor_of(node, {}, None)
            return self.tensor_of(node, {}, start + 1)
        ndim = x.ndim
        start, end = start % ndim if ndim else 0, end % ndim if ndim else 0
        if start >= end:
            return self.tensor_of(node, dict(x.perms), ndim)
        new_ndim = ndim - (end - start)
        perms = {}
        for dim, perm in x.perms.items():
            pos = dim + ndim
            if pos < start:
                perms[pos - new_ndim] = perm
            elif pos > end:
                perms[pos - (end - start) - new_ndim] = perm
            elif pos == start:  # channel-major flatten: each unit becomes a block
                trailing = x.shape[start + 1 : end + 1] if x.shape else None
                block = None
                if perm.block is not None and trailing is not None:
                    block = perm.block * math.prod(trailing)
                perms[start - new_ndim] = _Perm(perm.group, block)
            else:
                raise _unsupported(
                    node, module, f"it merges the permuted dim {dim} into a preceding dim"
                )
        return self.tensor_of(node, perms, new_ndim)

    # -- functions and methods -----------------------------------------------------------------

    def visit_function(self, node: fx.Node) -> Any:
        target = node.target
        method = node.op == "call_method"
        args = [self.values.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        tensors = [a for a in args if isinstance(a, _Tensor)]
        if not self._reads_tensor(node):
            return _META  # arithmetic on sizes, constants
        if not tensors:  # tensors inside a list (torch.cat, torch.stack) or keyword arguments
            raise _unsupported(node)
        if (method and target in META_METHODS) or (
            target is getattr and len(node.args) > 1 and node.args[1] in META_ATTRIBUTES
        ):
            return _META
        x = tensors[0]
        if (method and target in ELEMENTWISE_METHODS) or target in ELEMENTWISE_FUNCTIONS:
            return self.tensor_of(node, dict(x.perms), x.ndim)
        if (method and target in ADD_METHODS) or target in ADD_FUNCTIONS:
            return self.add(node, args)
        if (method and target in SCALE_METHODS) or target in SCALE_FUNCTIONS:
            if len(tensors) > 1:
                raise _unsupported(node, why="product of two activations")
            return self.tensor_of(node, dict(x.perms), x.ndim)
        if target in POOL_FUNCTIONS:
            return self.pool(node, x, POOL_FUNCTIONS[target])
        if target is torch.flatten or (method and target == "flatten"):
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return self.flatten(node, x, start, end)
        if (method and target in ("view", "reshape")) or target is torch.reshape:
            return self.reshape(node, x)
        if (method and target in REDUCE_METHODS) or target in REDUCE_FUNCTIONS:
            return self.reduce(node, x)
        if (method and target in ("unsqueeze", "squeeze")) or target in (
            torch.unsqueeze,
            torch.squeeze,
        ):
            name = target if isinstance(target, str) else target.__name__
            return self.squeeze(node, x, name, _arg(node, 1, "dim", None))
        raise _unsupported(node)

    def _reads_tensor(self, node: fx.Node) -> bool:
        found = []

        def visit(arg: fx.Node) -> fx.Node:
            found.append(isinstance(self.values.get(arg), _Tensor))
            return arg

        fx.node.map_arg((node.args, node.kwargs), visit)
        return any(found)

    def add(self, node: fx.Node, args: list[Any]) -> _Tensor:
        """Residual addition: a dim permuted in one operand must carry the same group in the
        other (union); against an unpermuted, non-broadcast operand it cannot move (fixed)."""
        where = _describe(node)
        operands = [a for a in args[:2] if isinstance(a, _Tensor)]
        if len(operands) == 1:
            return self.tensor_of(node, dict(operands[0].perms), operands[0].ndim)
        a, b = operands
        perms: dict[int, _Perm] = {}
        for dim in sorted(set(a.perms) | set(b.perms)):
            pa, pb = a.perms.get(dim), b.perms.get(dim)
            if pa is not None and pb is not None:
                if pa.block != pb.block:
                    raise _unsupported(node, why="its operands are permuted in different blocks")
                self.union(pa.group, pb.group, where)
                perms[dim] = pa
                continue
            perm, other = (pa, b) if pa is not None else (pb, a)
            if _broadcasts(other, dim):
                perms[dim] = perm
            else:
                self.union(self.FIXED, perm.group, where)
        ndim = max(a.ndim or 0, b.ndim or 0) if a.ndim and b.ndim else None
        return self.tensor_of(node, perms, ndim)

    def squeeze(self, node: fx.Node, x: _Tensor, name: str, dim: Any) -> _Tensor:
        """unsqueeze(dim) / squeeze(dim): a size-1 dim appears or goes; permuted dims shift."""
        if not isinstance(dim, int):
            if x.perms or name == "unsqueeze":
                raise _unsupported(node, why="squeeze without an explicit dim")
            return self.tensor_of(node, {}, None)
        grow = 1 if name == "unsqueeze" else -1
        ndim = None if x.ndim is None else x.ndim + grow
        if not x.perms:
            return self.tensor_of(node, {}, ndim)
        if x.ndim is None or ndim is None:
            raise PlanError(f"{_describe(node)}: input rank unknown; pass example_input")
        pos = dim % ndim if grow == 1 else dim % x.ndim  # the inserted / removed position
        perms = {}
        for d, perm in x.perms.items():
            old = d + x.ndim
            if grow == -1 and old == pos:
                raise _unsupported(node, why="it squeezes a permuted dim")
            new = old + grow if old >= pos else old
            perms[new - ndim] = perm
        return self.tensor_of(node, perms, ndim)

    def reshape(self, node: fx.Node, x: _Tensor) -> _Tensor:
        """view / reshape that merges a run of consecutive dims is a flatten; anything else
        with a permuted input is not supported."""
        out_meta = node.meta.get("tensor_meta")
        if x.shape is not None and out_meta is not None:
            merged = _merged_range(x.shape, tuple(int(s) for s in out_meta.shape))
            if merged is not None:
                return self.flatten(node, x, *merged)
            if not x.perms:
                return self.tensor_of(node, {}, None)
            raise _unsupported(node, why=f"reshape {x.shape} -> {tuple(out_meta.shape)}")
        shape_args = node.args[1:]
        if len(shape_args) == 1 and isinstance(shape_args[0], list | tuple):
            shape_args = tuple(shape_args[0])
        # x.view(x.size(0), -1) / x.reshape(B, -1): flatten from dim 1
        if len(shape_args) == 2 and shape_args[1] == -1:
            return self.flatten(node, x, 1, -1)
        if not x.perms:
            return self.tensor_of(node, {}, len(shape_args) or None)
        raise PlanError(f"{_describe(node)}: reshape of a permuted tensor; pass example_input")

    def reduce(self, node: fx.Node, x: _Tensor) -> _Tensor:
        dims = _arg(node, 1, "dim", None)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if dims is None:
            return self.tensor_of(node, {}, 0)  # a full reduction is permutation invariant
        dims = [dims] if isinstance(dims, int) else list(dims)
        if x.ndim is None and any(d >= 0 for d in dims):
            raise PlanError(f"{_describe(node)}: input rank unknown; pass example_input")
        neg = {d - x.ndim if d >= 0 else d for d in dims}  # type: ignore[operator]
        if neg & set(x.perms):
            raise _unsupported(node, why="it reduces over a permuted dim")
        if keepdim:
            return self.tensor_of(node, dict(x.perms), x.ndim)
        perms = {d + sum(1 for r in neg if r > d): p for d, p in x.perms.items()}
        ndim = None if x.ndim is None else x.ndim - len(neg)
        return self.tensor_of(node, perms, ndim)

    # -- result --------------------------------------------------------------------------------

    def spec(self) -> PermutationSpec:
        members: dict[int, list[AxisRef]] = {}
        for (key, axis), (group, block) in self.axes.items():
            root = self.find(group)
            if root != self.FIXED:
                members.setdefault(root, []).append(AxisRef(key, axis, block))
        groups, points = {}, {}
        for root in sorted(members):
            name = self.names[root]
            groups[name] = PermGroup(name, self.sizes[root], tuple(members[root]))
            points[name] = tuple(p for g, p in self.points if self.find(g) == root)
        buffers = frozenset(
            k for k in self.buffers if any(r.key == k for g in groups.values() for r in g.axes)
        )
        return PermutationSpec(groups, buffers, points)


def _broadcasts(other: _Tensor, dim: int) -> bool:
    """True if ``other`` is constant along negative dim ``dim`` (absent or of size 1)."""
    if other.shape is not None:
        return -dim > len(other.shape) or other.shape[dim] == 1
    return other.ndim is not None and -dim > other.ndim


def _merged_range(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, int] | None:
    """(start, end) if ``after`` is ``before`` with dims start..end multiplied into one."""
    if len(after) >= len(before):
        return (0, 0) if after == before else None
    span = len(before) - len(after)
    for start in range(len(after)):
        end = start + span
        merged = (*before[:start], math.prod(before[start : end + 1]), *before[end + 1 :])
        if merged == after:
            return start, end
    return None


def _as_tuple(example: torch.Tensor | Sequence[torch.Tensor] | None):
    if example is None:
        return None
    if isinstance(example, torch.Tensor):
        return (example,)
    return tuple(example)


def permutation_spec(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by ``torch.fx`` tracing.

    ``example_input`` (a batch, or a tuple of the forward's positional inputs) makes the
    analysis exact: it resolves shape-dependent control flow, the rank of every tensor and the
    block size of a flattened feature map. Without it, plain MLPs and CNNs still work. A
    model on the meta device (a weightless template) is traced with the example moved there.
    Raises PlanError naming the first operation that cannot be handled.
    """
    example = _as_tuple(example_input)
    if example is not None and any(t.is_meta for t in model.state_dict().values()):
        # A weightless (meta) template, as the merge context keeps: shapes are all it needs.
        example = tuple(e.to("meta") if isinstance(e, torch.Tensor) else e for e in example)
    gm = _trace(model, example)
    analysis = _Analysis(gm, set(model.state_dict()))
    analysis.run()
    spec = analysis.spec()
    spec.check(model.state_dict(), what="model's state dict")
    return spec
