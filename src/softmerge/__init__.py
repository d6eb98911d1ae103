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
from .context import MergeContext
from .errors import (
    CandidateError,
    ConfigError,
    DataError,
    PlanError,
    SoftmergeError,
)
from .evaluation import evaluate, model_with_state, recalibrate_batchnorm
from .fit import FitConfig, FitResult
from .plan import MergePlan
from .soft import SoftMerger

__all__ = [
    "Candidate",
    "CandidateError",
    "ConfigError",
    "DataError",
    "FitConfig",
    "FitResult",
    "MergeContext",
    "MergePlan",
    "PlanError",
    "SoftMerger",
    "SoftmergeError",
    "__version__",
    "evaluate",
    "load_candidates",
    "model_with_state",
    "recalibrate_batchnorm",
]
