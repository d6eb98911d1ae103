"""The engine at real model sizes (issue 10): memory of soft merging, static merges against
mergekit, and the cost of one gate step. Writes ``docs/performance.md``.

    python benchmarks/engine.py --out bench-out/engine --docs docs     (make perf)

Five parts, each measured in this one run:

1. **Memory.** Soft merging N candidates of an MLP, each configuration in a fresh process:
   baseline = resident memory after imports, the model, the data and one optimiser step on a
   one-element parameter (torch.optim and autograd initialised), with freed heap returned to the
   system; then ``SoftMerger(model, files)`` (the script drops its own model reference, as the
   CLI does), a fit of ``--fit-steps`` steps and ``merged_state_dict()``. Peak = the kernel's
   resident high-water mark (VmHWM, reset at the baseline) minus the baseline, divided by the
   candidates' bytes. Floor = the stack + the largest parameter's gradient (float32) + one merged
   copy of the parameters - the template's weights (dropped) = stack + largest gradient.
2. **Static merges vs mergekit-yaml 0.1.5** (its own virtual environment: it pins other
   versions of transformers and pydantic) on a 168M-parameter Llama-architecture model in bf16
   (hidden 1024, 8 layers, intermediate 2816, vocab 32000, untied): 3 fine-tunes (the base plus
   small seeded noise) and the base. TIES (density 0.5) and linear, each tool as a command in a
   subprocess (wall time, and peak RSS from ``wait4``), alternating, files in the page cache
   first; then the two outputs compared tensor by tensor.
3. **Gate step vs plain step** on the 18.9M MLP (N=5, batch 128) with float32 and bfloat16
   stacks, interleaved in one process, with the memory-bandwidth floor measured alongside: the
   time to read every byte of the stack twice (``sum`` over each buffer, twice).
4. **Gate steps on 2 processes** (``--only dist``): the same MLP and batch, 1 thread per
   process: one process, then 2 processes under torchrun (gloo), data-parallel and with the
   stack sharded; each configuration in its own launch, rounds alternating the order.
5. **The L0 path** (``--only path``, issue 14) against one default merge, on the demo's 5 clean
   children (MNIST-1D CNN, trained here once and cached): ``fit.l0_lambda: auto`` (the path on
   four fifths of the merge split, λ chosen on the rest) against the default λ, each from
   ``SoftMerger(...)`` to ``merged_state_dict()``, alternating; wall and CPU seconds.

``--only`` with some of the parts rewrites only their sections of an existing page.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softmerge.memory import release_memory  # noqa: E402
from softmerge.report import format_markdown_table  # noqa: E402

MIB = 2**20
# (label, in, hidden...) of the memory curves; "M" is the 18.9M-parameter MLP.
SIZES = {
    "S": (512, (1024, 1024)),
    "M": (512, (4096, 4096)),
    "L": (1024, (8192, 8192)),
}
LLAMA = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _mlp(size: str):
    from softmerge.zoo import MLP

    inputs, hidden = SIZES[size]
    return MLP(inputs, hidden, 10)


# ------------------------------------------------------------------------------- 1. memory


def candidate_files(work: Path, size: str, count: int) -> list[Path]:
    """``count`` float32 candidates of MLP ``size`` as safetensors (made once, seeded)."""
    from safetensors.torch import save_file

    folder = work / f"mlp-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(count):
        path = folder / f"c{j}.safetensors"
        if not path.exists():
            torch.manual_seed(j)
            state = {k: v.contiguous() for k, v in _mlp(size).state_dict().items()}
            save_file(state, str(path))
        paths.append(path)
    return paths


def memory_child(size: str, count: int, dtype: str, steps: int, work: Path) -> dict[str, Any]:
    """Runs in a fresh process: the peak above the baseline of one soft merge."""
    import torch.nn.functional as F  # noqa: F401  (imported before the baseline)

    from softmerge import FitConfig, MergePlan, SoftMerger

    paths = candidate_files(work, size, count)
    gen = torch.Generator().manual_seed(0)
    inputs = SIZES[size][0]
    x, y = torch.randn(512, inputs, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    loader = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    model = _mlp(size)
    probe = torch.nn.Parameter(torch.zeros(1))  # torch.optim and autograd initialised
    torch.optim.SGD([probe], lr=0.1).step()
    (probe * 2).sum().backward()
    params = {n: p.numel() * 4 for n, p in model.named_parameters()}
    release_memory()
    base = _rss()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    merger = SoftMerger(model, paths, MergePlan(granularity="tensor"), storage_dtype=dtype)
    del model  # the merger keeps a weightless template: the weights go
    compile_merge = os.environ.get("ENGINE_COMPILE_MERGE") == "1"  # run_memory's "compiled"
    cfg = FitConfig(steps=steps, progress=False, eval_every=0, compile_merge=compile_merge)
    merger.fit(loader, config=cfg)
    merger.merged_state_dict()
    peak = _rss("VmHWM") - base
    seconds = time.perf_counter() - start
    cand_bytes = sum(p.stat().st_size for p in paths)
    stack = merger.stack.nbytes
    floor = stack + max(params.values())
    return {
        "size": size,
        "params": sum(params.values()) // 4,
        "N": count,
        "storage": dtype,
        "candidates_mib": cand_bytes / MIB,
        "stack_mib": stack / MIB,
        "peak_mib": peak / MIB,
        "peak_ratio": peak / cand_bytes,
        "floor_ratio": floor / cand_bytes,
        "seconds": seconds,
    }


def run_memory(
    work: Path, sizes: list[str], counts: list[int], steps: int, repeats: int = 1
) -> list[dict]:
    """One fresh process per size, N and dtype, ``repeats`` times each: the row is the median
    run (a peak moves by a few MiB from run to run with the C heap's layout). The target
    points (M, N=5) run twice more: with ``SOFTMERGE_MMAP_THRESHOLD=off`` (glibc's dynamic
    threshold, as before softmerge pinned it; rows with ``heap: "glibc default"``), and with
    ``fit.compile_merge: true`` (``heap: "compiled"``: inductor's own memory included)."""
    rows = []
    points = [(s, c, d) for s in sizes for c in counts for d in ("float32", "bfloat16")]
    controls = [(s, c, d) for s, c, d in points if (s, c) == ("M", 5)]
    runs_of = [
        *((p, "pinned") for p in points),
        *((p, "glibc default") for p in controls),
        *((p, "compiled") for p in controls),
    ]
    for (size, count, dtype), heap in runs_of:
        argv = [sys.executable, __file__, "_memory", size, str(count), dtype, str(steps)]
        argv += ["--out", str(work)]
        env = dict(os.environ)
        if heap == "glibc default":
            env["SOFTMERGE_MMAP_THRESHOLD"] = "off"
        env["ENGINE_COMPILE_MERGE"] = "1" if heap == "compiled" else "0"
        runs = []
        for _ in range(max(1, repeats)):
            done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory run {size} N={count} {dtype}: {done.stderr}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = sorted(runs, key=lambda r: r["peak_ratio"])[len(runs) // 2]
        row["repeats"] = [round(r["peak_ratio"], 3) for r in runs]
        row["heap"] = heap
        print(
            f"memory {size} N={count} {dtype} ({heap}): peak {row['peak_ratio']:.2f}x "
            f"(floor {row['floor_ratio']:.2f}x)",
            flush=True,
        )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- 2. static


def llama_folders(work: Path) -> dict[str, Path]:
    """Base + 3 fine-tunes of the 168M Llama in bf16, as Hugging Face folders (made once)."""
    import transformers

    folder = work / "llama168m"
    names = ["base", "ft1", "ft2", "ft3"]
    paths = {n: folder / n for n in names}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    cfg = transformers.LlamaConfig(**LLAMA, torch_dtype="bfloat16")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.save_pretrained(paths["base"])
    state = base.state_dict()
    for i, name in enumerate(names[1:], start=1):
        gen = torch.Generator().manual_seed(100 + i)
        tuned = {
            k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen)).to(
                v.dtype
            )
            for k, v in state.items()
        }
        base.load_state_dict(tuned)
        base.save_pretrained(paths[name])
    del base, state
    return paths


# A small launcher runs each command, so that the command's peak RSS is its own: a child forked
# from this (large) benchmark process would inherit its resident size in ru_maxrss.
_LAUNCHER = """
import os, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.write(done.stderr.decode(errors="replace")[-2000:])
print(peak)
sys.exit(done.returncode)
"""


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command, measured by a small launcher process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024


def _mergekit_config(method: str, paths: dict[str, Path]) -> str:
    import yaml

    tuned = [{"model": str(paths[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2", "ft3")]
    config: dict[str, Any] = {"merge_method": method, "models": tuned, "dtype": "bfloat16"}
    if method == "ties":
        config["base_model"] = str(paths["base"])
        for m in tuned:
            m["parameters"]["density"] = 0.5
    return yaml.safe_dump(config)


def _softmerge_config(method: str, paths: dict[str, Path], out: Path) -> str:
    import yaml

    config: dict[str, Any] = {
        "candidates": [str(paths[n]) for n in ("ft1", "ft2", "ft3")],
        "method": method,
        "output": {"dir": str(out)},
    }
    if method == "ties":
        config["params"] = {"density": 0.5}
        config["plan"] = {"base": str(paths["base"])}
    return yaml.safe_dump(config)


def _agreement(ours: Path, theirs: Path) -> dict[str, Any]:
    """Fraction of differing elements and the largest difference, over every tensor."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as handle:
                found.update(dict.fromkeys(handle.keys(), f))
        return found

    a, b = files(ours), files(theirs)
    keys = sorted(set(a) & set(b))
    differ = total = 0
    worst = 0.0
    for key in keys:
        with safe_open(str(a[key]), "pt") as fa, safe_open(str(b[key]), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        differ += int((x != y).sum())
        total += x.numel()
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {
        "tensors_compared": len(keys),
        "only_ours": sorted(set(a) - set(b)),
        "only_mergekit": sorted(set(b) - set(a)),
        "differing_fraction": differ / max(total, 1),
        "max_abs_diff": worst,
    }


def run_static(work: Path, mergekit: Path | None, rounds: int) -> dict[str, Any]:
    paths = llama_folders(work)
    for p in paths.values():  # the files in the page cache for both tools
        (p / "model.safetensors").read_bytes()
    softmerge = shutil.which("softmerge", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    results: dict[str, Any] = {}
    for method in ("ties", "linear"):
        runs: dict[str, list[tuple[float, float]]] = {"softmerge": [], "mergekit": []}
        ours_out, theirs_out = work / f"out-softmerge-{method}", work / f"out-mergekit-{method}"
        (work / f"{method}.yaml").write_text(_softmerge_config(method, paths, ours_out))
        (work / f"{method}-mergekit.yml").write_text(_mergekit_config(method, paths))
        for r in range(rounds):
            order = ["softmerge", "mergekit"] if r % 2 == 0 else ["mergekit", "softmerge"]
            for tool in order:
                if tool == "softmerge":
                    argv = [str(softmerge), "merge", str(work / f"{method}.yaml"), "-q"]
                elif mergekit is not None:
                    shutil.rmtree(theirs_out, ignore_errors=True)
                    argv = [str(mergekit), str(work / f"{method}-mergekit.yml"), str(theirs_out)]
                else:
                    continue
                runs[tool].append(_timed(argv, env))
                print(
                    f"static {method} {tool}: {runs[tool][-1][0]:.1f} s, "
                    f"{runs[tool][-1][1]:.0f} MiB",
                    flush=True,
                )
        row: dict[str, Any] = {}
        for tool, values in runs.items():
            if values:
                row[tool] = {
                    "seconds": statistics.median(v[0] for v in values),
                    "peak_mib": statistics.median(v[1] for v in values),
                    "runs": [list(v) for v in values],
                }
        if mergekit is not None:
            row["agreement"] = _agreement(ours_out, theirs_out)
        results[method] = row
    results["candidate_mib"] = (paths["ft1"] / "model.safetensors").stat().st_size / MIB
    return results


# ------------------------------------------------------------------------------- 3. step


def run_step(threads: int, rounds: int) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from softmerge import FitConfig, MergePlan, SoftMerger
    from softmerge.evaluation import set_gate_training_mode
    from softmerge.fused import FusedMerge

    torch.set_num_threads(threads)
    work_paths = None
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 512, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    model = _mlp("M")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    steps: dict[str, Any] = {"plain": plain}
    variants = [(d, k) for d in ("float32", "bfloat16") for k in ("eager", "compiled")]
    for dtype in ("float32", "bfloat16"):
        work_paths = candidate_files(ARGS.out, "M", 5)
        merger = SoftMerger(
            _mlp("M"), work_paths, MergePlan(granularity="tensor"), storage_dtype=dtype
        )
        cfg = FitConfig(progress=False, warmup=0.0, compile_merge=False)
        loop = merger.make_loop([(x, y)], cfg)
        set_gate_training_mode(merger.model)
        # One stack for both kernels: each step says which (compile_merge: true's kernels).
        compiled = FusedMerge(required=True)
        for kernels, fused in (("eager", None), ("compiled", compiled)):

            def gate(loop=loop, stack=merger.stack, fused=fused) -> None:
                stack.fused = fused
                loop.step += 1
                loop.train_step((x, y))

            forward, backward = _merge_passes(merger, fused)
            steps[f"gate_{dtype}_{kernels}"] = gate
            steps[f"forward_{dtype}_{kernels}"] = forward
            steps[f"backward_{dtype}_{kernels}"] = backward
        buffers = list(merger.stack.buffers.values())

        def floor(buffers=buffers) -> None:
            for _ in range(2):
                for b in buffers:
                    b.sum()

        steps[f"floor_{dtype}"] = floor
    # The first compiled step compiles (inductor's on-disk cache, if warm, shortens it).
    first_ms = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        steps[f"gate_{dtype}_compiled"]()
        first_ms[dtype] = (time.perf_counter() - start) * 1e3
    # The plain step alone moves by 15 % from one measurement to the next on this machine
    # (page faults of its fresh gradients, other tenants' memory traffic): the section repeats
    # the whole interleaved measurement and judges the median repeat.
    cycles = 5 * rounds
    repeats = [_interleaved(steps, cycles) for _ in range(max(1, ARGS.step_repeats))]
    rows = []
    for dtype, kernels in variants:
        each = [_step_row(times, dtype, kernels, threads) for times in repeats]
        # The median repeat, whole (its columns add up); an odd count has one.
        row = sorted(each, key=lambda r: r["overhead_over_floor"])[len(each) // 2]
        row["repeats"] = [round(r["overhead_over_floor"], 2) for r in each]
        row["cycles"] = cycles
        if kernels == "compiled":
            row["first_step_ms"] = first_ms[dtype]
        rows.append(row)
        print(f"step {dtype} {kernels} {threads} thread(s): {row}", flush=True)
    return rows


def _step_row(
    times: dict[str, list[float]], dtype: str, kernels: str, threads: int
) -> dict[str, Any]:
    """Medians in ms; the overhead is the median of paired differences (gate − plain of the
    same cycle), steadier than the difference of two medians when the plain step drifts."""
    gate, plain = times[f"gate_{dtype}_{kernels}"], times["plain"]
    overhead_ms = statistics.median(g - p for g, p in zip(gate, plain, strict=True)) * 1e3
    floor_ms = statistics.median(times[f"floor_{dtype}"]) * 1e3
    return {
        "forward_ms": statistics.median(times[f"forward_{dtype}_{kernels}"]) * 1e3,
        "backward_ms": statistics.median(times[f"backward_{dtype}_{kernels}"]) * 1e3,
        "storage": dtype,
        "kernels": kernels,
        "threads": threads,
        "plain_ms": statistics.median(plain) * 1e3,
        "gate_ms": statistics.median(gate) * 1e3,
        "floor_ms": floor_ms,
        "overhead_ms": overhead_ms,
        "overhead_over_floor": overhead_ms / floor_ms,
    }


def _merge_passes(merger: Any, fused: Any) -> tuple[Any, Any]:
    """The merge product's two passes alone, as a gate step runs them (``fused``: the compiled
    kernels, or None: the eager ones): forward into the step buffers, backward from a fixed
    upstream gradient."""
    stack = merger.stack
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(stack.count, generator=gen)
    grads = {n: torch.randn(b.shape[1:], generator=gen) for n, b in stack.buffers.items()}
    backward_of = {n: stack._weight_grad_step(n, None) for n in stack.buffers}

    def forward() -> None:
        stack.fused = fused
        for name in stack.buffers:
            stack._mix_step(name, w, None)

    def backward() -> None:
        stack.fused = fused
        for name, weight_grad in backward_of.items():
            weight_grad(grads[name])

    return forward, backward


def _interleaved(steps: dict[str, Any], cycles: int) -> dict[str, list[float]]:
    """Seconds of each call of each callable, in cycles: every cycle calls each once (the order
    reversed every other cycle), so the i-th calls of two callables ran within about a second
    of each other and a paired difference cancels the machine's slower drifts."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for cycle in range(cycles):
        for key in list(steps) if cycle % 2 == 0 else list(reversed(steps)):
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    gc.collect()
    return times


# ------------------------------------------------------------------------------- 4. dist

DIST_MODES = ("one", "data_parallel", "sharded")


def dist_child(mode: str, steps: int, work: Path) -> dict[str, Any] | None:
    """Runs in each process of one configuration: median gate-step time on a global batch of
    128 (each of K processes takes 128 / K samples); process 0 returns the numbers."""
    import resource

    from softmerge import FitConfig, MergePlan, SoftMerger, distributed
    from softmerge.evaluation import set_gate_training_mode

    torch.set_num_threads(1)
    if distributed.launched_by_torchrun():
        distributed.init_from_env()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 512, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    paths = candidate_files(work, "M", 5)
    merger = SoftMerger(
        _mlp("M"), paths, MergePlan(granularity="tensor"), shard_stack=mode == "sharded"
    )
    loop = merger.make_loop([(x, y)], FitConfig(progress=False, warmup=0.0, eval_every=0))
    set_gate_training_mode(merger.model)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        distributed.barrier()
        start = time.perf_counter()
        loop.step += 1
        loop.train_step((x, y))
        if i >= 3:
            times.append(time.perf_counter() - start)
    row = {
        "mode": mode,
        "processes": distributed.world_size(),
        "threads": torch.get_num_threads(),
        "step_ms": statistics.median(times) * 1e3,
        "stack_mib": merger.stack.nbytes / MIB,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    distributed.shutdown()
    return row if distributed.is_writer() else None


def run_dist(work: Path, steps: int, rounds: int) -> list[dict[str, Any]]:
    """Each configuration launched ``rounds`` times (order alternating); medians."""
    candidate_files(work, "M", 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in DIST_MODES}
    for r in range(rounds):
        for mode in DIST_MODES if r % 2 == 0 else tuple(reversed(DIST_MODES)):
            launcher = [sys.executable]
            if mode != "one":
                launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
            argv = [*launcher, __file__, "_dist", mode, str(steps), "--out", str(work)]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"dist run {mode}: {done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"dist {mode}: {row['step_ms']:.1f} ms/step", flush=True)
            runs[mode].append(row)
    rows = []
    one = statistics.median(r["step_ms"] for r in runs["one"])
    for values in runs.values():
        step = statistics.median(r["step_ms"] for r in values)
        rows.append(
            {
                **values[0],
                "step_ms": step,
                "runs_ms": [r["step_ms"] for r in values],
                "speedup": one / step,
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in values),
            }
        )
    return rows


def _dist_section(rows: list[dict[str, Any]], steps: int) -> list[str]:
    labels = {
        "one": "1 process",
        "data_parallel": "2 processes, data-parallel",
        "sharded": "2 processes, sharded stack",
    }
    table = [
        {
            "run": labels[r["mode"]],
            "threads per process": r["threads"],
            "gate step (ms)": round(r["step_ms"], 1),
            "vs 1 process": f"{r['speedup']:.2f}×",
            "stack per process (MiB)": round(r["stack_mib"]),
            "peak RSS of process 0 (MiB)": round(r["peak_rss_mib"]),
        }
        for r in rows
    ]
    return [
        "## Gate steps on 2 processes",
        "",
        "18.9M-parameter MLP (512-4096-4096-10), N=5 float32 candidates, tensor gates, global "
        "batch 128 (64 per process on 2), 1 thread per process, gloo on CPU under torchrun; "
        f"median of {steps} steps per launch, then the median over launches (rounds alternate "
        "the order). Data-parallel: each process holds the whole stack and mixes all of it; "
        "sharded (`fit.shard_stack`): each holds half the stack's rows, mixes them and gathers "
        "the merged tensors (`docs/scaling.md`).",
        "",
        format_markdown_table(table),
        "",
    ]


# ------------------------------------------------------------------------------- 5. path


def path_children(work: Path) -> dict[str, Path]:
    """The demo's 5 clean children (seed 0, full MNIST-1D sizes) as safetensors, made once."""
    from softmerge.data import mnist1d_splits
    from softmerge.demo import make_children
    from softmerge.io import write_safetensors

    folder = work / "path-children"
    paths = {f"child{k}": folder / f"child{k}.safetensors" for k in range(5)}
    if not all(p.exists() for p in paths.values()):
        _, states = make_children(mnist1d_splits(), 0, progress=False)
        for path, state in zip(paths.values(), states, strict=True):
            write_safetensors(path, state)
    return paths


def run_path(work: Path, rounds: int, granularities: list[str]) -> list[dict[str, Any]]:
    """Seconds of one default soft merge and of ``l0_lambda: auto`` (the L0 path), both from
    ``SoftMerger(...)`` to ``merged_state_dict()``, alternating over ``rounds`` rounds."""
    from torch.utils.data import DataLoader

    from softmerge import FitConfig, MergePlan, SoftMerger
    from softmerge.data import mnist1d_splits
    from softmerge.demo import CHANNELS
    from softmerge.zoo import CNN1D

    torch.set_num_threads(ARGS.threads)
    files = path_children(work)
    merge = mnist1d_splits().merge
    rows = []
    for granularity in granularities:
        times: dict[str, list[tuple[float, float]]] = {"default": [], "auto": []}
        path_info: dict[str, Any] = {}
        for r in range(rounds):
            for kind in ("default", "auto") if r % 2 == 0 else ("auto", "default"):
                loader = DataLoader(
                    merge, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
                )
                lam: Any = "auto" if kind == "auto" else 1e-3
                cfg = FitConfig(l0_lambda=lam, progress=False, eval_every=0)
                wall, cpu = time.perf_counter(), time.process_time()
                merger = SoftMerger(
                    CNN1D(channels=CHANNELS),
                    list(files.values()),
                    MergePlan(granularity=granularity),
                    names=list(files),
                )
                merger.fit(loader, config=cfg)
                merger.merged_state_dict()
                times[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
                if kind == "auto" and merger.path is not None:
                    path_info = {
                        "cost": merger.path.cost,
                        "grid": merger.path.grid,
                        "points": len(merger.path.points),
                        "probes": len(merger.path.search),
                        "chosen": merger.path.choice["lambda"],
                    }
                release_memory()
        row = {
            "granularity": granularity,
            "threads": ARGS.threads,
            "rounds": rounds,
            "default_s": statistics.median(t[0] for t in times["default"]),
            "auto_s": statistics.median(t[0] for t in times["auto"]),
            "default_cpu_s": statistics.median(t[1] for t in times["default"]),
            "auto_cpu_s": statistics.median(t[1] for t in times["auto"]),
            **path_info,
        }
        row["load_avg"] = os.getloadavg()[0]  # other processes slow wall time, not CPU time
        row["ratio"] = row["auto_s"] / row["default_s"]
        row["cpu_ratio"] = row["auto_cpu_s"] / row["default_cpu_s"]
        print(f"path {granularity}: {row}", flush=True)
        rows.append(row)
    return rows


def _path_section(path: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    lines = [
        "## The L0 path against one default merge",
        "",
        f"_Measured {meta['date']}, {path[0]['threads']} torch thread(s), median of "
        f"{path[0]['rounds']} alternating rounds, 1-min load average "
        f"{max(r.get('load_avg', 0.0) for r in path):.2f}._ The demo's 5 clean children "
        "(MNIST-1D CNN, 64 channels; merge split 2,000 samples, batch 128). *default*: one "
        "soft merge at λ = 1e-3 (300 steps). *auto*: `fit.l0_lambda: auto`: the L0 path (a "
        "dense fit of 300 steps at λ = 0, then warm-started stages of 30 steps: the coarse "
        "search for the lower end and the grid up to one candidate per unit, at most 750 "
        "steps in all), every point scored on the learning and the held-out data, the "
        "chosen point's gates kept. Both "
        "from `SoftMerger(...)` to `merged_state_dict()`. Target: auto ≤ 3× default.",
        "",
    ]
    table = [
        {
            "gates": r["granularity"],
            "default (s)": round(r["default_s"], 2),
            "auto (s)": round(r["auto_s"], 2),
            "wall ratio": round(r["ratio"], 2),
            "CPU ratio": round(r["cpu_ratio"], 2),
            "gate steps": r.get("cost", {}).get("steps"),
            "steps ratio": round(r.get("cost", {}).get("steps_ratio", float("nan")), 2),
            "path points": r.get("points"),
            "search probes": r.get("probes"),
            "λ range": f"{r['grid'].get('lower', 0):.3g}–{r['grid'].get('upper', 0):.3g}"
            if r.get("grid")
            else "-",
        }
        for r in path
    ]
    lines += [format_markdown_table(table), ""]
    for r in path:
        verdict = "meets" if r["ratio"] <= 3.0 else "misses"
        lines.append(
            f"- {r['granularity']} gates: the path costs **{r['ratio']:.2f}×** one default merge "
            f"in wall time ({r['cpu_ratio']:.2f}× in CPU time) — {verdict} the ≤ 3× target."
        )
    lines += [
        "",
        "Where the time goes: the step budget (2.5× the dense fit's steps) bounds the gate "
        "steps; scoring each point on the learning and held-out data adds a forward pass over "
        "the merge split per point; warm starts copy only the gates and the optimiser's "
        "momentum (a few numbers per unit). The stack, the ranking and the reading of the "
        "candidates are paid once, as in one merge.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------- the page


def write_page(results: dict[str, Any], docs: Path) -> Path:
    from softmerge.io import write_text

    meta = results["meta"]
    lines = [
        "# Performance: memory, static merges, gate steps, the L0 path",
        "",
        "_Written by `make perf` (`benchmarks/engine.py`); do not edit by hand. A run with "
        "`--only` rewrites its own sections and keeps the others: each section says when it "
        "was measured._",
        "",
        f"**Latest run:** {meta['date']}, {meta['seconds'] / 60:.1f} min, torch {meta['torch']}, "
        f"{meta['cpus']} CPUs, {meta['threads']} torch thread(s) for the step timings, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}, {meta['machine']}.",
        "",
    ]
    mem_all = results.get("memory") or []
    mem = [r for r in mem_all if r.get("heap", "pinned") == "pinned"]
    # The eager (main) row of each point: a control row is compared with its own point's.
    eager_mib = {(r["size"], r["N"], r["storage"]): r["peak_mib"] for r in mem}
    glibc = {r["storage"]: r for r in mem_all if r.get("heap") == "glibc default"}
    compiled = {r["storage"]: r for r in mem_all if r.get("heap") == "compiled"}
    if mem:
        lines += [
            "## Memory of soft merging",
            "",
            "Peak resident memory above the baseline (after imports, model and data), as a "
            "multiple of the candidates' bytes (float32 files); floor = stack + the largest "
            "parameter's gradient (one merged copy of the parameters replaces the template's "
            "weights, which the merger drops). Tensor gates, "
            f"{meta['fit_steps']} steps, batch 128. Targets on the 18.9M MLP (M), N=5: "
            "≤ 1.3× (float32 stack), ≤ 0.8× (bfloat16 stack).",
            "",
        ]
        table = [
            {
                "MLP": r["size"],
                "params": f"{r['params'] / 1e6:.1f}M",
                "N": r["N"],
                "stack": r["storage"],
                "candidates (MiB)": round(r["candidates_mib"]),
                "peak above baseline (MiB)": round(r["peak_mib"]),
                "peak / candidates": round(r["peak_ratio"], 2),
                "floor / candidates": round(r["floor_ratio"], 2),
                "merge (s)": round(r["seconds"], 1),
            }
            for r in mem
        ]
        lines += [format_markdown_table(table), ""]
        target = {("M", 5, "float32"): 1.3, ("M", 5, "bfloat16"): 0.8}
        for r in mem:
            goal = target.get((r["size"], r["N"], r["storage"]))
            if goal is not None:
                verdict = "meets" if r["peak_ratio"] <= goal else "misses"
                runs = r.get("repeats", [])
                if len(runs) > 1:
                    verdict = (
                        f"the median of {len(runs)} runs ({', '.join(map(str, runs))}); {verdict}"
                    )
                lines.append(
                    f"- M, N=5, {r['storage']} stack: **{r['peak_ratio']:.2f}×** — {verdict} "
                    f"the ≤ {goal}× target (floor {r['floor_ratio']:.2f}×)."
                )
        if glibc:
            lines += [
                "",
                "The rows above run with glibc's mmap threshold pinned at 4 MiB, as softmerge "
                "sets it when a CPU stack is built (`softmerge.memory`). The same points with "
                "glibc's dynamic threshold (`SOFTMERGE_MMAP_THRESHOLD=off`), in this run: "
                + "; ".join(
                    f"{dtype} **{r['peak_ratio']:.2f}×** (runs {', '.join(map(str, r['repeats']))})"
                    for dtype, r in glibc.items()
                )
                + ". Freeing a mapped tensor raises that threshold to its size, so later "
                "gradient-sized tensors come from the heap, where small blocks allocated after "
                "them keep the heap from shrinking.",
            ]
        if compiled:
            over_eager = {
                d: r["peak_mib"] - eager_mib[r["size"], r["N"], d] for d, r in compiled.items()
            }
            lines += [
                "",
                "With `fit.compile_merge: true` (the gate step section's compiled kernels; "
                "`auto` would not compile stacks this small), the same points peak at "
                + "; ".join(
                    f"{dtype} **{r['peak_ratio']:.2f}×** ({over_eager[dtype]:+.0f} MiB "
                    f"against the eager row; runs {', '.join(map(str, r['repeats']))})"
                    for dtype, r in compiled.items()
                )
                + ": inductor's modules and compiled kernels stay resident.",
            ]
        lines += ["", "![memory](performance/memory.png)", ""]
    static = results.get("static")
    if static:
        lines += _static_section(static)
    step = results.get("step")
    if step:
        lines += [
            "## Gate step against a plain training step",
            "",
            "18.9M-parameter MLP (512-4096-4096-10), N=5 candidates, batch 128, tensor gates; "
            "plain step = SGD step of the model itself. Floor = the time to read every byte of "
            "the stack twice (a merge must read it once forward and once backward), measured in "
            "the same run. Target: gate step − plain step ≤ 1.25 × floor. Every callable is "
            f"called once per cycle ({step[0].get('cycles', 30)} cycles per repeat, the order "
            "reversed every other cycle); the overhead is the median over cycles of gate step "
            "− plain step of the same cycle, the other columns are medians. Each stack runs "
            "with the eager kernels (`fit.compile_merge: false`) and with the merge's passes "
            "compiled (`compile_merge: true`, `softmerge.fused`; `auto`, the default, compiles "
            "for stacks of 1 GiB or more and long enough fits).",
            "",
        ]
        table = [
            {
                "stack": r["storage"],
                "kernels": r.get("kernels", "eager"),
                "threads": r["threads"],
                "plain step (ms)": round(r["plain_ms"], 1),
                "gate step (ms)": round(r["gate_ms"], 1),
                "overhead (ms)": round(r["overhead_ms"], 1),
                "floor (ms)": round(r["floor_ms"], 1),
                "overhead / floor": round(r["overhead_over_floor"], 2),
                **(
                    {
                        "merge forward alone (ms)": round(r["forward_ms"], 1),
                        "merge backward alone (ms)": round(r["backward_ms"], 1),
                    }
                    if "forward_ms" in r
                    else {}
                ),
            }
            for r in step
        ]
        lines += [format_markdown_table(table), ""]
        for r in step:
            verdict = "meets" if r["overhead_over_floor"] <= 1.25 else "misses"
            passes = ""
            if "forward_ms" in r:
                both = r["forward_ms"] + r["backward_ms"]
                passes = (
                    f" The merge's two passes alone take {both:.1f} ms "
                    f"({both / r['floor_ms']:.2f}× the floor: forward "
                    f"{r['forward_ms']:.1f}, backward {r['backward_ms']:.1f})."
                )
            spread = ""
            if len(r.get("repeats", [])) > 1:
                spread = (
                    f" (median of {len(r['repeats'])} repeats: {', '.join(map(str, r['repeats']))})"
                )
            first = ""
            if "first_step_ms" in r:
                first = f" Its first step, compiling, took {r['first_step_ms'] / 1e3:.1f} s."
            lines.append(
                f"- {r['storage']} stack, {r.get('kernels', 'eager')} kernels, "
                f"{r['threads']} thread(s): overhead "
                f"{r['overhead_over_floor']:.2f}× the floor{spread} — {verdict} the ≤ 1.25× "
                f"target.{passes}{first}"
            )
        lines += [
            "",
            "The floor reads the stack with `sum`, the fastest reduction torch has here. In "
            "eager torch the merge's passes are a multiply-add per candidate row (forward: "
            "each one a pass over the merged tensor) and a matrix-vector product (backward), "
            "and a bfloat16 stack is first converted to float32 chunk by chunk: each pass "
            "over a float32 stack takes about as long as the whole floor. Compiled "
            "(`softmerge.fused`), each pass is one loop that reads every row once, converting "
            "half-precision rows in registers, and writes its result once. A gate step does "
            "both passes but skips the "
            "plain step's optimizer update (SGD with momentum reads and writes every weight), "
            "which is why the overhead can come out below the passes' sum. The plain step "
            "itself moves by 15 % or more between repeats (other tenants' memory traffic): the "
            "verdict is the median repeat's. "
            "Compiling adds about 90 MiB to the peak (inductor's modules and kernels: the "
            "memory section's compiled rows), which is why `auto` leaves smaller stacks eager "
            "and the memory section's main rows run eager.",
            "",
        ]
    dist = results.get("dist")
    if dist:
        lines += _dist_section(dist, meta.get("dist_steps", 0))
    path = results.get("path")
    if path:
        lines += _path_section(path, meta)
    page = docs / "performance.md"
    text = "\n".join(_dated(lines, meta, results.get("parts", PARTS)))
    if page.exists() and set(results.get("parts", PARTS)) != set(PARTS):
        text = _splice(page.read_text(encoding="utf-8"), text)
    write_text(page, text)
    if mem:
        _plot_memory(mem, docs / "performance" / "memory.png")
    return page


PARTS = ("memory", "static", "step", "dist", "path")


def _dated(lines: list[str], meta: dict[str, Any], parts: Sequence[str]) -> list[str]:
    """``lines`` with the run's date under each section heading that does not give its own,
    so a page spliced from several ``--only`` runs dates every section."""
    run = "make perf" if set(parts) == set(PARTS) else f"--only {','.join(parts)}"
    stamp = f"_Measured {meta['date']}, {meta['seconds'] / 60:.1f} min ({run})._"
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        following = lines[i + 2] if i + 2 < len(lines) else ""
        if line.startswith("## ") and not following.startswith("_Measured"):
            out += ["", stamp]
    return out


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """The page's text before its first '## ' heading, and each '## ' section by heading."""
    head, *rest = text.split("\n## ")
    return head, {part.split("\n", 1)[0]: "## " + part for part in rest}


def _splice(old: str, new: str) -> str:
    """``old`` with the sections ``new`` has replaced (the others kept, a new section at the
    end) under ``new``'s header (the latest run): a run of some parts updates only their
    sections, each of which carries its own date."""
    _, sections = _sections(old)
    head, fresh = _sections(new)
    sections.update(fresh)
    return "\n".join([head.rstrip("\n"), "", *(s.rstrip("\n") + "\n" for s in sections.values())])


def _static_section(static: dict[str, Any]) -> list[str]:
    lines = [
        "## Static merges against mergekit",
        "",
        "168M-parameter Llama-architecture model (hidden 1024, 8 layers, intermediate 2816, "
        "vocab 32000, untied) in bfloat16: base + 3 fine-tunes, "
        f"{static['candidate_mib']:.0f} MiB each. Both tools run as commands "
        "(`softmerge merge cfg.yaml`, `mergekit-yaml cfg.yml out`), alternating, files in the "
        "page cache; medians. Peak = the child process's peak RSS. Targets: wall time ≤ "
        "mergekit's, peak RSS ≤ 0.5× mergekit's.",
        "",
    ]
    table = []
    for method in ("ties", "linear"):
        row = static.get(method, {})
        ours, theirs = row.get("softmerge"), row.get("mergekit")
        if not ours:
            continue
        entry: dict[str, Any] = {
            "method": "TIES (density 0.5)" if method == "ties" else "linear",
            "softmerge (s)": round(ours["seconds"], 1),
            "softmerge peak (MiB)": round(ours["peak_mib"]),
        }
        if theirs:
            agree = row["agreement"]
            entry.update(
                {
                    "mergekit (s)": round(theirs["seconds"], 1),
                    "mergekit peak (MiB)": round(theirs["peak_mib"]),
                    "time ratio": round(ours["seconds"] / theirs["seconds"], 2),
                    "peak ratio": round(ours["peak_mib"] / theirs["peak_mib"], 2),
                    "differing elements": f"{agree['differing_fraction']:.2e}",
                    "max abs diff": f"{agree['max_abs_diff']:.3g}",
                }
            )
        table.append(entry)
    lines += [format_markdown_table(table), ""]
    for entry in table:
        if "time ratio" in entry:
            ok_time = entry["time ratio"] <= 1.0
            ok_mem = entry["peak ratio"] <= 0.5
            lines.append(
                f"- {entry['method']}: time {entry['time ratio']}× mergekit's "
                f"({'meets' if ok_time else 'misses'} ≤ 1×), peak {entry['peak ratio']}× "
                f"({'meets' if ok_mem else 'misses'} ≤ 0.5×)."
            )
    lines.append("")
    return lines


def _plot_memory(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    from softmerge.io import atomic_write

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, dtype in zip(axes, ("float32", "bfloat16"), strict=True):
        for size in SIZES:
            sel = [r for r in rows if r["size"] == size and r["storage"] == dtype]
            if not sel:
                continue
            ns = [r["N"] for r in sel]
            (line,) = ax.plot(ns, [r["peak_ratio"] for r in sel], marker="o", label=f"{size}")
            ax.plot(ns, [r["floor_ratio"] for r in sel], ls="--", color=line.get_color())
        ax.set_title(f"{dtype} stack (dashed: floor)")
        ax.set_xlabel("candidates N")
        ax.legend(title="MLP")
    axes[0].set_ylabel("peak above baseline / candidates' bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "engine")
    parser.add_argument("--docs", type=Path, default=None, help="write performance.md here")
    parser.add_argument("--only", default="memory,static,step,dist,path")
    parser.add_argument("--path-rounds", type=int, default=3)
    parser.add_argument("--path-granularities", default="tensor,model")
    parser.add_argument("--sizes", default="S,M,L")
    parser.add_argument("--counts", default="2,5,10")
    parser.add_argument("--fit-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="runs per memory point (odd: a median)"
    )
    parser.add_argument(
        "--step-repeats", type=int, default=9, help="repeats of the step timing (odd: a median)"
    )
    parser.add_argument("--static-rounds", type=int, default=3)
    parser.add_argument("--dist-steps", type=int, default=30, help="timed steps per launch")
    parser.add_argument("--dist-rounds", type=int, default=3, help="launches per configuration")
    parser.add_argument(
        "--mergekit",
        type=Path,
        default=None,
        help="the mergekit-yaml command (default: install mergekit 0.1.5 into <out>/mergekit-venv)",
    )
    ARGS = parser.parse_args(argv)
    # Absolute: the static section's YAML configs name files under it, and softmerge reads a
    # config's relative paths from the config's own folder.
    ARGS.out = ARGS.out.resolve()
    ARGS.out.mkdir(parents=True, exist_ok=True)
    parts = set(ARGS.only.split(","))
    start = time.perf_counter()
    results: dict[str, Any] = {}
    if "memory" in parts:
        sizes, counts = ARGS.sizes.split(","), [int(c) for c in ARGS.counts.split(",")]
        results["memory"] = run_memory(ARGS.out, sizes, counts, ARGS.fit_steps, ARGS.memory_repeats)
    if "static" in parts:
        mergekit = ARGS.mergekit or install_mergekit(ARGS.out / "mergekit-venv")
        results["static"] = run_static(ARGS.out, mergekit, ARGS.static_rounds)
    if "step" in parts:
        results["step"] = run_step(ARGS.threads, ARGS.rounds)
    if "dist" in parts:
        results["dist"] = run_dist(ARGS.out, ARGS.dist_steps, ARGS.dist_rounds)
    if "path" in parts:
        grans = ARGS.path_granularities.split(",")
        results["path"] = run_path(ARGS.out, ARGS.path_rounds, grans)
    results["parts"] = sorted(parts)
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": ARGS.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.machine(),
        "fit_steps": ARGS.fit_steps,
        "dist_steps": ARGS.dist_steps,
    }
    (ARGS.out / "engine.json").write_text(json.dumps(results, indent=2))
    if ARGS.docs is not None:
        print(f"wrote {write_page(results, ARGS.docs)}")
    return results


def install_mergekit(venv: Path) -> Path | None:
    """mergekit 0.1.5 in its own virtual environment (CPU torch first: never a CUDA build)."""
    command = venv / "bin" / "mergekit-yaml"
    if command.exists():
        return command
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"mergekit could not be installed ({exc}); static merges run without it")
        return None
    return command


ARGS: argparse.Namespace


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":
        _, _, size, count, dtype, steps, _, out = sys.argv
        print(json.dumps(memory_child(size, int(count), dtype, int(steps), Path(out))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_dist":
        _, _, mode, steps, _, out = sys.argv
        found = dist_child(mode, int(steps), Path(out))
        if found is not None:
            print(json.dumps(found))
    else:
        main()
