"""Eval loss against client CPU-seconds and forward passes: the MeZO recipe, ZOSGD's default and
ZOSGD's estimator variants, single-process training on SmolLM2-135M-Instruct with the FAQ data.

    python benchmarks/convergence.py --jobs 2        # every method, 3 seeds, one thread per run
    python benchmarks/convergence.py --smoke --output runs/convergence-smoke   # tiny model, seconds
    python benchmarks/convergence.py --report-only       # the table and plot from the runs in --output

Each (method, seed) trains one fresh model in its own process (``--jobs`` at a time, each on
``--threads`` threads) and writes ``{method}-seed{seed}.json``; a finished run with the same
settings is reused, one with other settings is refused. Methods:

- ``mezo``: the MeZO recipe (:mod:`fedkseed.testing.mezo`: torch.normal reseeded per step, four
  passes and two forwards per step, Gaussian z), step seeds drawn as MeZO draws them
  (``randint(1e9)``, here from the run's seed);
- ``zosgd``: ``ZOSGD``'s default (Gaussian, one direction, the fused two-pass step);
- the variants of :data:`METHODS`: ZOSGD keyword arguments, one line each. A variant whose
  keywords this ZOSGD does not accept is skipped with a printed note.

Every method uses the same lr and eps (ZOSGD and the MeZO step share the convention
theta -= lr * g * z with g = (L+ - L-) / (2 eps)), except where a variant's update has another
scale (sign-ZO's ±z, FZOO's sigma-normalised step, momentum's sum over its window): its
``lr_scale`` says so (:data:`METHODS`). The same seed gives
every method the same training examples in the same order (batch ``--batch-size``, shuffled
epochs over the training pool). Every method gets the recipe's forward passes, 2 x ``--steps``:
a method of more forwards per step (q directions, FZOO) runs fewer steps.

Measured: the eval loss (mean over ``--eval-examples`` held-back examples of each one's mean
response-token cross-entropy) of a FIXED set of training-category examples, disjoint from the
training pool, at step 0 and whenever the forwards reach the next multiple of 2 x
``--eval-every``; at each point the step, the forwards so far and the process CPU-seconds of the
training alone (``time.process_time`` around each step; evaluation, tokenising and loading are
outside it). ZOSGD settles its pending perturbation before an evaluation (inside the evaluation)
and re-applies it in the next step (one extra pass per evaluation, counted as training).

Report (Markdown and JSON): the target is the recipe's eval loss at its last point (step
``--steps``), mean over seeds. Per method: the eval loss at its last point, and the CPU-seconds
and forwards at which each seed's curve first reaches the target (linear interpolation between
evaluation points), with 95% Student-t intervals over seeds; the ratio of those CPU-seconds to
the same seed's recipe CPU-seconds at step ``--steps`` (paired by seed); and in how many seeds
the method reached the target with less CPU than ``zosgd`` in the same seed (or where ``zosgd``
did not). A last line names the methods whose whole ratio interval is within the goal (1/6) and
those faster than ``zosgd`` in every seed.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

RECIPE, DEFAULT = "mezo", "zosgd"  # the baseline every figure is relative to, and ZOSGD's default
GOAL = 1 / 6  # issue 21: the recipe's eval loss at N steps in at most this share of its client CPU


@dataclass(frozen=True)
class Method:
    name: str
    zosgd: dict | None  # ZOSGD keyword arguments; None: the MeZO recipe (fedkseed.testing.mezo)
    lr_scale: float = 1.0  # lr = --lr * lr_scale (* --eps with times_eps): updates on another scale than g z
    times_eps: bool = False
    note: str = ""

    def lr(self, lr: float, eps: float) -> float:
        return lr * self.lr_scale * (eps if self.times_eps else 1.0)

    def forwards_per_step(self) -> int:
        kw = self.zosgd or {}
        directions = kw.get("directions", 1)
        return directions + 1 if kw.get("estimator") == "fzoo" else 2 * directions


# One line per method. No lr is tuned per method; where a variant's update has another scale than
# the recipe's g z, its lr_scale gives it the recipe's size: sign-ZO's update is +-z, and FZOO's
# per-direction weight (L_i - L_0) / (eps sigma) is about g / (eps |g|), so both take G_TYPICAL,
# the median |g| of SmolLM2 on this data at the start (8.5 over 30 ZOSGD steps at eps 1e-3,
# batch 1, measured 2026-12-05); momentum's window sums beta^j over W steps, so lr_scale = 1 over
# that sum keeps the steady-state step the recipe's (the EMA form of heavy-ball).
G_TYPICAL = 8.5
BETA, WINDOW = 0.9, 8
METHODS = {
    m.name: m
    for m in (
        Method(RECIPE, None, note="MeZO recipe: torch.normal, 4 passes"),
        Method(DEFAULT, {}, note="ZOSGD default: Gaussian, fused 2 passes"),
        Method("zosgd-q4", {"directions": 4}, note="n-SPSA, q = 4 (update g/q per direction)"),
        Method("zosgd-sign", {"sign": True}, lr_scale=G_TYPICAL, note="sign-ZO: update sign(g) z, lr x |g| typical"),
        Method(
            "zosgd-momentum",
            {"momentum": BETA, "window": WINDOW},
            lr_scale=(1 - BETA) / (1 - BETA**WINDOW),
            note=f"heavy-ball beta {BETA}, window {WINDOW}, lr / sum of the window's weights",
        ),
        Method(
            "zosgd-fzoo",
            {"estimator": "fzoo", "directions": 8, "dist": "rademacher"},
            lr_scale=G_TYPICAL,
            times_eps=True,
            note="FZOO, N = 8, Rademacher, sigma-normalised; lr x eps x |g| typical",
        ),
        Method(
            "zosgd-sparse",
            {"density": 0.25, "mask_every": 10},
            note="Sparse-MeZO: the 25% smallest-magnitude weights per tensor, mask rebuilt every 10 steps",
        ),
    )
}
# The FAQ categories compare.py holds out for new-task evaluation: left out here too, so neither
# the training pool nor the eval set touches them.
HOLDOUT = ("verifiera-byggfirma", "dolda-fel")
EVAL_ORDER_SEED = 20_261_205  # fixes which training-category examples form the eval set
EVAL_BATCH = 8
SMOKE = dict(model="tiny", steps=6, eval_every=2, eval_examples=4, seeds=[0, 1], max_length="64", jobs=2, lr=1e-3)
# The full run's defaults: N = 70 recipe steps at lr 4e-5, eps 1e-3, batch 1 (FedKSeed's official
# batch). Measured on SmolLM2, one thread, CPU-s per step: recipe 4.2-4.3, zosgd 1.2, q4 5.1, sign
# 1.2, momentum 1.4, fzoo 4.7, sparse 1.3; a forward or an eval example 0.41. So 70 steps cost
# about 820 CPU-s of training per seed over all methods, 3 seeds with evaluations and loading about
# 57 CPU-minutes (29 min at --jobs 2 on two free cores). The recipe's eval loss falls slowly at this
# lr (about -0.01 in 20 ZOSGD steps); lr 1e-4 already raised it over 30 steps and 3e-4 diverged.


def zosgd_accepts() -> set[str]:
    from fedkseed import ZOSGD

    return set(inspect.signature(ZOSGD).parameters)


def available(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(methods this ZOSGD can run, notes on the skipped ones)."""
    accepted, kept, notes = zosgd_accepts(), [], []
    for name in names:
        unknown = sorted(set(METHODS[name].zosgd or {}) - accepted)
        if unknown:
            notes.append(f"{name}: skipped, this ZOSGD does not accept {', '.join(unknown)}")
        else:
            kept.append(name)
    return kept, notes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="faq")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=70, help="the recipe's steps N (every method: 2N forwards)")
    parser.add_argument("--eval-every", type=int, default=10, help="evaluate every this many recipe steps")
    parser.add_argument("--eval-examples", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", default="auto", help="tokens per example, or auto (the longest)")
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    parser.add_argument("--output", default="runs/convergence")
    parser.add_argument("--plot", default=None, help="the plot's PNG (default: {output}/convergence.png)")
    parser.add_argument("--report-only", action="store_true", help="no runs: the report from the runs in --output")
    parser.add_argument("--smoke", action="store_true", help=f"a fast end-to-end check: {SMOKE}")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    for name in ("steps", "eval_every", "eval_examples", "batch_size", "threads", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if RECIPE not in args.methods:
        parser.error(f"--methods must include {RECIPE}: its loss at --steps is the target")
    return args


def run_config(args: argparse.Namespace, method: Method, seed: int) -> dict:
    """What a run's result depends on: a finished run is reused only when all of it matches."""
    return {
        "method": method.name,
        "zosgd": method.zosgd,
        "lr": method.lr(args.lr, args.eps),
        "eps": args.eps,
        "seed": seed,
        "model": args.model,
        "data": args.data,
        "holdout": list(HOLDOUT),
        "recipe_steps": args.steps,
        "forward_budget": 2 * args.steps,
        "eval_every_forwards": 2 * args.eval_every,
        "eval_examples": args.eval_examples,
        "batch_size": args.batch_size,
        "max_length": str(args.max_length),
        "threads": args.threads,
    }


# --- one run -----------------------------------------------------------------------------------


def split(examples: list, count: int) -> tuple[list, list]:
    """(training pool, eval set): the examples of the training categories, ``count`` of them (a
    fixed draw, the same for every seed and method) held back for the eval loss."""
    pool = [e for e in examples if e.category not in HOLDOUT]
    if count >= len(pool):
        raise SystemExit(f"convergence: --eval-examples {count} leaves no training example (of {len(pool)})")
    order = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(pool))
    held = set(order[:count].tolist())
    return [e for i, e in enumerate(pool) if i not in held], [pool[i] for i in sorted(held)]


def batches(pool: list, seed: int, size: int) -> Callable[[], list]:
    """The next training batch: shuffled epochs over ``pool`` from ``seed`` (the same for every method)."""
    rng, queue = np.random.default_rng(seed), []

    def take() -> list:
        nonlocal queue
        while len(queue) < size:
            queue += rng.permutation(len(pool)).tolist()
        out, queue = queue[:size], queue[size:]
        return [pool[i] for i in out]

    return take


def train(config: dict) -> dict:
    """One run: the training loop, its evaluation points and per-step training losses."""
    import torch

    from fedkseed import ZOSGD
    from fedkseed import data as D
    from fedkseed.models import load_model
    from fedkseed.testing.mezo import mezo_step

    torch.set_num_threads(config["threads"])
    method = METHODS[config["method"]]
    model, tokenizer = load_model(config["model"])
    examples = D.load_examples(config["data"])
    pool, held = split(examples, config["eval_examples"])
    max_length = D.auto_max_length(tokenizer, examples) if config["max_length"] == "auto" else int(config["max_length"])
    eval_batches = [D.encode(tokenizer, held[i : i + EVAL_BATCH], max_length) for i in range(0, len(held), EVAL_BATCH)]
    take = batches(pool, config["seed"], config["batch_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    lr, eps = config["lr"], config["eps"]
    if method.zosgd is None:
        step_seeds = np.random.default_rng([config["seed"], 1]).integers(0, 1_000_000_000, size=config["recipe_steps"])
        optimizer = None
    else:
        with warnings.catch_warnings():  # the momentum window's kept-weight warning: the setting is deliberate
            warnings.simplefilter("ignore", UserWarning)
            optimizer = ZOSGD(model, lr=lr, eps=eps, seed=config["seed"], **method.zosgd)

    forwards, cpu, steps = 0, 0.0, 0
    points, train_losses = [], []

    def evaluate() -> None:
        losses = torch.cat([D.example_losses(model, b) for b in eval_batches])
        points.append({"step": steps, "forwards": forwards, "cpu_seconds": cpu, "eval_loss": float(losses.mean())})

    per_step = method.forwards_per_step()
    budget, every = config["forward_budget"], config["eval_every_forwards"]
    next_eval = every
    evaluate()
    while forwards + per_step <= budget:
        batch = D.encode(tokenizer, take(), max_length)
        counted = [0]

        def closure(batch=batch, counted=counted) -> torch.Tensor:
            counted[0] += 1
            return D.lm_loss(model, batch)

        start = time.process_time()
        if optimizer is None:
            loss = mezo_step(params, closure, int(step_seeds[steps]), lr=lr, eps=eps)
        else:
            loss = optimizer.step(closure)
        cpu += time.process_time() - start
        forwards += counted[0]
        steps += 1
        train_losses.append(float(loss))
        if forwards >= next_eval:
            evaluate()
            next_eval = (forwards // every + 1) * every
    if points[-1]["step"] != steps:  # the last point is the end of the budget
        evaluate()
    return {
        "config": config,
        "points": points,
        "train_losses": train_losses,
        "pool_examples": len(pool),
        "max_length_tokens": max_length,
        "torch": torch.__version__,
    }


# --- running -----------------------------------------------------------------------------------


def result_path(root: pathlib.Path, method: str, seed: int) -> pathlib.Path:
    return root / f"{method}-seed{seed}.json"


def execute(args: argparse.Namespace, root: pathlib.Path, method: str, seed: int, argv: Sequence[str]) -> str:
    """Make the run (method, seed) finished in ``root``: reuse a finished one with its settings,
    refuse one with other settings, else run it in a subprocess (its own CPU clock and threads)."""
    if read_run(args, root, method, seed) is not None:
        return "reused"
    command = [sys.executable, __file__, *argv, "--run", method, str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = root / f"{method}-seed{seed}.log"
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if finished.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"convergence: {method} seed {seed} failed ({finished.returncode}): {tail[0]}; see {log}")
    return "ran"


def read_run(args: argparse.Namespace, root: pathlib.Path, method: str, seed: int) -> dict | None:
    """The finished run (method, seed) in ``root``, or None; one made with other settings is refused,
    never replaced or mixed into the report."""
    path = result_path(root, method, seed)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    want, done = run_config(args, METHODS[method], seed), result["config"]
    differ = {k: (done.get(k), v) for k, v in want.items() if done.get(k) != v}
    if differ:
        shown = "; ".join(f"{k} {have!r} (wanted {v!r})" for k, (have, v) in differ.items())
        raise SystemExit(f"convergence: {path} holds a run with other settings: {shown}; use another --output")
    return result


def run_one(args: argparse.Namespace, root: pathlib.Path, method: str, seed: int) -> None:
    """The internal --run: train, then write the result whole (a temporary file renamed)."""
    result = train(run_config(args, METHODS[method], seed))
    path = result_path(root, method, seed)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result) + "\n")
    partial.replace(path)


# --- statistics --------------------------------------------------------------------------------


@dataclass
class Estimate:
    mean: float
    low: float
    high: float
    n: int
    values: list[float] = field(default_factory=list)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """The mean and its Student-t interval over seeds (one value: no interval, low = high = mean)."""
    from scipy import stats  # scipy comes with dp-accounting (fedkseed[llm])

    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if data.size < 2:
        return Estimate(mean, mean, mean, int(data.size), data.tolist())
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / np.sqrt(data.size))
    return Estimate(mean, mean - half, mean + half, int(data.size), data.tolist())


def first_reach(points: list[dict], target: float, key: str) -> float | None:
    """``key`` (cpu_seconds or forwards) where the eval loss first reaches ``target``: linear
    interpolation between the two evaluation points around the crossing; None if never."""
    if points[0]["eval_loss"] <= target:
        return points[0][key]
    for before, after in itertools.pairwise(points):
        if after["eval_loss"] <= target < before["eval_loss"]:
            share = (before["eval_loss"] - target) / (before["eval_loss"] - after["eval_loss"])
            return before[key] + share * (after[key] - before[key])
    return None


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Every figure of the report from the runs (method -> seed -> result), as numbers."""
    recipe = runs[RECIPE]
    starts = {r["points"][0]["eval_loss"] for seeds in runs.values() for r in seeds.values()}
    if len(starts) != 1:  # the same base model and eval set: anything else is not comparable
        raise SystemExit(f"convergence: the runs start from different eval losses {sorted(starts)}")
    target = float(np.mean([r["points"][-1]["eval_loss"] for r in recipe.values()]))
    recipe_cpu = {s: r["points"][-1]["cpu_seconds"] for s, r in recipe.items()}
    default_reach = {s: first_reach(r["points"], target, "cpu_seconds") for s, r in runs.get(DEFAULT, {}).items()}
    methods = {}
    for name, seeds in runs.items():
        order = sorted(seeds)
        last = [seeds[s]["points"][-1] for s in order]
        if name == RECIPE:  # the target is its loss at step N: its time to it is step N's, by definition
            reach_cpu = {s: p["cpu_seconds"] for s, p in zip(order, last)}
            reach_fwd = {s: p["forwards"] for s, p in zip(order, last)}
        else:
            reach_cpu = {s: first_reach(seeds[s]["points"], target, "cpu_seconds") for s in order}
            reach_fwd = {s: first_reach(seeds[s]["points"], target, "forwards") for s in order}
        reached = [s for s in order if reach_cpu[s] is not None]
        entry = {
            "seeds": order,
            "steps": [p["step"] for p in last],
            "forwards": [p["forwards"] for p in last],
            "final_eval_loss": vars(t_interval([p["eval_loss"] for p in last])),
            "cpu_seconds": vars(t_interval([p["cpu_seconds"] for p in last])),
            "cpu_seconds_per_step": vars(t_interval([p["cpu_seconds"] / max(p["step"], 1) for p in last])),
            "reached": reached,
            "reach_cpu_seconds_by_seed": {str(s): reach_cpu[s] for s in order},
        }
        if reached and len(reached) == len(order):
            entry["reach_cpu_seconds"] = vars(t_interval([reach_cpu[s] for s in order]))
            entry["reach_forwards"] = vars(t_interval([reach_fwd[s] for s in order]))
            if all(s in recipe_cpu for s in order):
                entry["reach_cpu_ratio"] = vars(t_interval([reach_cpu[s] / recipe_cpu[s] for s in order]))
        # Faster in a seed: reached the target with less CPU than zosgd in that seed, or where it did not.
        paired = [s for s in order if s in default_reach]
        entry["paired_with_default"] = paired
        entry["faster_than_default"] = sum(
            reach_cpu[s] is not None and (default_reach[s] is None or reach_cpu[s] < default_reach[s]) for s in paired
        )
        methods[name] = entry
    return {"target": target, "start_eval_loss": starts.pop(), "methods": methods}


# --- report ------------------------------------------------------------------------------------


def fmt(e: dict | None, digits: int = 3) -> str:
    if e is None:
        return ""
    if e["n"] < 2:
        return f"{e['mean']:.{digits}f}"
    return f"{e['mean']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"


def table(summary: dict) -> str:
    header = [
        "method",
        "seeds",
        "steps (forwards)",
        "final eval loss",
        "training CPU-s",
        "CPU-s / step",
        "CPU-s to reach target",
        "forwards to reach target",
        "CPU vs recipe",
        f"faster than {DEFAULT} (seeds)",
    ]
    rows = []
    for name, m in summary["methods"].items():
        n = len(m["seeds"])
        steps = sorted(set(zip(m["steps"], m["forwards"])))
        if "reach_cpu_seconds" in m:
            reach = [fmt(m["reach_cpu_seconds"], 1), fmt(m["reach_forwards"], 0), fmt(m.get("reach_cpu_ratio"), 2)]
        else:
            got = ", ".join(f"{v:.1f}" for v in m["reach_cpu_seconds_by_seed"].values() if v is not None)
            reach = [
                f"not reached in {n - len(m['reached'])} of {n} seeds" + (f" (others: {got})" if got else ""),
                "",
                "",
            ]
        compared = name not in (RECIPE, DEFAULT)
        faster = f"{m['faster_than_default']} of {len(m['paired_with_default'])}" if compared else ""
        rows.append([
            name,
            str(n),
            ", ".join(f"{s} ({f})" for s, f in steps),
            fmt(m["final_eval_loss"]),
            fmt(m["cpu_seconds"], 1),
            fmt(m["cpu_seconds_per_step"], 2),
            *reach,
            faster,
        ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def verdict(summary: dict) -> str:
    """The two questions of the benchmark, answered from the figures: which methods reach the
    recipe's loss in at most GOAL of its CPU (the whole interval), and which beat ZOSGD's default
    in every seed."""
    methods = summary["methods"]
    goal = [n for n, m in methods.items() if n != RECIPE and m.get("reach_cpu_ratio", {}).get("high", 1) <= GOAL]
    faster = [
        n
        for n, m in methods.items()
        if n not in (RECIPE, DEFAULT) and m["paired_with_default"] and m["faster_than_default"] == len(m["seeds"])
    ]
    return (
        f"goal, the recipe's loss in <= {GOAL:.3g} of its CPU (whole interval): {', '.join(goal) or 'none'}; "
        f"faster than {DEFAULT} in every seed: {', '.join(faster) or 'none'}"
    )


def curve(results: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x: mean of ``key`` over seeds, mean eval loss, low, high) at each evaluation point the
    seeds share (the same steps in every seed: the forwards per step are fixed)."""
    count = min(len(r["points"]) for r in results)
    xs, means, lows, highs = [], [], [], []
    for i in range(count):
        e = t_interval([r["points"][i]["eval_loss"] for r in results])
        xs.append(np.mean([r["points"][i][key] for r in results]))
        means.append(e.mean)
        lows.append(e.low)
        highs.append(e.high)
    return np.array(xs), np.array(means), np.array(lows), np.array(highs)


def plot(runs: dict[str, dict[int, dict]], summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    axis_labels = {"cpu_seconds": "training CPU-seconds (process time)", "forwards": "forward passes"}
    for ax, (key, label) in zip(axes, axis_labels.items()):
        for name, seeds in runs.items():
            x, mean, low, high = curve(list(seeds.values()), key)
            (line,) = ax.plot(x, mean, marker=".", label=f"{name} ({len(seeds)} seeds)")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        ax.axhline(summary["target"], color="0.4", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel("eval loss (held-back, training categories)")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{title}: mean and 95% t-interval over seeds; dashed: the recipe's loss at its last step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    root = pathlib.Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_one(args, root, args.run[0], int(args.run[1]))
        return 0
    methods, notes = available(args.methods)
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    started, load_start = time.perf_counter(), os.getloadavg()
    # Seed-major, so that an interrupted benchmark leaves whole seeds.
    pending = [(m, s) for s in args.seeds for m in methods]
    if not args.report_only:

        def one(job: tuple[str, int]) -> None:
            begun = time.perf_counter()
            how = execute(args, root, *job, argv)
            print(f"{job[0]} seed {job[1]}: {how} in {time.perf_counter() - begun:.0f} s", file=sys.stderr, flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, pending))
    runs: dict[str, dict[int, dict]] = {}
    for m, s in pending:
        if (result := read_run(args, root, m, s)) is not None:
            runs.setdefault(m, {})[s] = result
    if RECIPE not in runs:
        raise SystemExit(f"convergence: no finished {RECIPE} run in {root}")
    summary = summarise(runs)
    summary["skipped"] = notes
    plot_path = pathlib.Path(args.plot) if args.plot else root / "convergence.png"
    plot(runs, summary, plot_path, f"{args.model}, batch {args.batch_size}, lr {args.lr:g}, eps {args.eps:g}")
    wall, load_end = time.perf_counter() - started, os.getloadavg()
    timing = (
        "runs read back from --output"
        if args.report_only
        else f"{args.jobs} run(s) at a time, {args.threads} thread(s) each; wall {wall / 60:.1f} min;"
        f" load average at start {load_start[0]:.1f}, at end {load_end[0]:.1f}"
    )
    lines = [
        f"`python benchmarks/convergence.py {shlex.join(argv)}` ({args.model}; {timing})",
        "",
        f"Target: the {RECIPE} recipe's eval loss at step {args.steps}, mean over its seeds: {summary['target']:.4f}"
        f" (start {summary['start_eval_loss']:.4f}; {args.eval_examples} held-back training-category examples).",
        "Mean [95% Student-t interval over seeds]; reach: first crossing of the target, interpolated between"
        f" evaluation points (every {2 * args.eval_every} forwards; the recipe's: its step {args.steps});"
        " CPU vs recipe: paired by seed, against the"
        f" recipe's training CPU-seconds at step {args.steps}.",
        "",
        table(summary),
        "",
        *[f"- {name}: {METHODS[name].note}; lr {METHODS[name].lr(args.lr, args.eps):g}" for name in runs],
        *[f"- {note}" for note in notes],
        f"- {verdict(summary)}",
        f"- plot: {plot_path}",
    ]
    report = "\n".join(lines)
    print(report)
    (root / "convergence.md").write_text(report + "\n")
    (root / "convergence.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
