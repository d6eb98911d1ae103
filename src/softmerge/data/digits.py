"""scikit-learn's 8x8 digits (1,797 images, shipped with the package: no download)."""

from __future__ import annotations

import numpy as np

from softmerge.data.splits import Splits, check_sizes, permutation, tensor_dataset


def digits_splits(num_merge: int = 300, num_test: int = 400, seed: int = 0) -> Splits:
    """Seeded split of sklearn's digits: x = pixels / 16 as float32 (N, 64); train = the rest."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0  # pixel values are 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    check_sizes(len(y), num_merge=num_merge, num_test=num_test)
    order = permutation(len(y), seed)
    test_idx = order[:num_test]
    merge_idx = order[num_test : num_test + num_merge]
    train_idx = order[num_test + num_merge :]
    return Splits(
        name="digits",
        train=tensor_dataset(x[train_idx], y[train_idx]),
        merge=tensor_dataset(x[merge_idx], y[merge_idx]),
        test=tensor_dataset(x[test_idx], y[test_idx]),
        num_classes=10,
        input_shape=(64,),
    )
