"""results.json -> docs/results.md and docs/results/*.png, with the claims verdicts.

    python benchmarks/report.py [--results bench-out/results.json] [--docs docs]

Every number on the page comes from results.json; every verdict of the claims table comes from
those numbers through the rules written next to it (``claims()`` below), never by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GRANULARITIES = ("model", "module", "tensor", "channel")
HEADLINE = "soft (tensor)"  # the library's default granularity: the claims are judged on it
ALIGNED = "soft (tensor), aligned"  # S2: the headline after weight matching (plan.align)
SOUP_ALIGNED = "uniform soup, aligned"
LEARNED = "soft (tensor, delta_scale learned)"  # S5: task vectors' scale learned with the gates
TA_TUNED = "task arithmetic (lambda tuned)"
AUTO = "soft (tensor), λ auto"  # fit.l0_lambda: auto, whose record carries the L0 path
PATH_SETTINGS = ("S1", "S3", "S5")  # the tables claim 3 is judged on along the path
DEFAULT_LAMBDA = 1e-3  # FitConfig's default λ
EXTREME = ("scaled_x100", "noise_x10", "nan_inf")  # "malicious models with extreme values"
MARGIN = 1.0  # accuracy points: "collapses" / "within" thresholds of the rules
STEP_LIMIT = 1.25  # acceptance: gate step <= 1.25x a plain step (MLP and CNN, N=5, batch 128)

SETTING_TITLES = {
    "S1": "S1 — local optima of one run (children of one parent)",
    "S2": "S2 — independently initialised models (as they are, and aligned by weight matching)",
    "S3": "S3 — malicious candidates (k of 7)",
    "S4": "S4 — partial merging (only the plan's layers; the rest from one candidate)",
    "S5": "S5 — fine-tunes of one parent on different class pairs (task vectors, delta)",
}


# ---------------------------------------------------------------------------------------------
# Aggregation


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Stat:
    """Mean and sample standard deviation over seeds of one quantity."""

    def __init__(self, values: Iterable[Any]) -> None:
        vals = [v for v in values if v is not None]
        self.n = len(vals)
        self.nan = any(not finite(v) for v in vals)
        nums = [float(v) for v in vals if finite(v)]
        self.mean = statistics.fmean(nums) if nums and not self.nan else math.nan
        self.std = statistics.stdev(nums) if len(nums) > 1 and not self.nan else 0.0
        self.values = vals

    def fmt(self, digits: int = 2, pm: bool = True) -> str:
        if self.n == 0:
            return "—"
        if self.nan or not finite(self.mean):
            return (
                "nan"
                if any(isinstance(v, float) and math.isnan(v) for v in self.values)
                else ("inf")
            )
        text = f"{self.mean:.2e}" if abs(self.mean) >= 1e5 else f"{self.mean:.{digits}f}"
        if pm and self.n > 1:
            text += f" ± {self.std:.{digits}f}" if abs(self.std) < 1e5 else f" ± {self.std:.1e}"
        return text


class Results:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.meta = data["meta"]
        self.records = data["records"]
        self.tables: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for r in self.records:
            self.tables[(r["setting"], r["config"])][r["row"]].append(r)

    def configs(self, setting: str) -> list[str]:
        return [c for s, c in self.tables if s == setting]

    def rows(self, setting: str, config: str) -> dict[str, list[dict]]:
        return self.tables.get((setting, config), {})

    def stat(self, setting: str, config: str, row: str, key: str = "test_acc") -> Stat:
        return Stat(r.get(key) for r in self.rows(setting, config).get(row, []))

    def all(self, pred: Callable[[dict], bool]) -> list[dict]:
        return [r for r in self.records if pred(r)]


# ---------------------------------------------------------------------------------------------
# Markdown helpers


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def notes_for(recs: list[dict]) -> str:
    """Short per-row notes: errors, tuned lambda, greedy's picks, malicious weight, gates."""
    out = []
    errors = {r["error"] for r in recs if "error" in r}
    if errors:
        out.append("error: " + "; ".join(sorted(errors))[:120])
    lams = [r["lambda"] for r in recs if "lambda" in r]
    if lams:
        out.append("λ=" + "/".join(fmt(x, 2) for x in lams))
    kept = [len(r["kept"]) for r in recs if r.get("kept")]
    if kept:
        out.append("kept " + "/".join(str(k) for k in kept))
    chosen = [r["chosen"] for r in recs if "chosen" in r]
    if chosen:
        out.append("= " + "/".join(chosen))
    mal = [r.get("malicious_weight") for r in recs if "malicious_weight" in r]
    mal = [m for m in mal if m is not None]
    if mal:
        out.append(f"malicious max {fmt(max(mal), 3)}")
    zero = [r["gate_zero_frac"] for r in recs if "gate_zero_frac" in r]
    if zero:
        one = [r["gate_one_frac"] for r in recs if "gate_one_frac" in r]
        out.append(
            f"gates =0: {100 * statistics.fmean(zero):.0f}%, =1: {100 * statistics.fmean(one):.0f}%"
        )
    opened = [
        r["open"]
        for r in recs
        if "open" in r and "gates_max" in r and len(r["open"]) < len(r["gates_max"])
    ]
    if opened:

        def open_text(r: dict) -> str:
            if len(r["open"]) == len(r["gates_max"]):
                return "all"
            if r["open"]:
                return ",".join(r["open"])
            if r.get("combine") == "delta" or r["setting"] == "S5":
                return "none (= base)"
            return f"none (fallback: {r.get('reference')})"

        shown = [open_text(r) for r in recs if "open" in r and "gates_max" in r]
        out.append("open: " + " / ".join(shown))
    ratio = [
        r["alignment"]["cost_ratio"] for r in recs if (r.get("alignment") or {}).get("cost_ratio")
    ]
    if ratio:
        out.append(f"aligned: distance ×{statistics.fmean(ratio):.2f}")
    scales = [r["delta_scale_learned"] for r in recs if "delta_scale_learned" in r]
    if scales:
        lo, hi = min(x["min"] for x in scales), max(x["max"] for x in scales)
        out.append(f"learned scale {lo:.2f}–{hi:.2f}")
    own = [r["own_task_acc"] for r in recs if "own_task_acc" in r]
    if own:
        out.append("own task " + "/".join(f"{v:.1f}" for v in own) + "%")
    if any(r.get("frozen") is False for r in recs):
        out.append("CANDIDATE WEIGHTS CHANGED")
    ph = [r["plan_honoured"] for r in recs if r.get("plan_honoured")]
    if ph:
        ok = all(p["rest_identical_to"] and p["merged_changed"] for p in ph)
        out.append("plan honoured" if ok else "PLAN NOT HONOURED")
    return "; ".join(out)


def method_table(res: Results, setting: str, config: str, task_acc: bool = False) -> str:
    header = [
        "model",
        "test acc (%)",
        "test loss",
        "merge (s)",
        "settle step",
        "step ratio",
        "peak RSS (MiB)",
        "notes",
    ]
    if task_acc:
        header.insert(2, "mean task acc (%)")
    rows = []
    for row, recs in res.rows(setting, config).items():
        if recs[0].get("group") == "diagnostic":
            continue
        acc = Stat(r.get("test_acc") for r in recs)
        name = f"**{row}**" if row.startswith("soft") else row
        if recs[0].get("malicious"):
            name += " ⚠"
        line = [
            name,
            acc.fmt(2),
            Stat(r.get("test_loss") for r in recs).fmt(3),
            Stat(r.get("merge_s") for r in recs).fmt(1),
            Stat(r.get("settle_step") for r in recs).fmt(0),
            Stat(r.get("step_ratio") for r in recs).fmt(2),
            Stat(r.get("peak_mb") for r in recs).fmt(0, pm=False),
            notes_for(recs),
        ]
        if task_acc:
            line.insert(2, Stat((r.get("task_acc") or {}).get("mean") for r in recs).fmt(2))
        rows.append(line)
    return md_table(header, rows, "l" + "r" * (len(header) - 2) + "l")


# ---------------------------------------------------------------------------------------------
# Claims: verdicts derived from the numbers by the rules stated on the page


def mean_acc(res: Results, setting: str, config: str, row: str, key: str = "test_acc") -> float:
    return res.stat(setting, config, row, key).mean


def best_single(res: Results, s: str, c: str) -> float:
    return mean_acc(res, s, c, "best single (chosen on merge split)")


def claims(res: Results) -> list[dict[str, str]]:
    out = []
    out.append(claim1(res))
    out.append(claim2(res))
    out.append(claim3(res))
    out.append(claim4(res))
    out.append(claim5(res))
    out.append(claim6(res))
    return out


def _gap_list(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {v:+.2f}" for name, v in items)


def claim1(res: Results) -> dict[str, str]:
    dis = {
        s: [
            res.stat(s, c, "pairwise test disagreement (%)", "disagreement").mean
            for c in res.configs(s)
        ]
        for s in ("S1", "S2")
    }
    bad, good, lines = [], [], []
    for s in ("S1", "S2", "S3"):
        for c in res.configs(s):
            gap = mean_acc(res, s, c, "uniform soup") - best_single(res, s, c)
            lu = mean_acc(res, s, c, "uniform soup", "test_loss")
            lb = mean_acc(res, s, c, "best single (chosen on merge split)", "test_loss")
            worse = not finite(gap) or gap < -MARGIN or not finite(lu) or lu > 2 * lb
            (bad if worse else good).append(f"{s} {c}")
            lines.append(f"{s} {c} {gap:+.2f} pt (loss {fmt(lu, 3)} vs {fmt(lb, 3)})")
    dtext = "; ".join(
        f"{s} mean pairwise test disagreement {statistics.fmean(v):.1f}%"
        for s, v in dis.items()
        if v and all(finite(x) for x in v)
    )
    aligned = [
        f"{c} {mean_acc(res, 'S2', c, SOUP_ALIGNED) - best_single(res, 'S2', c):+.2f} pt"
        for c in res.configs("S2")
        if res.stat("S2", c, SOUP_ALIGNED).n
    ]
    if bad and not good:
        verdict = "held"
    elif bad:
        verdict = "held only in " + ", ".join(bad) + "; averaging is fine in " + ", ".join(good)
    else:
        verdict = "not held"
    return {
        "claim": "1. SGD ends in different local optima; simple averaging gives undesirable "
        "results",
        "rule": "different optima: clean candidates disagree on test samples. Averaging is "
        f"undesirable in a table if the uniform soup's accuracy is below the best single "
        f"model's by more than {MARGIN:g} pt or its test loss is more than twice the best "
        "single model's (means over seeds); held if so in every S1, S2 and S3 table",
        "numbers": f"{dtext}. Uniform soup − best single: "
        + "; ".join(lines)
        + (
            ". After weight matching (not part of the rule), S2 uniform soup − best single: "
            + ", ".join(aligned)
            if aligned
            else ""
        ),
        "verdict": verdict,
    }


def _train_seconds(res: Results, family: str) -> float:
    """Wall time of producing one clean candidate: its own training plus its parent's."""
    per_seed = []
    for f in res.data["families"]:
        if f["family"] != family:
            continue
        t = f["train_seconds"]
        own = [v for k, v in t.items() if k not in ("parent", "shuffled_labels")]
        if own:
            per_seed.append(statistics.fmean(own) + t.get("parent", 0.0))
    return statistics.fmean(per_seed) if per_seed else math.nan


def step_ratios(res: Results) -> dict[tuple[str, int, str], float]:
    """Gate step / plain step at the acceptance batch size (128), by (model, threads, gates)."""
    return {
        (r["model"], r["threads"], r["granularity"]): r["ratio"]
        for r in res.data.get("step_cost") or []
        if r.get("batch", 128) == 128
    }


def claim2(res: Results) -> dict[str, str]:
    soft = res.all(lambda r: r.get("method") == "soft" and "frozen" in r)
    frozen = all(r["frozen"] for r in soft)
    comps = []
    for s in ("S1", "S2", "S3", "S5"):
        for c in res.configs(s):
            recs = res.rows(s, c).get(HEADLINE, [])
            if not recs:
                continue
            fam = recs[0]["family"]
            merge = Stat(r.get("merge_s") for r in recs).mean
            comps.append((f"{s} {c}", merge, _train_seconds(res, fam)))
    fast_in = [name for name, m, t in comps if finite(m) and finite(t) and m < t]
    slow_in = [name for name, m, t in comps if name not in fast_in]
    settle = Stat(r.get("settle_step") for r in soft).mean
    steps = Stat(r.get("steps") for r in soft).mean
    ratios = step_ratios(res)
    threads = max((k[1] for k in ratios), default=0)
    key_ratios = {m: ratios.get((m, threads, "tensor")) for m in ("MLP", "CNN")}
    step_ok = all(v is not None and v <= STEP_LIMIT for v in key_ratios.values())
    nums = (
        f"candidate weights bit-identical after all {len(soft)} soft merges: "
        f"{'yes' if frozen else 'NO'}. Soft (tensor) merge time / time to train one candidate "
        "(incl. its parent): "
        + ", ".join(f"{name} {m:.1f}/{t:.1f} s" for name, m, t in comps)
        + f". Gates settle after {settle:.0f} of {steps:.0f} steps on average. Gate step / "
        f"plain step at N=5, batch 128, {threads} thread(s), tensor gates: "
        + ", ".join(f"{m} {fmt(v)}x" for m, v in key_ratios.items())
    )
    slow_steps = [m for m, v in key_ratios.items() if v is None or v > STEP_LIMIT]
    if not frozen or not fast_in:
        verdict = "not held"
    elif not slow_in and step_ok:
        verdict = "held"
    else:
        parts = []
        if slow_in:
            parts.append(
                "merging is faster than training one candidate only in "
                + ", ".join(fast_in)
                + " (slower in "
                + ", ".join(slow_in)
                + ")"
            )
        if slow_steps:
            parts.append(
                f"a gate step costs more than {STEP_LIMIT}x a plain training step on "
                "the " + " and ".join(slow_steps)
            )
        verdict = "held only in part (weights frozen: yes): " + "; ".join(parts)
    return {
        "claim": "2. Merges rapidly, by learning gates with SGD while the weights stay frozen",
        "rule": "held if every candidate's weights are bit-identical after every soft merge, "
        "the soft (tensor) merge takes less wall time than training one candidate (its own "
        "training plus its parent's) in every S1, S2, S3 and S5 table, and a gate step costs "
        f"<= {STEP_LIMIT}x a plain training step (MLP and CNN, step-cost table)",
        "numbers": nums,
        "verdict": verdict,
    }


def path_runs(res: Results, settings: tuple[str, ...] = PATH_SETTINGS) -> list[dict]:
    """The auto-λ records (each carries its L0 path) of ``settings``, without errors."""
    return res.all(lambda r: r["row"] == AUTO and r["setting"] in settings and bool(r.get("path")))


def _default_pairs(res: Results) -> tuple[float, float, float, int]:
    """Default λ (1e-3) minus λ = 0, soft (tensor), same table and seed: expected L0 per unit,
    open gates per unit, test accuracy; and the number of pairs."""
    pairs = []
    off = {
        (r["setting"], r["config"], r["seed"]): r
        for r in res.all(lambda r: r["row"].startswith("soft (tensor), L0 off"))
    }
    for r in res.all(lambda r: r["row"] == HEADLINE):
        o = off.get((r["setting"], r["config"], r["seed"]))
        if o and "expected_l0" in r and "expected_l0" in o:
            pairs.append(
                (
                    r["expected_l0"] - o["expected_l0"],
                    r["gate_open_per_unit"] - o["gate_open_per_unit"],
                    r["test_acc"] - o["test_acc"],
                )
            )
    means = [statistics.fmean(p[i] for p in pairs) if pairs else math.nan for i in range(3)]
    return means[0], means[1], means[2], len(pairs)


def claim3(res: Results) -> dict[str, str]:
    soft = res.all(lambda r: r.get("method") == "soft" and "gate_zero_frac" in r)
    zero = statistics.fmean(r["gate_zero_frac"] for r in soft) if soft else math.nan
    one = statistics.fmean(r["gate_one_frac"] for r in soft) if soft else math.nan
    runs_zero = sum(r["gate_zero_frac"] > 0 for r in soft)
    runs_one = sum(r["gate_one_frac"] > 0 for r in soft)
    exact = runs_zero > 0 and runs_one > 0
    d_l0, d_open, d_acc, n_pairs = _default_pairs(res)
    runs = path_runs(res)
    trivial = [r for r in runs if len(r["path"]) == 1]  # the dense fit keeps <= 1 per unit
    falls = [
        r for r in runs if r["path"][-1]["open_per_unit"] <= r["path"][0]["open_per_unit"] - 0.01
    ]
    reached = [r for r in runs if r["path_grid"].get("upper_reached")]
    lowers = sorted(r["path_grid"]["lower"] for r in runs if (r["path_grid"].get("lower") or 0))
    dense_at_default = sum(v >= DEFAULT_LAMBDA for v in lowers)

    def mean_at(index: int, key: str) -> float:
        vals = [r["path"][index].get(key) for r in runs]
        vals = [v for v in vals if finite(v)]
        return statistics.fmean(vals) if vals else math.nan

    nums = (
        f"L0 path of soft (tensor) in {len(runs)} S1, S3 and S5 runs (tables × seeds; dense "
        "fit at λ = 0, then warm-started λ from the lower end, where nothing has closed, to the "
        f"upper end, where every unit keeps at most one open gate): open gates per unit "
        f"{mean_at(0, 'open_per_unit'):.2f} at λ = 0 -> {mean_at(-1, 'open_per_unit'):.2f} at "
        f"the upper end (one candidate per unit reached in {len(reached)} of {len(runs)}; "
        f"{len(trivial)} paths had nothing to close); exact zeros "
        f"{100 * mean_at(0, 'zero_fraction'):.0f}% -> {100 * mean_at(-1, 'zero_fraction'):.0f}%"
        f" of gates; test acc {mean_at(0, 'test_acc'):.2f} -> {mean_at(-1, 'test_acc'):.2f}. "
        + (
            f"Lower ends λ {lowers[0]:.3g} to {lowers[-1]:.3g} (median "
            f"{statistics.median(lowers):.3g}): at the default λ = {DEFAULT_LAMBDA:g} nothing "
            f"closes in {dense_at_default} of {len(lowers)} paths. "
            if lowers
            else ""
        )
        + f"Over {len(soft)} soft merges: {100 * zero:.1f}% of deterministic gates exactly 0 (in "
        f"{runs_zero} runs), {100 * one:.1f}% exactly 1 (in {runs_one} runs). Default λ minus "
        f"λ = 0, soft (tensor), {n_pairs} paired runs: expected L0 per unit {d_l0:+.3f}, open "
        f"gates per unit {d_open:+.3f}, test acc {d_acc:+.2f} pt"
    )
    acts = bool(falls) and len(falls) + len(trivial) == len(runs)
    if exact and acts and len(reached) == len(runs):
        verdict = (
            "held: along the L0 path the term closes gates, down to one candidate per unit in "
            f"every S1, S3 and S5 path ({len(reached)} of {len(runs)}); the default λ is below "
            f"the path's lower end in {dense_at_default} of {len(lowers)} paths (a dense merge), "
            "so λ, or `l0_lambda: auto`, is what chooses the sparsity"
        )
    elif exact and falls:
        verdict = (
            f"held in part: raising λ closes gates on {len(falls)} of {len(runs)} L0 paths; one "
            f"candidate per unit reached on {len(reached)}"
        )
    elif exact:
        verdict = (
            "held only as a parameterisation: hard concrete gates do reach exactly 0 and 1, but "
            "raising λ along the L0 path does not close gates"
        )
    else:
        verdict = "not held"
    return {
        "claim": "3. Gates follow the hard concrete distribution, a differentiable L0 surrogate",
        "rule": "held if deterministic gates reach exactly 0 and exactly 1 in some runs and, on "
        "the L0 path of every S1, S3 and S5 table and seed (soft (tensor), λ from 0 up), raising "
        "λ closes gates: the open gates per unit fall from their λ = 0 value to at most one per "
        "unit at the path's upper end (paths whose dense fit already keeps one per unit count "
        "as having nothing to close)",
        "numbers": nums,
        "verdict": verdict,
    }


def claim4(res: Results) -> dict[str, str]:
    rows = []
    honoured = True
    for c in res.configs("S4"):
        for row in ("soft (tensor)", "soft (channel)"):
            recs = res.rows("S4", c).get(row, [])
            for r in recs:
                ph = r.get("plan_honoured") or {}
                honoured &= bool(ph.get("rest_identical_to")) and bool(ph.get("merged_changed"))
        fam = c.split(":")[0]
        soft = mean_acc(res, "S4", c, "soft (tensor)")
        best = mean_acc(res, "S1", fam, "best single (chosen on merge split)")
        full = mean_acc(res, "S1", fam, HEADLINE)
        uni = mean_acc(res, "S4", c, "uniform soup")
        rows.append((c, soft, best, full, uni))
    no_harm = [r for r in rows if finite(r[1]) and finite(r[2]) and r[1] >= r[2] - 0.5]
    nums = "; ".join(
        f"{c}: soft (tensor) {s:.2f} vs best single {b:.2f}, full soft {f:.2f}, "
        f"uniform soup on the same part {u:.2f}"
        for c, s, b, f, u in rows
    )
    if rows and honoured and len(no_harm) == len(rows):
        verdict = "held"
    elif rows and honoured:
        verdict = (
            "held only as a mechanism: the plan is honoured exactly, but partial merges "
            "lose to the best single model in " + ", ".join(r[0] for r in rows if r not in no_harm)
        )
    else:
        verdict = "not held"
    return {
        "claim": "4. Merging specific parts of a network is simple",
        "rule": "held if in every S4 run every parameter outside the plan is bit-identical to "
        "one candidate's, merged ones differ, and the partial soft merge is no worse than the "
        "best single model − 0.5 pt",
        "numbers": f"plan honoured in every run: {'yes' if honoured else 'NO'}. {nums}. "
        "Code: `MergePlan(exclude=['head.*'])` or `MergePlan(include=['head.*'])`",
        "verdict": verdict,
    }


def claim5(res: Results) -> dict[str, str]:
    per: list[tuple[str, str, float, float, float]] = []  # config, row, max gate, acc, clean
    for c in res.configs("S3"):
        for g in GRANULARITIES:
            row = f"soft ({g})"
            recs = res.rows("S3", c).get(row, [])
            if not recs:
                continue
            gate = (
                max(
                    (r.get("malicious_weight") or 0.0)
                    for r in recs
                    if r.get("malicious_weight") is not None
                )
                if recs
                else math.nan
            )
            if any("error" in r for r in recs):
                gate = math.nan
            acc = Stat(r.get("test_acc") for r in recs).mean
            clean = mean_acc(res, "S1", "mnist_mlp", row)
            per.append((c, row, gate, acc, clean))

    def kinds(c: str) -> list[str]:
        return c.split(" ", 1)[1].split("+")

    extreme = [p for p in per if all(k in EXTREME for k in kinds(p[0]))]
    other = [p for p in per if p not in extreme]

    def ok(p) -> bool:
        return p[2] == 0.0 and finite(p[3]) and finite(p[4]) and p[3] >= p[4] - MARGIN

    ext_ok = all(ok(p) for p in extreme) and bool(extreme)
    other_fail = sorted({p[0] for p in other if not ok(p)})
    uni = [(c, mean_acc(res, "S3", c, "uniform soup")) for c in res.configs("S3")]
    ada = [(c, mean_acc(res, "S3", c, "AdaMerging task-wise")) for c in res.configs("S3")]
    head = [p for p in per if p[1] == HEADLINE]
    nan_runs = res.all(
        lambda r: r["setting"] == "S3" and r.get("method") == "soft" and "nan_inf" in r["config"]
    )
    nan_excl = sum("nan_inf" in (r.get("excluded") or []) for r in nan_runs)
    nums = (
        "soft (tensor) per pool [largest malicious gate; acc vs clean S1 soft (tensor)]: "
        + "; ".join(f"{c}: {fmt(g, 3)}; {a:.2f} vs {cl:.2f}" for c, _, g, a, cl in head)
        + f". Largest malicious gate at any granularity, extreme kinds: "
        f"{fmt(max((p[2] for p in extreme), default=math.nan), 3)}; other kinds: "
        f"{fmt(max((p[2] for p in other), default=math.nan), 3)}. Uniform soup: "
        + ", ".join(f"{c} {a:.1f}" for c, a in uni)
        + ". AdaMerging task-wise: "
        + ", ".join(f"{c} {a:.1f}" for c, a in ada)
        + f". The NaN/Inf candidate is excluded before training (its gates fixed at 0) in "
        f"{nan_excl} of {len(nan_runs)} soft merges: its zero is a check, not a learned gate"
    )
    if ext_ok and not other_fail:
        verdict = "held"
    elif ext_ok:
        verdict = (
            "held for extreme values (x100, noise, NaN/Inf: gates exactly 0, accuracy within "
            f"{MARGIN:g} pt of the clean merge); not for " + ", ".join(other_fail)
        )
    else:
        failing = sorted({p[0] for p in extreme if not ok(p)})
        verdict = "not held: " + ", ".join(failing)
    return {
        "claim": "5. Robust against malicious models with extreme values: their gates go to "
        "exactly zero",
        "rule": "per S3 pool and granularity: every malicious candidate's deterministic gate is "
        f"exactly 0 in every seed and accuracy is within {MARGIN:g} pt of the same soft merge "
        "on the clean S1 MNIST MLP children; held if so for every pool of extreme kinds "
        "(x100, noise, NaN/Inf), sign-flip and shuffled-label pools reported separately",
        "numbers": nums,
        "verdict": verdict,
    }


def claim6(res: Results) -> dict[str, str]:
    better, par, worse, lines = [], [], [], []
    for s in ("S1", "S2", "S5"):
        for c in res.configs(s):
            aligned = s == "S2" and res.stat(s, c, ALIGNED).n > 0
            soft = res.stat(s, c, ALIGNED if aligned else HEADLINE)
            best = res.stat(s, c, "best single (chosen on merge split)")
            uni = res.stat(s, c, SOUP_ALIGNED if aligned else "uniform soup")
            ref = max((best, uni), key=lambda st: st.mean if finite(st.mean) else -1e9)
            tol = max(0.1, soft.std, ref.std)
            diff = soft.mean - ref.mean if finite(soft.mean) else -math.inf
            name = f"{s} {c}" + (" (aligned)" if aligned else "")
            (better if diff > tol else worse if diff < -tol else par).append(name)
            rivals = {
                row: mean_acc(res, s, c, row)
                for row, recs in res.rows(s, c).items()
                if recs[0].get("group") in ("merge", "reference")
                and not row.startswith(("output ensemble", "best single"))
            }
            top = max(rivals.items(), key=lambda kv: kv[1] if finite(kv[1]) else -1e9)
            loss_soft = mean_acc(res, s, c, ALIGNED if aligned else HEADLINE, "test_loss")
            loss_best = mean_acc(res, s, c, "best single (chosen on merge split)", "test_loss")
            lines.append(
                f"{name}: soft {soft.mean:.2f} vs max(best single {best.mean:.2f}, uniform "
                f"{uni.mean:.2f}) = {diff:+.2f} (tolerance {tol:.2f}); strongest other merge "
                f"{top[0]} {top[1]:.2f}; test loss {loss_soft:.3f} vs best single {loss_best:.3f}"
            )
    if better and not par and not worse:
        verdict = "held"
    elif better:
        verdict = "held only in " + ", ".join(better)
        verdict += f"; on par in {', '.join(par)}" if par else ""
        verdict += f"; worse in {', '.join(worse)}" if worse else ""
    else:
        verdict = (
            "not held: soft (tensor) is on par with the better of best single / uniform "
            f"soup in {', '.join(par) or 'no table'}"
            + (f" and worse in {', '.join(worse)}" if worse else "")
        )
    return {
        "claim": "6. The merged model performs better (a better local optimum), at low cost",
        "rule": "per S1, S2, S5 table: soft (tensor) mean test accuracy minus the better of "
        "best single and uniform soup (S2: both after weight matching, plan.align, the "
        "documented way to merge independently initialised models); better / worse if beyond "
        "the tolerance max(0.1 pt, either std over seeds), else on par; held if better in every "
        "table (S3 is claim 5; cost is claim 2; inference always costs one model)",
        "numbers": "; ".join(lines),
        "verdict": verdict,
    }


# ---------------------------------------------------------------------------------------------
# Plots

KEY_ROWS = [
    "best single (chosen on merge split)",
    "uniform soup",
    "uniform soup, aligned",
    "greedy soup",
    "learned soup",
    "TIES (density 0.2, lambda tuned)",
    "AdaMerging task-wise",
    "output ensemble (N x cost)",
    "soft (model)",
    "soft (tensor)",
    "soft (tensor), aligned",
    "soft (channel)",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(res: Results, tables: list[tuple[str, str]], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4.2), squeeze=False)
    for ax, (s, c) in zip(axes[0], tables, strict=True):
        names, means, stds = [], [], []
        for row in KEY_ROWS:
            st = res.stat(s, c, row)
            if st.n:
                names.append(
                    row.replace(" (chosen on merge split)", "")
                    .replace(" (density 0.2, lambda tuned)", "")
                    .replace(" (N x cost)", "")
                )
                means.append(st.mean if finite(st.mean) else 0.0)
                stds.append(st.std)
        colors = ["tab:red" if n.startswith("soft") else "tab:gray" for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        good = [m for m in means if m > 0]
        lo = min(good) if good else 0
        ax.set_xlim(max(0, lo - 2), min(100, max(means, default=100) + 1))
        ax.set_title(f"{s} {c}", fontsize=9)
        ax.set_xlabel("test accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_malicious(res: Results, path: Path) -> None:
    plt = _plt()
    configs = res.configs("S3")
    rows = [
        "uniform soup",
        "greedy soup",
        "learned soup",
        "TIES (density 0.2, lambda tuned)",
        "AdaMerging task-wise",
        "output ensemble (N x cost)",
        "soft (model)",
        "soft (tensor)",
    ]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        st = [res.stat("S3", c, row) for c in configs]
        ax.bar(
            [j + i * width for j in range(len(configs))],
            [s.mean if finite(s.mean) else 0 for s in st],
            width,
            yerr=[s.std for s in st],
            label=row.replace(" (density 0.2, lambda tuned)", ""),
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(configs))],
        [c.replace("+", "+\n") for c in configs],
        fontsize=7,
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.set_title("S3: 7 candidates (MNIST MLP children), k malicious; mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gates(res: Results, path: Path) -> None:
    plt = _plt()
    configs = res.configs("S3")
    if not configs:
        return
    config = configs[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, row in zip(axes, ("soft (model)", "soft (tensor)"), strict=True):
        recs = [r for r in res.rows("S3", config).get(row, []) if "trajectory" in r]
        if not recs:
            continue
        r = min(recs, key=lambda r: r["seed"])
        traj = r["trajectory"]
        mal = set(config.split(" ", 1)[1].split("+"))
        for name, vals in traj["mean_gate"].items():
            ax.plot(
                traj["steps"],
                vals,
                "--" if name in mal else "-",
                label=name + (" (malicious)" if name in mal else ""),
            )
        ax.set_title(f"{row}, S3 {config}, seed {r['seed']}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("mean deterministic gate")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(res: Results, path: Path) -> None:
    plt = _plt()
    sc = res.data.get("step_cost") or []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sc = [r for r in sc if r["granularity"] == "tensor"]
    if sc:
        labels = [f"{r['model']}\nbatch {r.get('batch', 128)}\n{r['threads']} thr" for r in sc]
        axes[0].bar(
            range(len(sc)),
            [r["ratio"] for r in sc],
            color=[
                "tab:gray"
                if r.get("batch", 128) != 128 or r["model"] not in ("MLP", "CNN")
                else "tab:red"
                if r["ratio"] > STEP_LIMIT
                else "tab:green"
                for r in sc
            ],
        )
        axes[0].axhline(STEP_LIMIT, color="k", ls="--", lw=1)
        axes[0].set_xticks(range(len(sc)), labels, fontsize=7)
        axes[0].set_ylabel("gate step / plain training step")
        axes[0].set_title(
            "Gate step / plain step, N=5, tensor gates (grey: information)", fontsize=9
        )
    tables = [(s, c) for s in ("S1",) for c in res.configs(s)]
    rows = [r for r in KEY_ROWS if r != "best single (chosen on merge split)"]
    width = 0.8 / max(1, len(tables))
    for i, (s, c) in enumerate(tables):
        vals = [res.stat(s, c, row, "merge_s").mean for row in rows]
        axes[1].bar(
            [j + i * width for j in range(len(rows))],
            [v if finite(v) else 0 for v in vals],
            width,
            label=f"{s} {c}",
        )
    axes[1].set_yscale("log")
    axes[1].set_xticks(
        [j + 0.4 - width / 2 for j in range(len(rows))],
        [r.replace(" (density 0.2, lambda tuned)", "").replace(" (N x cost)", "") for r in rows],
        rotation=45,
        ha="right",
        fontsize=7,
    )
    axes[1].set_ylabel("merge wall time (s)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("Merge wall time, S1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multitask(res: Results, path: Path) -> None:
    plt = _plt()
    configs = res.configs("S5")
    if not configs:
        return
    c = configs[0]
    rows = [
        row
        for row, recs in res.rows("S5", c).items()
        if recs[0].get("group") not in ("diagnostic",)
    ]
    st = [res.stat("S5", c, row) for row in rows]
    fig, ax = plt.subplots(figsize=(8, 6))
    colors = ["tab:red" if r.startswith("soft") else "tab:gray" for r in rows]
    ax.barh(
        range(len(rows)),
        [s.mean if finite(s.mean) else 0 for s in st],
        xerr=[s.std for s in st],
        color=colors,
    )
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("10-class test accuracy (%)")
    ax.set_title(f"S5 {c}: multi-task merge of 5 class-pair fine-tunes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The page


def _first_seed(recs: list[dict]) -> dict | None:
    recs = [r for r in recs if r.get("path")]
    return min(recs, key=lambda r: r["seed"]) if recs else None


def auto_vs_default(res: Results) -> tuple[str, list[str]]:
    """Every table with both rows: the default λ's soft (tensor) against λ auto (same seeds);
    and the summary lines (within the tolerance of the default's test loss; sparser)."""
    choices = res.all(lambda r: r["row"] == AUTO and "l0_choice" in r)
    tol = choices[0]["l0_choice"]["tolerance"] if choices else 0.01
    header = [
        "table",
        "λ auto (per seed)",
        "used/unit default",
        "used/unit auto",
        "test acc default",
        "test acc auto",
        "Δ acc (pt)",
        "Δ test loss",
        f"within {100 * tol:g} %",
        "sparser",
        "path allows sparser",
        "auto sparser",
    ]
    rows, verdicts = [], []
    seeds_allowed = seeds_taken = 0
    for (s, c), table in res.tables.items():
        default = {r["seed"]: r for r in table.get(HEADLINE, []) if "test_acc" in r}
        pairs = [(default[r["seed"]], r) for r in table.get(AUTO, []) if r["seed"] in default]
        pairs = [(d, a) for d, a in pairs if "test_acc" in a and "used_per_unit" in d]
        if not pairs:
            continue
        acc_d = statistics.fmean(d["test_acc"] for d, _ in pairs)
        acc_a = statistics.fmean(a["test_acc"] for _, a in pairs)
        used_d = statistics.fmean(d["used_per_unit"] for d, _ in pairs)
        used_a = statistics.fmean(a["used_per_unit"] for _, a in pairs)
        ratios = [a["test_loss"] / d["test_loss"] - 1 for d, a in pairs if d["test_loss"] > 0]
        within = sum(a["test_loss"] <= d["test_loss"] * (1 + tol) for d, a in pairs)
        sparser = used_a < used_d - 0.01
        allows = [_path_allows_sparser(d, a, tol) for d, a in pairs]
        taken = [a["used_per_unit"] < d["used_per_unit"] - 0.01 for d, a in pairs]
        seeds_allowed += sum(allows)
        seeds_taken += sum(t and ok for t, ok in zip(taken, allows, strict=True))
        rows.append(
            [
                f"{s} {c}",
                "/".join(f"{a['lambda']:.3g}" for _, a in pairs),
                f"{used_d:.2f}",
                f"{used_a:.2f}",
                f"{acc_d:.2f}",
                f"{acc_a:.2f}",
                f"{acc_a - acc_d:+.2f}",
                f"{100 * statistics.fmean(ratios):+.1f}%" if ratios else "—",
                f"{within}/{len(pairs)} seeds",
                "yes" if sparser else "no",
                f"{sum(allows)}/{len(pairs)} seeds",
                f"{sum(taken)}/{len(pairs)} seeds",
            ]
        )
        verdicts.append((s, within == len(pairs), sparser, acc_a - acc_d))
    lines = []
    for label, keep in (
        ("S1, S3 and S5", lambda v: v[0] in PATH_SETTINGS),
        ("all", lambda v: True),
    ):
        sel = [v for v in verdicts if keep(v)]
        if not sel:
            continue
        lines.append(
            f"{label} tables: λ auto's test loss within {100 * tol:g} % of the default λ's on "
            f"every seed in {sum(v[1] for v in sel)} of {len(sel)}; sparser (fewer candidates "
            f"used per unit) in {sum(v[2] for v in sel)}; accuracy auto − default "
            f"{statistics.fmean(v[3] for v in sel):+.2f} pt on average, "
            f"{min(v[3] for v in sel):+.2f} at worst"
        )
    if rows:
        lines.append(
            f"where the path allows it (a point sparser than the default λ's merge with a test "
            f"loss within {100 * tol:g} % of the default's; the test split, which auto never "
            f"sees, judges), auto is sparser on {seeds_taken} of {seeds_allowed} seeds"
        )
    held = [_held_back(c) for c in choices if c.get("path")]
    if held:
        lines.append(
            f"the confidence condition held back a sparser point that was within the tolerance "
            f"on its mean gap in {sum(h > 0 for h in held)} of {len(held)} λ auto runs"
        )
    table = md_table(header, rows, "ll" + "r" * (len(header) - 2)) if rows else ""
    return table, lines


def _held_back(rec: dict) -> int:
    """Points of ``rec``'s path sparser than its choice whose held-out (and learning) loss is
    within the choice's limits: what only the confidence condition kept auto from taking."""
    choice, points = rec["l0_choice"], rec["path"]
    if "limit" not in choice:
        return 0
    chosen = points[choice["index"]]["used_per_unit"]
    learn_limit = choice.get("learn_limit", math.inf)
    return sum(
        p["used_per_unit"] < chosen
        and (p.get("held_out_loss") or math.inf) <= choice["limit"]
        and (p.get("learn_loss") or math.inf) <= learn_limit
        for p in points
    )


def _path_allows_sparser(default: dict, auto: dict, tol: float) -> bool:
    """Has ``auto``'s path a point that uses fewer candidates per unit than the default λ's
    merge, with a test loss within ``tol`` of the default's?"""
    limit = default["test_loss"] * (1 + tol)
    return any(
        p["used_per_unit"] < default["used_per_unit"] - 0.01
        and p.get("test_loss") is not None
        and p["test_loss"] <= limit
        for p in auto.get("path") or []
    )


def path_table(rec: dict) -> str:
    """One run's L0 path: per λ the open gates, exact zeros, held-out loss, test accuracy."""
    chosen = (rec.get("l0_choice") or {}).get("index")
    everyone = {n for p in rec["path"] for n in p.get("open_candidates", [])}
    rows = []
    for k, p in enumerate(rec["path"]):
        open_names = p.get("open_candidates", [])
        rows.append(
            [
                f"{p['lambda']:.3g}" + (" ← auto" if k == chosen else ""),
                f"{p['open_per_unit']:.2f}",
                f"{p['used_per_unit']:.2f}",
                f"{100 * p['zero_fraction']:.0f}",
                fmt(p.get("held_out_loss"), 4),
                fmt(p.get("test_acc"), 2),
                "all" if set(open_names) >= everyone else ", ".join(open_names) or "none",
            ]
        )
    return md_table(
        [
            "λ",
            "open gates/unit",
            "used/unit",
            "exact zeros (%)",
            "held-out loss",
            "test acc (%)",
            "open candidates",
        ],
        rows,
        "lrrrrrl",
    )


def path_section(res: Results) -> list[str]:
    runs = path_runs(res, tuple(SETTING_TITLES))
    if not runs:
        return []
    cost = [r["path_cost"]["steps_ratio"] for r in runs if r.get("path_cost")]
    table, lines = auto_vs_default(res)
    out = [
        "## The L0 path and λ chosen on held-out data (claim 3)",
        "",
        "`fit.l0_lambda: auto` (row *soft (tensor), λ auto*) holds a fifth of the merge split "
        "out, trains tensor gates along the L0 path on the rest (`softmerge.path`: a dense fit "
        "at λ = 0 of the usual steps; coarse warm-started stages from λ = 1e-3 up by ×10 until a "
        "gate closes; then from the last λ where nothing closed, λ × 10^(1/8) per stage, each "
        "warm-started from the previous one, until every unit keeps at most one open gate; a "
        "stage is a tenth of the steps; at most 2.5× the steps in all) and keeps the sparsest "
        "point whose held-out loss is within the tolerance (1 %) of the path's best with 95 % "
        "confidence (`fit.l0_confidence`: the gap plus 1.64 standard errors of the per-sample "
        "differences on the held-out data), among the points whose learning loss is within "
        "1 % of the path's best learning loss. "
        f"The paths took {statistics.fmean(cost):.2f}× the steps of one merge on average "
        f"(at most {max(cost):.2f}×)."
        if cost
        else "",
        "",
        "*used/unit*: candidates a unit's merge uses (an all-closed convex unit is the "
        "reference candidate's: one). *Δ test loss*: auto relative to the default λ's own "
        "merge (the default learns on the whole merge split, auto on four fifths of it).",
        "",
        table,
        "",
        *[f"- {x}" for x in lines],
        "",
        "![L0 path](results/l0_path.png)",
        "",
        f"Each path below is the first seed's; ← auto marks the chosen λ, and the default λ = "
        f"{DEFAULT_LAMBDA:g} (a separate fit) is given under each table.",
        "",
    ]
    for s in PATH_SETTINGS:
        for c in res.configs(s):
            rec = _first_seed(res.rows(s, c).get(AUTO, []))
            if rec is None:
                continue
            out += [f"### L0 path: {s} {c} (seed {rec['seed']})", "", path_table(rec), ""]
            default = [r for r in res.rows(s, c).get(HEADLINE, []) if r["seed"] == rec["seed"]]
            if default and "test_acc" in default[0]:
                d = default[0]
                out += [
                    f"Default λ: {d['gate_open_per_unit']:.2f} open gates per unit, exact zeros "
                    f"{100 * d['gate_zero_frac']:.0f}%, test acc {d['test_acc']:.2f}%. "
                    + "Importance (closing λ): "
                    + ", ".join(
                        f"{i['candidate']} "
                        + ("never" if i["close_lambda"] is None else f"{i['close_lambda']:.3g}")
                        for i in rec.get("importance", [])
                    ),
                    "",
                ]
    return out


def plot_l0_path(res: Results, path: Path) -> bool:
    """Test accuracy against open gates per unit along each first-seed path (S1, S3, S5); a
    star for the default λ's merge, a ring for the λ chosen on held-out data."""
    settings = [
        s
        for s in PATH_SETTINGS
        if any(_first_seed(res.rows(s, c).get(AUTO, [])) for c in res.configs(s))
    ]
    if not settings:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.4), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for c in res.configs(s):
            rec = _first_seed(res.rows(s, c).get(AUTO, []))
            if rec is None:
                continue
            xs = [p["open_per_unit"] for p in rec["path"]]
            ys = [p.get("test_acc") if finite(p.get("test_acc")) else math.nan for p in rec["path"]]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1, label=c)
            k = rec["l0_choice"]["index"]
            ax.plot([xs[k]], [ys[k]], "o", ms=9, mfc="none", color=line.get_color())
            d = [r for r in res.rows(s, c).get(HEADLINE, []) if r["seed"] == rec["seed"]]
            if d and finite(d[0].get("test_acc")):
                ax.plot(
                    [d[0]["gate_open_per_unit"]],
                    [d[0]["test_acc"]],
                    "*",
                    ms=10,
                    color=line.get_color(),
                )
        ax.set_xlabel("open gates per unit")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{s}: L0 path (ring: λ auto, star: default λ)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def where_soft_loses(res: Results) -> list[str]:
    """Tables where some single-model merge beats soft (tensor) by more than one std of both
    (rows merged after alignment are compared with soft (tensor) after alignment)."""
    out = []
    for (s, c), rows in res.tables.items():
        for row, recs in rows.items():
            if row.startswith("soft") or recs[0].get("group") in (
                "candidate",
                "parent",
                "diagnostic",
            ):
                continue
            headline = ALIGNED if "alignment" in recs[0] else HEADLINE
            soft = res.stat(s, c, headline)
            other = res.stat(s, c, row)
            if not soft.n or not finite(soft.mean):
                continue
            if finite(other.mean) and other.mean - soft.mean > max(soft.std, other.std, 0.1):
                out.append(
                    f"{s} {c}: {row} {other.mean:.2f} vs {headline} {soft.mean:.2f} "
                    f"({other.mean - soft.mean:+.2f} pt)"
                )
    return out


def targets_section(res: Results) -> list[str]:
    """Issue 13's targets, each computed from the records: S2 after alignment (weight
    matching, MergeMany or STE; aligned uniform soup within 1.5 pt of the best single model;
    aligned soft (tensor) merge >= best single + 0.5 pt) and S5 (soft merging with the learned
    scale >= task arithmetic, λ tuned, − 0.1 pt)."""
    lines = []
    for c in res.configs("S2"):
        if not res.stat("S2", c, SOUP_ALIGNED).n:
            continue
        best = best_single(res, "S2", c)
        gaps = {
            row: mean_acc(res, "S2", c, row) - best
            for row in (
                "output ensemble (N x cost)",
                "uniform soup",
                SOUP_ALIGNED,
                "uniform soup, aligned + REPAIR",
                "uniform soup, aligned (MergeMany)",
                "uniform soup, aligned (MergeMany) + REPAIR",
                "uniform soup, aligned (STE)",
                "uniform soup, aligned (STE) + REPAIR",
                HEADLINE,
                ALIGNED,
                "soft (tensor), aligned + REPAIR",
                "soft (tensor), aligned (STE)",
                "soft (channel), aligned",
            )
            if res.stat("S2", c, row).n
        }
        soups = [v for row, v in gaps.items() if row.startswith(SOUP_ALIGNED)]
        soup_ok = any(finite(v) and v >= -1.5 for v in soups)
        softs = [v for row, v in gaps.items() if row.startswith(ALIGNED)]
        soft_ok = any(finite(v) and v >= 0.5 for v in softs)
        lines.append(
            f"S2 {c} (best single {best:.2f}%), minus the best single model: "
            + ", ".join(f"{row} {v:+.2f}" for row, v in gaps.items())
            + f". Aligned uniform soup (any alignment, with or without REPAIR) within 1.5 pt: "
            f"**{'met' if soup_ok else 'not met'}**; "
            f"aligned soft (tensor) (any alignment, with or without REPAIR) >= best single + "
            f"0.5 pt: **{'met' if soft_ok else 'not met'}**."
        )
    for c in res.configs("S5"):
        ta = res.stat("S5", c, TA_TUNED)
        rows = [r for r in res.rows("S5", c) if "delta_scale learned" in r]
        if not ta.n or not rows:
            continue
        parts = [f"{row} {mean_acc(res, 'S5', c, row):.2f}" for row in (*rows, HEADLINE)]
        learned = mean_acc(res, "S5", c, LEARNED)
        ok = finite(learned) and learned >= ta.mean - 0.1
        lines.append(
            f"S5 {c}: task arithmetic (λ tuned on the merge split) {ta.mean:.2f}; "
            + ", ".join(parts)
            + f". {LEARNED} >= task arithmetic − 0.1 pt: **{'met' if ok else 'not met'}**."
        )
    return lines


def observations(res: Results) -> list[str]:
    """Facts worth reading beside the tables, each computed from the records."""
    out = []
    s2_all = res.all(lambda r: r["setting"] == "S2" and r.get("method") == "soft" and "open" in r)
    s2 = [r for r in s2_all if "alignment" not in r]
    s2_aligned = [r for r in s2_all if (r.get("plan") or {}).get("align") == "weight_matching"]
    s2_ste = res.all(lambda r: r["setting"] == "S2" and "ste" in (r.get("alignment") or {}))
    if s2:
        one = [r for r in s2 if len(r["open"]) == 1]
        none = [r for r in s2 if not r["open"]]
        cands = defaultdict(dict)  # (config, seed) -> name -> (merge acc, test acc)
        for r in res.all(lambda r: r["setting"] == "S2" and r.get("group") == "candidate"):
            cands[(r["config"], r["seed"])][r["row"]] = (r["merge_acc"], r["test_acc"])

        def is_best(r: dict, i: int) -> bool:  # ties count as best
            pool = cands[(r["config"], r["seed"])]
            return pool[r["open"][0]][i] >= max(v[i] for v in pool.values())

        same = sum(is_best(r, 0) for r in one)
        same_t = sum(is_best(r, 1) for r in one)
        out.append(
            f"S2 (independent inits): in {len(one)} of {len(s2)} soft merges (all granularities) "
            f"exactly one candidate keeps an open gate, and in {len(none)} every gate closes and "
            "the merge falls back to the reference (best-ranked) candidate — soft merging picks "
            f"one model, it does not average; the one open model is the best (or tied best) on the "
            f"merge split in {same} and on the test split in {same_t} of those {len(one)} "
            "merges. "
            "The uniform soup collapses (see claim 1)."
        )
    if s2_aligned:
        opened = [len(r["open"]) for r in s2_aligned]
        ratio = [r["alignment"]["cost_ratio"] for r in s2_aligned if r["alignment"]["cost_ratio"]]
        align_s = [r["alignment"]["seconds"] for r in s2_aligned if r["alignment"]["seconds"]]
        out.append(
            f"S2 after weight matching (`plan.align: weight_matching`): the squared distance of "
            f"a candidate to the reference falls to {statistics.fmean(ratio):.2f}x its unaligned "
            f"value on average ({statistics.fmean(align_s):.1f} s per merge); the soft merges "
            f"keep {statistics.fmean(opened):.1f} candidates open on average (of "
            f"{len(s2_aligned[0]['gates_max'])}), against "
            f"{statistics.fmean(len(r['open']) for r in s2) if s2 else math.nan:.1f} unaligned."
        )
    if s2_ste:
        notes = [r["alignment"]["ste"] for r in s2_ste]
        kept = sum(1 for n in notes if n["chosen_step"] == 0)
        out.append(
            f"S2 after STE matching (`plan.align: ste`, {notes[0]['steps']} steps): "
            f"{statistics.fmean(r['alignment']['seconds'] for r in s2_ste):.0f} s per merge on "
            f"average; the uniform soup's loss on the selection batches falls from "
            f"{statistics.fmean(n['soup_loss_start'] for n in notes):.3f} (weight matching) to "
            f"{statistics.fmean(n['soup_loss_end'] for n in notes):.3f} on average, at step "
            f"{statistics.fmean(n['chosen_step'] for n in notes):.0f} on average; the search "
            f"kept the weight-matching start in {kept} of {len(notes)} merges."
        )
    s5 = res.all(lambda r: r["setting"] == "S5" and r.get("method") == "soft" and "open" in r)
    if s5:
        by_row = defaultdict(list)
        for r in s5:
            by_row[r["row"]].append(len(r["open"]))
        parts = [f"{row}: {'/'.join(map(str, v))}" for row, v in by_row.items()]
        parent = Stat(
            r.get("test_acc")
            for r in res.all(lambda r: r["setting"] == "S5" and r["row"].startswith("parent"))
        )
        scans = [
            r["lambda_scan"]
            for r in res.all(
                lambda r: (
                    r["setting"] == "S5"
                    and r.get("method") == "task_arithmetic"
                    and "lambda_scan" in r
                )
            )
        ]
        scan_text = ""
        closed = any(len(r["open"]) < 5 for r in s5)
        if scans and closed:
            from softmerge import gates as hc

            p_one = float(hc.prob_one(torch.tensor(hc.log_alpha_for_gate(0.5))))
            scan_text = (
                " Task arithmetic's merge-split accuracy by λ: "
                + ", ".join(f"{k}: {statistics.fmean(x[k] for x in scans):.1f}%" for k in scans[0])
                + f". A hard concrete sample is exactly 1 with probability {p_one:.2f} at the "
                "start (gate 0.5); the gates of a delta merge share their noise, so a sample "
                "scales every open task vector together instead of adding a random subset."
            )
        out.append(
            "S5 (task vectors): task vectors kept open (of 5) per seed — "
            + "; ".join(parts)
            + f". With no task vector open the merge is the parent ({parent.fmt(2)}%)."
            + scan_text
        )
    s3 = [
        (
            c,
            mean_acc(res, "S3", c, "uniform soup"),
            mean_acc(res, "S3", c, "uniform soup", "test_loss"),
        )
        for c in res.configs("S3")
    ]
    hidden = [(c, a, lo) for c, a, lo in s3 if finite(lo) and lo > 1.0 and a > 90]
    if hidden:
        out.append(
            "S3: the uniform soup's accuracy can hide the damage (a ReLU MLP is positively "
            "homogeneous, so a scaled or sign-flipped member mostly rescales the logits): "
            + ", ".join(f"{c} {a:.1f}% at test loss {lo:.3g}" for c, a, lo in hidden)
        )
    settle = defaultdict(list)
    for r in res.all(lambda r: r.get("method") == "soft" and r.get("settle_step") is not None):
        settle[r["setting"]].append(r["settle_step"] / r["steps"])
    if settle:
        out.append(
            "Gate settling (first recorded step after which no gate moves by > 0.01), as a "
            "fraction of the steps: "
            + ", ".join(f"{s} {statistics.fmean(v):.2f}" for s, v in sorted(settle.items()))
            + ". Values near 1 mean some gate was still moving by more than 0.01 near the end "
            "of training."
        )
    return out


def step_cost_section(res: Results) -> str:
    sc = res.data.get("step_cost") or []
    if not sc:
        return "_step_cost.py was not run._\n"
    rows = [
        [
            r["model"],
            str(r.get("batch", 128)),
            str(r["threads"]),
            r["granularity"],
            str(r["units"]),
            fmt(r["plain_ms"], 2),
            fmt(r["gate_ms"], 2),
            f"**{r['ratio']:.2f}**",
            fmt(r.get("fit_loop_ratio"), 2),
        ]
        for r in sc
    ]
    table = md_table(
        [
            "model",
            "batch",
            "threads",
            "gates",
            "units",
            "plain step (ms)",
            "gate step (ms)",
            "ratio",
            "fit loop ratio",
        ],
        rows,
    )
    ratios = step_ratios(res)
    threads = sorted({k[1] for k in ratios})
    verdicts = []
    for m in ("MLP", "CNN"):
        for t in threads:
            v = ratios.get((m, t, "tensor"))
            if v is None:
                continue
            state = "meets" if v <= STEP_LIMIT else f"misses (by {100 * (v / STEP_LIMIT - 1):.0f}%)"
            verdicts.append(f"{m}, {t} thread(s): {v:.2f}x — {state} the {STEP_LIMIT}x target")
    why = []
    for r in sc:
        if "merge_ms" not in r:
            continue
        excess = r["gate_ms"] - r["plain_ms"]
        rest = excess - r["merge_ms"] - r["gate_ops_ms"] + r["plain_opt_ms"]
        why.append(
            f"{r['model']} ({r['threads']} thread(s), tensor gates): a gate step takes "
            f"{excess:+.2f} ms over a plain step. Measured alone in the same run: the merge "
            f"(`merged_parameters` forward and backward, reading {r['merge_read_mb']:.1f} MB of "
            f"stacked candidates per step) {r['merge_ms']:.2f} ms; the gate bookkeeping "
            f"(sampling both gate levels, mixing weights, L0 penalty, clipping, SGD on the gates) "
            f"{r['gate_ops_ms']:.2f} ms; minus the plain step's weight update, which a gate step "
            f"does not do, {r['plain_opt_ms']:.2f} ms; the remaining {rest:+.2f} ms is not "
            "accounted for by the parts timed alone (they run with warm caches and a small "
            "autograd graph)."
        )
    big = [r for r in sc if r.get("batch", 128) != 128]
    if big:
        why.append(
            "The merge and the bookkeeping cost the same at any batch size, so the ratio falls "
            "as the batch grows: "
            + ", ".join(
                f"{r['model']} at batch {r['batch']}, {r['threads']} thread(s), "
                f"{r['granularity']} gates: {r['ratio']:.2f}x"
                for r in big
                if r["granularity"] == "tensor"
            )
            + "."
        )
    text = table + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    if why:
        text += "\nWhy:\n\n" + "\n".join(f"- {w}" for w in why) + "\n"
    return text


def matrix_section(res: Results) -> str:
    fams = res.meta["families"]
    sc = res.meta["scale"]
    uses = defaultdict(list)
    for s, c in res.tables:
        fam = res.rows(s, c)
        first = next(iter(fam.values()))[0]["family"]
        if s not in uses[first]:
            uses[first].append(s)
    rows = []
    for key, f in fams.items():
        if key not in uses:
            continue
        a = res.meta["archs"][f["arch"]]
        p, ch = sc["epochs"][key]
        kind = {
            "children": f"parent {p} ep, then {f['count']} children x {ch} ep on random halves"
            + (" (+ random shifts)" if f["augment"] else "")
            + "; + 1 child on shuffled labels",
            "independent": f"{f['count']} models from different inits x {ch} ep",
            "finetunes": f"parent {p} ep on 1/5 of train; 5 fine-tunes x {ch} ep on class pairs",
        }[f["kind"]]
        d = res.meta["data"][f["dataset"]]
        actual = (res.meta.get("split_sizes") or {}).get(f["dataset"], {})
        sizes = "/".join(
            str(actual.get(part, d.get(f"num_{part}", "rest")))
            for part in ("train", "merge", "test")
        )
        rows.append(
            [
                ", ".join(uses[key]),
                f["label"].split(" / ")[0],
                a["label"],
                a["family"],
                f"{a['params']:,}",
                sizes.replace("//", "rest/"),
                kind,
            ]
        )
    return md_table(
        ["settings", "data", "architecture", "family", "params", "train/merge/test", "candidates"],
        rows,
        "lllllll",
    )


def write_page(res: Results, docs: Path) -> Path:
    figdir = docs / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    meta = res.meta
    s1 = [("S1", c) for c in res.configs("S1")]
    s2 = [("S2", c) for c in res.configs("S2")]
    figs = []
    if s1:
        plot_accuracy(res, s1, figdir / "s1_accuracy.png", "S1: children of one parent")
        figs.append(("s1_accuracy.png", "S1 test accuracy"))
    if s2:
        plot_accuracy(res, s2, figdir / "s2_accuracy.png", "S2: independent initialisations")
        figs.append(("s2_accuracy.png", "S2 test accuracy"))
    if res.configs("S3"):
        plot_malicious(res, figdir / "s3_malicious.png")
        plot_gates(res, figdir / "s3_gates.png")
        figs += [("s3_malicious.png", "S3 accuracy"), ("s3_gates.png", "S3 gate trajectories")]
    if res.configs("S5"):
        plot_multitask(res, figdir / "s5_multitask.png")
        figs.append(("s5_multitask.png", "S5 multi-task accuracy"))
    plot_cost(res, figdir / "cost.png")
    figs.append(("cost.png", "cost"))
    if plot_l0_path(res, figdir / "l0_path.png"):
        figs.append(("l0_path.png", "L0 path"))

    sc = meta["scale"]
    minutes = meta["seconds"] / 60
    lines = [
        "# Results: every claim of the paper, measured",
        "",
        "_Generated by `make bench` (`benchmarks/run.py` then `benchmarks/report.py`) from "
        "`bench-out/results.json`; do not edit by hand._",
        "",
        f"**Run:** {meta['finished']}, total **{minutes:.1f} min** "
        f"({meta['seconds']:.0f} s) with **{meta['threads']} torch thread(s)** "
        f"(OMP_NUM_THREADS={meta['omp_num_threads']}, {meta['cpu_count']} CPUs, torch "
        f"{meta['torch']}; 1-min load average at the end {meta['load_avg'][0]:.2f}); "
        f"scale `{sc['name']}`, seeds {', '.join(map(str, sc['seeds']))}; every candidate "
        f"trained in this run: {'yes' if meta['fresh'] else 'no (cache reused)'}. "
        "Tables show mean ± sample std over the seeds.",
        "",
        "## Claims",
        "",
        "Each verdict is computed by `benchmarks/report.py` from the numbers below with the "
        "rule shown. Soft merging is judged at its default granularity, **tensor** (chosen "
        "before the runs; other granularities are in the tables).",
        "",
    ]
    cl = claims(res)
    lines.append(
        md_table(
            ["claim", "verdict", "rule", "numbers"],
            [[c["claim"], f"**{c['verdict']}**", c["rule"], c["numbers"]] for c in cl],
            "llll",
        )
    )
    losses = where_soft_loses(res)
    lines += ["", "### Observations", ""]
    lines += [f"- {x}" for x in observations(res)]
    lines += ["", "### Where soft merging (tensor) loses", ""]
    lines += [f"- {x}" for x in losses] or ["- nowhere by more than one std"]
    targets = targets_section(res)
    if targets:
        lines += [
            "",
            "### Alignment and the learned task-vector scale: issue 13's targets",
            "",
        ]
        lines += [f"- {x}" for x in targets]
    lines += ["", *path_section(res)]
    lines += [
        "",
        "## The matrix",
        "",
        matrix_section(res),
        "",
        "Why this matrix: every data set (MNIST, digits, MNIST-1D) and every architecture "
        "(MLP, CNN, ResNet with BatchNorm) appears, within a one-hour budget on 2 cores. "
        "MNIST is subsampled (10k train / 2k merge / 5k of the 10k test images). The data "
        "split is fixed; the seed changes every candidate's initialisation, data order and "
        "subset, the gate noise and the merge loader's order. S3 and S4 reuse S1's candidates "
        "(same seed). Each table merges the first 5 clean children; S3 pools hold 7 candidates "
        "(7−k clean children + k malicious). The malicious kinds: `scaled_x100` (every tensor of "
        "child 0 ×100), `noise_x10` (Gaussian noise at 10× each tensor's std), `sign_flip` "
        "(child 0 negated), `nan_inf` (1% NaN and 1% +Inf in every tensor of child 0), "
        "`shuffled_labels` (a child trained from the parent on randomly permuted labels).",
        "",
        "Methods: registry defaults (`softmerge.methods`) unless stated: soft merging "
        f"{sc['soft_steps']} steps (FitConfig defaults: SGD lr 0.1, λ=1e-3, two gate levels); "
        "learned soup and AdaMerging their registry defaults (Adam; AdaMerging minimises "
        "prediction entropy on the unlabeled merge split, with the parent as base where one "
        "exists); task arithmetic, TIES and DARE pick λ from "
        f"{{{', '.join(map(str, sc['lambdas']))}}} by merge-split accuracy (the search is "
        "included in their merge time); greedy soup scores on the merge split; the best "
        "single model is chosen by merge-split accuracy.",
        "",
        "**Columns.** *merge (s)*: wall time of the method's `merge()` (incl. ranking candidates, "
        "BatchNorm re-estimation; for λ-tuned methods the whole search). *settle step*: first "
        "recorded step (every 10) after which no deterministic gate moves by more than 0.01 "
        "(max-abs over all gates of `FitResult.gate_trajectory`) until the end. *step ratio*: "
        "(merge time / optimisation steps) / one plain training step (SGD, batch 128) of the "
        "same model measured in the same run — it includes the fixed costs, so it overstates "
        "the per-step cost; the clean per-step ratio is the step-cost table. *peak RSS*: "
        "resident-set high-water mark of the process during the merge (`softmerge.profiling`), "
        "which includes the data and the framework (~hundreds of MiB). ⚠ marks malicious "
        "candidates. *malicious max*: the largest weight any malicious candidate kept (soft: "
        "deterministic gate; learned soup / AdaMerging: mean coefficient; greedy: 1 if kept).",
        "",
        "## Gate-step cost (acceptance: <= 1.25x a plain training step at N=5, batch 128)",
        "",
        "`benchmarks/step_cost.py`: in one process, plain training steps and soft-merging gate "
        "steps (the body of `SoftMerger.fit`'s loop) are timed interleaved, median over "
        "100 steps after warm-up. *fit loop ratio*: the same from `fit()` itself "
        "((time of 2K steps − time of K steps)/K), which adds the per-10-step recording.",
        "",
        step_cost_section(res),
    ]
    for s in ("S1", "S2", "S3", "S4", "S5"):
        configs = res.configs(s)
        if not configs:
            continue
        lines += ["", f"## {SETTING_TITLES[s]}", ""]
        if s == "S3":
            lines += [s3_summary(res), ""]
        for c in configs:
            first = next(iter(res.rows(s, c).values()))[0]
            label = meta["families"][first["family"]]["label"]
            lines += [f"### {s} {c} — {label}", ""]
            dis = res.stat(s, c, "pairwise test disagreement (%)", "disagreement")
            if dis.n:
                lines += [
                    f"Clean candidates disagree on {dis.fmt(1)}% of test samples "
                    "(mean over pairs).",
                    "",
                ]
            lines += [method_table(res, s, c, task_acc=(s == "S5")), ""]
    lines += ["", "## Plots", ""]
    lines += [f"![{alt}](results/{name})" for name, alt in figs]
    lines += ["", "## Time per part of the run", ""]
    lines.append(
        md_table(["part", "seconds"], [[k, f"{v:.0f}"] for k, v in meta["timings"].items()])
    )
    path = docs / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def s3_summary(res: Results) -> str:
    configs = res.configs("S3")
    rows_order: list[str] = []
    for c in configs:
        for row, recs in res.rows("S3", c).items():
            if recs[0].get("group") not in ("candidate", "diagnostic") and row not in rows_order:
                rows_order.append(row)
    header = ["model", *configs]
    rows = []
    for row in rows_order:
        line = [row]
        for c in configs:
            st = res.stat("S3", c, row)
            mal = [r.get("malicious_weight") for r in res.rows("S3", c).get(row, [])]
            mal = [m for m in mal if m is not None]
            cell = st.fmt(1)
            if mal:
                cell += f" [{fmt(max(mal), 2)}]"
            line.append(cell)
        rows.append(line)
    loss_rows = [
        [row, *(res.stat("S3", c, row, "test_loss").fmt(3, pm=False) for c in configs)]
        for row in rows_order
    ]
    return (
        "Summary: test accuracy (%) per pool, mean ± std; in brackets the largest weight any "
        "malicious candidate kept in any seed (soft: its deterministic gate).\n\n"
        + md_table(header, rows)
        + "\n\nTest loss (mean over seeds). A ReLU MLP is positively homogeneous, so a ×100 "
        "or sign-flipped candidate can leave the argmax (accuracy) of a soup nearly intact "
        "while its loss explodes:\n\n" + md_table(header, loss_rows)
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("bench-out/results.json"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    res = Results(json.loads(args.results.read_text()))
    path = write_page(res, args.docs)
    for c in claims(res):
        print(f"{c['claim'][:60]:60s} -> {c['verdict']}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()


__all__ = ["Counter", "claims", "main"]
