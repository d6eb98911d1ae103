"""One candidate checkpoint: a name, a lazy reader, and what a streaming scan found in it.

A :class:`Candidate` never holds its tensors: ``candidate.tensor(key)`` reads one when it is
needed and ``candidate.state`` is a read-only mapping that does the same, so iterating over it
visits one tensor at a time. Non-finite values are counted by one streaming pass the first time
anyone asks (``nonfinite``, ``is_finite``); the merge engine, not loading, decides what to do with
such candidates.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import torch

from ..errors import CandidateError
from ..memory import release_memory
from .adapters import AdapterReader, adapter_base, is_adapter
from .readers import INDEX_SUFFIX, Aliased, MemoryReader, Reader, TensorInfo, open_path

logger = logging.getLogger("softmerge")


class LazyState(Mapping[str, torch.Tensor]):
    """A read-only ``{key: tensor}`` view of a reader; each lookup reads that tensor."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._reader.infos():
            raise KeyError(key)
        return self._reader.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.infos())

    def __len__(self) -> int:
        return len(self._reader.infos())

    def __contains__(self, key: object) -> bool:
        return key in self._reader.infos()


class Candidate:
    """One checkpoint to merge: its name, where it came from, and a lazy reader of its tensors."""

    def __init__(
        self,
        name: str,
        reader: Reader | Mapping[str, torch.Tensor],
        source: str | None = None,
        hf_folder: Path | None = None,
    ) -> None:
        if not isinstance(reader, Reader):
            reader = MemoryReader(reader, source or f"<memory:{name}>")
        self.name = name
        self.reader = reader
        self.source = source if source is not None else reader.source
        self.hf_folder = hf_folder
        self._nonfinite: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"Candidate({self.name!r}, {self.source!r})"

    # -- header ----------------------------------------------------------------------------

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.reader.infos()

    def keys(self) -> list[str]:
        return list(self.reader.infos())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    # -- data --------------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        return self.reader.read(key)

    @property
    def state(self) -> LazyState:
        return LazyState(self.reader)

    def close(self) -> None:
        self.reader.close()

    @property
    def is_adapter(self) -> bool:
        return bool(getattr(self._inner_reader(), "targets", None))

    def _inner_reader(self) -> Reader:
        reader = self.reader
        while hasattr(reader, "inner"):
            reader = reader.inner
        return reader

    @property
    def targets(self) -> list[str]:
        """The weights a LoRA adapter changes (empty for a full checkpoint)."""
        return list(getattr(self._inner_reader(), "targets", []))

    @property
    def nonfinite(self) -> dict[str, int]:
        """NaN/Inf count per floating tensor that has some (one streaming pass, then cached)."""
        if self._nonfinite is None:
            self._nonfinite = count_nonfinite(self.state)
            self.close()
            release_memory(collect=False)  # every tensor was read once: give the heap back
            _warn_nonfinite(self)
        return self._nonfinite

    @property
    def is_finite(self) -> bool:
        return not self.nonfinite

    @property
    def scanned(self) -> bool:
        """Whether the streaming NaN/Inf scan has run."""
        return self._nonfinite is not None

    def with_aliases(self, aliases: Mapping[str, str]) -> Candidate:
        """The same checkpoint answering to more names (``{new name: stored name}``)."""
        if not aliases:
            return self
        same = Candidate(self.name, Aliased(self.reader, aliases), self.source, self.hf_folder)
        same._nonfinite = self._nonfinite
        return same

    def renamed(self, name: str) -> Candidate:
        """The same checkpoint under another name (its scan is recomputed when asked)."""
        return Candidate(name, self.reader, self.source, self.hf_folder)


CandidateSource: TypeAlias = (
    str | os.PathLike[str] | torch.nn.Module | Mapping[str, torch.Tensor] | Candidate
)


def count_nonfinite(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Count NaN/Inf values per floating (or complex) tensor; only tensors with some are listed.

    Reads ``state`` one tensor at a time (it may be a :class:`LazyState`)."""
    counts: dict[str, int] = {}
    for key in state:
        t = state[key]
        if t.is_floating_point() or t.is_complex():
            n = t.numel() - int(torch.isfinite(t).sum())
            if n:
                counts[key] = n
    return counts


def _warn_nonfinite(c: Candidate) -> None:
    if not c.nonfinite:
        return
    shown = ", ".join(f"'{k}' ({n})" for k, n in list(c.nonfinite.items())[:5])
    more = f" and {len(c.nonfinite) - 5} more" if len(c.nonfinite) > 5 else ""
    logger.warning(
        "%s: candidate '%s' has non-finite values (NaN/Inf) in %d tensor(s): %s%s",
        c.source,
        c.name,
        len(c.nonfinite),
        shown,
        more,
    )


# --------------------------------------------------------------------------- loading


def load_candidate(
    source: CandidateSource, name: str | None = None, *, adapter_base: Path | None = None
) -> Candidate:
    """One candidate from a path, module, tensor mapping or existing Candidate (nothing read
    but headers). A LoRA adapter folder reads on ``adapter_base`` (or the base it names)."""
    chosen = name if name is not None else default_name(source, 0)
    return _load_one(source, chosen, adapter_base)


def _load_adapter(folder: Path, name: str, base: Path | None) -> Candidate:
    """A LoRA adapter folder on its base model (``base``, or the base its config names)."""
    base = base or adapter_base(folder)
    if base is None:
        raise CandidateError(
            f"{folder}: a LoRA adapter needs its base model: give the base model's folder "
            "(plan.base, or model.hf in a YAML config)"
        )
    reader = AdapterReader(folder, open_path(Path(base)))
    hf = Path(base) if Path(base).is_dir() else None
    return Candidate(name, reader, os.fspath(folder), hf)


def _load_one(source: CandidateSource, name: str, adapter_base: Path | None = None) -> Candidate:
    if isinstance(source, Candidate):
        return source if source.name == name else source.renamed(name)
    if isinstance(source, torch.nn.Module):
        return Candidate(name, MemoryReader(source.state_dict(), f"<memory:{name}>"))
    if isinstance(source, Mapping):
        return Candidate(name, MemoryReader(source, f"<memory:{name}>"))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if is_adapter(path):
            return _load_adapter(path, name, adapter_base)
        folder = path if path.is_dir() else None
        return Candidate(name, open_path(path), os.fspath(source), folder)
    raise CandidateError(
        f"cannot load a candidate from a {type(source).__name__}; "
        "give a file or folder path, an nn.Module, a dict of tensors or a Candidate"
    )


def default_name(source: CandidateSource, index: int) -> str:
    """File stem, folder name, the Candidate's own name, or ``candidate{index}`` for memory."""
    if isinstance(source, Candidate):
        return source.name
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return p.resolve().name or str(p)
        if p.name.lower().endswith(INDEX_SUFFIX):  # model.safetensors.index.json -> model
            return Path(p.name[: -len(INDEX_SUFFIX)]).stem
        return p.stem
    return f"candidate{index}"


def _describe_source(source: CandidateSource, name: str) -> str:
    if isinstance(source, Candidate):
        return source.source
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<memory:{name}>"


def load_candidates(
    sources: Sequence[CandidateSource],
    names: Sequence[str] | None = None,
    *,
    min_count: int = 2,
    adapter_base: Path | None = None,
) -> list[Candidate]:
    """Open and validate all candidates from their headers; names are unique (auto names get
    ``-1``, ``-2``...)."""
    from .validate import validate_candidates  # validate imports this module

    if isinstance(sources, (str, os.PathLike, Mapping, torch.nn.Module, Candidate)):
        raise CandidateError("sources must be a list of candidates, not a single one")
    sources = list(sources)
    final_names = _choose_names(sources, names)
    if len(sources) < min_count:
        got = ", ".join(_describe_source(s, n) for s, n in zip(sources, final_names, strict=True))
        raise CandidateError(
            f"need at least {min_count} candidates to merge, got {len(sources)}"
            + (f": {got}" if got else "")
        )
    candidates = [_load_one(s, n, adapter_base) for s, n in zip(sources, final_names, strict=True)]
    validate_candidates(candidates)
    return candidates


def _choose_names(sources: Sequence[CandidateSource], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return _dedupe([default_name(s, i) for i, s in enumerate(sources)])
    names = list(names)
    if len(names) != len(sources):
        raise CandidateError(f"got {len(names)} names for {len(sources)} candidates")
    if any(not isinstance(n, str) or not n for n in names):
        raise CandidateError(f"candidate names must be non-empty strings, got {names}")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise CandidateError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
    return names


def _dedupe(names: list[str]) -> list[str]:
    """Number every repeated name ``name-1``, ``name-2``..., skipping names already taken."""
    counts = Counter(names)
    taken = set(names)
    last: Counter[str] = Counter()
    out = []
    for n in names:
        if counts[n] == 1:
            out.append(n)
            continue
        k = last[n] + 1
        while f"{n}-{k}" in taken:
            k += 1
        last[n] = k
        taken.add(f"{n}-{k}")
        out.append(f"{n}-{k}")
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint file or Hugging Face folder into a CPU state dict (for small
    checkpoints, scripts and tests; the merge itself never does this)."""
    reader = open_path(Path(path))
    try:
        return {k: reader.read(k).contiguous() for k in reader.infos()}
    finally:
        reader.close()
