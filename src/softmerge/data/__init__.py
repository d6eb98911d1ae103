"""Data sets for training candidates and learning merges: train / merge / test splits.

Text for Hugging Face models (local files, ``save_to_disk`` folders, LM blocks) lives in
:mod:`softmerge.data.text`; it needs the ``hf`` extra only when called.

Every loader returns a :class:`Splits` whose ``merge`` part is held out from training, so merge
gates or greedy soups are tuned on data that none of the candidates has seen. MNIST is found by
:func:`resolve_mnist` (an explicit folder, ``$SOFTMERGE_DATA/mnist``, the user cache, else a
verified download into the cache).
"""

from __future__ import annotations

from collections.abc import Callable

from softmerge.data.digits import digits_splits
from softmerge.data.locate import cache_dir, download_mnist, find_mnist_files, resolve_mnist
from softmerge.data.mnist import mnist_splits, read_idx
from softmerge.data.mnist1d import mnist1d_splits
from softmerge.data.splits import Splits
from softmerge.data.text import (
    TokenBlocks,
    check_batch_fields,
    check_block_size,
    check_labels,
    check_tokenizer_fits,
    collate_dict,
    load_hf_disk,
    load_text_files,
    load_tokenizer,
    tokenize_blocks,
    tokenize_classification,
)
from softmerge.errors import DataError

__all__ = [
    "LOADERS",
    "Splits",
    "TokenBlocks",
    "cache_dir",
    "check_batch_fields",
    "check_block_size",
    "check_labels",
    "check_tokenizer_fits",
    "collate_dict",
    "digits_splits",
    "download_mnist",
    "find_mnist_files",
    "load_hf_disk",
    "load_splits",
    "load_text_files",
    "load_tokenizer",
    "mnist1d_splits",
    "mnist_splits",
    "read_idx",
    "resolve_mnist",
    "tokenize_blocks",
    "tokenize_classification",
]

LOADERS: dict[str, Callable[..., Splits]] = {
    "mnist1d": mnist1d_splits,
    "mnist": mnist_splits,
    "digits": digits_splits,
}


def load_splits(name: str, **kwargs: object) -> Splits:
    """Build the splits of the data set ``name``; ``kwargs`` go to its loader."""
    try:
        loader = LOADERS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(LOADERS))
        raise DataError(f"unknown data set {name!r}; valid names: {valid}") from None
    return loader(**kwargs)
