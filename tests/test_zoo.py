"""Tests for softmerge.zoo: model shapes, deterministic training, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from softmerge.data import Splits, digits_splits
from softmerge.errors import DataError
from softmerge.zoo import (
    CNN1D,
    CNN2D,
    MLP,
    ResNet1D,
    build_model,
    evaluate,
    predict_logits,
    train,
)


@pytest.fixture(scope="module")
def digits() -> Splits:
    return digits_splits(num_merge=300, num_test=400, seed=0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (MLP(64, (32,)), (5, 64)),
        (MLP(784), (5, 1, 28, 28)),  # flattens its input
        (CNN1D(), (5, 40)),
        (CNN1D(), (5, 1, 40)),
        (CNN2D(), (5, 1, 28, 28)),
        (CNN2D(), (5, 784)),
        (ResNet1D(), (5, 40)),
    ],
)
def test_models_forward_to_logits(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    assert model(torch.randn(shape)).shape == (5, 10)


def test_build_model_names_and_seed() -> None:
    assert isinstance(build_model("cnn1d", num_classes=3), CNN1D)
    assert isinstance(build_model("ResNet1D"), ResNet1D)
    assert _same_weights(build_model("cnn2d", seed=1), build_model("cnn2d", seed=1))
    assert not _same_weights(build_model("cnn2d", seed=1), build_model("cnn2d", seed=2))
    with pytest.raises(ValueError, match="cnn1d, cnn2d, mlp, resnet1d"):
        build_model("vit")


def test_build_model_seed_leaves_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("mlp", seed=0, in_features=8)
    assert torch.equal(torch.rand(3), expected)


def _train_small(data: TensorDataset, seed: int, model_seed: int = 0) -> torch.nn.Module:
    model = build_model("resnet1d", seed=model_seed, channels=4, length=64)
    return train(model, data, epochs=1, batch_size=64, seed=seed, augment=_jitter)


def _jitter(x: torch.Tensor) -> torch.Tensor:
    return x + 0.01 * torch.randn_like(x)  # uses the global RNG: train seeds it in a fork


def test_train_deterministic_per_seed(digits: Splits) -> None:
    data = TensorDataset(*(t[:256] for t in digits.train.tensors))
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    a = _train_small(data, seed=0)
    assert torch.equal(torch.rand(3), expected)  # caller's RNG untouched
    b = _train_small(data, seed=0)
    c = _train_small(data, seed=1)
    assert _same_weights(a, b)  # BatchNorm buffers included
    assert not _same_weights(a, c)


def test_train_mlp_on_digits(digits: Splits) -> None:
    model = build_model("mlp", seed=0, in_features=64, hidden=(128,))
    before, _ = evaluate(model, digits.test)
    assert train(model, digits.train, epochs=10, batch_size=64, seed=0) is model
    acc, loss = evaluate(model, digits.test)
    assert acc > 80.0
    assert acc > before
    assert 0.0 < loss < 1.0
    # A loader gives the same result, and evaluation restores the training mode.
    assert evaluate(model, DataLoader(digits.test, batch_size=37)) == pytest.approx((acc, loss))
    assert model.training


def test_evaluate_returns_percent() -> None:
    x = torch.eye(4)
    y = torch.tensor([0, 1, 2, 0])
    model = torch.nn.Identity()
    acc, loss = evaluate(model, TensorDataset(x, y))
    assert acc == pytest.approx(75.0)
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert loss == pytest.approx(expected)


def test_predict_logits_order_and_shape(digits: Splits) -> None:
    model = build_model("mlp", seed=0, in_features=64, hidden=(16,))
    logits = predict_logits(model, digits.test, batch_size=128)
    assert logits.shape == (400, 10)
    with torch.no_grad():
        direct = model(digits.test.tensors[0])
    torch.testing.assert_close(logits, direct)


def test_empty_data_raises() -> None:
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(DataError, match="empty"):
        train(MLP(4), empty, epochs=1)
    with pytest.raises(DataError, match="empty"):
        evaluate(MLP(4), empty)
