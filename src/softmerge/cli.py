"""The ``softmerge`` command: ``merge`` and ``compare`` a YAML config, follow its L0 ``path``,
``inspect`` checkpoints, list ``methods``, run the ``demo``. A thin layer over
:mod:`softmerge.pipeline`.

Every :class:`SoftmergeError` becomes one line on stderr (``softmerge: error: ...``) and exit
code 2. ``softmerge merge`` also runs under torchrun (``torchrun --nproc-per-node K -m softmerge
merge cfg.yaml``, or ``softmerge merge --nproc-per-node K``, which launches torchrun): see
:mod:`softmerge.launch`. Command-line options are overrides of the config (``--steps N`` is ``--set
fit.steps=N``), checked by the same schema. Outputs go into a hidden staging folder that is
moved into place only once every file is complete, so a failed or interrupted run leaves the
output folder as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__, distributed, launch
from .candidates import format_inspect, inspect_candidates, load_candidates
from .checkpoint import checkpoint_path, remove_checkpoint
from .config import MergeConfig, load_config
from .context import CheckpointSpec
from .errors import ConfigError, OutputError, SoftmergeError
from .io import check_output_dir, writable_problem
from .methods import METHOD_NAMES, REGISTRY
from .pipeline import run_compare, run_key, run_merge, run_path

log = logging.getLogger("softmerge")


# ---------------------------------------------------------------------------------------------
# Options -> overrides of the config


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's options as ``KEY=VALUE`` overrides, applied before validation."""
    found = list(getattr(args, "set", None) or [])
    if getattr(args, "steps", None) is not None:
        found += [f"fit.steps={args.steps}", "fit.epochs=null"]
    if getattr(args, "seed", None) is not None:
        found += [f"fit.seed={args.seed}", f"?data.seed={args.seed}"]
    if getattr(args, "device", None) is not None:
        found.append(f"fit.device={args.device}")
    if getattr(args, "checkpoint_every", None) is not None:
        found.append(f"fit.checkpoint_every={args.checkpoint_every}")
    if args.no_progress or _quiet(args):
        found.append("fit.progress=false")
    return found


def _config(args: argparse.Namespace) -> MergeConfig:
    return load_config(args.config, overrides_of(args))


def output_dir(cfg: MergeConfig, args: argparse.Namespace) -> Path:
    """The output folder; refused now if it is an input or cannot be written, not after an
    hour of training."""
    if args.out is not None:
        out, label = args.out.absolute(), "--out"
    else:
        out, label = cfg.output.dir, f"{cfg.source}: output.dir"
    check_output_dir(out, cfg.input_paths(), label)
    if not distributed.is_writer():
        return out  # only process 0 writes (and its machine may be the only one with the folder)
    problem = writable_problem(out.parent) or (writable_problem(out) if out.is_dir() else None)
    if problem:
        raise OutputError(f"{label}: cannot write the output folder {out}: {problem}")
    return out


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_merge(args: argparse.Namespace) -> int:
    if args.nproc_per_node is not None and args.nproc_per_node > 1:
        return launch.relaunch_under_torchrun(args.argv, args.nproc_per_node)
    if distributed.launched_by_torchrun():
        with launch.process_group(lambda: _config(args)) as overrides:
            return _merge(args, overrides)
    return _merge(args, [])


def _merge(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load_config(args.config, [*overrides_of(args), *extra])
    out = output_dir(cfg, args)
    progress = cfg.fit.progress
    if cfg.method != "soft":
        if args.resume:
            raise ConfigError(f"--resume: only method 'soft' checkpoints, not {cfg.method!r}")
        run_merge(cfg, out, progress=progress)
        return 0
    ckpt = checkpoint_path(out)
    writer = distributed.is_writer()  # only its machine needs the checkpoint file
    if writer and args.resume and not ckpt.is_file():
        raise ConfigError(
            f"--resume: no checkpoint of an interrupted run at {ckpt} (one is written every "
            "fit.checkpoint_every steps, or --checkpoint-every K)"
        )
    if writer and ckpt.is_file() and not args.resume:
        log.warning("%s: starting over; pass --resume to continue that interrupted run", ckpt)
    checkpointing = bool(cfg.fit.checkpoint_every or args.resume)
    if checkpointing and cfg.build_method("soft", cfg.params).params.l0_lambda == "auto":
        raise ConfigError(
            f"{cfg.source}: fit.l0_lambda: 'auto' runs the L0 path, which is not checkpointed; "
            "drop fit.checkpoint_every and --resume, or give l0_lambda a number"
        )
    spec = None
    if checkpointing:
        # Kept until the outputs are written, so a crash while writing can still resume.
        spec = CheckpointSpec(ckpt, resume=args.resume, keep=True, run_key=run_key(cfg))
    try:
        run_merge(cfg, out, progress=progress, checkpoint=spec)
    except KeyboardInterrupt:
        if writer and checkpointing and ckpt.is_file():
            log.warning("training state kept in %s: add --resume to continue", ckpt)
        raise
    if writer:
        remove_checkpoint(ckpt)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    launch.refuse_several_processes("softmerge compare")
    cfg = _config(args)
    out = output_dir(cfg, args)
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    run_compare(cfg, out, progress=cfg.fit.progress, only=only)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    cfg = _config(args)
    out = output_dir(cfg, args)
    run_path(cfg, out, progress=cfg.fit.progress)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods, what they need and their parameters with defaults."""
    for name in METHOD_NAMES:
        cls = REGISTRY[name]
        needs = [w for w, flag in (("base", cls.needs_base), ("data", cls.needs_data)) if flag]
        print(f"{name:22s} {cls.summary}" + (f"  [needs {', '.join(needs)}]" if needs else ""))
        if args.verbose:
            for key, field in cls.Params.model_fields.items():
                print(f"    {field.alias or key} = {field.default!r}")
    return 0


# ---------------------------------------------------------------------------------------------
# softmerge inspect / demo


def cmd_inspect(args: argparse.Namespace) -> int:
    candidates = load_candidates([Path(p) for p in args.paths], min_count=1)
    report = inspect_candidates(candidates)
    text = json.dumps(report, indent=2) + "\n" if args.json else format_inspect(report)
    sys.stdout.write(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    launch.refuse_several_processes("softmerge demo")
    # imported here: the demos' training code is not needed elsewhere
    if args.task == "lm":
        from .demo_lm import run_lm_demo as run_demo
    else:
        from .demo import run_demo

    out = args.out.absolute()
    run_demo(out, quick=args.quick, seed=args.seed, progress=not (args.no_progress or _quiet(args)))
    print(f"demo outputs in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser, logging, entry point


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def _add_overrides(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--device",
        metavar="DEVICE",
        help="where the merge runs: cpu, cuda, cuda:1... (overrides fit.device)",
    )
    command.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set fit.l0_lambda=0.01 --set plan.granularity=module"
        " (repeatable; the value is read as YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    # -q is accepted before or after the command; SUPPRESS keeps one from resetting the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print only warnings and errors (also hides progress bars)",
    )
    parser = argparse.ArgumentParser(
        prog="softmerge",
        parents=[common],
        description="Merge checkpoints of one architecture by learning hard concrete (L0) gates.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="merge the checkpoints a YAML config names",
        description="Learn gates over the candidates of CONFIG.yaml, write the merged model, "
        "gates.json, plots and summary.json into the output folder.",
    )
    merge.add_argument("config", type=Path, metavar="CONFIG.yaml")
    merge.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (overrides output.dir)"
    )
    merge.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="gate-training steps (overrides fit.steps and fit.epochs)",
    )
    merge.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of the gate noise and of the merge-data order (overrides fit.seed, data.seed)",
    )
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_overrides(merge)

    def steps_or_zero(text: str) -> int:
        if not text.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
        return int(text)

    merge.add_argument(
        "--checkpoint-every",
        type=steps_or_zero,
        metavar="K",
        help="save the training state every K steps, for --resume (overrides "
        "fit.checkpoint_every; 0: never)",
    )
    merge.add_argument(
        "--resume",
        action="store_true",
        help="continue the gate training of an interrupted run from its checkpoint "
        "(.<output folder>.checkpoint.pt beside the output folder)",
    )
    merge.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        metavar="K",
        help="train the gates on K processes of this machine, data-parallel: relaunches this "
        "command under torchrun (gloo on CPU; nccl, one GPU each, with --device cuda)",
    )
    merge.set_defaults(handler=cmd_merge)

    comp = sub.add_parser(
        "compare",
        parents=[common],
        help="run several merge methods on the same candidates and data; one table",
        description="Run the config's `methods:` list (default: every method that applies) on "
        "its candidates and data; print accuracy, loss, merge seconds and peak memory, and "
        "write compare.json and compare.md into the output folder.",
    )
    comp.add_argument("config", type=Path, metavar="CONFIG.yaml")
    comp.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (overrides output.dir)"
    )
    comp.add_argument(
        "--methods", metavar="A,B", help="only these entries (labels or method names)"
    )
    comp.add_argument(
        "--seed", type=int, metavar="S", help="seed of every method and of the data order"
    )
    comp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_overrides(comp)
    comp.set_defaults(handler=cmd_compare)

    path = sub.add_parser(
        "path",
        parents=[common],
        help="the L0 path: how many candidates a merge needs, and which matter most",
        description="Train the gates of CONFIG.yaml's soft merge over a λ grid (found from "
        "'nothing closes' to 'one candidate per unit'), each λ warm-started from the previous "
        "one; write path.json, path.png and path.md into the output folder, and print the "
        "table, the λ chosen on held-out data and the candidates' importance.",
    )
    path.add_argument("config", type=Path, metavar="CONFIG.yaml")
    path.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (overrides output.dir)"
    )
    path.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="steps of the first (dense) fit; each later λ gets N/10 (overrides fit.steps)",
    )
    path.add_argument(
        "--seed", type=int, metavar="S", help="seed of the gate noise and of the data order"
    )
    path.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_overrides(path)
    path.set_defaults(handler=cmd_path)

    methods = sub.add_parser(
        "methods",
        parents=[common],
        help="list the merge methods usable as `method:` in a config",
        description="List every registered merge method; -v adds parameters and defaults.",
    )
    methods.add_argument("-v", "--verbose", action="store_true", help="show parameters")
    methods.set_defaults(handler=cmd_methods)

    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        help="summarise and compare checkpoints",
        description="Tensors, norms and pairwise cosine similarity / L2 distance of checkpoints.",
    )
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint file or HF folder")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=cmd_inspect)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train, poison and merge small models end to end",
        description="Train MNIST-1D candidates, add broken ones, merge them, write a report.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        metavar="DIR",
        help="output folder (default: demo-out)",
    )
    demo.add_argument(
        "--task",
        choices=["classify", "lm"],
        default="classify",
        help="classify: MNIST-1D CNNs (default); lm: a byte-level Llama on two text domains, "
        "with full fine-tunes, LoRA adapters and a poisoned child",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=cmd_demo)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"softmerge: {level}{record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(handlers=[handler])  # a no-op when the host already configured logging
    level = logging.WARNING if quiet else logging.INFO
    if not distributed.is_writer():  # under torchrun, process 0 alone reports progress
        level = logging.ERROR
    logging.getLogger("softmerge").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch under torchrun
    _setup_logging(_quiet(args))
    try:
        return int(args.handler(args))
    except SoftmergeError as exc:
        print(f"softmerge: error: {launch.who()}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsoftmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
