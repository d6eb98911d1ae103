"""Text data for Hugging Face models: local files or saved data sets, tokenised into batches.

Two ways in, both local (nothing is downloaded):

- :func:`load_text_files` reads ``.txt``, ``.jsonl``, ``.csv`` and ``.parquet`` files through the
  ``datasets`` library. A ``.txt`` file is **one document** (source code and prose span lines,
  so cutting at newlines would tear them apart); a ``.jsonl``/``.csv``/``.parquet`` row is one
  document, its text in the ``text`` field or the one named by ``column``.
- :func:`load_hf_disk` opens a folder written by ``datasets``' ``save_to_disk`` (one data set or
  a dict of splits), with ``columns`` naming the text and label columns and ``split`` a split.

Both return a ``datasets.Dataset`` whose columns are ``text`` (and ``label`` when asked for).
:func:`tokenize_blocks` turns it into causal-LM blocks and :func:`tokenize_classification` into
padded sequences with one class id each; both give a :class:`TokenBlocks`, a torch ``Dataset``
of dicts that :func:`collate_dict` batches. **Text longer than the model's positions is
chunked** for language modelling: documents are concatenated (EOS between them) and cut into
blocks of ``block_size`` tokens, so no text is lost; for classification each text is truncated
to ``max_length`` tokens (one label per sequence).

The checks (:func:`check_batch_fields`, :func:`check_tokenizer_fits`, :func:`check_labels`,
:func:`check_block_size`) turn the silent failures of text pipelines (a dropped field, a token
id past the embedding table, a NaN loss from a batch with no target) into one DataError.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from softmerge.errors import DataError

if typing.TYPE_CHECKING:  # imported lazily: `datasets` and `transformers` are the hf extra
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "TEXT_SUFFIXES",
    "TokenBlocks",
    "accepted_fields",
    "check_batch_fields",
    "check_block_size",
    "check_labels",
    "check_tokenizer_fits",
    "collate_dict",
    "load_hf_disk",
    "load_text_files",
    "load_tokenizer",
    "tokenize_blocks",
    "tokenize_classification",
]

IGNORE_INDEX = -100  # the label PyTorch's and Hugging Face's cross-entropy skip
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
# datasets' packaged builder for each tabular suffix (.txt is read directly: one document).
_BUILDERS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_ROLES = ("text", "label")
_TOKENIZE_BATCH = 256  # documents per tokenizer call: fast, and bounded memory


def _hf_datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise DataError(
            "text data needs the 'datasets' package: pip install 'softmerge[hf]'"
        ) from exc
    return datasets


# --------------------------------------------------------------------------- reading files


def load_text_files(
    files: Sequence[str | os.PathLike[str]],
    *,
    column: str | None = None,
    label_column: str | None = None,
) -> datasets.Dataset:
    """Read local text files into one ``datasets.Dataset`` with a ``text`` column.

    ``.txt``: the whole file is one document. ``.jsonl`` / ``.csv`` / ``.parquet``: one
    document per row, its text in ``column`` (default ``text``); ``label_column`` also keeps
    that column as ``label``. Rows with no text (empty or null) are dropped. Every problem is a
    DataError naming the file: missing, empty, not UTF-8 (with the byte offset), an unknown
    suffix, a missing column (listing those present) or no text at all.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise DataError("no text files given")
    datasets = _hf_datasets()
    parts = [_load_one_file(Path(f), column, label_column) for f in files]
    try:
        merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except (ValueError, TypeError) as exc:  # e.g. int labels in one file, strings in another
        names = ", ".join(str(f) for f in files)
        raise DataError(f"text files {names} do not share column types: {exc}") from exc
    return merged


def _load_one_file(path: Path, column: str | None, label_column: str | None) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(
            f"{path}: unknown text file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(TEXT_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if suffix != ".parquet":  # parquet is binary; arrow itself validates its strings
        _read_utf8(path)
    if suffix == ".txt":
        if column is not None or label_column is not None:
            raise DataError(f"{path}: a .txt file has no columns; drop column/label_column")
        return _hf_datasets().Dataset.from_dict({"text": [_read_utf8(path)]})
    table = _read_table(path, _BUILDERS[suffix])
    return _select_columns(table, str(path), column or "text", label_column)


def _read_utf8(path: Path) -> str:
    """The file's text; empty (or whitespace only) and non-UTF-8 files are errors."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{bad} at offset {exc.start} ({exc.reason}); "
            "convert the file to UTF-8"
        ) from exc
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no text)")
    return text


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars for small local reads; restores the user's setting afterwards."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _read_table(path: Path, builder: str) -> datasets.Dataset:
    """One jsonl/csv/parquet file through datasets' packaged builder, fully in memory.

    The builder's cache goes to a temporary folder that is removed afterwards: reading a local
    file should leave nothing behind in the user's home."""
    datasets = _hf_datasets()
    with tempfile.TemporaryDirectory(prefix="softmerge-text-") as cache, _quiet_datasets():
        try:
            return datasets.load_dataset(
                builder,
                data_files=[str(path)],
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
            )
        except Exception as exc:  # the builders raise many types (ArrowInvalid, ParserError...)
            reason = str(exc).strip().splitlines()
            cause = exc.__cause__
            detail = reason[0] if reason else type(exc).__name__
            if cause is not None and str(cause).strip():
                detail = f"{detail}: {str(cause).strip().splitlines()[0]}"
            raise DataError(f"{path}: cannot read as {builder}: {detail}") from exc


def _select_columns(
    table: datasets.Dataset, origin: str, text_column: str, label_column: str | None
) -> datasets.Dataset:
    """Keep the text column (as ``text``) and the label column (as ``label``), drop the rest."""
    wanted = {"text": text_column, **({"label": label_column} if label_column else {})}
    for role, name in wanted.items():
        if name not in table.column_names:
            present = ", ".join(table.column_names) or "(none)"
            raise DataError(f"{origin}: no {role} column {name!r}; the columns are: {present}")
    dtype = getattr(table.features[text_column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"{origin}: column {text_column!r} holds {dtype or table.features[text_column]}, "
            "not text"
        )
    table = table.select_columns(list(wanted.values()))
    renames = {name: role for role, name in wanted.items() if name != role}
    if renames:
        table = table.rename_columns(renames)
    with _quiet_datasets():
        table = table.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(table) == 0:
        raise DataError(f"{origin}: no text: every row of column {text_column!r} is empty")
    return table


def load_hf_disk(
    folder: str | os.PathLike[str],
    *,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> datasets.Dataset:
    """A data set saved with ``datasets``' ``save_to_disk``, as columns ``text`` (+ ``label``).

    ``columns`` maps the roles ``text`` and ``label`` to column names (default
    ``{"text": "text"}``; add ``"label"`` for classification). A folder holding several splits
    needs ``split`` (one split alone is taken as is); a wrong split name lists the names.
    """
    datasets = _hf_datasets()
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (a data set saved with save_to_disk)")
    roles = dict(columns or {"text": "text"})
    unknown = sorted(set(roles) - set(_ROLES))
    if unknown or "text" not in roles:
        raise DataError(
            f"{path}: columns must map 'text' (and optionally 'label') to column names, "
            f"got {dict(roles)}"
        )
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a data set saved with save_to_disk: {exc}") from exc
    table = _pick_split(loaded, path, split)
    return _select_columns(table, str(path), roles["text"], roles.get("label"))


def _pick_split(loaded: Any, path: Path, split: str | None) -> datasets.Dataset:
    datasets = _hf_datasets()
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise DataError(
                f"{path}: holds one data set without splits, so split {split!r} does not apply"
            )
        return loaded
    names = list(loaded.keys())
    if split is None:
        if len(names) == 1:
            return loaded[names[0]]
        raise DataError(f"{path}: holds the splits {', '.join(names)}: choose one with split")
    if split not in loaded:
        raise DataError(f"{path}: no split {split!r}; the splits are: {', '.join(names)}")
    return loaded[split]


def load_tokenizer(folder: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder`` (a model folder by default), from local files only."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{path}: no such tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise DataError(
            f"{path}: cannot load a tokenizer: {first[0] if first else type(exc).__name__}"
        ) from exc


# --------------------------------------------------------------------------- tokenising


class TokenBlocks(TorchDataset):
    """Tokenised examples as equal-length tensors; item ``i`` is ``{field: tensor[i]}``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label_names: Sequence[str] = ()):
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"fields of different lengths: {sizes}")
        self.tensors = dict(tensors)
        self.label_names = list(label_names)  # class names of string labels, by class id

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values()))) if self.tensors else 0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def target_tokens(self) -> int:
        """Positions that are a next-token target (causal LM labels, after the shift)."""
        labels = self.tensors["labels"]
        return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() == 2 else len(labels)


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError(
        f"tokenizer {_tokenizer_name(tokenizer)} has no EOS (or SEP) token to separate "
        "documents; set tokenizer.eos_token"
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The pad id, else EOS: padded positions are masked out and never a target anyway."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _texts(dataset: Any, column: str) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"no text column {column!r}; the columns are: {', '.join(names)}")
    return [t for t in dataset[column] if t and t.strip()]


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Iterator[list[int]]:
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        # verbose=False: longer-than-max_length warnings do not apply, the blocks cut the text.
        encoded = tokenizer(
            list(texts[start : start + _TOKENIZE_BATCH]), add_special_tokens=False, verbose=False
        )
        yield from encoded["input_ids"]


def tokenize_blocks(
    dataset: Any, tokenizer: PreTrainedTokenizerBase, block_size: int, *, column: str = "text"
) -> TokenBlocks:
    """Causal-LM blocks: every document tokenised, EOS after each, cut into ``block_size``.

    Items are ``{input_ids, attention_mask, labels}`` of length ``block_size``. ``labels`` are
    the input ids (Hugging Face convention: the loss shifts them), -100 on padding. A final
    block shorter than ``block_size`` is padded (pad id, attention_mask 0, label -100); one
    with fewer than 2 real tokens holds no next-token target and is dropped. Long documents span
    several blocks: text longer than the model's positions is chunked, never truncated.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
    separator = _separator_id(tokenizer)
    stream: list[int] = []
    for ids in _token_ids(tokenizer, _texts(dataset, column)):
        stream.extend(ids)
        stream.append(separator)
    full, rest = divmod(len(stream), block_size)
    ids = torch.tensor(stream[: full * block_size], dtype=torch.long).view(full, block_size)
    mask = torch.ones_like(ids)
    if rest >= 2:
        pad = _pad_id(tokenizer)
        assert pad is not None  # the separator exists, so EOS or SEP does: see _pad_id
        tail = torch.full((1, block_size), pad, dtype=torch.long)
        tail[0, :rest] = torch.tensor(stream[full * block_size :], dtype=torch.long)
        tail_mask = torch.zeros_like(tail)
        tail_mask[0, :rest] = 1
        ids, mask = torch.cat([ids, tail]), torch.cat([mask, tail_mask])
    if len(ids) == 0:
        raise DataError(
            f"no text to model: the data set has {len(stream)} tokens, fewer than 2 "
            f"(column {column!r})"
        )
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return TokenBlocks({"input_ids": ids, "attention_mask": mask, "labels": labels})


def tokenize_classification(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    column: str = "text",
    label_column: str = "label",
) -> TokenBlocks:
    """Sequence classification: each text padded or truncated to ``max_length`` tokens.

    Items carry every field the tokenizer makes (``input_ids``, ``attention_mask``, and
    ``token_type_ids`` for BERT-like tokenizers) and ``labels``, one class id. Integer labels
    are kept; string labels become ids in sorted order (``TokenBlocks.label_names``).
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    names = list(getattr(dataset, "column_names", []))
    for role, name in (("text", column), ("label", label_column)):
        if name not in names:
            raise DataError(f"no {role} column {name!r}; the columns are: {', '.join(names)}")
    texts, raw_labels = list(dataset[column]), list(dataset[label_column])
    labels, label_names = _class_ids(raw_labels, label_column)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(
                f"tokenizer {_tokenizer_name(tokenizer)} has no pad token (nor EOS to pad "
                "with); set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        [t or "" for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    tensors = {k: v.long() for k, v in encoded.items()}
    tensors["labels"] = torch.tensor(labels, dtype=torch.long)
    return TokenBlocks(tensors, label_names)


def _class_ids(values: Sequence[Any], column: str) -> tuple[list[int], list[str]]:
    if not values:
        raise DataError(f"label column {column!r} is empty")
    for row, value in enumerate(values):
        if value is None:
            raise DataError(f"label column {column!r}: row {row} has no label")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in values], names
    for row, value in enumerate(values):
        if not isinstance(value, int) or value < 0:  # bool is an int: True/False become 1/0
            raise DataError(
                f"label column {column!r}: row {row} holds {value!r}; labels must be class "
                "ids (integers >= 0) or class names (strings)"
            )
    return [int(v) for v in values], []


def collate_dict(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of dict items field by field (a DataLoader ``collate_fn``)."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    keys = list(batch[0])
    for i, item in enumerate(batch[1:], start=1):
        if set(item) != set(keys):
            diff = sorted(set(item) ^ set(keys))
            raise DataError(f"batch item {i} has other fields than item 0: {', '.join(diff)}")
    return {k: torch.stack([torch.as_tensor(item[k]) for item in batch]) for k in keys}


# --------------------------------------------------------------------------- checks


def _forward_of(model: Any) -> Any:
    """The forward whose signature decides: a PEFT wrapper forwards to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "forward", base)


def accepted_fields(model: Any) -> frozenset[str] | None:
    """Keyword arguments ``model``'s forward accepts, or None when it accepts any.

    A plain ``**kwargs`` accepts anything. Hugging Face forwards declare
    ``**kwargs: Unpack[TypedDict]`` (PEP 692): only that TypedDict's keys are accepted, so a
    ``token_type_ids`` passed to a Llama model is caught rather than ignored."""
    signature = inspect.signature(_forward_of(model))
    accepted: set[str] = set()
    for param in signature.parameters.values():
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            accepted.add(param.name)
        elif param.kind is param.VAR_KEYWORD:
            declared = _unpacked_keys(param.annotation)
            if declared is None:
                return None
            accepted |= declared
    return frozenset(accepted)


def _unpack_forms() -> tuple[Any, ...]:
    """``Unpack`` as typing (3.11+) and typing_extensions (3.10: transformers uses it) spell it."""
    forms = [getattr(typing, "Unpack", None)]
    try:
        from typing_extensions import Unpack
    except ImportError:  # pragma: no cover - transformers depends on typing_extensions
        Unpack = None
    forms.append(Unpack)
    return tuple(f for f in forms if f is not None)


def _unpacked_keys(annotation: Any) -> set[str] | None:
    """Keys of ``Unpack[SomeTypedDict]``; None for any other annotation (anything goes)."""
    if typing.get_origin(annotation) not in _unpack_forms():
        return None
    (inner,) = typing.get_args(annotation)
    keys = getattr(inner, "__annotations__", None)
    return set(keys) if isinstance(keys, dict) else None


def check_batch_fields(
    model: Any, batch_keys: Sequence[str], *, target_key: str = "labels"
) -> None:
    """Every field of a batch (except the target) must be an argument of the model's forward.

    A field the model does not accept is an error naming it: dropping it silently would
    change what the model computes (a missing attention mask attends to padding)."""
    accepted = accepted_fields(model)
    if accepted is None:
        return
    rejected = [k for k in batch_keys if k != target_key and k not in accepted]
    if rejected:
        owner = type(model.get_base_model() if hasattr(model, "get_base_model") else model)
        named = sorted(k for k in accepted if k not in ("self", "kwargs"))
        raise DataError(
            f"batch field {rejected[0]!r} is not an argument of {owner.__name__}.forward "
            f"(it takes: {', '.join(named)}); remove it from the data or use a model that "
            "accepts it"
        )


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer's ids must index the model's embedding table (``config.vocab_size``)."""
    size = len(tokenizer)
    if size > vocab_size:
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)} has {size} tokens but the model's "
            f"vocabulary has {vocab_size} (config.vocab_size): token ids {vocab_size}..{size - 1}"
            " would index past the embedding table; use the model's own tokenizer"
        )


def check_block_size(block_size: int, max_positions: int | None) -> None:
    """A block must fit the model's positions (``config.max_position_embeddings``)."""
    if max_positions is not None and block_size > max_positions:
        raise DataError(
            f"block_size {block_size} exceeds the model's {max_positions} positions "
            "(config.max_position_embeddings); longer text is cut into blocks, so lower "
            "block_size"
        )


def check_labels(batch: Mapping[str, torch.Tensor], *, causal: bool = False) -> None:
    """A batch must hold at least one target: all -100 labels give a loss of 0/0 (NaN).

    ``causal``: labels are unshifted LM labels, so position 0 is never a target."""
    labels = batch.get("labels")
    if labels is None:
        raise DataError(f"the batch has no 'labels' (fields: {', '.join(batch)})")
    targets = labels[..., 1:] if causal and labels.dim() >= 2 else labels
    if targets.numel() == 0 or bool((targets == IGNORE_INDEX).all()):
        raise DataError(
            f"every label of the batch is {IGNORE_INDEX} (ignored): nothing to learn from, the "
            "loss would be NaN; check the padding or the label column"
        )
