"""Gate training on 2 processes (torchrun, gloo on CPU, 1 thread each) against 1 process.

End to end, as users run it: ``softmerge merge cfg.yaml --nproc-per-node 2`` and ``torchrun
--nproc-per-node 2 -m softmerge merge cfg.yaml`` on an MLP merged from digits-trained
candidates (safetensors) must give the gates of one process within 1e-5 and its test accuracy
within 0.05 points; a rank killed with SIGKILL mid-run, or failing with an error, must end the
whole run, non-zero, within 60 s, writing nothing; resuming that run under torchrun must give
the uninterrupted run's outputs bit for bit. Through the Python API (``distributed_cases.py``),
a token-weighted causal LM, BatchNorm and the sharded stack must match one process too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import softmerge
from softmerge import distributed, launch
from softmerge.batches import split_batch
from softmerge.cli import main
from softmerge.errors import ConfigError, DataError
from softmerge.objectives import CausalLM, Classification, Entropy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find a rank's process"
)

HERE = Path(__file__).resolve().parent
SRC = str(Path(softmerge.__file__).resolve().parents[1])
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "MPLBACKEND": "Agg",
    "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
FAULTY = '''"""An objective that fails on process 1 after a few calls (the injected fault)."""
import os
import time
from pathlib import Path

import torch.nn.functional as F

from softmerge.errors import DataError

calls = 0


def loss(logits, labels):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls > 20:
        Path(os.environ["FAULT_STAMP"]).write_text(str(time.time()))
        raise DataError("injected failure on this process")
    return F.cross_entropy(logits, labels)
'''


# ---------------------------------------------------------------------------------------------
# Pieces, in one process


def test_shard_batch_cuts_every_per_sample_tensor_contiguously() -> None:
    x, y = torch.arange(10).view(5, 2), torch.arange(5)
    assert [distributed.shard_batch((x, y), r, 2)[1].tolist() for r in (0, 1)] == [
        [0, 1, 2],
        [3, 4],
    ]
    batch = {"input_ids": torch.zeros(4, 3), "attention_mask": torch.ones(4, 3), "scale": 2.0}
    part = distributed.shard_batch(batch, 1, 2)
    assert part["input_ids"].shape == (2, 3) and part["attention_mask"].shape == (2, 3)
    assert part["scale"] == 2.0
    assert distributed.shard_batch(torch.arange(6), 2, 3).tolist() == [4, 5]
    with pytest.raises(DataError, match=r"batch of 1 sample.*2 processes"):
        distributed.shard_batch((x[:1], y[:1]), 0, 2)


def test_objective_weights_count_what_the_loss_averages() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = split_batch({"input_ids": ids, "attention_mask": mask})
    logits = torch.randn(2, 4, 7)
    assert CausalLM().weight(logits, batch) == 4.0  # 3 + 1 predicted tokens
    assert Entropy().weight(logits, batch) == 6.0  # unmasked positions
    labels = split_batch((torch.randn(5, 3), torch.zeros(5, dtype=torch.long)))
    assert Classification().weight(torch.randn(5, 3), labels) == 5.0


def test_the_launcher_drops_its_own_option() -> None:
    argv = ["-q", "merge", "cfg.yaml", "--nproc-per-node", "2", "--steps", "5"]
    assert launch.without_option(argv) == ["-q", "merge", "cfg.yaml", "--steps", "5"]
    assert launch.without_option(["merge", "c.yaml", "--nproc-per-node=3"]) == ["merge", "c.yaml"]
    assert launch.without_option(["merge", "c.yaml", "--nproc", "3"]) == ["merge", "c.yaml"]
    command = launch.torchrun_command(["merge", "c.yaml", "--nproc-per-node", "4"], 4)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "softmerge",
        "merge",
        "c.yaml",
    ]


def test_outside_torchrun_there_is_no_group_to_join(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.world_size() == 1 and distributed.is_writer()
    assert not distributed.is_distributed()
    with pytest.raises(ConfigError, match="no process group to join: RANK"):
        distributed.init_from_env()
    for bad in ("soon", "inf", "-1"):
        monkeypatch.setenv(distributed.ENV_TIMEOUT, bad)
        with pytest.raises(ConfigError, match=f"SOFTMERGE_DIST_TIMEOUT='{bad}'"):
            distributed.timeout_from_env()
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "30")
    assert distributed.timeout_from_env().total_seconds() == 30


def test_several_processes_only_for_soft_merging(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    logger = logging.getLogger("softmerge")
    monkeypatch.setattr(logger, "level", logger.level)  # main() sets it for process 1
    config = tmp_path / "c.yaml"
    config.write_text("candidates: [a.safetensors, b.safetensors]\n")
    assert main(["compare", str(config)]) == 2
    err = capsys.readouterr().err
    assert "softmerge: error: process 1/2: softmerge compare runs in one process" in err
    assert main(["merge", str(config), "--nproc-per-node", "2"]) == 2
    assert "already runs under torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command line on 2 processes


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three digits MLPs fine-tuned from one parent plus a noisy one, and a merge config."""
    from softmerge.data import digits_splits
    from softmerge.zoo import MLP

    folder = tmp_path_factory.mktemp("dist")
    x, y = digits_splits(300, 400, 0).train.tensors
    torch.manual_seed(0)
    parent = MLP(64, [32], 10)
    _train(parent, x, y, 0, 100)
    for j in range(4):
        child = MLP(64, [32], 10)
        child.load_state_dict(parent.state_dict())
        _train(child, x, y, j + 1, 60)
        state = {k: v.detach().contiguous() for k, v in child.state_dict().items()}
        if j == 3:  # noise at the scale of each tensor: a candidate the gates must shut
            gen = torch.Generator().manual_seed(7)
            state = {
                k: v + 3 * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()
            }
        save_file(state, str(folder / f"c{j}.safetensors"))
    (folder / "faulty.py").write_text(FAULTY)
    config = {
        "model": {
            "factory": "softmerge.zoo:MLP",
            "kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10},
        },
        "candidates": [f"c{j}.safetensors" for j in range(4)],
        "data": {
            "dataset": "digits",
            "kwargs": {"num_merge": 300, "num_test": 400, "seed": 0},
            "batch_size": 32,
            "seed": 1,
        },
        "plan": {"granularity": "channel"},
        "fit": {"steps": 40, "lr": 0.3, "eval_every": 10, "record_every": 5, "progress": False},
        "output": {"dir": "out"},
    }
    (folder / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    faulty = {**config, "fit": {**config["fit"], "objective": "faulty:loss"}}
    (folder / "faulty.yaml").write_text(yaml.safe_dump(faulty, sort_keys=False))
    return folder


def _gates(out: Path) -> dict[str, float]:
    units = json.loads((out / "gates.json").read_text())["units"]
    return {f"{u['name']}/{c}": g["gate"] for u in units for c, g in u["gates"].items()}


def _accuracy(out: Path) -> float:
    rows = json.loads((out / "summary.json").read_text())["results"]
    return next(r["accuracy"] for r in rows if r["model"] == "soft merge")


def _no_partial_outputs(folder: Path) -> None:
    assert not list(folder.glob(".*partial*")), "a staging folder was left behind"


@pytest.fixture(scope="module")
def one_process(project: Path) -> Path:
    out = project / "out1"
    assert main(["merge", str(project / "merge.yaml"), "--out", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(project: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = project / "out2"  # (softmerge merge --nproc-per-node 2: the test of an error below)
    command = [*TORCHRUN, "-m", "softmerge", "merge", str(project / "merge.yaml")]
    command += ["--out", str(out), "-q"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_two_processes_give_the_gates_of_one(
    one_process: Path, two_processes: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out2, done = two_processes
    one, two = _gates(one_process), _gates(out2)
    assert one.keys() == two.keys()
    assert max(abs(one[k] - two[k]) for k in one) <= 1e-5
    assert min(one.values()) == 0.0 and max(one.values()) > 0.3  # the gates did move
    assert abs(_accuracy(one_process) - _accuracy(out2)) <= 0.05
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["processes"] == 2
    assert done.stdout.count("outputs in") == 1  # process 0 alone reports


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _rank_pid(root: int, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env and _descends_from(int(entry.name), root):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.fixture(scope="module")
def killed(project: Path) -> dict[str, Any]:
    """``torchrun -m softmerge merge`` whose rank 1 is SIGKILLed once the first checkpoint of
    its gate training exists."""
    out = project / "out-killed"
    ckpt = project / ".out-killed.checkpoint.pt"
    command = [*TORCHRUN, "-m", "softmerge", "merge", str(project / "merge.yaml")]
    command += ["--out", str(out), "-q", "--checkpoint-every", "2"]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    found: dict[str, Any] = {"killed_at": None}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        pid = _rank_pid(process.pid, 1) if ckpt.exists() else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            found["killed_at"] = time.monotonic()
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=240)
    found.update(ended_at=time.monotonic(), code=process.returncode, stderr=stderr, out=out)
    found["ckpt"] = ckpt
    return found


def test_a_killed_rank_ends_the_run_quickly_and_writes_nothing(killed: dict[str, Any]) -> None:
    assert killed["killed_at"] is not None, "the run ended before a rank could be killed"
    assert killed["code"] != 0
    assert killed["ended_at"] - killed["killed_at"] < 60
    assert "SIGKILL" in killed["stderr"]  # torchrun names the rank that died and how
    assert not killed["out"].exists()
    _no_partial_outputs(killed["out"].parent)
    assert killed["ckpt"].exists()  # kept, by design, for --resume


def test_resume_under_torchrun_gives_the_uninterrupted_outputs(
    project: Path, killed: dict[str, Any], two_processes: tuple[Path, Any]
) -> None:
    out = killed["out"]
    command = [*TORCHRUN, "-m", "softmerge", "merge", str(project / "merge.yaml")]
    command += ["--out", str(out), "-q", "--checkpoint-every", "2", "--resume"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = two_processes[0]
    a, b = (
        load_file(str(out / "merged.safetensors")),
        load_file(str(reference / "merged.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _gates(out) == _gates(reference)
    history = [json.loads((d / "history.json").read_text()) for d in (out, reference)]
    assert history[0] == history[1]
    assert not killed["ckpt"].exists()  # removed once the outputs are written


def test_an_error_on_one_rank_ends_every_rank_with_its_message(project: Path) -> None:
    out, stamp = project / "out-faulty", project / "fault.time"
    command = [sys.executable, "-m", "softmerge", "merge", str(project / "faulty.yaml")]
    command += ["--out", str(out), "-q", "--nproc-per-node", "2"]
    # fit.objective 'faulty:loss' is imported from the path (the module beside the config)
    path = os.pathsep.join([str(project), ENV["PYTHONPATH"]])
    env = {**ENV, "FAULT_STAMP": str(stamp), "PYTHONPATH": path}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert done.returncode != 0
    assert "softmerge: error: process 1/2: injected failure on this process" in done.stderr
    assert "the run on 2 processes failed" in done.stderr
    assert ended - float(stamp.read_text()) < 60
    assert not out.exists()
    _no_partial_outputs(project)


# ---------------------------------------------------------------------------------------------
# The Python API on 2 processes: LM token weighting, BatchNorm, the sharded stack


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("api") / "results.pt"
    command = [*TORCHRUN, str(HERE / "distributed_cases.py"), str(out)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _cases():
    sys.path.insert(0, str(HERE))
    try:
        import distributed_cases
    finally:
        sys.path.remove(str(HERE))
    return distributed_cases.CASES


@pytest.mark.parametrize(
    "case", ["mlp_channel", "bn_tensor", "lm_tokens", "sharded_delta", "sharded_bf16"]
)
def test_python_api_on_two_processes_matches_one(api_runs: dict[str, Any], case: str) -> None:
    assert api_runs["world_size"] == 2
    one, two = _cases()[case](), api_runs[case]
    start = one["history"][0]["mean_gate"]
    moved = max(abs(a - b) for a, b in zip(one["history"][-1]["mean_gate"], start, strict=True))
    assert moved > 0.01  # the gates did move
    assert torch.allclose(one["gates"], two["gates"], atol=1e-5, rtol=0)
    assert torch.allclose(one["log_alpha"], two["log_alpha"], atol=1e-5, rtol=0)
    for key, value in one["state"].items():
        assert torch.allclose(value.float(), two["state"][key].float(), atol=1e-5), key
    assert one["candidate_losses"] == pytest.approx(two["candidate_losses"], rel=1e-6)
    assert len(one["history"]) == len(two["history"])
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    if case.startswith("sharded"):  # each process holds about half the stack
        assert two["stack_bytes"] < 0.6 * one["stack_bytes"]


def test_early_stopping_on_two_processes_selects_the_step_of_one(api_runs: dict[str, Any]) -> None:
    one, two = _cases()["mlp_early_stopping"](), api_runs["mlp_early_stopping"]
    assert one["selected_step"] is not None and one["selected_step"] == two["selected_step"]
    assert torch.allclose(one["gates"], two["gates"], atol=1e-5, rtol=0)
    held = [(r["step"], r["held_out_loss"]) for r in one["history"] if "held_out_loss" in r]
    held_two = [(r["step"], r["held_out_loss"]) for r in two["history"] if "held_out_loss" in r]
    assert [s for s, _ in held] == [s for s, _ in held_two] == list(range(0, 31, 5))
    assert [v for _, v in held] == pytest.approx([v for _, v in held_two], rel=1e-5)


def test_sharded_bfloat16_model_gathers_the_same_bits(api_runs: dict[str, Any]) -> None:
    one, two = _cases()["sharded_bf16_model"](), api_runs["sharded_bf16_model"]
    for key, value in one["start"].items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, two["start"][key]), key
    # bfloat16 gradients of half batches, summed: the gates agree to bfloat16 precision only
    assert torch.allclose(one["gates"], two["gates"], atol=1e-3, rtol=0)
