"""RunBook: the bookkeeping every engine shares around its rounds."""

from __future__ import annotations

import math
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ..fed import RoundSummary
from .checkpoint import STATE_FILE, inputs_of, load_state, save_state
from .evaluate import eval_losses, rouge
from .methods import final_model
from .outputs import Results, train_loss_meaning, unmark_complete
from .prepare import Setup
from .usage import Usage, round_usage


class RunBook:
    """The bookkeeping every engine shares around its rounds: resume from the checkpoint or
    measure the "before" metrics, one record per round (evaluated, checkpointed, printed), and
    the final block. Engines only move the bytes between the server and clients (any method:
    ``Setup.load_global`` makes the model the server's global model) and measure each client's
    local work (``usage.measure``)."""

    def __init__(self, setup: Setup, *, progress: bool) -> None:
        from tqdm import tqdm

        self.setup = setup
        config, server = setup.config, setup.server
        self.output = pathlib.Path(config.output)
        self.inputs = inputs_of(setup)  # the base model's and the data's fingerprints
        state = load_state(self.output, config, self.inputs) if config.resume else None
        self.resumed = state is not None
        if state is not None:
            try:
                server.load_state_dict(state["server"])
            # The saved server state is outside input too: whatever is wrong with it, one line.
            except Exception as error:
                raise UsageError(
                    f"--resume: {self.output / STATE_FILE} does not fit this run's server "
                    f"({type(error).__name__}: {error})"
                ) from None
        setup.load_global()
        if state is not None:
            self.rounds, self.before = state["rounds"], state["before"]
        else:
            loss, per_example = eval_losses(setup.model, setup.eval_data)
            self.rounds = []
            self.before = {"eval_loss": loss, "eval_loss_per_example": per_example, "rouge_l": rouge(setup)}
        self.steps_per_round = config.clients_per_round * config.local_steps
        self.bar = tqdm(
            total=max(0, config.rounds - server.round) * self.steps_per_round,
            file=sys.stderr,
            disable=not progress,
            unit="step",
            desc="fedkseed",
        )
        self.bar.write(f"train loss: {train_loss_meaning(config.method)}", file=sys.stdout)
        self.dp = config.dp_epsilon is not None  # the table gets an epsilon column
        _row(self.bar, None, self.dp)
        _row(
            self.bar,
            {
                "round": 0,
                "train_loss": math.nan,
                "eval_loss": self.before["eval_loss"],
                "bytes_up_per_client": 0,
                "bytes_down_per_client": 0,
                "seconds": 0.0,
                "epsilon": 0.0,
            },
            self.dp,
        )

    def step(self, loss: float) -> None:
        """One local step done (progress per step, with its loss; tqdm adds the rate and ETA)."""
        self.bar.update(1)
        if loss == loss:  # not NaN: a skipped step keeps the last loss shown
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def record(self, summary: RoundSummary, started: float, usage: Sequence[Usage]) -> dict[str, Any]:
        """Evaluate the new global model, checkpoint the run and print the round's row.
        ``usage``: what each client that trained this round measured (``usage.measure``)."""
        setup = self.setup
        setup.load_global()
        record = {
            "round": summary.round,
            "train_loss": summary.train_loss,
            "eval_loss": eval_losses(setup.model, setup.eval_data)[0],
            "bytes_up_per_client": _mean(summary.bytes_up.values()),
            "bytes_down_per_client": _mean(summary.bytes_down.values()),
            "clients": summary.accepted,
            "weights": {str(c): w for c, w in summary.weights.items()},
            "rms_bound": None if math.isinf(summary.bound) else summary.bound,  # None: unbounded
            "clipped": {str(c): f for c, f in summary.clipped.items()},
            "rejected": {str(c): reason for c, reason in summary.rejected.items()},
            **round_usage(usage),
            "seconds": time.perf_counter() - started,
            **({"epsilon": summary.epsilon} if self.dp else {}),  # spent after this round
        }
        self.rounds.append(record)
        unmark_complete(self.output)
        save_state(
            self.output,
            {
                "identity": setup.config.run_identity(),
                "inputs": self.inputs,
                "server": setup.server.state_dict(),
                "rounds": self.rounds,
                "before": self.before,
            },
        )
        _row(self.bar, record, self.dp)
        return record

    def finish(self) -> Results:
        """The final block (before/after metrics, each with its n) and the run's results."""
        self.bar.close()
        setup, config = self.setup, self.setup.config
        setup.load_global()
        loss, per_example = eval_losses(setup.model, setup.eval_data)
        rouge_after = rouge(setup)
        final = {
            "method": config.method,
            "eval_loss_before": self.before["eval_loss"],
            "eval_loss_after": loss,
            "eval_examples": len(per_example),
            "eval_loss_before_per_example": self.before["eval_loss_per_example"],
            "eval_loss_after_per_example": per_example,
            "rouge_l_before": self.before["rouge_l"],
            "rouge_l_after": rouge_after,
            "heldout_examples": 0 if rouge_after is None else next(iter(rouge_after.values()))["n"],
            "train_loss_meaning": train_loss_meaning(config.method),
            "data": setup.data,
            "fingerprint": setup.fingerprint,
        }
        if self.dp:
            final["dp"] = setup.server.privacy.report(setup.server.round)
        # delta.fks is FedKSeed's (a seed table); the first-order methods' product is the model.
        delta = None if config.first_order else setup.server.delta(setup.fingerprint)
        return Results(config, self.rounds, final, delta, final_model(setup.model, config.method), setup.tokenizer)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def _row(bar: Any, record: dict[str, Any] | None, dp: bool) -> None:
    if record is None:
        line = f"{'round':>5}  {'train loss':>10}  {'eval loss':>9}  {'up B':>7}  {'down B':>7}  {'seconds':>7}"
        line += f"  {'epsilon':>7}" if dp else ""
    else:
        line = (
            f"{record['round']:>5}  {record['train_loss']:>10.4f}  {record['eval_loss']:>9.4f}  "
            f"{record['bytes_up_per_client']:>7.0f}  {record['bytes_down_per_client']:>7.0f}  {record['seconds']:>7.1f}"
        )
        line += f"  {record['epsilon']:>7.3f}" if dp else ""
    bar.write(line, file=sys.stdout)
