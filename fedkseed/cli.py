"""The ``fedkseed`` command: ``simulate`` (a federated run: FedKSeed, FedIT, FedAvg or Ferret) and ``apply``
(FedKSeed's delta -> model).

The arguments are generated from the experiment's config dataclasses (field name, type,
default, help and choices), so an option is defined once, in ``fedkseed.experiment.config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import UsageError
from .experiment.config import ApplyConfig, SimConfig, choices_of, flag, protocol_defaults
from .ops import backend_setting
from .zo import ESTIMATORS

# FedKSeed's local steps are MeZO steps: the server draws each client's schedule of one seed per
# local step and checks uploads against it, and FedKSeed-Pro's per-step upload carries one scalar
# per step; an FZOO step takes N seeds and gives N scalars. Refused rather than run differently.
ESTIMATOR_REFUSED = (
    "--estimator {name} is not supported by fedkseed simulate: FedKSeed's seed schedule (one seed per local step, "
    "which the server checks uploads against) and FedKSeed-Pro's per-step upload (one scalar per step) cannot carry "
    "its N seeds and N scalars per step; train with ZOSGD(estimator='{name}') or ZOTrainer outside a federation"
)

# A sparse (Sparse-MeZO) mask built from the round-start global weights would cost no
# communication, but the server's replay of the seed table merges a round's steps into one pass
# per seed, catch-up replays the table's accumulated sums, and neither the wire format nor the
# checkpoint carries a density yet: refused rather than replayed wrongly.
DENSITY_REFUSED = (
    "--density {rho:g} is not supported by fedkseed simulate: the server's merged per-seed replay of a round and "
    "catch-up from the seed table cannot yet apply per-round magnitude masks, and the wire format and checkpoint do "
    "not carry a density; train sparse with ZOSGD(density={rho:g}) or ZOTrainer (zo_density) outside a federation"
)

COMMAND_DESCRIPTION = (
    "fedkseed: simulate runs a federated fine-tuning method (FedKSeed, FedIT, FedAvg or Ferret) on "
    "this machine; apply rebuilds a model from a base model and FedKSeed's delta file."
)
SIMULATE_DESCRIPTION = (
    "Federated fine-tuning of a causal LM, simulated on this machine: FedKSeed (ZO, K seeds; "
    "--pro: FedKSeed-Pro) or the first-order baselines FedIT (LoRA adapters averaged) and FedAvg "
    "(--method). Writes delta.fks (FedKSeed only), model/, losses.png, a resumable state.npz and, "
    "last, metrics.json to --output. --print-config prints the resolved settings and exits."
)


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr with exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _value_type(kind: Any) -> Any:
    """The type an option parses its text with: ``X | None`` parses as X."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return kind


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One option per field of ``config_class``: bools are switches, fields without a default
    are required, fields with choices accept only those, protocol-dependent fields say each
    protocol's default."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = _value_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag(f.name), action="store_true", help=help_text)
            continue
        options: dict[str, Any] = {"type": kind, "help": help_text}
        per_protocol = protocol_defaults(f.name)
        if f.default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
            if per_protocol is not None:
                listed = ", ".join(f"{value} ({name})" for name, value in per_protocol.items())
                options["help"] = f"{help_text} (default by --protocol: {listed})"
            else:
                options["help"] = f"{help_text} (default %(default)s)"
        allowed = choices_of(f)
        if allowed is not None:
            options["choices"] = allowed
        parser.add_argument(flag(f.name), **options)


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in fields})


def build_parser() -> argparse.ArgumentParser:
    from . import data

    parser = _Parser(prog="fedkseed", description=COMMAND_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = commands.add_parser(
        "simulate",
        help="run a federated method (FedKSeed, FedIT, FedAvg) on one machine",
        description=SIMULATE_DESCRIPTION,
        epilog="--data: " + data.DATA_FORMATS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(sim, SimConfig)
    sim.add_argument("--quiet", action="store_true", help="no progress bar")  # how to print, not what to run
    sim.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="mezo",
        help="ZO estimator of FedKSeed's local steps: mezo only (fzoo is refused with the reason)",
    )
    sim.add_argument(
        "--density",
        type=float,
        default=1.0,
        help="Sparse-MeZO mask density of the local steps: 1 (dense) only (a sparse mask is refused with the reason)",
    )
    sim.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (protocol and method defaults filled in) as JSON and exit; loads nothing",
    )
    app = commands.add_parser("apply", help=ApplyConfig.__doc__, description=ApplyConfig.__doc__)
    add_config_arguments(app, ApplyConfig)
    return parser


def final_line(final: dict[str, Any], output: str) -> str:
    """The run's last line: eval loss and Rouge-L before -> after, each with its n."""
    loss = f"eval loss {final['eval_loss_before']:.4f} -> {final['eval_loss_after']:.4f}"
    parts = [f"{loss} (n={final['eval_examples']})"]
    before, after = final.get("rouge_l_before"), final.get("rouge_l_after")
    if before and after:
        scorer = next(iter(after))
        a, b = before[scorer], after[scorer]
        parts.append(
            f"Rouge-L ({scorer}) {a['mean']:.1f} -> {b['mean']:.1f} "
            f"[95% CI {b['low']:.1f}, {b['high']:.1f}] (n={b['n']})"
        )
    else:
        parts.append("Rouge-L not scored (no held-out examples or --rouge-examples 0)")
    if "dp" in final:
        parts.append(f"client-level DP: epsilon {final['dp']['epsilon']:.3f} at delta {final['dp']['delta']:.3g}")
    return "; ".join(parts) + f"; outputs in {output}"


def resolved_settings(config: SimConfig) -> dict[str, Any]:
    """What ``--print-config`` prints: the config as metrics.json records it, plus the settings
    every party shares (``FedSpec``, with the protocol's rules: weighting, batching)."""
    return {"config": dataclasses.asdict(config), "spec": config.spec().to_dict()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:  # a bad FEDKSEED_BACKEND is refused by every command, used or not
            backend_setting()
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.command == "simulate" and args.estimator != "mezo":
            raise UsageError(ESTIMATOR_REFUSED.format(name=args.estimator))
        if args.command == "simulate" and args.density != 1.0:
            if not 0.0 < args.density < 1.0:
                raise UsageError(f"--density must be in (0, 1] (each tensor's share perturbed), got {args.density}")
            raise UsageError(DENSITY_REFUSED.format(rho=args.density))
        if args.command == "simulate" and args.print_config:
            print(json.dumps(resolved_settings(config_from_args(SimConfig, args)), indent=2))
            return 0
        _quiet_transformers()
        if args.command == "simulate":
            from .experiment.run import simulate

            config = config_from_args(SimConfig, args)
            results = simulate(config, progress=not args.quiet)
            print(final_line(results.final, config.output))
        else:
            from .experiment.apply import apply_delta

            target = config_from_args(ApplyConfig, args)
            written = apply_delta(
                target.base, target.delta, target.output, dtype=target.dtype, overwrite=target.overwrite
            )
            print(f"model written to {written}")
    except UsageError as error:
        print(f"fedkseed {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _quiet_transformers() -> None:
    """Our own progress bar and messages only: transformers' load/save bars would interleave."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
