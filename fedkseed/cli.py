"""The ``fedkseed`` command: ``simulate`` (a FedKSeed run) and ``apply`` (delta -> model)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .simulate import ENGINES, SimConfig, UsageError

DEFAULTS = SimConfig()


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr with exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedkseed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = commands.add_parser("simulate", help="run FedKSeed on one machine", description=(
        "Federated ZO fine-tuning (FedKSeed) of a causal LM, simulated on this machine. Writes "
        "metrics.json, delta.fks, model/, losses.png and a resumable state.npz to --output."))
    d = DEFAULTS
    sim.add_argument("--model", default=d.model, help="smollm2-135m, tiny or a local HF model folder (default %(default)s)")
    sim.add_argument("--data", default=d.data, help="faq or a JSONL file (default %(default)s)")
    sim.add_argument("--clients", type=int, default=d.clients, help="number of clients (default %(default)s)")
    sim.add_argument("--clients-per-round", type=int, default=d.clients_per_round, help="default %(default)s")
    sim.add_argument("--rounds", type=int, default=d.rounds, help="default %(default)s")
    sim.add_argument("--local-steps", type=int, default=d.local_steps, help="ZO steps per client and round (default %(default)s)")
    sim.add_argument("--k", type=int, default=d.k, help="candidate seeds (default %(default)s)")
    sim.add_argument("--pro", action="store_true", help="FedKSeed-Pro seed probabilities")
    sim.add_argument("--dist", choices=("gaussian", "rademacher"), default=d.dist, help="default %(default)s")
    sim.add_argument("--lr", type=float, default=d.lr, help="default %(default)s")
    sim.add_argument("--eps", type=float, default=d.eps, help="default %(default)s")
    sim.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration over categories (default %(default)s)")
    sim.add_argument("--holdout", type=int, default=d.holdout, help="categories held out for new-task Rouge-L (default %(default)s)")
    sim.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    sim.add_argument("--engine", choices=ENGINES, default=d.engine, help="default %(default)s")
    sim.add_argument("--output", default=d.output, help="output folder (default %(default)s)")
    sim.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    sim.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    sim.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (default %(default)s)")
    sim.add_argument("--eval-examples", type=int, default=d.eval_examples, help="default %(default)s")
    sim.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="Rouge-L generation length (default %(default)s)")
    sim.add_argument("--precision", choices=("fp16", "fp32"), default=d.precision,
                     help="how seed-table entries travel and are replayed (default %(default)s)")
    sim.add_argument("--backend", choices=("auto", "reference", "cpu", "triton", "cuda"), default=d.backend,
                     help="perturbation kernels (default %(default)s)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")

    app = commands.add_parser("apply", help="rebuild a fine-tuned model from a base model and a delta file")
    app.add_argument("--base", required=True, help="smollm2-135m, tiny or a local HF model folder")
    app.add_argument("--delta", required=True, help="a delta.fks file written by simulate")
    app.add_argument("--output", required=True, help="folder for the rebuilt model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()
    try:
        if args.command == "simulate":
            from .simulate import simulate

            fields = {f.name for f in dataclasses.fields(SimConfig)}
            config = SimConfig(**{k: v for k, v in vars(args).items() if k in fields})
            results = simulate(config, progress=not args.quiet)
            final = results.final
            print(f"eval loss {final['eval_loss_before']:.4f} -> {final['eval_loss_after']:.4f}; "
                  f"outputs in {config.output}")
        else:
            from .simulate import apply_delta

            print(f"model written to {apply_delta(args.base, args.delta, args.output)}")
    except UsageError as error:
        print(f"fedkseed {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _quiet_transformers() -> None:
    """Our own progress bar and messages only: transformers' load/save bars would interleave."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
