"""Does FedKSeed improve on zero-shot, and does Pro improve on uniform seeds? One markdown table.

    python benchmarks/quality.py               # SmolLM2-135M-Instruct, FAQ (~60 min on 2 idle cores: estimated)
    python benchmarks/quality.py --model tiny --rounds 1 --local-steps 2 --seeds 0 --output runs/quality-smoke
    python benchmarks/quality.py --seeds 0 1 --report-only    # the table from runs already made

On a shared machine, run two at a time on one thread each (``OMP_NUM_THREADS=1 ... --jobs 2``);
to pin the code under test, copy the package elsewhere and point PYTHONPATH at the copy (runs
start in their output folder, so a checkout in the working directory does not shadow it).

Every run goes through the ``fedkseed simulate`` command line in a subprocess (the stable
interface) and is read back from its metrics.json. For each seed, FedKSeed (uniform seeds) and
FedKSeed-Pro run on the same split; zero-shot is the "before" measurement of those runs (the
same base model and examples), so no run is spent on it.

- Rouge-L: greedy answers on every example of the held-out categories (new tasks), scored both
  ways (``fedkseed.metrics``: rouge-score with stemmer, and the ``rouge`` package of FedKSeed's
  official code). The held-out examples are the same for every seed: a method's per-example
  score is its mean over seeds, and the interval is a bootstrap over examples.
- Eval loss: response-token loss on examples held back from the training categories; they
  depend on the seed's split, so examples of all seeds are pooled, paired with the same
  example's zero-shot loss for the difference.
- Differences (vs zero-shot, Pro vs uniform) are paired per example; an interval that excludes
  0 is a significant difference at the 95% level.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedkseed.metrics import SCORERS, Estimate, bootstrap_interval

METHODS = {"FedKSeed": [], "FedKSeed-Pro": ["--pro"]}
# 55 held-out examples in two categories: more than the 50 the comparison needs.
HOLDOUT = "verifiera-byggfirma,dolda-fel"
MIN_HELDOUT = 50


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="faq")
    parser.add_argument("--holdout", default=HOLDOUT, help="held-out categories (comma-separated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Sized for ~60 minutes on 2 idle cores: 6 runs of ~10 min, each ~1000 ZO steps (~0.4 s) plus
    # ~3 min of loading and before/after evaluation (greedy 128 tokens on 55 examples, twice):
    # the official protocol (balanced split, shuffled epochs, batch 1, every held-out example,
    # 128 new tokens) with the rounds, steps, K, lr and eps that move SmolLM2-135M in that time.
    # Measured on the shared machine (load 2-8, OMP_NUM_THREADS=1, --jobs 2): one before or after
    # evaluation takes 3-6 min and a ZO step 1-2.5 s in each run, and zero-shot is re-measured in
    # every run (no option skips it), so the RESULTS table ran 5 rounds of 30 steps at K 256:
    # 3 seeds in 44 min, 7.5-21 min per run.
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--dist", default="rademacher")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-examples", type=int, default=32, help="held-back examples for the eval loss, per seed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--min-heldout", type=int, default=MIN_HELDOUT)
    parser.add_argument("--output", default="runs/quality")
    # On a shared 2-core machine two runs at OMP_NUM_THREADS=1 each beat one run on two threads.
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    parser.add_argument(
        "--report-only", action="store_true", help="no runs: the table from the runs already in --output"
    )
    return parser.parse_args(argv)


def _local(name: str) -> str:
    """``name`` made absolute when it is a local file or folder (runs start in their output folder)."""
    path = pathlib.Path(name)
    return str(path.resolve()) if path.exists() else name


def simulate_command(args: argparse.Namespace, method_flags: list[str], seed: int, output: pathlib.Path) -> list[str]:
    return [
        sys.executable, "-m", "fedkseed", "simulate", "--quiet",
        "--protocol", "paper",
        "--model", _local(args.model), "--data", _local(args.data), "--holdout", args.holdout,
        "--seed", str(seed), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
        "--clients", str(args.clients), "--clients-per-round", str(args.clients_per_round),
        "--k", str(args.k), "--dist", args.dist, "--lr", str(args.lr), "--eps", str(args.eps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--eval-examples", str(args.eval_examples), "--rouge-examples", "all",
        "--max-new-tokens", str(args.max_new_tokens),
        *method_flags, "--output", str(output), "--overwrite",
    ]  # fmt: skip


def run(command: list[str], log: pathlib.Path) -> float:
    """Run one simulation, its output in ``log``; its wall time in seconds."""
    started = time.perf_counter()
    # Started in the run's parent folder, not here: `python -m` puts the working directory first
    # on sys.path, which would shadow a PYTHONPATH snapshot of the package with a checkout's.
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"quality: {shlex.join(command)} failed ({done.returncode}): {tail[0]}; see {log}")
    return time.perf_counter() - started


def read_final(output: pathlib.Path) -> dict:
    return json.loads((output / "metrics.json").read_text())["final"]


def summarise(finals: dict[str, list[dict]], min_heldout: int) -> tuple[list[list[str]], list[str]]:
    """Table rows and notes from each method's per-seed final blocks (seeds in the same order)."""
    first = next(iter(finals.values()))[0]
    rouge_before = {s: np.asarray(first["rouge_l_before"][s]["per_example"]) for s in SCORERS}
    n_heldout = len(rouge_before[SCORERS[0]])
    if n_heldout < min_heldout:
        raise SystemExit(f"quality: only {n_heldout} held-out examples scored; at least {min_heldout} are needed")
    # Zero-shot is the same base model on the same examples in every run of a seed (and greedy
    # Rouge-L in every run at all): anything else means the runs are not comparable.
    baseline = next(iter(finals.values()))
    for runs in finals.values():
        for final, base in zip(runs, baseline):
            same = final["eval_loss_before_per_example"] == base["eval_loss_before_per_example"] and all(
                final["rouge_l_before"][s]["per_example"] == list(rouge_before[s]) for s in SCORERS
            )
            if not same:
                raise SystemExit("quality: zero-shot metrics differ between runs; the runs are not comparable")
    loss_before = np.concatenate([f["eval_loss_before_per_example"] for f in baseline])

    after: dict[str, dict[str, np.ndarray]] = {}
    for method, runs in finals.items():
        after[method] = {"loss": np.concatenate([f["eval_loss_after_per_example"] for f in runs])}
        for s in SCORERS:
            after[method][s] = np.mean([f["rouge_l_after"][s]["per_example"] for f in runs], axis=0)

    rows = [["zero-shot", fmt(bootstrap_interval(loss_before)), ""]]
    for s in SCORERS:
        rows[0] += [fmt(bootstrap_interval(rouge_before[s]), digits=2), ""]
    for method, values in after.items():
        row = [
            method,
            fmt(bootstrap_interval(values["loss"])),
            fmt(bootstrap_interval(values["loss"] - loss_before), sign=True),
        ]
        for s in SCORERS:
            row += [
                fmt(bootstrap_interval(values[s]), digits=2),
                fmt(bootstrap_interval(values[s] - rouge_before[s]), sign=True, digits=2),
            ]
        rows.append(row)
    methods = list(after)
    notes = [f"n = {n_heldout} held-out examples (Rouge-L), {len(loss_before)} eval-loss examples pooled over seeds"]
    if len(methods) == 2:
        a, b = methods
        diff = [fmt(bootstrap_interval(after[b]["loss"] - after[a]["loss"]), sign=True)]
        diff += [fmt(bootstrap_interval(after[b][s] - after[a][s]), sign=True, digits=2) for s in SCORERS]
        notes.append(
            f"{b} minus {a}: eval loss {diff[0]}; " + "; ".join(f"Rouge-L ({s}) {d}" for s, d in zip(SCORERS, diff[1:]))
        )
    for method, runs in finals.items():
        per_seed = ", ".join(f"{np.mean(f['rouge_l_after'][SCORERS[0]]['per_example']):.2f}" for f in runs)
        notes.append(f"{method} Rouge-L ({SCORERS[0]}) per seed: {per_seed}")
    return rows, notes


def fmt(estimate: Estimate, *, sign: bool = False, digits: int = 3) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{estimate.mean:{spec}} [{estimate.low:{spec}}, {estimate.high:{spec}}]"


def table(rows: list[list[str]]) -> str:
    header = ["method", "eval loss", "Δ loss"]
    for s in SCORERS:
        header += [f"Rouge-L % ({s})", "Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"quality: --jobs must be >= 1, got {args.jobs}")
    root = pathlib.Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    # Seed-major order, so that with --jobs 2 each seed's two methods run side by side.
    jobs = [(seed, method, flags) for seed in args.seeds for method, flags in METHODS.items()]

    def one(job: tuple[int, str, list[str]]) -> float:
        seed, method, flags = job
        output = root / f"{method.lower()}-seed{seed}"
        seconds = run(simulate_command(args, flags, seed, output), root / f"{output.name}.log")
        print(f"{method} seed {seed}: {seconds:.0f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        return seconds

    times: list[float] = []
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            times = list(pool.map(one, jobs))
    finals: dict[str, list[dict]] = {method: [] for method in METHODS}
    for seed, method, _ in jobs:
        finals[method].append(read_final(root / f"{method.lower()}-seed{seed}"))
    rows, notes = summarise(finals, args.min_heldout)
    wall = time.perf_counter() - started
    load_end = os.getloadavg()
    timing = (
        "finished runs read back from --output (their times are in the log of the command that ran them)"
        if args.report_only
        else f"{args.jobs} run(s) at a time; wall time {wall / 60:.1f} min; per run {np.mean(times):.0f} s;"
        f" load average at start {load_start[0]:.1f}, at end {load_end[0]:.1f} (15-min {load_end[2]:.1f})"
    )
    report = "\n".join([
        f"`python benchmarks/quality.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({args.model}, {len(args.seeds)} seeds per method; {timing})",
        "",
        "Mean [95% bootstrap interval over examples]; Δ is paired with zero-shot per example.",
        "",
        table(rows),
        "",
        *[f"- {note}" for note in notes],
    ])  # fmt: skip
    print(report)
    (root / "quality.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
