"""The merge at the test-time gates, and what is reported about it.

After a fit (or after ``SoftMerger.use_gates`` moves the gates to another point of an L0
path), :class:`FinalMerge` turns the deterministic gates into the state dict the user gets:
the merged tensors, BatchNorm statistics re-estimated for them (``fit.recalibrate_bn``), and
REPAIR's corrected statistics (``plan.repair``), each computed once per set of gates. It also
gives the report: the gate snapshot, the candidate-level gates, and ``describe()`` for
``gates.json``. Training (``softmerge.step``, ``softmerge.fit``) never goes through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .batches import Batch
from .evaluation import model_with_state

if TYPE_CHECKING:
    from .report import GateSnapshot
    from .soft import SoftMerger


class FinalMerge:
    """The deterministic merge of ``merger``'s current gates, with its caches."""

    def __init__(self, merger: SoftMerger) -> None:
        self.merger = merger
        # BatchNorm buffers re-estimated for the current gates (None: the candidates' own).
        self.bn_buffers: dict[str, torch.Tensor] | None = None
        # plan.repair: (gates' version, repaired state, note), computed when first asked for.
        self._repaired: tuple[tuple[Any, ...], dict[str, torch.Tensor], dict[str, Any]] | None
        self._repaired = None
        # A sharded stack's collective merge: (gates' version, merged tensors).
        self._sharded_merge: tuple[tuple[Any, ...], dict[str, torch.Tensor]] | None = None

    def forget(self) -> None:
        """The gates moved: drop what was estimated for the old ones."""
        self.bn_buffers, self._repaired = None, None

    def recalibrate(self, loader: Iterable[Batch]) -> None:
        """Re-estimate BatchNorm statistics for the current merge on ``loader``."""
        m = self.merger
        model = model_with_state(m.model, self.state(recalibrated=False), m.ctx.device)
        distributed.recalibrate_batchnorm(model, loader)  # recalibrate_batchnorm, shared out
        self.bn_buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def state(self, recalibrated: bool = True, repaired: bool = True) -> dict[str, torch.Tensor]:
        """The full state dict of the merge: in the candidates' dtypes, on the CPU."""
        m = self.merger
        if recalibrated and repaired and self._repairs():
            return dict(self._repair()[1])  # fitted gates: the REPAIRed merge (plan.repair)
        merged = self._merged_tensors()
        if recalibrated and self.bn_buffers is not None:
            merged = {**merged, **self.bn_buffers}
        return m.ctx.assemble(merged)

    def repair_note(self) -> dict[str, Any] | None:
        """What plan.repair did to the current merge (layers, weights, seconds), or None."""
        return self._repair()[2] if self._repairs() else None

    def _repairs(self) -> bool:
        return self.merger.plan.repair and self.merger.result is not None

    def _gates_version(self) -> tuple[Any, ...]:
        m = self.merger
        return (*(p._version for p in m.gate_parameters), m.ctx.reference)

    def _repair(self) -> tuple[tuple[Any, ...], dict[str, torch.Tensor], dict[str, Any]]:
        """plan.repair: REPAIR the deterministic merge; each layer's statistics are the
        candidates' interpolated with that layer's mixing weights (softmerge.align.pool).
        Computed once per set of gates (an L0 path moves them after the fit)."""
        from .align.pool import repair_merged, soft_layer_weights

        m = self.merger
        version = (*self._gates_version(), id(self.bn_buffers))
        if self._repaired is None or self._repaired[0] != version:
            with torch.no_grad():
                mixing = m.mixing_weights(m.deterministic_gates())
            weights = soft_layer_weights(m.ctx, m.layout, mixing, m.delta)
            state = self.state(repaired=False)
            self._repaired = (version, *repair_merged(m.ctx, state, weights, delta=m.delta))
        return self._repaired

    def _merged_tensors(self) -> dict[str, torch.Tensor]:
        """The merged tensors at the test-time gates. A sharded stack's merge is collective: it
        is kept until the gates change, so rank 0 can then export and evaluate on its own."""
        m = self.merger
        with torch.no_grad():
            if not getattr(m.stack, "sharded", False):
                return m.merged_parameters(m.deterministic_gates())
            version = self._gates_version()
            if self._sharded_merge is None or self._sharded_merge[0] != version:
                merged = m.merged_parameters(m.deterministic_gates())
                self._sharded_merge = (version, merged)
            return self._sharded_merge[1]

    # -- the report ---------------------------------------------------------------------------

    def snapshot(self) -> GateSnapshot:
        """Per unit and candidate: unit log_alpha, effective deterministic gate, P(non-zero)."""
        from .report import GateSnapshot

        m = self.merger
        with torch.no_grad():
            return GateSnapshot(
                candidates=list(m.names),
                units=list(m.layout.units),
                log_alpha=m.log_alpha.detach().cpu().numpy().copy(),
                gate=m.deterministic_gates().cpu().numpy(),
                p_nonzero=m.gates.prob_nonzero().cpu().numpy(),
                excluded=[
                    c.name for c, ok in zip(m.candidates, m.ctx.active, strict=True) if not ok
                ],
            )

    def candidate_gates(self) -> dict[str, dict[str, float]] | None:
        """The candidate-level gates (two-level gating), or None at model granularity."""
        m = self.merger
        levels = m.gates.candidate_gates()
        if levels is None:
            return None
        gate, pnz = levels
        assert m.gates.log_alpha_candidate is not None
        la = m.gates.log_alpha_candidate.detach()
        return {
            name: {"log_alpha": float(la[i]), "gate": float(gate[i]), "p_nonzero": float(pnz[i])}
            for i, name in enumerate(m.names)
        }

    def describe(self) -> dict[str, Any]:
        """The merge's settings, and the alignment, REPAIR and learned task-vector scale when
        the plan asks for them."""
        m = self.merger
        out: dict[str, Any] = {
            "plan": m.plan.model_dump(),
            "candidates": {c.name: c.source for c in m.candidates},
            "base": None if m.base is None else m.base.source,
            "units": len(m.layout.units),
            "merged_tensors": len(m.layout.slots),
            "reference": m.names[m.reference],
            "storage_dtype": str(m.stack.dtype).removeprefix("torch."),
            "device": str(m.ctx.device),
        }
        if m.ctx.alignment is not None:
            out["alignment"] = m.ctx.alignment.to_dict()
        note = self.repair_note()
        if note is not None:
            out["repair"] = note
        scale = m.gates.scale()
        if scale is not None:
            out["delta_scale_learned"] = dict(
                zip(m.layout.units, scale.detach().cpu().tolist(), strict=True)
            )
        return out
