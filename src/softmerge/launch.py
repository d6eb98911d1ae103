"""``softmerge merge`` on several processes: torchrun, started by the user or for them.

- ``torchrun --nproc-per-node K -m softmerge merge cfg.yaml`` (any torchrun options: several
  machines with ``--nnodes``/``--rdzv-endpoint``): every process runs the command, joins the
  process group torchrun describes (:func:`process_group`), trains its share of the gates'
  batches; process 0 alone prints, evaluates and writes.
- ``softmerge merge cfg.yaml --nproc-per-node K`` runs ``python -m torch.distributed.run
  --standalone --nproc-per-node K -m softmerge merge cfg.yaml`` (:func:`relaunch_under_torchrun`)
  and returns its exit code.

When one process fails (an error, a kill), torchrun stops the others and exits non-zero; a
process whose peer has gone gets a :class:`~softmerge.errors.DistributedError` from the
collective it was in. SIGTERM (torchrun stopping a process) becomes ``SystemExit``, so the
staging folder of unfinished outputs is removed on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

from . import distributed
from .errors import ConfigError

log = logging.getLogger("softmerge")
OPTION = "--nproc-per-node"


def who() -> str:
    """``"process 1/4: "`` in a run of several processes (its error lines start so), else ``""``."""
    count = distributed.world_size()
    return f"process {distributed.rank()}/{count}: " if count > 1 else ""


def refuse_several_processes(command: str) -> None:
    if distributed.world_size() > 1:
        raise ConfigError(
            f"{command} runs in one process; only softmerge merge (soft merging) trains on "
            "several processes"
        )


@contextlib.contextmanager
def process_group(load_config: Callable[[], Any]) -> Iterator[list[str]]:
    """Join torchrun's process group for one ``softmerge merge``; yields the config overrides
    this process needs (its own GPU; no progress bars but on process 0).

    The config is checked first, on every process, so a bad one fails before any group forms."""
    cfg = load_config()
    if cfg.method != "soft" and distributed.world_size() > 1:
        raise ConfigError(
            f"{cfg.source}: method: {cfg.method!r} runs in one process; only soft merging trains "
            "on several processes (run it without torchrun / --nproc-per-node)"
        )
    device = distributed.init_from_env(cfg.fit.device)
    extra = [f"fit.device={device}"] if device.type == "cuda" else []
    if not distributed.is_writer():
        extra.append("fit.progress=false")
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield extra
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def without_option(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node K`` (or ``=K``, or an abbreviation argparse took)."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) >= 4 and OPTION.startswith(name):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def torchrun_command(argv: list[str], processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"{OPTION}={processes}",
        "-m",
        "softmerge",
        *without_option(argv),
    ]


def relaunch_under_torchrun(argv: list[str], processes: int) -> int:
    """Run this command again under torchrun with ``processes`` processes; its exit code."""
    if distributed.launched_by_torchrun():
        raise ConfigError(
            f"{OPTION}: this command already runs under torchrun, which sets the number of "
            "processes; drop the option"
        )
    command = torchrun_command(argv, processes)
    env = dict(os.environ)
    # torchrun would set 1 thread per process and warn; share this machine's cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log.info("running on %d processes: %s", processes, " ".join(command[1:]))
    code = _run(command, env)
    if code != 0:
        print(
            f"softmerge: error: the run on {processes} processes failed (torchrun's exit code "
            f"{code}); the messages above say why. Nothing was written",
            file=sys.stderr,
        )
    return code


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun; SIGTERM and Ctrl-C are passed on to it, so it stops its processes."""
    process = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: Any) -> None:
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
