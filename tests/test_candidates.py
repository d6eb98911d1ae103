"""Tests for softmerge.candidates: loading every checkpoint format, validation, inspection."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from softmerge.candidates import (
    HF_WEIGHT_FILES,
    SUPPORTED_SUFFIXES,
    Candidate,
    count_nonfinite,
    format_inspect,
    inspect_candidates,
    load_candidate,
    load_candidates,
    read_state_dict,
    validate_candidates,
)
from softmerge.errors import CandidateError


def _model(seed: int = 0) -> nn.Module:
    """A tiny MLP with BatchNorm, run once in train mode so its buffers are not defaults."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    model.train()
    model(torch.randn(8, 4))
    return model.eval()


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model(seed).state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)  # safetensors stores keys in its own order
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
        assert got[key].is_contiguous() and got[key].device.type == "cpu"
        assert not got[key].requires_grad


def _cand(name: str, state: dict[str, torch.Tensor]) -> Candidate:
    return load_candidate(state, name)


class _Evil:
    """Unpickling this calls open(path, "w"): creating the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip(tmp_path: Path) -> None:
    want = _state()
    path = tmp_path / "run-a.safetensors"
    save_file(want, str(path))
    _assert_same(read_state_dict(path), want)
    cand = load_candidate(str(path))
    assert (cand.name, cand.source, cand.hf_folder) == ("run-a", str(path), None)
    assert cand.is_finite and cand.nonfinite == {}
    assert "1.running_var" in cand.state and "1.num_batches_tracked" in cand.state


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_plain_round_trip(tmp_path: Path, suffix: str) -> None:
    want = _state()
    path = tmp_path / f"ckpt{suffix}"
    torch.save(want, path)
    _assert_same(read_state_dict(path), want)
    assert load_candidate(path).name == "ckpt"


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_pickle_wrapped_state_dict_is_unwrapped(tmp_path: Path, wrapper: str) -> None:
    want = _state()
    path = tmp_path / "train.pt"
    torch.save({wrapper: want, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    _assert_same(read_state_dict(path), want)


def test_wrapper_next_to_a_model_name_string(tmp_path: Path) -> None:
    # "model" holding a string is not a state dict, so "state_dict" is the only wrapper.
    want = _state()
    path = tmp_path / "train.pt"
    torch.save({"state_dict": want, "model": "mlp"}, path)
    _assert_same(read_state_dict(path), want)


def test_ambiguous_wrappers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save({"state_dict": _state(0), "model": _state(1)}, path)
    with pytest.raises(CandidateError, match="ambiguous") as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "'state_dict'" in str(err.value)


def test_ddp_module_prefix_is_stripped(tmp_path: Path) -> None:
    want = _state()
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in want.items()}}, path)
    _assert_same(read_state_dict(path), want)


def test_prefix_on_only_some_keys_is_kept(tmp_path: Path) -> None:
    state = {"module.a": torch.ones(2), "b": torch.zeros(2)}
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    assert sorted(read_state_dict(path)) == ["b", "module.a"]


def test_hf_folder_single_file(tmp_path: Path) -> None:
    want = _state()
    folder = tmp_path / "my-model"
    folder.mkdir()
    save_file(want, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    cand = load_candidate(folder)
    _assert_same(cand.state, want)
    assert (cand.name, cand.source, cand.hf_folder) == ("my-model", str(folder), folder)


def test_hf_folder_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    folder = tmp_path / "both"
    folder.mkdir()
    save_file(_state(0), str(folder / "model.safetensors"))
    torch.save(_state(1), folder / "pytorch_model.bin")
    _assert_same(read_state_dict(folder), _state(0))


def _write_sharded(folder: Path, state: dict[str, torch.Tensor], fmt: str) -> Path:
    """Split ``state`` over two shards the way Hugging Face does and write the index."""
    folder.mkdir(exist_ok=True)
    keys = list(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        shard = f"{stem}-0000{i}-of-00002.{ext}"
        tensors = {k: state[k] for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(folder / shard))
        else:
            torch.save(tensors, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_folder_sharded(tmp_path: Path, fmt: str) -> None:
    want = _state()
    folder = tmp_path / "sharded"
    _write_sharded(folder, want, fmt)
    got = read_state_dict(folder)
    assert sorted(got) == sorted(want)
    _assert_same({k: got[k] for k in want}, want)
    assert load_candidate(folder).hf_folder == folder


def test_sharded_index_missing_key_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    index = _write_sharded(folder, _state(), "safetensors")
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CandidateError) as err:
        read_state_dict(folder)
    msg = str(err.value)
    assert str(index) in msg and "'extra.weight'" in msg and "model-00001-of-00002" in msg


def test_sharded_index_missing_shard_file(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    _write_sharded(folder, _state(), "safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CandidateError, match=r"model-00002-of-00002\.safetensors.* missing"):
        read_state_dict(folder)


def test_sharded_index_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(CandidateError, match="outside"):
        read_state_dict(folder)


def test_in_memory_module_is_read_not_copied(tmp_path: Path) -> None:
    """A module's candidate holds no second copy of its weights: it reads the module's own
    (detached) tensors, and the merge only ever reads them (see test_resume's freeze test)."""
    model = _model()
    cand = load_candidate(model)
    _assert_same(cand.state, dict(model.state_dict()))
    assert (cand.name, cand.source, cand.hf_folder) == ("candidate0", "<memory:candidate0>", None)
    assert "1.running_mean" in cand.state and cand.state["1.num_batches_tracked"].item() == 1
    weight = cand.state["0.weight"]
    assert weight.data_ptr() == model[0].weight.data_ptr() and not weight.requires_grad


def test_in_memory_dict_and_noncontiguous_tensor() -> None:
    t = torch.arange(6.0).reshape(2, 3).t()  # a transposed view: not contiguous
    source = {"w": t, "b": nn.Parameter(torch.ones(3))}
    cand = load_candidate(source, "mine")
    assert cand.source == "<memory:mine>"
    assert cand.infos["w"].shape == (3, 2) and torch.equal(cand.state["w"], t)
    assert not cand.state["b"].requires_grad
    assert cand.state["w"].data_ptr() == t.data_ptr()  # read, not copied


def test_in_memory_dict_with_non_tensor_names_key() -> None:
    with pytest.raises(CandidateError, match=r"<memory:x>: key 'step' holds a int, not a tensor"):
        load_candidate({"w": torch.ones(1), "step": 3}, "x")


def test_candidate_passthrough_renames_a_copy() -> None:
    original = _cand("a", _state())
    renamed = load_candidate(original, "b")
    assert (renamed.name, original.name) == ("b", "a")
    assert renamed.source == original.source
    assert load_candidate(original).name == "a"


def test_candidate_passthrough_recounts_nonfinite() -> None:
    state = {"w": torch.tensor([1.0, float("nan")])}
    hand_built = Candidate("h", state, "<memory:h>")  # nonfinite left at its default
    assert load_candidate(hand_built).nonfinite == {"w": 1}


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CandidateError, match="no such file") as err:
        load_candidate(path)
    assert str(path) in str(err.value)


def test_folder_without_weights_lists_what_was_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    torch.save(_state(), folder / "weights.pt")
    with pytest.raises(CandidateError) as err:
        read_state_dict(folder)
    msg = str(err.value)
    assert str(folder) in msg and "weights.pt" in msg
    assert all(name in msg for name in HF_WEIGHT_FILES)


def test_truncated_safetensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(_state(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CandidateError, match="not a valid safetensors file") as err:
        read_state_dict(bad)
    assert str(bad) in str(err.value)


def test_truncated_pickle(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_state(), good)
    data = good.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CandidateError, match="truncated or corrupt") as err:
        read_state_dict(bad)
    assert str(bad) in str(err.value)


def test_garbage_pickle_is_corrupt_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"garbage, not a pickle")
    with pytest.raises(CandidateError, match="truncated or corrupt") as err:
        read_state_dict(path)
    assert "refused" not in str(err.value) and str(path) in str(err.value)


def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Evil(marker)}, path)
    with pytest.raises(CandidateError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg
    assert "could execute code" in msg and "safetensors" in msg
    assert not marker.exists()


def test_malicious_payload_is_real(tmp_path: Path) -> None:
    # Guards the test above: an unsafe load of the same file does create the marker.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Evil(marker)}, path)
    loaded = torch.load(path, weights_only=False)
    loaded["payload"].close()  # the payload returned an open file handle
    assert marker.exists()


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(CandidateError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "'.h5'" in msg
    assert all(s in msg for s in SUPPORTED_SUFFIXES)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_empty_state_dict(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    if suffix == ".safetensors":
        save_file({}, str(path))
    else:
        torch.save({}, path)
    with pytest.raises(CandidateError, match="empty") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_non_tensor_value_in_pickle_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(CandidateError) as err:
        read_state_dict(path)
    assert str(err.value) == f"{path}: key 'epoch' holds a int, not a tensor"


def test_pickle_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CandidateError, match="holds a list, not a state dict"):
        read_state_dict(path)


# --------------------------------------------------------------------------- load_candidates


def test_load_candidates_auto_names_are_deduplicated(tmp_path: Path) -> None:
    paths = []
    for i, run in enumerate(["run1", "run2"]):
        (tmp_path / run).mkdir()
        paths.append(tmp_path / run / "model.safetensors")
        save_file(_state(i), str(paths[-1]))
    cands = load_candidates([*paths, _model(2)])
    assert [c.name for c in cands] == ["model-1", "model-2", "candidate2"]
    assert [c.source for c in cands] == [str(paths[0]), str(paths[1]), "<memory:candidate2>"]


def test_load_candidates_dedup_skips_taken_names() -> None:
    a, b = _cand("x", _state(0)), _cand("x", _state(1))
    c = _cand("x-1", _state(2))
    assert [k.name for k in load_candidates([a, b, c])] == ["x-2", "x-3", "x-1"]


def test_load_candidates_user_names() -> None:
    cands = load_candidates([_state(0), _model(1)], names=["base", "tuned"])
    assert [c.name for c in cands] == ["base", "tuned"]
    assert cands[1].source == "<memory:tuned>"


def test_load_candidates_rejects_duplicate_user_names() -> None:
    with pytest.raises(CandidateError, match="unique; repeated: a"):
        load_candidates([_state(0), _state(1)], names=["a", "a"])


def test_load_candidates_rejects_wrong_number_of_names() -> None:
    with pytest.raises(CandidateError, match="got 1 names for 2 candidates"):
        load_candidates([_state(0), _state(1)], names=["a"])


def test_load_candidates_needs_two(tmp_path: Path) -> None:
    path = tmp_path / "only.safetensors"
    save_file(_state(), str(path))
    with pytest.raises(CandidateError) as err:
        load_candidates([path])
    assert str(err.value) == f"need at least 2 candidates to merge, got 1: {path}"
    assert len(load_candidates([path], min_count=1)) == 1


def test_load_candidates_rejects_a_bare_path(tmp_path: Path) -> None:
    with pytest.raises(CandidateError, match="list of candidates"):
        load_candidates(str(tmp_path / "a.pt"))


def test_load_candidates_validates(tmp_path: Path) -> None:
    small, big = _state(0), _state(1)
    big["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(CandidateError, match="shape"):
        load_candidates([small, big])


# --------------------------------------------------------------------------- validation


def test_key_mismatch_names_both_sources_and_first_key() -> None:
    a = _cand("a", _state())
    b_state = _state()
    del b_state["1.running_var"], b_state["3.bias"]  # sorted: "1.running_var" comes first
    b_state["zz.extra"] = torch.ones(1)
    b = _cand("b", b_state)
    with pytest.raises(CandidateError) as err:
        validate_candidates([a, b])
    msg = str(err.value)
    assert "<memory:a>" in msg and "<memory:b>" in msg
    assert "'1.running_var' is in <memory:a> but not in <memory:b>" in msg
    assert "2 only in <memory:a>, 1 only in <memory:b>" in msg


def test_key_only_in_later_candidate_says_which_side() -> None:
    a_state = _state()
    del a_state["0.bias"]
    with pytest.raises(CandidateError) as err:
        validate_candidates([_cand("a", a_state), _cand("b", _state())])
    assert "'0.bias' is in <memory:b> but not in <memory:a>" in str(err.value)


def test_shape_mismatch_message() -> None:
    a_state, b_state = _state(), _state()
    a_state["0.weight"], b_state["0.weight"] = torch.zeros(10, 4), torch.zeros(10, 5)
    with pytest.raises(CandidateError) as err:
        validate_candidates([_cand("a", a_state), _cand("b", b_state)])
    assert str(err.value) == (
        "<memory:b>: tensor '0.weight' has shape (10, 5) but <memory:a> has (10, 4)"
    )


def test_dtype_mismatch_message() -> None:
    b_state = _state()
    b_state["3.weight"] = b_state["3.weight"].half()
    with pytest.raises(CandidateError) as err:
        validate_candidates([_cand("a", _state()), _cand("b", b_state)])
    assert str(err.value) == (
        "<memory:b>: tensor '3.weight' has dtype float16 but <memory:a> has float32"
    )


def test_checks_run_keys_then_shapes_then_dtypes() -> None:
    a = _cand("a", _state())
    wrong_dtype = _state()
    wrong_dtype["0.bias"] = wrong_dtype["0.bias"].double()  # sorts before the shape problem
    wrong_shape = _state()
    wrong_shape["3.weight"] = torch.zeros(2, 7)
    missing_key = _state()
    del missing_key["3.bias"]
    cands = [a, _cand("d", wrong_dtype), _cand("s", wrong_shape), _cand("k", missing_key)]
    with pytest.raises(CandidateError, match=r"'3\.bias'"):
        validate_candidates(cands)
    with pytest.raises(CandidateError, match="shape"):
        validate_candidates(cands[:3])
    with pytest.raises(CandidateError, match="dtype float64"):
        validate_candidates(cands[:2])


def test_first_mismatch_in_sorted_key_order() -> None:
    b_state = _state()
    b_state["3.weight"], b_state["0.weight"] = torch.zeros(2, 9), torch.zeros(3, 9)
    with pytest.raises(CandidateError, match=r"'0\.weight'"):
        validate_candidates([_cand("a", _state()), _cand("b", b_state)])


def test_nonfinite_warns_but_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    bad = _state()
    bad["0.weight"][0, 0] = float("nan")
    bad["0.weight"][1, 1] = float("inf")
    cands = [_cand("good", _state()), _cand("bad", bad)]
    with caplog.at_level(logging.WARNING, logger="softmerge"):
        validate_candidates(cands)  # headers only: the values are scanned when first asked
        assert cands[0].is_finite
        assert cands[1].nonfinite == {"0.weight": 2} and not cands[1].is_finite
    text = caplog.text
    assert "<memory:bad>" in text and "'0.weight' (2)" in text
    assert "<memory:good>" not in text


def test_validate_rejects_duplicate_names() -> None:
    with pytest.raises(CandidateError, match="repeated: a"):
        validate_candidates([_cand("a", _state()), _cand("a", _state())])


# --------------------------------------------------------------------------- counting


def test_count_nonfinite() -> None:
    state = {
        "f": torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]),
        "h": torch.tensor([float("nan"), 0.0], dtype=torch.float16),
        "ok": torch.ones(3),
        "i": torch.tensor([1, 2], dtype=torch.int64),
        "b": torch.tensor([True]),
    }
    assert count_nonfinite(state) == {"f": 3, "h": 1}


# --------------------------------------------------------------------------- inspection


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in state.values() if t.is_floating_point()])


def test_inspect_three_candidates() -> None:
    s0 = _state(0)
    s2 = {k: (2 * v if v.is_floating_point() else v) for k, v in s0.items()}
    cands = [_cand("a", s0), _cand("b", _state(1)), _cand("c", s2)]
    report = inspect_candidates(cands)
    json.dumps(report, allow_nan=False)  # strictly JSON-serialisable
    cos, dist = report["pairwise"]["cosine"], report["pairwise"]["l2_distance"]
    assert report["pairwise"]["names"] == ["a", "b", "c"]
    for i in range(3):
        assert cos[i][i] == 1.0 and dist[i][i] == 0.0
        for j in range(3):
            assert cos[i][j] == pytest.approx(cos[j][i], abs=1e-12)
            assert dist[i][j] == pytest.approx(dist[j][i], abs=1e-12)
    x0, x1 = _flat(s0), _flat(_state(1))
    assert cos[0][2] == pytest.approx(1.0, abs=1e-12)  # c = 2a points the same way
    assert dist[0][2] == pytest.approx(float(x0.norm()), rel=1e-9)
    assert cos[0][1] == pytest.approx(float(x0 @ x1 / (x0.norm() * x1.norm())), rel=1e-9)
    assert dist[0][1] == pytest.approx(float((x0 - x1).norm()), rel=1e-9)
    assert report["pairwise"]["num_elements"] == x0.numel()


def test_inspect_per_candidate_summary() -> None:
    state = _state()
    entry = inspect_candidates([_cand("a", state)])["candidates"][0]
    assert entry["name"] == "a" and entry["source"] == "<memory:a>"
    assert entry["num_tensors"] == len(state)
    assert entry["num_params"] == sum(t.numel() for t in state.values())
    w = entry["tensors"]["0.weight"]
    assert w["shape"] == [3, 4] and w["dtype"] == "float32" and w["nonfinite"] == 0
    assert w["norm"] == pytest.approx(float(state["0.weight"].double().norm()))
    assert entry["tensors"]["1.num_batches_tracked"]["dtype"] == "int64"


def test_inspect_ignores_nonfinite_positions() -> None:
    good, bad = _state(0), _state(1)
    bad["0.weight"][0, :] = float("nan")
    report = inspect_candidates([_cand("good", good), _cand("bad", bad)])
    entry = report["candidates"][1]
    assert entry["nonfinite_total"] == 4 and entry["tensors"]["0.weight"]["nonfinite"] == 4
    finite_w = bad["0.weight"][1:].double()
    assert entry["tensors"]["0.weight"]["norm"] == pytest.approx(float(finite_w.norm()))
    x0, x1 = _flat(good), _flat(bad)
    keep = torch.isfinite(x1)
    x0, x1 = x0[keep], x1[keep]
    cos, dist = report["pairwise"]["cosine"], report["pairwise"]["l2_distance"]
    assert cos[0][1] == pytest.approx(float(x0 @ x1 / (x0.norm() * x1.norm())), rel=1e-9)
    assert dist[0][1] == pytest.approx(float((x0 - x1).norm()), rel=1e-9)
    assert all(math.isfinite(v) for row in cos for v in row)


def test_inspect_identical_candidates_have_zero_distance() -> None:
    report = inspect_candidates([_cand("a", _state()), _cand("b", _state())])
    assert report["pairwise"]["l2_distance"][0][1] == 0.0
    assert report["pairwise"]["cosine"][0][1] == pytest.approx(1.0, abs=1e-12)


def test_inspect_zero_candidate_has_undefined_cosine() -> None:
    zero = {k: torch.zeros_like(v) for k, v in _state().items()}
    report = inspect_candidates([_cand("a", _state()), _cand("z", zero)])
    assert report["pairwise"]["cosine"][0][1] is None
    assert report["pairwise"]["cosine"][1][1] is None
    assert "n/a" in format_inspect(report)


# --------------------------------------------------------------------------- text report


def test_format_inspect_contains_names_tensors_and_marks() -> None:
    bad = _state(2)
    bad["3.bias"][0] = float("inf")
    cands = [_cand("base", _state(0)), _cand("tuned", _state(1)), _cand("broken", bad)]
    text = format_inspect(inspect_candidates(cands))
    for name in ("base", "tuned", "broken", "0.weight", "1.running_mean", "(3, 4)", "float32"):
        assert name in text
    assert "!1" in text and "NON-FINITE: 1 values" in text
    assert "cosine" in text.lower()
    assert "1.000000" in text


def test_format_inspect_fits_100_columns_for_five_candidates() -> None:
    long_names = {
        f"model.encoder.layers.{i}.self_attention.query_projection.weight": torch.randn(64, 64)
        for i in range(3)
    }
    cands = []
    for i in range(5):
        torch.manual_seed(i)
        cands.append(_cand(f"cand{i}", {k: torch.randn_like(v) for k, v in long_names.items()}))
    text = format_inspect(inspect_candidates(cands))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert all(f"cand{i}" in text for i in range(5))


def test_format_inspect_uses_numbers_for_long_names() -> None:
    names = ["a-very-long-candidate-name-1", "a-very-long-candidate-name-2"]
    cands = [_cand(n, _state(i)) for i, n in enumerate(names)]
    text = format_inspect(inspect_candidates(cands))
    assert all(n in text for n in names)
    assert "#0" in text and "#1" in text
