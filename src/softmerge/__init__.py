"""softmerge: merge checkpoints of one architecture by learning hard concrete (L0) gates.

The public API is small::

    from softmerge import SoftMerger, MergePlan, FitConfig
    merger = SoftMerger(model, ["a.safetensors", "b.safetensors", "c.safetensors"],
                        MergePlan(granularity="tensor"))
    merger.fit(merge_loader, config=FitConfig(steps=300, seed=0))
    merger.export("out/")                 # merged.safetensors, gates.json, plots
    model.load_state_dict(merger.merged_state_dict())
"""

__version__ = "0.1.0"

from .candidates import Candidate, load_candidates
from .errors import (
    CandidateError,
    ConfigError,
    DataError,
    PlanError,
    SoftmergeError,
)
from .plan import MergePlan
from .soft import FitConfig, FitResult, SoftMerger, recalibrate_batchnorm

__all__ = [
    "Candidate",
    "CandidateError",
    "ConfigError",
    "DataError",
    "FitConfig",
    "FitResult",
    "MergePlan",
    "PlanError",
    "SoftMerger",
    "SoftmergeError",
    "__version__",
    "load_candidates",
    "recalibrate_batchnorm",
]
