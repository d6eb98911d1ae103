"""What alignment did, for the gate report and the run summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["COST", "AlignmentReport", "CandidateAlignment"]

COST = "squared L2 distance to the reference over the permuted weights (BatchNorm stats excluded)"


@dataclass
class CandidateAlignment:
    """How one candidate was aligned: its permutation per group and the cost before / after."""

    index: int  # position in the pool (-1: the base of task-vector merges)
    name: str
    permutation: dict[str, list[int]]  # group -> perm; aligned unit i = original unit perm[i]
    cost_before: float
    cost_after: float
    moved_units: int  # units that changed position, over all groups


@dataclass
class AlignmentReport:
    """What alignment did (``to_dict`` is JSON-serialisable)."""

    method: str
    reference: int  # index of the candidate the others were matched to
    reference_name: str
    groups: dict[str, int]  # group -> number of units
    seed: int
    candidates: list[CandidateAlignment] = field(default_factory=list)
    cost: str = COST
    skipped: list[str] = field(default_factory=list)  # non-finite candidates, left as they are
    base: CandidateAlignment | None = None  # the base of task-vector merges, aligned too
    seconds: float | None = None
    ste: dict[str, Any] | None = None  # plan.align 'ste': steps, lr, chosen step, soup losses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The report without the permutations: per candidate, cost before / after and the
        number of units moved (what a run summary prints)."""
        entries = [*self.candidates, *([self.base] if self.base is not None else [])]
        return {
            "method": self.method,
            "reference": self.reference_name,
            "groups": len(self.groups),
            "units": sum(self.groups.values()),
            "seconds": self.seconds,
            "candidates": {
                e.name: {
                    "cost_before": e.cost_before,
                    "cost_after": e.cost_after,
                    "moved_units": e.moved_units,
                }
                for e in entries
            },
            "skipped": list(self.skipped),
            **({"ste": self.ste} if self.ste is not None else {}),
        }
