"""What one malicious client does to a FedKSeed run, with and without the server's bound.

    python benchmarks/robustness.py                  # SmolLM2-135M-Instruct, FAQ data
    python benchmarks/robustness.py --model tiny --rounds 1 --local-steps 4 --k 32   # a smoke run

Every run is a real simulation (``fedkseed.experiment.simulate``, the local engine): 4 clients,
all 4 sampled every round, one of them Byzantine (``--byzantine 1``): it trains, then sends the
attack's upload through the real encoder to the real server path. Attacks (``fed/attacks.py``):
``scale`` multiplies its values by 1e6, ``sign-flip`` negates them, ``random`` sends large noise.
Each aggregation is compared with its own clean run (no attacker, same seed, same split):

- default: ``--aggregate mean --clip auto`` (each upload's norm bounded by 3x the round's median);
- unbounded: ``--aggregate mean --clip off``, FedKSeed's plain weighted mean.

A run "holds" when its final eval loss is finite and within 2% of the clean run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import shlex
import sys
import time
from collections.abc import Sequence

AGGREGATIONS = {"default (mean, clip auto)": dict(aggregate="mean", clip="auto"),
                "unbounded (mean, clip off)": dict(aggregate="mean", clip="off")}  # fmt: skip
ATTACKS = ("scale", "sign-flip", "random")
TOLERANCE = 0.02


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A model that has learned something: a wrecked model must score worse than a clean one
    # (the random-weight "tiny" model already predicts uniformly, as a wrecked model may).
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-5)  # the demo's settings
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", nargs="+", default=["scale", "sign-flip"], choices=ATTACKS)
    parser.add_argument("--output", default="runs/robustness")
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace):
    from fedkseed.experiment import SimConfig

    return SimConfig(
        model=args.model, clients=4, clients_per_round=4, rounds=args.rounds, local_steps=args.local_steps,
        k=args.k, lr=args.lr, eps=args.eps, seed=args.seed, eval_examples=16, rouge_examples="0",
        overwrite=True,
    )  # fmt: skip


def eval_losses(config) -> tuple[float, float]:
    """(final eval loss, worst eval loss of any round) of a run."""
    from fedkseed.experiment import simulate

    results = simulate(config, progress=False)
    return float(results.final["eval_loss_after"]), max(float(r["eval_loss"]) for r in results.rounds)


def fmt(loss: float) -> str:
    return f"{loss:.4f}" if abs(loss) < 1e4 else f"{loss:.3g}"


def measure(args: argparse.Namespace) -> list[list[str]]:
    """One row per (aggregation, attack): final and worst-round eval loss, the final one's change
    from the clean run, verdict."""
    base, root = base_config(args), pathlib.Path(args.output)
    rows = []
    for label, settings in AGGREGATIONS.items():
        name = settings["clip"]
        clean_config = dataclasses.replace(base, **settings, output=str(root / f"{name}-clean"))
        clean, worst = eval_losses(clean_config)
        rows.append([label, "none", fmt(clean), fmt(worst), "", ""])
        for attack in args.attacks:
            attacked = dataclasses.replace(
                clean_config, byzantine=1, attack=attack, output=str(root / f"{name}-{attack}")
            )
            loss, worst = eval_losses(attacked)
            change = (loss - clean) / clean
            holds = math.isfinite(loss) and abs(change) <= TOLERANCE
            verdict = "holds" if holds else "FAILS"
            rows.append([label, f"1 of 4: {attack}", fmt(loss), fmt(worst), f"{change:+.2%}", verdict])
    return rows


def table(rows: list[list[str]]) -> str:
    header = ["aggregation", "attackers", "final eval loss", "worst round", "vs clean", f"within {TOLERANCE:.0%}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = measure(args)
    wall = time.perf_counter() - started
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    print("`" + f"python benchmarks/robustness.py {command}".strip() + "`")
    shape = f"{args.rounds} rounds x {args.local_steps} local steps, K = {args.k}"
    print(f"({args.model}, {shape}; wall time {wall:.0f} s)")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
