"""FedKSeed against zero-shot, FedKSeed-Pro, FedIT and FedAvg: quality and cost, at equal local
examples and at equal client CPU-seconds. Markdown tables and a plot of quality against bytes.

    python benchmarks/compare.py                  # SmolLM2-135M-Instruct, FAQ, 3 seeds
    python benchmarks/compare.py --smoke --output runs/compare-smoke    # tiny model, 1 round, 2 steps
    python benchmarks/compare.py --report-only    # the tables from the runs already in --output
    python benchmarks/compare.py --methods FedKSeed FedKSeed-Pro --budgets examples    # ZO only

On a shared machine, run two at a time on one thread each (``OMP_NUM_THREADS=1 ... --jobs 2``);
to pin the code under test, copy the package elsewhere and point PYTHONPATH at the copy (runs
start in their output folder, so a checkout in the working directory does not shadow it).

Every run goes through the ``fedkseed simulate`` command line in a subprocess (the stable
interface) and is read back from its metrics.json. A run folder that holds a finished run with
the same settings is reused, and one with only a checkpoint is resumed, so an interrupted
comparison continues where it stopped. Zero-shot is the "before" measurement of the runs (the
same base model and examples; every run repeats it, because ``simulate`` has no option to skip
it), so no run is spent on it.

Two budgets:

- ``examples``: every method runs the same rounds x clients per round x local steps x batch:
  the same training examples, drawn the same way.
- ``cpu``: equal client CPU-seconds. A ZO step costs a client less CPU than a first-order step,
  so each ZO method gets more of them: its ``examples`` run continues (``--resume``, from a copy
  of its checkpoint) for more rounds of the same local steps, until its client CPU-seconds match
  those of the costliest first-order method. The costs per step are measured from the
  ``examples`` runs' ``client_cpu_seconds`` (mean over rounds and over the seeds finished when the
  budget is first chosen); the rounds chosen are kept in ``cpu_budget.json``, so a later
  invocation continues the same budget. First-order runs
  are the same in both budgets and are not repeated.

Statistics (``fedkseed.metrics``): Rouge-L on every held-out example (the same examples in every
run; an example's score is its mean over seeds, the interval a bootstrap over examples), both
scorers; eval loss on the examples each seed's split holds back from the training categories,
pooled over seeds. Differences (against zero-shot, and each method against FedKSeed) are paired
per example, over the seeds both rows finished; an interval that excludes 0 is a difference at
the 95% level.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fedkseed.metrics import SCORERS, bootstrap_interval


@dataclass(frozen=True)
class Method:
    name: str
    flags: tuple[str, ...]  # what selects it on the ``fedkseed simulate`` command line
    zero_order: bool  # ZO methods take --k/--dist/--lr/--eps and get more steps at equal CPU

    @property
    def slug(self) -> str:
        return self.name.lower()


# One line per method; a method added to ``fedkseed simulate`` is one more line here.
METHODS = {
    m.name: m
    for m in (
        Method("FedKSeed", ("--method", "fedkseed"), zero_order=True),
        Method("FedKSeed-Pro", ("--method", "fedkseed", "--pro"), zero_order=True),
        Method("FedIT", ("--method", "fedit"), zero_order=False),  # lr: simulate's first-order default
        Method("FedAvg", ("--method", "fedavg"), zero_order=False),
        # First-order cost with FedKSeed's seeds and lr (this script's --k/--dist/--lr defaults), same upload.
        Method(
            "Ferret", ("--method", "ferret", "--k", "256", "--dist", "rademacher", "--lr", "3e-5"), zero_order=False
        ),
    )
}
REFERENCE = "FedKSeed"  # the method every other one is compared with
BUDGETS = ("examples", "cpu")
# 55 held-out examples in two categories: more than the 50 the comparison needs.
HOLDOUT = "verifiera-byggfirma,dolda-fel"
MIN_HELDOUT = 50
BUDGET_FILE, REPORT_FILE, TABLE_FILE = "cpu_budget.json", "compare.md", "compare.json"
SMOKE = dict(
    model="tiny", rounds=1, local_steps=2, seeds=[0], max_new_tokens=4, eval_examples=8, max_length="64", jobs=2
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="faq")
    parser.add_argument("--holdout", default=HOLDOUT, help="held-out categories (comma-separated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # The protocol of the quality table in RESULTS.md (issue 12): 20 clients, 2 per round, batch 1,
    # 5 rounds x 30 local steps = 300 examples per run; the sizes of a run are set on the command line.
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--k", type=int, default=256, help="ZO methods: candidate seeds")
    parser.add_argument("--dist", default="rademacher", help="ZO methods: perturbation distribution")
    parser.add_argument("--lr", type=float, default=3e-5, help="ZO methods (first-order ones: simulate's defaults)")
    parser.add_argument("--eps", type=float, default=1e-2, help="ZO methods: perturbation scale")
    parser.add_argument("--max-length", default="auto", help="tokens per example, or auto")
    parser.add_argument("--eval-examples", type=int, default=32, help="held-back examples for the eval loss, per seed")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-heldout", type=int, default=MIN_HELDOUT)
    parser.add_argument(
        "--cpu-ratio",
        type=float,
        default=None,
        help="fix the first-order / ZO client CPU ratio of the cpu budget instead of measuring it",
    )
    parser.add_argument("--output", default="runs/compare")
    parser.add_argument("--plot", default=None, help="the plot's PNG (default: {{output}}/compare.png)")
    # On a shared 2-core machine two runs at OMP_NUM_THREADS=1 each beat one run on two threads.
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    parser.add_argument("--report-only", action="store_true", help="no runs: the tables from the runs in --output")
    parser.add_argument("--smoke", action="store_true", help=f"a fast end-to-end check: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if REFERENCE not in args.methods:
        parser.error(f"--methods must include {REFERENCE}: every other method is compared with it")
    return args


@dataclass(frozen=True)
class Run:
    method: Method
    seed: int
    budget: str  # "examples", or "cpu" (a ZO method's examples run continued for more rounds)
    rounds: int

    @property
    def folder(self) -> str:
        return f"{self.method.slug}-{'' if self.budget == 'examples' else 'cpu-'}seed{self.seed}"


def _local(name: str) -> str:
    """``name`` made absolute when it is a local file or folder (runs start in their output folder)."""
    path = pathlib.Path(name)
    return str(path.resolve()) if path.exists() else name


def simulate_command(args: argparse.Namespace, run: Run, output: pathlib.Path, *, resume: bool) -> list[str]:
    zo = ["--k", str(args.k), "--dist", args.dist, "--lr", str(args.lr), "--eps", str(args.eps)]
    return [
        sys.executable, "-m", "fedkseed", "simulate", "--quiet",
        "--protocol", "paper",
        "--model", _local(args.model), "--data", _local(args.data), "--holdout", args.holdout,
        "--seed", str(run.seed), "--rounds", str(run.rounds), "--local-steps", str(args.local_steps),
        "--clients", str(args.clients), "--clients-per-round", str(args.clients_per_round),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--eval-examples", str(args.eval_examples), "--rouge-examples", "all",
        "--max-new-tokens", str(args.max_new_tokens),
        *run.method.flags, *(zo if run.method.zero_order else []),
        "--output", str(output), "--resume" if resume else "--overwrite",
    ]  # fmt: skip


def expected_config(args: argparse.Namespace, run: Run) -> dict:
    """The settings a finished run in ``run``'s folder must have been made with (metrics.json's config)."""
    config = {
        "seed": run.seed,
        "rounds": run.rounds,
        "method": run.method.flags[run.method.flags.index("--method") + 1],
        "pro": "--pro" in run.method.flags,
        "local_steps": args.local_steps,
        "clients": args.clients,
        "clients_per_round": args.clients_per_round,
        "batch_size": args.batch_size,
        "holdout": args.holdout,
        "eval_examples": args.eval_examples,
        "max_new_tokens": args.max_new_tokens,
        "max_length": str(args.max_length),
    }
    if run.method.zero_order:
        config.update(k=args.k, dist=args.dist, lr=args.lr, eps=args.eps)
    return config


def metrics_of(folder: pathlib.Path) -> dict | None:
    """The finished run in ``folder`` (its metrics.json), or None."""
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def execute(args: argparse.Namespace, root: pathlib.Path, run: Run) -> str:
    """Make ``run`` finished in its folder: reuse a finished run with its settings, resume a
    checkpoint, continue a cpu run from a copy of its examples run's checkpoint, or start anew."""
    output = root / run.folder
    done = metrics_of(output)
    if done is not None:
        differ = {
            k: (done["config"].get(k), v) for k, v in expected_config(args, run).items() if done["config"].get(k) != v
        }
        if not differ:
            return "reused"
        # Never replaced silently: a finished run is somebody's result.
        shown = "; ".join(f"{k} {have!r} (wanted {want!r})" for k, (have, want) in differ.items())
        raise SystemExit(f"compare: {output} holds a finished run with other settings: {shown}; use another --output")
    resume = (output / "state.npz").is_file() and done is None
    if run.budget == "cpu" and not resume:
        base = root / Run(run.method, run.seed, "examples", args.rounds).folder
        if metrics_of(base) is None:
            raise SystemExit(f"compare: {run.folder} continues {base.name}, which has not finished")
        if output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True)
        shutil.copy2(base / "state.npz", output / "state.npz")
        resume = True
    log = root / f"{run.folder}.log"
    command = simulate_command(args, run, output, resume=resume)
    # Started in the run's parent folder, not here: `python -m` puts the working directory first
    # on sys.path, which would shadow a PYTHONPATH snapshot of the package with a checkout's.
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    if finished.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"compare: {run.folder} failed ({finished.returncode}): {tail[0]}; see {log}")
    return "resumed" if resume else "ran"


def per_step_cpu(metrics: dict) -> float:
    """A run's mean client CPU-seconds per local step."""
    rounds = metrics["rounds"]
    return float(np.mean([r["client_cpu_seconds"] for r in rounds])) / metrics["config"]["local_steps"]


def cpu_budget(args: argparse.Namespace, root: pathlib.Path, finished: dict[tuple[str, int], dict]) -> dict:
    """Rounds per ZO method at the cpu budget (``BUDGET_FILE`` once chosen, else measured now)."""
    path = root / BUDGET_FILE
    if path.is_file():
        return json.loads(path.read_text())
    cost = {}
    for name in args.methods:
        runs = [m for (method, _), m in finished.items() if method == name]
        if runs:
            cost[name] = float(np.mean([per_step_cpu(m) for m in runs]))
    first_order = {n: c for n, c in cost.items() if not METHODS[n].zero_order}
    if not first_order and args.cpu_ratio is None:
        raise SystemExit("compare: the cpu budget needs a finished first-order run (or --cpu-ratio)")
    matched = max(first_order, key=first_order.get) if first_order else None
    rounds, ratio = {}, {}
    for name in args.methods:
        if METHODS[name].zero_order and name in cost:
            ratio[name] = args.cpu_ratio if args.cpu_ratio is not None else first_order[matched] / cost[name]
            rounds[name] = max(args.rounds, round(args.rounds * ratio[name]))
    budget = {
        "cpu_seconds_per_step": cost,
        "matched": matched,
        "ratio": ratio,
        "ratio_fixed": args.cpu_ratio is not None,
        "rounds": rounds,
    }
    path.write_text(json.dumps(budget, indent=2) + "\n")
    return budget


# --- statistics --------------------------------------------------------------------------------


@dataclass
class Row:
    """One method at one budget: its finished runs by seed."""

    method: str
    budget: str
    runs: dict[int, dict]  # seed -> metrics.json

    @property
    def label(self) -> str:
        return self.method if self.budget == "examples" else f"{self.method} (equal CPU)"

    def rouge(self, scorer: str, seeds: Sequence[int]) -> np.ndarray:
        """Per held-out example, the mean over ``seeds`` of the after score (percent)."""
        return np.mean([self.runs[s]["final"]["rouge_l_after"][scorer]["per_example"] for s in seeds], axis=0)

    def loss(self, seeds: Sequence[int], which: str = "after") -> np.ndarray:
        return np.concatenate([self.runs[s]["final"][f"eval_loss_{which}_per_example"] for s in seeds])

    def per_round(self, key: str) -> float:
        return float(np.mean([r[key] for m in self.runs.values() for r in m["rounds"]]))

    def cost(self) -> dict[str, float]:
        config = next(iter(self.runs.values()))["config"]
        return {
            "rounds": config["rounds"],
            "local_steps": config["local_steps"],
            "examples_per_client_round": config["local_steps"] * config["batch_size"],
            "bytes_per_client_round": self.per_round("bytes_up_per_client") + self.per_round("bytes_down_per_client"),
            "peak_client_mib": max(r["client_peak_mib"] for m in self.runs.values() for r in m["rounds"]),
            "seconds_per_round": self.per_round("seconds"),
            "client_seconds_per_round": self.per_round("client_seconds"),
            "client_cpu_seconds_per_round": self.per_round("client_cpu_seconds"),
        }


def check_comparable(rows: list[Row], min_heldout: int) -> dict[str, np.ndarray]:
    """Zero-shot Rouge-L per scorer; refuses runs whose zero-shot measurements differ."""
    runs = [m for row in rows for m in row.runs.values()]
    first = runs[0]["final"]
    zero = {s: np.asarray(first["rouge_l_before"][s]["per_example"]) for s in SCORERS}
    if len(zero[SCORERS[0]]) < min_heldout:
        raise SystemExit(
            f"compare: only {len(zero[SCORERS[0]])} held-out examples scored; at least {min_heldout} are needed"
        )
    # Zero-shot is the same base model on the same examples in every run (and, per seed, the same
    # eval examples): anything else means the runs are not comparable.
    loss_before: dict[int, list[float]] = {}
    for row in rows:
        for seed, m in row.runs.items():
            final = m["final"]
            same_rouge = all(final["rouge_l_before"][s]["per_example"] == list(zero[s]) for s in SCORERS)
            same_loss = (
                loss_before.setdefault(seed, final["eval_loss_before_per_example"])
                == (final["eval_loss_before_per_example"])
            )
            if not (same_rouge and same_loss):
                raise SystemExit(f"compare: {row.label} seed {seed}: zero-shot differs; the runs are not comparable")
    return zero


def summarise(rows: list[Row], min_heldout: int) -> dict:
    """Every figure of the report, as numbers (compare.json) with the n of each interval."""
    zero = check_comparable(rows, min_heldout)
    seeds_all = sorted({s for row in rows for s in row.runs})
    reference = {row.budget: row for row in rows if row.method == REFERENCE}
    quality: dict[str, dict] = {
        "zero-shot": {
            "seeds": seeds_all,
            **{f"rouge_{s}": _est(zero[s]) for s in SCORERS},
        }
    }
    for row in rows:
        seeds = sorted(row.runs)
        before = zero_shot_loss(rows, seeds)
        entry = {"seeds": seeds, "budget": row.budget, "method": row.method, "cost": row.cost()}
        after_loss = row.loss(seeds)
        entry["eval_loss"] = _est(after_loss)
        entry["eval_loss_change"] = _est(after_loss - before)
        for s in SCORERS:
            entry[f"rouge_{s}"] = _est(row.rouge(s, seeds))
            entry[f"rouge_{s}_change"] = _est(row.rouge(s, seeds) - zero[s])
        quality[row.label] = entry
    versus: dict[str, dict] = {}
    for row in rows:
        # Each method against FedKSeed at the same budget; first-order rows (the same in both
        # budgets) against FedKSeed at each budget.
        for budget, ref in reference.items():
            if row is ref or (row.budget != budget and METHODS[row.method].zero_order):
                continue
            common = sorted(set(row.runs) & set(ref.runs))
            if not common:
                continue
            entry = {"seeds": common, "eval_loss": _est(row.loss(common) - ref.loss(common))}
            for s in SCORERS:
                entry[f"rouge_{s}"] = _est(row.rouge(s, common) - ref.rouge(s, common))
            versus[f"{row.label} minus {ref.label}"] = entry
    return {"quality": quality, "versus": versus}


def zero_shot_loss(rows: list[Row], seeds: Sequence[int]) -> np.ndarray:
    """The zero-shot eval loss per example of ``seeds`` (the same in every run of a seed)."""
    by_seed = {s: m["final"]["eval_loss_before_per_example"] for row in rows for s, m in row.runs.items()}
    return np.concatenate([by_seed[s] for s in seeds])


def _est(values: np.ndarray) -> dict[str, float]:
    e = bootstrap_interval(values)
    return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n}


# --- report ------------------------------------------------------------------------------------


def fmt(e: dict, *, sign: bool = False, digits: int = 2) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{e['mean']:{spec}} [{e['low']:{spec}}, {e['high']:{spec}}]"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def quality_table(summary: dict) -> str:
    header = ["method", "seeds"]
    for s in SCORERS:
        header += [f"held-out Rouge-L % ({s})", "Δ vs zero-shot"]
    header += ["Δ eval loss (training categories)"]
    rows = []
    for label, q in summary["quality"].items():
        row = [label, str(len(q["seeds"]))]
        for s in SCORERS:
            change = q.get(f"rouge_{s}_change")
            row += [fmt(q[f"rouge_{s}"]), fmt(change, sign=True) if change else ""]
        row.append(fmt(q["eval_loss_change"], sign=True, digits=3) if "eval_loss_change" in q else "")
        rows.append(row)
    return markdown(header, rows)


def cost_table(summary: dict) -> str:
    header = [
        "method",
        "rounds x steps",
        "bytes / client / round (up+down)",
        "peak client MiB",
        "s / round (wall)",
        "client s / round (wall)",
        "client CPU-s / round",
        "client CPU-s / step",
    ]
    rows = []
    for label, q in summary["quality"].items():
        if "cost" not in q:
            continue
        c = q["cost"]
        rows.append([
            label,
            f"{c['rounds']} x {c['local_steps']}",
            f"{c['bytes_per_client_round']:,.0f}",
            f"{c['peak_client_mib']:,.0f}",
            f"{c['seconds_per_round']:.1f}",
            f"{c['client_seconds_per_round']:.1f}",
            f"{c['client_cpu_seconds_per_round']:.1f}",
            f"{c['client_cpu_seconds_per_round'] / c['local_steps']:.2f}",
        ])  # fmt: skip
    return markdown(header, rows)


def versus_table(summary: dict) -> str:
    header = ["paired difference", "seeds", *[f"Rouge-L ({s})" for s in SCORERS], "eval loss"]
    rows = [
        [
            label,
            str(len(v["seeds"])),
            *[fmt(v[f"rouge_{s}"], sign=True) for s in SCORERS],
            fmt(v["eval_loss"], sign=True, digits=3),
        ]
        for label, v in summary["versus"].items()
    ]  # fmt: skip
    return markdown(header, rows)


def plot(summary: dict, path: pathlib.Path) -> None:
    """Held-out Rouge-L (rouge-score) gain over zero-shot, paired per example, against bytes per
    client and round on a log axis: the interval that decides significance is the paired one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorer = SCORERS[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    zero = summary["quality"]["zero-shot"][f"rouge_{scorer}"]
    ax.axhline(0, color="0.5", linestyle="--", linewidth=1, label=f"zero-shot ({zero['mean']:.1f}%)")
    markers = dict(zip(METHODS, "osDv^<>p"))
    for label, q in summary["quality"].items():
        if "cost" not in q:
            continue
        e, x = q[f"rouge_{scorer}_change"], q["cost"]["bytes_per_client_round"]
        ax.errorbar(
            x,
            e["mean"],
            yerr=[[e["mean"] - e["low"]], [e["high"] - e["mean"]]],
            marker=markers.get(q["method"], "o"),
            markerfacecolor="white" if q["budget"] == "cpu" else None,
            capsize=3,
            linestyle="none",
            label=f"{label}, {len(q['seeds'])} seed(s)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("bytes per client and round (up + down, log scale)")
    ax.set_ylabel(f"held-out Rouge-L change, points ({scorer})")
    ax.set_title("Gain over zero-shot against communication (mean, paired 95% interval)", fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    methods = [METHODS[name] for name in args.methods]
    started, load_start = time.perf_counter(), os.getloadavg()

    def execute_all(runs: list[Run]) -> None:
        def one(run: Run) -> None:
            begun = time.perf_counter()
            how = execute(args, root, run)
            seconds = time.perf_counter() - begun
            print(
                f"{run.folder}: {how} in {seconds:.0f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True
            )

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, runs))

    # Seed-major, so that an interrupted comparison leaves whole seeds.
    examples = [Run(m, seed, "examples", args.rounds) for seed in args.seeds for m in methods]
    if not args.report_only:
        execute_all(examples)
    finished = {(r.method.name, r.seed): m for r in examples if (m := metrics_of(root / r.folder)) is not None}
    if not finished:
        raise SystemExit(f"compare: no finished run in {root}")
    rows = [
        Row(m.name, "examples", {s: finished[(m.name, s)] for s in args.seeds if (m.name, s) in finished})
        for m in methods
    ]
    budget = None
    if "cpu" in args.budgets and any(m.zero_order for m in methods):
        budget = cpu_budget(args, root, finished)
        # Method-major: FedKSeed's seeds first, the method every other one is compared with.
        cpu_runs = [
            Run(m, seed, "cpu", budget["rounds"][m.name])
            for m in methods
            for seed in args.seeds
            if m.name in budget["rounds"] and budget["rounds"][m.name] > args.rounds
        ]
        if not args.report_only:
            execute_all(cpu_runs)
        for m in methods:
            done = {r.seed: d for r in cpu_runs if r.method == m and (d := metrics_of(root / r.folder)) is not None}
            if done:
                rows.append(Row(m.name, "cpu", done))
    rows = [row for row in rows if row.runs]
    summary = summarise(rows, args.min_heldout)
    summary["cpu_budget"] = budget
    wall, load_end = time.perf_counter() - started, os.getloadavg()
    timing = (
        "finished runs read back from --output (their times are in the logs of the commands that ran them)"
        if args.report_only
        else f"{args.jobs} run(s) at a time; wall time {wall / 60:.1f} min; load average at start"
        f" {load_start[0]:.1f}, at end {load_end[0]:.1f} (15-min {load_end[2]:.1f})"
    )
    plot_path = pathlib.Path(args.plot) if args.plot else root / "compare.png"
    plot(summary, plot_path)
    notes = [
        f"n: Rouge-L on {summary['quality']['zero-shot']['rouge_rouge-score']['n']} held-out examples (each the mean"
        f" over a row's seeds); eval loss pools {args.eval_examples} held-back examples per seed",
    ]
    if budget is not None:
        ratios = ", ".join(f"{n} {r:.2f}" for n, r in budget["ratio"].items())
        costs = ", ".join(f"{n} {c:.3f}" for n, c in budget["cpu_seconds_per_step"].items())
        notes.append(
            f"client CPU-seconds per local step ({BUDGET_FILE}: mean over rounds of the equal-examples runs finished"
            f" when the budget was chosen): {costs};"
            f" equal CPU matches {budget['matched']}: ratio {ratios}"
            f"{' (fixed by --cpu-ratio)' if budget['ratio_fixed'] else ''} -> rounds {budget['rounds']}"
        )
    report = "\n".join([
        f"`python benchmarks/compare.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({args.model}; {timing})",
        "",
        "Quality: mean [95% bootstrap interval over examples]; Δ is paired per example with zero-shot.",
        "",
        quality_table(summary),
        "",
        "Each method minus FedKSeed at the same budget, paired per example over the seeds both finished:",
        "",
        versus_table(summary),
        "",
        "Cost (means over rounds and seeds; peak: the largest of any client's local training):",
        "",
        cost_table(summary),
        "",
        *[f"- {note}" for note in notes],
        f"- plot: {plot_path}",
    ])  # fmt: skip
    print(report)
    (root / REPORT_FILE).write_text(report + "\n")
    (root / TABLE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
