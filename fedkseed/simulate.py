"""``fedkseed simulate``: a FedKSeed run on one machine, its metrics, plot, delta and model.

An *engine* is a function ``engine(config) -> Results``: it runs the rounds (the local engine
calls Server and Client objects in this process; a Flower engine would run them as a Flower
app) and returns the same Results, which ``simulate`` writes to the output folder:

    metrics.json      config, one entry per round, the final block (before/after metrics)
    delta.fks         the seed table: what ``fedkseed apply`` rebuilds the model from
    model/            the final model (safetensors, config, tokenizer)
    losses.png        train and eval loss per round
    state.npz         the checkpoint --resume continues from: arrays + JSON, no pickle (rewritten atomically)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import data as D
from .atomic import save_atomically
from .fed import Client, FedSpec, Replica, RoundSummary, Server
from .fed.wire import PRECISIONS
from .ops import BACKENDS
from .paramset import ParamSet

log = logging.getLogger("fedkseed.simulate")
STATE_FILE, METRICS_FILE, DELTA_FILE, MODEL_DIR, PLOT_FILE = (
    "state.npz", "metrics.json", "delta.fks", "model", "losses.png"
)
STATE_FORMAT = 1  # version of the checkpoint layout written by save_state
ENGINES = ("local", "flower")
EVAL_BATCH = 8


class UsageError(ValueError):
    """Bad options, paths or inputs: reported as one line, exit code 2."""


@dataclass(frozen=True)
class SimConfig:
    model: str = "smollm2-135m"
    data: str = "faq"
    # Defaults: a visible improvement of SmolLM2-135M in a few minutes on a 2-core CPU
    # (measured: 300 ZO steps at batch 2 x 64 tokens, ~2.5 min at load 2, eval loss -1.9%;
    # Rademacher replays K seeds ~20x cheaper than Gaussian). Sequential steps (rounds x
    # local steps) drive progress; lr 1e-4 diverges, lr 1e-5 barely moves, eps 1e-2 beats 1e-3.
    # FedKSeed's official shape is K=4096, 200 steps, lr 3e-7, eps 5e-4.
    clients: int = 20
    clients_per_round: int = 2
    rounds: int = 5
    local_steps: int = 30
    k: int = 1024
    pro: bool = False
    dist: str = "rademacher"
    lr: float = 3e-5
    eps: float = 1e-2
    alpha: float = 0.5
    holdout: int = 1
    seed: int = 0
    engine: str = "local"
    output: str = "runs/fedkseed"
    resume: bool = False
    batch_size: int = 2
    max_length: int = 64
    eval_examples: int = 8
    max_new_tokens: int = 64
    precision: str = "fp16"
    backend: str = "auto"

    def __post_init__(self) -> None:
        positive = ("clients", "clients_per_round", "rounds", "local_steps", "k", "batch_size", "eval_examples", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.max_length < 8:
            raise UsageError(f"--max-length must be >= 8, got {self.max_length}")
        if self.holdout < 0:
            raise UsageError(f"--holdout must be >= 0, got {self.holdout}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError(f"--alpha must be > 0, got {self.alpha}")
        choices = {"engine": ENGINES, "precision": PRECISIONS, "backend": BACKENDS, "dist": ("gaussian", "rademacher")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        try:
            self.spec()
        except ValueError as error:
            raise UsageError(str(error)) from None

    def spec(self) -> FedSpec:
        return FedSpec(
            num_clients=self.clients, clients_per_round=self.clients_per_round, k=self.k,
            local_steps=self.local_steps, lr=self.lr, eps=self.eps, dist=self.dist,
            batch_size=self.batch_size, pro=self.pro, precision=self.precision, seed=self.seed,
        )

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one (rounds may grow)."""
        skip = {"rounds", "resume", "output", "backend", "engine"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class Setup:
    """Everything a run prepares from its config: model, data, server and clients."""

    config: SimConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    server: Server
    replica: Replica
    clients: list[Client]
    eval_data: list[dict[str, torch.Tensor]]
    heldout: list[D.Example]


@dataclass
class Results:
    config: SimConfig
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    delta: bytes
    model: Any
    tokenizer: Any


# ------------------------------------------------------------------------------- preparation
def prepare(config: SimConfig) -> Setup:
    from .models import load_model

    try:
        model, tokenizer = load_model(config.model)
        examples = D.load_examples(config.data)
        per_client, heldout = D.split_clients(examples, config.clients, config.alpha, config.seed, config.holdout)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    per_client, evaluation = _carve_eval(per_client, config.eval_examples)
    encoded = [_encode_scored(tokenizer, ex, config.max_length) for ex in per_client]
    spec = config.spec()
    server = Server(spec, [int(e["input_ids"].shape[0]) for e in encoded])
    replica = Replica(model, server.pool, spec.lr32, spec.dist, config.backend)
    clients = [Client(i, spec, replica, e, D.lm_loss) for i, e in enumerate(encoded)]
    eval_data = [
        _encode_scored(tokenizer, evaluation[i : i + EVAL_BATCH], config.max_length)
        for i in range(0, len(evaluation), EVAL_BATCH)
    ]
    fingerprint = ParamSet.of(model).fingerprint(values=True)
    return Setup(config, model, tokenizer, fingerprint, server, replica, clients, eval_data, heldout)


def _encode_scored(tokenizer: Any, examples: list[D.Example], max_length: int) -> dict[str, torch.Tensor]:
    """``encode`` without the rows whose prompt alone fills ``max_length`` (nothing to score)."""
    batch = D.encode(tokenizer, examples, max_length)
    keep = (batch["labels"] != D.IGNORE_INDEX).any(dim=1)
    if not keep.any():
        raise UsageError(f"--max-length {max_length} leaves no answer token in some client's examples: raise it")
    return {name: tensor[keep] for name, tensor in batch.items()}


def _carve_eval(per_client: list[list[D.Example]], count: int) -> tuple[list[list[D.Example]], list[D.Example]]:
    """Take ``count`` evaluation examples round-robin from the clients' data (never a client's
    last example), so the eval loss measures held-back examples of the training tasks."""
    pools = [list(c) for c in per_client]
    taken: list[D.Example] = []
    while len(taken) < count:
        moved = False
        for pool in pools:
            if len(taken) < count and len(pool) > 1:
                taken.append(pool.pop())
                moved = True
        if not moved:
            break
    if not taken:
        raise UsageError("not enough examples to hold any back for evaluation")
    return pools, taken


def eval_loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean response-token loss over the evaluation batches (token-weighted)."""
    total = tokens = 0.0
    for batch in batches:
        n = float((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
        total += float(D.lm_loss(model, batch)) * n
        tokens += n
    return total / tokens


def rouge(setup: Setup) -> float | None:
    """Rouge-L (%) on the held-out categories (new-task generalisation); None without them."""
    if not setup.heldout:
        return None
    examples = setup.heldout[: setup.config.eval_examples]
    return D.rouge_l(setup.model, setup.tokenizer, examples, setup.config.max_new_tokens)


# ----------------------------------------------------------------------------- checkpointing
def _split_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` with every numpy array replaced by a reference into ``arrays`` (JSON-ready)."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, dict):
        return {k: _split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join_arrays(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def save_state(output: pathlib.Path, state: dict[str, Any]) -> None:
    """The checkpoint as one .npz: numeric arrays plus the rest as JSON (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps({"format": STATE_FORMAT, "state": _split_arrays(state, arrays)})
    arrays["__json__"] = np.frombuffer(document.encode(), dtype=np.uint8)

    def write(path: pathlib.Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    save_atomically(output / STATE_FILE, write)


def load_state(output: pathlib.Path, config: SimConfig) -> dict[str, Any] | None:
    path = output / STATE_FILE
    if not path.is_file():
        log.info("no checkpoint in %s: starting from round 1", output)
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            document = json.loads(arrays["__json__"].tobytes())
            if document.get("format") != STATE_FORMAT:
                raise UsageError(f"--resume: {path} has checkpoint format {document.get('format')!r}, expected {STATE_FORMAT}")
            state = _join_arrays(document["state"], {k: arrays[k] for k in arrays.files})
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({error})") from None
    if state["identity"] != config.run_identity():
        raise UsageError(f"--resume: {path} was saved by a run with other settings")
    return state


# ----------------------------------------------------------------------- what every engine does
class RunBook:
    """The bookkeeping every engine shares around its rounds: resume from the checkpoint or
    measure the "before" metrics, one record per round (evaluated, checkpointed, printed), and
    the final block. Engines only move the bytes between ``Server`` and clients."""

    def __init__(self, setup: Setup, *, progress: bool) -> None:
        from tqdm import tqdm

        self.setup = setup
        config, server = setup.config, setup.server
        self.output = pathlib.Path(config.output)
        state = load_state(self.output, config) if config.resume else None
        self.resumed = state is not None
        if state is not None:
            server.load_state_dict(state["server"])
        setup.replica.build(server.table)
        if state is not None:
            self.rounds, self.before = state["rounds"], state["before"]
        else:
            self.rounds = []
            self.before = {"eval_loss": eval_loss(setup.model, setup.eval_data), "rouge_l": rouge(setup)}
        self.steps_per_round = config.clients_per_round * config.local_steps
        self.bar = tqdm(total=max(0, config.rounds - server.round) * self.steps_per_round, file=sys.stderr,
                        disable=not progress, unit="step", desc="fedkseed")
        _row(self.bar, None)
        _row(self.bar, {"round": 0, "train_loss": math.nan, "eval_loss": self.before["eval_loss"],
                        "bytes_up_per_client": 0, "bytes_down_per_client": 0, "seconds": 0.0})

    def record(self, summary: RoundSummary, started: float) -> dict[str, Any]:
        """Evaluate the new global model, checkpoint the run and print the round's row."""
        setup = self.setup
        setup.replica.build(setup.server.table)
        record = {
            "round": summary.round,
            "train_loss": summary.train_loss,
            "eval_loss": eval_loss(setup.model, setup.eval_data),
            "bytes_up_per_client": _mean(summary.bytes_up.values()),
            "bytes_down_per_client": _mean(summary.bytes_down.values()),
            "clients": summary.accepted,
            "seconds": time.perf_counter() - started,
        }
        self.rounds.append(record)
        save_state(self.output, {"identity": setup.config.run_identity(), "server": setup.server.state_dict(),
                                 "rounds": self.rounds, "before": self.before})
        _row(self.bar, record)
        return record

    def finish(self) -> Results:
        """The final block (before/after metrics) and the run's results."""
        self.bar.close()
        setup, config = self.setup, self.setup.config
        setup.replica.build(setup.server.table)
        final = {
            "eval_loss_before": self.before["eval_loss"],
            "eval_loss_after": eval_loss(setup.model, setup.eval_data),
            "rouge_l_before": self.before["rouge_l"],
            "rouge_l_after": rouge(setup),
            "heldout_examples": min(len(setup.heldout), config.eval_examples),
            "eval_examples": sum(int(b["input_ids"].shape[0]) for b in setup.eval_data),
            "fingerprint": setup.fingerprint,
        }
        return Results(config, self.rounds, final, setup.server.delta(setup.fingerprint), setup.model,
                       setup.tokenizer)


# ------------------------------------------------------------------------------ local engine
def run_local(config: SimConfig, *, progress: bool = True) -> Results:
    """The local engine: every client in this process, one shared Replica (each client still
    merges its own catch-up table; the replica rebuilds only when the table changes)."""
    setup = prepare(config)
    book = RunBook(setup, progress=progress)
    server = setup.server
    if book.resumed:
        for client in setup.clients:  # the current table agrees with the table a client
            client.table = server.table.copy()  # holds on every entry its catch-up leaves out
            client.synced = int(server.synced[client.client_id])
    while server.round < config.rounds:
        started = time.perf_counter()
        for c in server.begin_round():
            download = server.download(c)
            try:
                upload = setup.clients[c].train(download)
            except Exception as error:  # a failed client loses nothing: it is simply absent
                log.warning("round %d: client %d failed: %s", server.round + 1, c, error)
            else:
                server.receive(upload)
            book.bar.update(config.local_steps)
        book.record(server.end_round(), started)
    return book.finish()


def run_flower(config: SimConfig, *, progress: bool = True) -> Results:
    """The Flower engine (simulation runtime, Ray backend): the optional extra fedkseed[flower]."""
    try:
        from .flower.engine import run_flower as run
    except ImportError as error:
        raise UsageError(f"--engine flower needs Flower: pip install 'fedkseed[flower]' ({error})") from None
    return run(config, progress=progress)


ENGINE_FUNCTIONS: dict[str, Callable[..., Results]] = {"local": run_local, "flower": run_flower}


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def _row(bar: Any, record: dict[str, Any] | None) -> None:
    if record is None:
        line = f"{'round':>5}  {'train loss':>10}  {'eval loss':>9}  {'up B':>7}  {'down B':>7}  {'seconds':>7}"
    else:
        line = (
            f"{record['round']:>5}  {record['train_loss']:>10.4f}  {record['eval_loss']:>9.4f}  "
            f"{record['bytes_up_per_client']:>7.0f}  {record['bytes_down_per_client']:>7.0f}  {record['seconds']:>7.1f}"
        )
    bar.write(line, file=sys.stdout)


# ----------------------------------------------------------------------------------- outputs
def simulate(config: SimConfig, *, progress: bool = True) -> Results:
    """Run ``config`` on its engine and write the output folder."""
    results = ENGINE_FUNCTIONS[config.engine](config, progress=progress)
    write_outputs(results)
    return results


def write_outputs(results: Results) -> None:
    output = pathlib.Path(results.config.output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = {"config": dataclasses.asdict(results.config), "rounds": results.rounds, "final": results.final}
    save_atomically(output / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    save_atomically(output / DELTA_FILE, lambda p: p.write_bytes(results.delta))
    save_model(results.model, results.tokenizer, output / MODEL_DIR)
    plot_losses(results.rounds, results.final, output / PLOT_FILE)


def save_model(model: Any, tokenizer: Any, folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def plot_losses(rounds: list[dict[str, Any]], final: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot([0] + xs, [final["eval_loss_before"]] + [r["eval_loss"] for r in rounds], "o-", label="eval loss (global model)")
    ax.plot(xs, [r["train_loss"] for r in rounds], "s--", label="train loss (clients, mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_title("FedKSeed")
    ax.legend()
    fig.tight_layout()
    save_atomically(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ------------------------------------------------------------------------------------- apply
def apply_delta(base: str, delta: str | os.PathLike, output: str | os.PathLike) -> pathlib.Path:
    """Rebuild a fine-tuned model from a base model spec and a delta file, bit-identical to the
    simulation's final model; refuses a base whose parameters (layout or values) differ."""
    from .fed import SeedPool, wire
    from .models import load_model

    path = pathlib.Path(delta)
    if not path.is_file():
        raise UsageError(f"--delta: {path} is not a file")
    try:
        table = wire.decode_table(path.read_bytes())
    except wire.WireError as error:
        raise UsageError(f"--delta: {error}") from None
    try:
        model, tokenizer = load_model(base)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    fingerprint = ParamSet.of(model).fingerprint(values=True)
    if fingerprint != table.fingerprint:
        raise UsageError(
            f"--base {base!r} does not match the delta: parameter fingerprint (layout and values) {fingerprint[:16]}... "
            f"!= {table.fingerprint[:16]}..."
        )
    replica = Replica(model, SeedPool(table.pool_seed, table.k), table.lr, table.dist)
    replica.build(wire.dense(table.indices, table.values, table.k))
    save_model(model, tokenizer, pathlib.Path(output))
    return pathlib.Path(output)
