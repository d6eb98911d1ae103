"""How fast can the merge product go on this machine? Kernels against the bandwidth floor.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mix_kernels.py [--threads 2] [--rounds 4]
                                                              [--compile]

The gate step's overhead over a plain step is two passes over the float32 stack: the forward
``theta = sum_j w_j * stack[j]`` and the backward ``dL/dw_j = <dL/dtheta, stack[j]>``
(``softmerge.stack``). ``docs/performance.md`` compares that overhead with a floor: the time
to read the stack twice (``stack.sum()`` twice). This script times each pass alone, with the
kernel softmerge uses and with the alternatives, on the stack of the 18.9M-parameter MLP of
the performance page (512-4096-4096-10, N = 5, seed 0), interleaved in rounds so load drift
hits all of them; medians, in ms and as a multiple of the floor.

- forward, rows (softmerge's eager kernel): ``out = w_0 * row_0``, then
  ``out += w_j * row_j`` per row;
- forward, rows with Python scalars: the same with ``add_(alpha=...)``;
- forward, chunks of K elements: all rows of one chunk before the next (``out`` stays in
  cache; one thread wake-up per operation under ``OMP_WAIT_POLICY=PASSIVE``);
- forward, BLAS: ``w (1, N) @ stack (N, P)``;
- backward, gemv (softmerge's eager kernel): ``stack (N, P) @ grad (P,)``; by chunks of K
  columns; one ``dot`` per row;
- ``--compile``: both passes as softmerge's compiled kernels (``softmerge.fused``, what
  ``fit.compile_merge`` turns on: inductor; a C++ compiler needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

N = 5
SHAPES = [(4096, 512), (4096,), (4096, 4096), (4096,), (10, 4096), (10,)]


def kernels(compile_too: bool) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn((N, *s), generator=gen).view(N, -1) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).view(-1) for s in SHAPES]
    outs = [torch.empty(st.shape[1]) for st in stacks]
    w = torch.rand(N, generator=gen)

    def floor() -> None:
        for _ in range(2):
            for st in stacks:
                st.sum()

    def fwd_rows() -> None:
        for st, out in zip(stacks, outs, strict=True):
            torch.mul(st[0], w[0], out=out)
            for j in range(1, N):
                out.addcmul_(st[j], w[j])

    def fwd_alpha() -> None:
        ws = w.tolist()
        for st, out in zip(stacks, outs, strict=True):
            torch.mul(st[0], ws[0], out=out)
            for j in range(1, N):
                out.add_(st[j], alpha=ws[j])

    def fwd_chunks(width: int) -> Callable[[], None]:
        def run() -> None:
            for st, out in zip(stacks, outs, strict=True):
                for s in range(0, st.shape[1], width):
                    e = min(s + width, st.shape[1])
                    seg = out[s:e]
                    torch.mul(st[0, s:e], w[0], out=seg)
                    for j in range(1, N):
                        seg.addcmul_(st[j, s:e], w[j])

        return run

    def fwd_blas() -> None:
        for st, out in zip(stacks, outs, strict=True):
            torch.mm(w.view(1, N), st, out=out.view(1, -1))

    def bwd_gemv() -> None:
        for st, g in zip(stacks, grads, strict=True):
            torch.mv(st, g)

    def bwd_chunks(width: int) -> Callable[[], None]:
        def run() -> None:
            for st, g in zip(stacks, grads, strict=True):
                total = torch.zeros(N)
                for s in range(0, st.shape[1], width):
                    e = min(s + width, st.shape[1])
                    total.addmv_(st[:, s:e], g[s:e])

        return run

    def bwd_dots() -> None:
        for st, g in zip(stacks, grads, strict=True):
            torch.stack([torch.dot(st[j], g) for j in range(N)])

    out: dict[str, Callable[[], object]] = {
        "floor: stack.sum() twice": floor,
        "forward, rows (softmerge, eager)": fwd_rows,
        "forward, rows, Python scalars": fwd_alpha,
        "forward, chunks of 256K": fwd_chunks(1 << 18),
        "forward, chunks of 2M": fwd_chunks(1 << 21),
        "forward, BLAS w @ stack": fwd_blas,
        "backward, gemv (softmerge, eager)": bwd_gemv,
        "backward, chunks of 256K": bwd_chunks(1 << 18),
        "backward, chunks of 2M": bwd_chunks(1 << 21),
        "backward, one dot per row": bwd_dots,
    }
    if compile_too:
        from softmerge.fused import FusedMerge

        fused = FusedMerge(required=True)
        out["forward, compiled (softmerge.fused)"] = lambda: [
            fused.mix(w, st, None, o) for st, o in zip(stacks, outs, strict=True)
        ]
        out["backward, compiled (softmerge.fused)"] = lambda: [
            fused.weight_grad(st, g) for st, g in zip(stacks, grads, strict=True)
        ]
    return out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for key in list(fns) if r % 2 == 0 else list(reversed(fns)):
            for _ in range(3):
                t0 = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = interleaved(kernels(args.compile), args.rounds)
    floor = times["floor: stack.sum() twice"]
    stack_mib = N * sum(torch.Size(s).numel() for s in SHAPES) * 4 / 2**20
    print(f"stack {stack_mib:.0f} MiB (float32, N = {N}); {args.threads} thread(s)")
    print("| kernel | ms | × floor |\n| --- | ---: | ---: |")
    for key, seconds in times.items():
        print(f"| {key} | {1e3 * seconds:.1f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
