"""MNIST-1D (Greydanus 2020), generated in-process by the ``mnist1d`` package.

Only ``mnist1d.data.make_dataset`` is used: ``get_dataset`` downloads and writes a pickle, which
must never happen at run time.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator

import numpy as np

from softmerge.data.splits import Splits, check_sizes, permutation, tensor_dataset

NUM_CLASSES = 10
LENGTH = 40  # mnist1d's default final_seq_length


@contextlib.contextmanager
def _preserve_global_rngs() -> Iterator[None]:
    """make_dataset reseeds and draws from the global ``random``/numpy RNGs: restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, train_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All samples (package train part first, then its test part), cached: ~8 s per 15k."""
    import mnist1d.data  # imported here: only this loader needs it

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    with _preserve_global_rngs():
        data = mnist1d.data.make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    # Cached arrays are shared between calls: make accidental in-place edits fail loudly.
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def mnist1d_splits(
    num_train: int = 10_000, num_merge: int = 2_000, num_test: int = 3_000, seed: int = 42
) -> Splits:
    """MNIST-1D with ``num_train + num_merge`` training and ``num_test`` test samples.

    ``seed`` drives both the generator (``args.seed``) and the permutation that cuts the
    package's training part into train / merge.
    """
    check_sizes(None, num_train=num_train, num_merge=num_merge, num_test=num_test)
    pool = num_train + num_merge
    # make_dataset makes num_samples // 10 samples per class: round up, drop the surplus below.
    num_samples = -(-(pool + num_test) // NUM_CLASSES) * NUM_CLASSES
    if num_samples == 0:
        raise ValueError("mnist1d_splits needs at least one sample")
    x, y = _generate(num_samples, pool / num_samples, seed)
    # Cut at ``pool`` ourselves: int(len * train_split) inside the package may round down by one.
    order = permutation(pool, seed)
    train_idx, merge_idx = order[:num_train], order[num_train:]
    test_idx = np.arange(pool, pool + num_test)
    return Splits(
        name="mnist1d",
        train=tensor_dataset(x[train_idx], y[train_idx]),
        merge=tensor_dataset(x[merge_idx], y[merge_idx]),
        test=tensor_dataset(x[test_idx], y[test_idx]),
        num_classes=NUM_CLASSES,
        input_shape=(x.shape[1],),
    )
