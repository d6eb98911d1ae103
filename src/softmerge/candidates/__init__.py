"""Candidate checkpoints: lazy readers, validation from headers, inspection.

Every candidate is a :class:`Candidate` whatever it came from (a safetensors file, a pickled
PyTorch checkpoint, a sharded index, a Hugging Face model folder, a module or a dict in memory).
Opening one reads its header only; tensors are read one at a time when the merge needs them.
"""

from .candidate import (
    Candidate,
    CandidateSource,
    LazyState,
    count_nonfinite,
    default_name,
    load_candidate,
    load_candidates,
    read_state_dict,
)
from .inspect import format_inspect, inspect_candidates
from .readers import (
    HF_WEIGHT_FILES,
    INDEX_SUFFIX,
    PICKLE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Reader,
    TensorInfo,
    load_error_detail,
    open_path,
)
from .validate import (
    check_fits_model,
    dtype_kind,
    dtype_name,
    model_infos,
    split_base,
    validate_candidates,
)

__all__ = [
    "HF_WEIGHT_FILES",
    "INDEX_SUFFIX",
    "PICKLE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "Candidate",
    "CandidateSource",
    "LazyState",
    "Reader",
    "TensorInfo",
    "check_fits_model",
    "count_nonfinite",
    "default_name",
    "dtype_kind",
    "dtype_name",
    "format_inspect",
    "inspect_candidates",
    "load_candidate",
    "load_candidates",
    "load_error_detail",
    "model_infos",
    "open_path",
    "read_state_dict",
    "split_base",
    "validate_candidates",
]
