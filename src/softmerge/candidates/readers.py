"""Lazy readers: a checkpoint's keys, shapes and dtypes from its header, tensors one at a time.

Nothing here loads a whole checkpoint. ``safetensors`` files are opened with ``safe_open`` and
read tensor by tensor; pickled PyTorch files are opened with ``torch.load(mmap=True,
weights_only=True)``, which maps the file and builds no tensor data until it is touched;
``*.index.json`` shard indexes are checked against each shard's header. A reader can be closed
between passes (its mapping is dropped) and reopens itself on the next read.

Every problem is a :class:`~softmerge.errors.CandidateError` naming the file and what is wrong.
Pickles are only ever opened with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CandidateError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUPPORTED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
INDEX_SUFFIX = ".index.json"
# Looked for in this order: safetensors first because it cannot execute code.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Training checkpoints often wrap the model's state dict under one of these keys.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
DDP_PREFIX = "module."

# safetensors' dtype names (header strings) -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Reader:
    """Keys, shapes and dtypes of one checkpoint, and its tensors one at a time (CPU)."""

    source: str

    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Drop open handles and mappings; the next read reopens them."""

    def factors(self, key: str) -> Any:
        """Low-rank factors of ``key`` when the reader is a LoRA adapter (else None)."""
        return None


# --------------------------------------------------------------------------- safetensors


class SafetensorsReader(Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)
        self._handle: Any = None
        handle = self._open()
        self._infos = {
            k: TensorInfo(tuple(handle.get_slice(k).get_shape()), self._dtype(handle, k))
            for k in handle.keys()  # noqa: SIM118  (a safe_open handle is not a dict)
        }

    def _open(self) -> Any:
        if self._handle is None:
            try:
                # safetensors reports any failure to open (EACCES included) as "No such file or
                # directory"; opening it here first gives the true reason.
                with open(self.path, "rb"):
                    pass
                # pread, not mmap: a mapped file's pages count in the process's memory for as
                # long as the file is open; read bytes are freed with their tensor.
                self._handle = safe_open(
                    str(self.path), framework="pt", device="cpu", backend="pread"
                )
            except SafetensorError as exc:
                raise CandidateError(
                    f"{self.path}: not a valid safetensors file (truncated or corrupt?): {exc}"
                ) from exc
            except OSError as exc:
                raise CandidateError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        return self._handle

    def _dtype(self, handle: Any, key: str) -> torch.dtype:
        name = handle.get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CandidateError(f"{self.path}: tensor '{key}' has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._open().get_tensor(key)
        except SafetensorError as exc:  # data cut short after a valid header
            raise CandidateError(
                f"{self.path}: not a valid safetensors file (truncated or corrupt?): "
                f"tensor '{key}': {exc}"
            ) from exc

    def close(self) -> None:
        self._handle = None


# --------------------------------------------------------------------------- pickles


class PickleReader(Reader):
    """A ``torch.save`` file, memory-mapped: no tensor data is read until it is used."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)
        self._state: Mapping[str, torch.Tensor] | None = None
        state = self._load()
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}

    def _load(self) -> Mapping[str, torch.Tensor]:
        if self._state is None:
            obj = _torch_load(self.path)
            state = _unwrap(obj, self.path)
            require_tensors(state, str(self.path))
            self._state = state
        return self._state

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        return self._load()[key].detach()

    def close(self) -> None:
        self._state = None  # unmaps the file once no tensor read from it is alive


def _torch_load(p: Path) -> Any:
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files written before torch 1.6's zip format cannot be mapped: read them whole.
            return torch.load(p, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CandidateError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises many types (KeyError, EOFError...) on corrupt files
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and _is_refusal(text):
            raise CandidateError(_refused_message(p, text)) from exc
        detail = load_error_detail(text) or type(exc).__name__
        raise CandidateError(
            f"{p}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {detail}"
        ) from exc


def _is_refusal(text: str) -> bool:
    """Tell "weights_only met an object it will not build" from a plain corrupt stream.

    Both raise UnpicklingError; only the first names a GLOBAL or an unallowlisted class.
    """
    return "weights only load failed" in text.lower() and (
        "GLOBAL " in text or "allowlisted" in text
    )


def load_error_detail(text: str) -> str:
    """One informative line from torch's error; its weights-only preamble would only mislead."""
    found = re.search(r"WeightsUnpickler error:[ \t]*(\S[^\n]*)", text)
    if found:
        return found.group(1).strip()
    if "weights only load failed" in text.lower():
        return "not a valid pickle stream"
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # torch appends advice sentences to some errors ("This is an internal miniz error. If...").
    return re.split(r"(?<=[a-z)])\. (?=[A-Z])", line, maxsplit=1)[0]


def _refused_message(p: Path, detail: str) -> str:
    found = re.search(r"GLOBAL (\S+)", detail)
    what = f" (it references {found.group(1)})" if found else ""
    return (
        f"{p}: refused to load: the pickle contains non-tensor objects that could execute code "
        f"when loaded{what}. Only plain tensor state dicts are accepted; if you trust the file, "
        f"load it yourself and save the state dict with safetensors.torch.save_file"
    )


def _unwrap(obj: Any, p: Path) -> Mapping[str, Any]:
    """Return the model's state dict from a bare state dict or a training-checkpoint wrapper."""
    if not isinstance(obj, Mapping):
        raise CandidateError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    # Count only keys whose value really is a state dict, so {"model": "resnet18", ...} works.
    wrapped = [k for k in WRAPPER_KEYS if k in obj and _is_tensor_dict(obj[k])]
    if len(wrapped) == 1:
        return obj[wrapped[0]]
    if len(wrapped) > 1:
        raise CandidateError(
            f"{p}: ambiguous checkpoint: keys {wrapped} all hold state dicts; "
            "save the model's state dict on its own"
        )
    return obj


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


# --------------------------------------------------------------------------- memory


class MemoryReader(Reader):
    """A state dict (or a module's) already in memory. Nothing is copied: the merge only ever
    reads these tensors, and the stack copies what it needs into its own buffer."""

    def __init__(self, state: Mapping[Any, Any], source: str) -> None:
        require_tensors(state, source)
        self.source = source
        self._state = {k: v.detach() for k, v in state.items()}
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._state.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        return self._state[key]


# --------------------------------------------------------------------------- shards


class ShardedReader(Reader):
    """A ``*.index.json`` and the shards its ``weight_map`` names, each checked from its header."""

    def __init__(self, index: Path) -> None:
        self.source = str(index)
        weight_map = _read_weight_map(index)
        self._shards: dict[str, Reader] = {}
        self._where: dict[str, str] = {}
        for shard in dict.fromkeys(weight_map.values()):
            reader = open_weights_file(_shard_path(index, shard))
            listed = [k for k, s in weight_map.items() if s == shard]
            missing = [k for k in listed if k not in reader.infos()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CandidateError(
                    f"{index}: tensor '{missing[0]}' is listed in weight_map for shard "
                    f"'{shard}' but that shard does not contain it{more}"
                )
            clash = next((k for k in reader.infos() if k in self._where), None)
            if clash is not None:
                raise CandidateError(f"{index}: tensor '{clash}' appears in more than one shard")
            self._shards[shard] = reader
            self._where.update(dict.fromkeys(reader.infos(), shard))
        self._infos = {k: self._shards[s].infos()[k] for k, s in self._where.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        return self._shards[self._where[key]].read(key)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CandidateError(f"{index}: cannot read shard index: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CandidateError(
            f"{index}: shard index has no 'weight_map' mapping tensor names to shard files"
        )
    return weight_map


def _shard_path(index: Path, shard: str) -> Path:
    # A shard name must stay inside the index's folder: the index is untrusted input.
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise CandidateError(f"{index}: shard '{shard}' points outside the index's folder")
    path = index.parent / shard
    if not path.is_file():
        raise CandidateError(f"{index}: shard '{shard}' listed in weight_map is missing")
    return path


# --------------------------------------------------------------------------- renaming keys


class PrefixStripped(Reader):
    """Drops the ``module.`` prefix DistributedDataParallel adds (only when every key has it)."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.source = inner.source
        self._infos = {k[len(DDP_PREFIX) :]: v for k, v in inner.infos().items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        return self.inner.read(DDP_PREFIX + key)

    def close(self) -> None:
        self.inner.close()


class Aliased(Reader):
    """A reader that also answers to other names (tied weights a checkpoint stored once)."""

    def __init__(self, inner: Reader, aliases: Mapping[str, str]) -> None:
        self.inner = inner
        self.source = inner.source
        self.aliases = dict(aliases)
        infos = inner.infos()
        self._infos = {**infos, **{a: infos[k] for a, k in self.aliases.items()}}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        return self.inner.read(self.aliases.get(key, key))

    def factors(self, key: str) -> Any:
        return self.inner.factors(self.aliases.get(key, key))

    def close(self) -> None:
        self.inner.close()


def without_ddp_prefix(reader: Reader) -> Reader:
    keys = reader.infos()
    if keys and all(k.startswith(DDP_PREFIX) for k in keys):
        return PrefixStripped(reader)
    return reader


# --------------------------------------------------------------------------- opening paths


def open_weights_file(p: Path) -> Reader:
    """One weights file: safetensors or a pickle (also used for shards)."""
    name = p.name.lower()
    if name.endswith(".safetensors"):
        return SafetensorsReader(p)
    if name.endswith(PICKLE_SUFFIXES):
        return PickleReader(p)
    raise CandidateError(
        f"{p}: unsupported file type '{p.suffix}'; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
        f"a '*{INDEX_SUFFIX}' shard index, or a Hugging Face model folder"
    )


def hf_weights_file(folder: Path) -> Path:
    """The weights file of a Hugging Face model folder, safetensors first."""
    for fname in HF_WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    present = sorted(
        f.name for f in folder.iterdir() if f.name.lower().endswith(SUPPORTED_SUFFIXES)
    )
    hint = f" (it has: {', '.join(present[:5])}{', ...' * (len(present) > 5)})" if present else ""
    raise CandidateError(
        f"{folder}: no model weights found in folder; looked for {', '.join(HF_WEIGHT_FILES)}{hint}"
    )


def open_path(path: Path) -> Reader:
    """A reader for a checkpoint file, a shard index or a Hugging Face model folder."""
    if path.is_dir():
        path = hf_weights_file(path)
    elif not path.exists():
        raise CandidateError(f"{path}: no such file or folder")
    if path.name.lower().endswith(INDEX_SUFFIX):
        reader: Reader = ShardedReader(path)
    else:
        reader = open_weights_file(path)
    if not reader.infos():
        raise CandidateError(f"{path}: state dict is empty (no tensors)")
    return without_ddp_prefix(reader)


# --------------------------------------------------------------------------- checks


def require_tensors(state: Mapping[Any, Any], origin: str) -> None:
    """Reject non-string keys and anything but dense tensors, naming the offending key."""
    if not state:
        raise CandidateError(f"{origin}: state dict is empty (no tensors)")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CandidateError(f"{origin}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CandidateError(
                f"{origin}: key '{key}' holds a {type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided:
            raise CandidateError(f"{origin}: tensor '{key}' is {value.layout}; only dense tensors")
        if value.is_meta:
            raise CandidateError(f"{origin}: tensor '{key}' is on the meta device and has no data")


def read_all(reader: Reader, keys: Iterator[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor (or ``keys``) as one dict: for small checkpoints and tests only."""
    wanted = list(keys) if keys is not None else list(reader.infos())
    return {k: reader.read(k) for k in wanted}


Opener = Callable[[Path], Reader]
