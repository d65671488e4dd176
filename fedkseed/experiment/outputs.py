"""What a finished run writes to its output folder (delta.fks: docs/formats.md#delta), in this
order:

    delta.fks         the seed table: what ``fedkseed apply`` rebuilds the model from
                      (FedKSeed only: the first-order methods have no seed table)
    model/            the final model (safetensors in the run's dtype, config, tokenizer;
                      FedIT's adapters merged into the base weights)
    losses.png        train and eval loss per round
    metrics.json      config, one entry per round, the final block (before/after metrics);
                      written last, it is the "run complete" marker

(and, written after every round by the RunBook, state.npz: the checkpoint, see ``checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass
from typing import Any

from ..atomic import save_atomically
from .config import SimConfig

METRICS_FILE, DELTA_FILE, MODEL_DIR, PLOT_FILE = "metrics.json", "delta.fks", "model", "losses.png"
# What the per-round "train loss" is (printed above the table, in the plot and metrics.json).
TRAIN_LOSS_MEANING = (
    "mean of (L+ + L-)/2 over each sampled client's local ZO steps (the losses at the perturbed "
    "weights w +/- eps*z as its local training moves them), weighted across clients like their "
    "uploads; eval loss is the global model's"
)
FIRST_ORDER_TRAIN_LOSS_MEANING = (
    "mean over each sampled client's local first-order steps of the batch loss before the step, "
    "weighted across clients like their uploads; eval loss is the global model's"
)


def train_loss_meaning(method: str) -> str:
    return TRAIN_LOSS_MEANING if method == "fedkseed" else FIRST_ORDER_TRAIN_LOSS_MEANING


@dataclass
class Results:
    config: SimConfig
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    delta: bytes | None  # None: a first-order method (no seed table)
    model: Any
    tokenizer: Any


def write_outputs(results: Results) -> None:
    """Every output file, metrics.json last: a folder with metrics.json holds a finished run."""
    from ..models import save_model  # transformers: loaded only when a run writes its model

    output = pathlib.Path(results.config.output)
    output.mkdir(parents=True, exist_ok=True)
    unmark_complete(output)
    if results.delta is not None:
        save_atomically(output / DELTA_FILE, lambda p: p.write_bytes(results.delta))
    save_model(results.model, results.tokenizer, output / MODEL_DIR)
    plot_losses(results.rounds, results.final, output / PLOT_FILE, f"{results.config.model}, {results.config.data}")
    metrics = {"config": dataclasses.asdict(results.config), "rounds": results.rounds, "final": results.final}
    save_atomically(output / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))


def unmark_complete(output: pathlib.Path) -> None:
    """Remove metrics.json before a run changes the folder: until the run writes its own, the
    folder must not look like a finished run (a resumed one's old marker would describe fewer
    rounds than its checkpoint and model)."""
    (output / METRICS_FILE).unlink(missing_ok=True)


def plot_losses(rounds: list[dict[str, Any]], final: dict[str, Any], path: pathlib.Path, subject: str = "") -> None:
    """The eval and train loss per round; ``subject`` (model and data) goes into the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r["round"] for r in rounds]
    ax.plot(
        [0, *xs], [final["eval_loss_before"]] + [r["eval_loss"] for r in rounds], "o-", label="eval loss (global model)"
    )
    zo = final.get("method", "fedkseed") == "fedkseed"
    label = "mean (L+ + L-)/2 of local ZO steps" if zo else "mean batch loss of local steps"
    ax.plot(xs, [r["train_loss"] for r in rounds], "s--", label=f"train loss: {label}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("loss")
    method = {"fedkseed": "FedKSeed", "fedit": "FedIT (LoRA)", "fedavg": "FedAvg", "ferret": "Ferret"}
    name = method.get(final.get("method", "fedkseed"), str(final.get("method")))
    ax.set_title(f"{name}: {subject}" if subject else name, fontsize="medium")
    ax.legend(fontsize="small")
    note = "at perturbed weights" if zo else "before each step's update"
    fig.text(0.01, 0.01, f"train loss is measured {note} during local training", fontsize="x-small")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_atomically(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
