"""Errors softmerge raises on bad input. The CLI turns each into one line and exit code 2."""

from __future__ import annotations


class SoftmergeError(Exception):
    """Base class: a problem with the user's input that softmerge can name precisely."""


class CandidateError(SoftmergeError):
    """A checkpoint cannot be loaded, or candidates disagree on keys, shapes or dtypes."""


class PlanError(SoftmergeError):
    """The merge plan does not fit the candidates (a pattern matches nothing, a bad base...)."""


class ConfigError(SoftmergeError):
    """The YAML config does not follow the schema."""


class DataError(SoftmergeError):
    """A data set is missing, empty, or does not fit the model."""


class OutputError(SoftmergeError):
    """An output file or folder cannot be written (no permission, disk full...)."""


class DistributedError(SoftmergeError):
    """Another process of a distributed run failed, was killed or stopped answering."""
