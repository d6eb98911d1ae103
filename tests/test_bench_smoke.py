"""The benchmark end to end at smoke size: every setting runs, the page and plots are written.

`make bench` runs the same code at full size (docs/results.md); this only checks the machinery:
every table present, every method ran without error, the claims table has its six verdicts,
and the guarantees that hold at any size (frozen candidates, plans honoured, NaN candidates
excluded, extreme candidates closed).

It runs on real MNIST when the user has it (SOFTMERGE_DATA or the user cache). Without it, the
MNIST settings run on a stand-in in MNIST's own IDX format: scikit-learn's 8x8 digits scaled up
to 28x28 (a warning says so). Every check above holds for either, since none depends on the
accuracy reached."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _digits_as_mnist(folder: Path, n_test: int = 400) -> Path:
    """sklearn digits as MNIST IDX files: each 8x8 pixel becomes 3x3, with a 2-pixel border."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = np.kron(digits.images[order], np.ones((3, 3)))  # 8x8 -> 24x24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))) * (255 / 16)
    labels = digits.target[order]
    folder.mkdir(parents=True)
    for stem, part in (("train", slice(n_test, None)), ("t10k", slice(None, n_test))):
        _write_idx(folder / f"{stem}-images-idx3-ubyte", 2051, images[part].round())
        _write_idx(folder / f"{stem}-labels-idx1-ubyte", 2049, labels[part])
    return folder


def test_bench_smoke(tmp_path, real_mnist):
    sys.path.insert(0, str(BENCH))
    try:
        import report
        import run
    finally:
        sys.path.remove(str(BENCH))
    mnist, missing = real_mnist
    if mnist is None:
        warnings.warn(
            f"{missing}. The benchmark smoke test ran its MNIST settings on scikit-learn "
            "digits scaled to 28x28 instead",
            stacklevel=1,
        )
        mnist = _digits_as_mnist(tmp_path / "digits-as-mnist")
    out = tmp_path / "out"
    results = run.main(["--smoke", "--out", str(out), "--quiet", "--mnist", str(mnist)])
    page = report.main(
        ["--results", str(tmp_path / "out" / "results.json"), "--docs", str(tmp_path / "docs")]
    )

    records = results["records"]
    assert {r["setting"] for r in records} == {"S1", "S2", "S3", "S4", "S5"}
    errors = [(r["config"], r["row"], r["error"]) for r in records if "error" in r]
    # Learning methods cannot learn from a NaN candidate (every loss is NaN); everything
    # else must run.
    assert all("nan_inf" in config for config, _, _ in errors), errors
    soft = [r for r in records if r.get("method") == "soft" and "error" not in r]
    assert soft and all(r["frozen"] for r in soft)
    assert all(r["settle_step"] is not None and r["step_ratio"] > 0 for r in soft)
    for r in soft:
        if r["setting"] == "S3":
            assert "nan_inf" not in r["open"]  # excluded before training
            assert "scaled_x100" not in r["open"]
    partial = [r for r in records if r["setting"] == "S4" and r.get("plan_honoured")]
    assert partial and all(r["plan_honoured"]["rest_identical_to"] for r in partial)
    assert results["meta"]["threads"] >= 1 and results["meta"]["seconds"] > 0

    text = page.read_text()
    assert text.count("| **") >= 6  # six verdicts in bold
    for n in range(1, 7):
        assert f"| {n}. " in text
    assert "total **" in text and "thread(s)" in text
    for png in ("s1_accuracy.png", "s3_malicious.png", "s3_gates.png", "cost.png"):
        assert (tmp_path / "docs" / "results" / png).stat().st_size > 1000


def test_bench_without_mnist_stops_at_once_naming_every_place(tmp_path, capsys):
    """`make bench` finds MNIST like the library does; when nothing works (no variable, an
    empty cache, no network: conftest), it stops before training, with the list of places."""
    sys.path.insert(0, str(BENCH))
    try:
        import run
    finally:
        sys.path.remove(str(BENCH))
    with pytest.raises(SystemExit) as stop:
        run.main(["--smoke", "--quiet", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench: MNIST not found; looked at: SOFTMERGE_DATA is not set; ")
    assert "to provide MNIST" in err
    assert not (tmp_path / "out").exists()
