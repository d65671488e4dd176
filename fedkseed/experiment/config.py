"""What an experiment is configured by: ``SimConfig`` (``fedkseed simulate``) and ``ApplyConfig``
(``fedkseed apply``), with their validation.

Each field carries its command-line help (``metadata["help"]``) and, where the value is one of a
set, the set's owner (``metadata["choices"]``: a function returning the allowed values, so they
are read from the module that defines them, at the time they are needed). ``fedkseed.cli``
generates its arguments from these definitions; nothing here knows about argparse.

Fields whose default is ``None`` take their value from the run's protocol (``PROTOCOLS``): an
explicit value always wins, and a constructed config holds the resolved values, so
``metrics.json``, the checkpoint and the Flower run config see the settings that actually ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import data as D
from .. import stream as S
from ..checks import check_int, check_real
from ..errors import UsageError
from ..fed import FedSpec
from ..fed.privacy import DEFAULT_CLIP_PER_STEP, DELTA_EXPONENT, Privacy
from ..fed.robust import AGGREGATES, parse_upload_bound
from ..fed.wire import PRECISIONS
from ..models import DTYPES
from . import engines
from .attacks import ATTACKS, parse_rounds
from .methods import FIRST_ORDER, FIRST_ORDER_LR, METHODS

# The protocols: the settings --protocol fills in where the command line leaves them unset.
# "demo": a visible improvement of SmolLM2-135M in a few minutes on a 2-core CPU (measured: 300
# ZO steps at batch 2 x whole examples, 536 CPU-s, eval loss 4.027 -> 3.977, README's demo run;
# Rademacher replays K seeds ~20x cheaper than Gaussian). Sequential steps (rounds x local steps) drive progress;
# lr 1e-4 diverges, lr 1e-5 barely moves, eps 1e-2 beats 1e-3.
# "paper": FedKSeed's official settings (Qin et al. 2024 and its FederatedScope code; every value
# with its source in docs/protocol-paper.md, which a test checks against this table): 200
# clients, 10 per round, 60 rounds (Dolly-style data, split over categories, as the FAQ data is;
# Natural-Instructions-style data takes 40: --rounds 40), K = 4096, tau = 200, lr 3e-7, eps 5e-4,
# batch 1, Gaussian directions, max length 1024, Rouge-L on every held-out example with 128 new
# tokens, no upload bound and fp32 seed-table values (the official code has neither); plus the
# protocol choices below (PAPER_RULES).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "demo": dict(
        clients=20,
        clients_per_round=2,
        rounds=5,
        k=1024,
        local_steps=30,
        lr=3e-5,
        eps=1e-2,
        dist="rademacher",
        batch_size=2,
        max_new_tokens=64,
        rouge_examples="8",
        max_length="auto",
        clip="auto",
        precision="fp16",
    ),
    "paper": dict(
        clients=200,
        clients_per_round=10,
        rounds=60,
        k=4096,
        local_steps=200,
        lr=3e-7,
        eps=5e-4,
        dist="gaussian",
        batch_size=1,
        max_new_tokens=128,
        rouge_examples="all",
        max_length=1024,
        clip="off",
        precision="fp32",
    ),
}
# What --protocol paper changes beyond defaults (no option overrides these): aggregation weights
# count batches, local batches walk shuffled epochs without replacement, and the Dirichlet split
# is the official balanced one with at least data.MIN_CLIENT_SIZE examples per client.
PAPER_RULES = "batch-count weights, shuffled epochs without replacement, balanced Dirichlet split"
ALL = "all"
AUTO = "auto"
MIN_MAX_LENGTH = 8  # tokens: the least --max-length (a 2-token prompt tail and a 6-token answer head)


def option(
    default: Any = dataclasses.MISSING, help: str = "", choices: Callable[[], Sequence[str]] | None = None
) -> Any:
    """A config field with its command-line help and, optionally, the owner of its choices."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of a config field, or None when any value of its type is allowed."""
    owner = f.metadata.get("choices")
    return None if owner is None else tuple(owner())


def flag(name: str) -> str:
    """The command-line spelling of a field name (``clients_per_round`` -> ``--clients-per-round``)."""
    return "--" + name.replace("_", "-")


def protocol_defaults(name: str) -> dict[str, Any] | None:
    """Per protocol, the value a protocol-dependent field takes when unset; None for other fields."""
    if name not in PROTOCOLS["demo"]:
        return None
    return {protocol: values[name] for protocol, values in PROTOCOLS.items()}


def _validate_choices(config: Any) -> None:
    for f in dataclasses.fields(config):
        allowed = choices_of(f)
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            raise UsageError(f"{flag(f.name)} must be one of {', '.join(allowed)}, got {value!r}")


def _count_or_all(name: str, value: Any) -> str:
    """``value`` as "all" or a decimal count >= 0 (an int or its text)."""
    text = "" if isinstance(value, bool) else str(value).strip().lower()
    if text == ALL or text.isdigit():
        return text if text == ALL else str(int(text))
    raise UsageError(f"{flag(name)} must be 'all' or an integer >= 0, got {value!r}")


def _auto_or_length(value: Any) -> str:
    """--max-length as "auto" or a decimal count of at least MIN_MAX_LENGTH tokens."""
    text = "" if isinstance(value, bool) else str(value).strip().lower()
    if text == AUTO or (text.isdigit() and int(text) >= MIN_MAX_LENGTH):
        return text if text == AUTO else str(int(text))
    raise UsageError(f"--max-length must be 'auto' or an integer >= {MIN_MAX_LENGTH}, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """A federated fine-tuning run simulated on one machine."""

    method: str = option(
        "fedkseed",
        "federated method: fedkseed (ZO, K seeds), fedit (LoRA adapters averaged), fedavg, ferret (first-order, seeds)",
        lambda: METHODS,
    )
    protocol: str = option("demo", f"where unset settings come from: demo, or paper ({PAPER_RULES})", PROTOCOLS.keys)
    model: str = option("smollm2-135m", "smollm2-135m, tiny or a local HF model folder")
    data: str = option("faq", "faq, faq-sv or a JSON / JSON Lines file of Alpaca or Dolly records (see below)")
    dtype: str = option("fp32", "model weights' dtype; bf16/fp16 train with stochastic rounding", lambda: tuple(DTYPES))
    clients: int | None = option(None, "number of clients")
    clients_per_round: int | None = option(None, "clients sampled per round")
    rounds: int | None = option(None, "federated rounds (paper: 60 for Dolly-style data; 40 for Natural Instructions)")
    local_steps: int | None = option(None, "local optimizer steps (batches) per client and round")
    k: int | None = option(None, "candidate seeds")
    pro: bool = option(False, "FedKSeed-Pro seed probabilities")
    dist: str | None = option(None, "perturbation distribution", lambda: tuple(S.DISTRIBUTIONS))
    lr: float | None = option(
        None, "learning rate; fedit and fedavg default to 1e-4 and 1e-5 (AdamW) whatever the protocol"
    )
    eps: float | None = option(None, "perturbation scale")
    weight_decay: float = option(0.0, "decoupled weight decay of the local steps (ZO steps, or AdamW's)")
    lora_rank: int = option(8, "fedit: LoRA rank")
    lora_alpha: float = option(16.0, "fedit: LoRA alpha (the adapter is scaled by alpha / rank)")
    lora_targets: str = option("q_proj,v_proj", "fedit: comma-separated names of the modules LoRA adapts")
    aggregate: str = option("mean", "per-seed aggregate of the round's uploads", lambda: AGGREGATES)
    clip: str | None = option(
        None, "bound on an upload's per-step RMS: auto (2x the median over clients, one value each), a number, or off"
    )
    shared_seeds: bool = option(
        False, "every client of a round follows the same seed schedule, so median/trimmed-mean compare clients per seed"
    )
    byzantine: int = option(0, "clients of each round's sample that send adversarial uploads (simulation)")
    attack: str = option("scale", "what the --byzantine clients send", lambda: ATTACKS)
    attack_rounds: str = option("all", "rounds in which the --byzantine clients attack: all, or e.g. 1 or 1,3")
    dp_epsilon: float | None = option(
        None, "client-level differential privacy of the released seed table: the run's epsilon (docs/privacy.md)"
    )
    dp_delta: float | None = option(None, f"DP: delta (default clients^-{DELTA_EXPONENT:g})")
    dp_clip: float | None = option(
        None,
        f"DP: L2 bound on each client's upload, its per-seed sums (default {DEFAULT_CLIP_PER_STEP:g} * "
        "sqrt(local steps)); replaces --clip",
    )
    dp_noise_seed: int | None = option(
        None, "DP: derive the client sampling and the noise from this seed (reproducible; UNSAFE outside simulations)"
    )
    alpha: float = option(0.5, "Dirichlet concentration over categories")
    holdout: str = option("1", "held-out categories for new-task Rouge-L: a count, or comma-separated names")
    seed: int = option(0, "seed of every draw of the run")
    engine: str = option("local", "what runs the rounds", engines.names)
    output: str = option("runs/fedkseed", "output folder (refused when it holds files, unless --resume or --overwrite)")
    resume: bool = option(False, "continue the run whose checkpoint is in --output (same settings, --rounds may grow)")
    overwrite: bool = option(False, "replace the run in --output")
    batch_size: int | None = option(None, "examples per ZO step")
    max_length: str | None = option(
        None,
        f"tokens per example, or auto (the longest example, at most {D.AUTO_MAX_LENGTH_CAP}); a longer example "
        "loses prompt tokens from the left, its answer only when that alone does not fit (counted)",
    )
    eval_examples: int = option(8, "examples held back from the clients for the eval loss")
    rouge_examples: str | None = option(None, "held-out examples scored by Rouge-L: a count, 0 (none) or all")
    max_new_tokens: int | None = option(None, "Rouge-L generation length")
    precision: str | None = option(None, "how seed-table entries travel and are replayed", lambda: PRECISIONS)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:  # first: the defaults below come from it
            raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.lr is None and self.method in FIRST_ORDER_LR:
            object.__setattr__(self, "lr", FIRST_ORDER_LR[self.method])
        if self.clip is None and self.dp_epsilon is not None:  # not the protocol's: --dp-clip replaces it
            object.__setattr__(self, "clip", "auto")
        for name, value in PROTOCOLS[self.protocol].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "holdout", self._holdout())
        object.__setattr__(self, "rouge_examples", _count_or_all("rouge_examples", self.rouge_examples))
        object.__setattr__(self, "clip", self._clip())
        positive = (
            "clients",
            "clients_per_round",
            "rounds",
            "local_steps",
            "k",
            "batch_size",
            "eval_examples",
            "max_new_tokens",
        )
        for name in positive:
            check_int(flag(name), getattr(self, name), 1, error=UsageError)
        object.__setattr__(self, "max_length", _auto_or_length(self.max_length))
        check_real("--alpha", self.alpha, positive=True, error=UsageError)
        check_real("--weight-decay", self.weight_decay, error=UsageError)
        check_int("--byzantine", self.byzantine, 0, error=UsageError)
        if self.byzantine >= self.clients_per_round:
            raise UsageError(
                f"--byzantine {self.byzantine} must be below --clients-per-round {self.clients_per_round} "
                "(a round needs at least one honest client)"
            )
        try:
            rounds = parse_rounds(self.attack_rounds)
        except ValueError as error:
            raise UsageError(f"--{error}".replace("--attack rounds", "--attack-rounds")) from None
        object.__setattr__(self, "attack_rounds", ALL if rounds is None else ",".join(map(str, rounds)))
        self._check_method()
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other: continue the run, or replace it")
        _validate_choices(self)
        try:
            self.spec()
        except ValueError as error:
            raise UsageError(str(error)) from None
        self._check_privacy()

    def _check_method(self) -> None:
        """What only FedKSeed does, refused for the first-order methods (one line each)."""
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        targets = tuple(t.strip() for t in str(self.lora_targets).split(","))
        if not all(targets):
            raise UsageError(f"--lora-targets must be comma-separated module names, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", ",".join(targets))
        check_int("--lora-rank", self.lora_rank, 1, error=UsageError)
        check_real("--lora-alpha", self.lora_alpha, positive=True, error=UsageError)
        if self.method == "ferret":
            self._check_ferret()
        if self.method not in FIRST_ORDER:
            return
        refused = {
            "--pro": self.pro,
            f"--byzantine {self.byzantine}": self.byzantine,
            f"--aggregate {self.aggregate}": self.aggregate != "mean",
            "--shared-seeds": self.shared_seeds,
            f"--dtype {self.dtype}": self.dtype != "fp32",
        }
        for what, given in refused.items():
            if given:
                raise UsageError(
                    f"{what} is FedKSeed's (--method fedkseed); --method {self.method} trains float32 weights "
                    "and averages them"
                )

    def _check_ferret(self) -> None:
        """Ferret projects onto the round's shared seeds (``shared_seeds`` is set for it) and trains
        float32 weights with first-order steps; what does not fit that is refused in one line."""
        object.__setattr__(self, "shared_seeds", True)
        refused = {
            "--pro": self.pro,
            f"--dtype {self.dtype}": self.dtype != "fp32",
            "--dp-epsilon": self.dp_epsilon is not None,
        }
        for what, given in refused.items():
            if given:
                raise UsageError(
                    f"{what} is not supported with --method ferret (first-order steps on float32 weights, "
                    "projected onto the round's shared seeds)"
                )

    def _check_privacy(self) -> None:
        """--dp-*: checked by ``Privacy`` itself (its errors name the option); the defaults it
        resolves (delta, clip) are recorded here, so metrics.json shows what ran."""
        if self.dp_epsilon is None:
            names = ("dp_delta", "dp_clip", "dp_noise_seed")
            dependent = [flag(name) for name in names if getattr(self, name) is not None]
            if dependent:
                raise UsageError(f"{dependent[0]} needs --dp-epsilon (the privacy budget that turns DP on)")
            return
        if self.first_order:
            raise UsageError(
                f"--dp-epsilon is FedKSeed's (--method fedkseed): its noise goes on the seed table; --method "
                f"{self.method} averages weights"
            )
        if self.clip != "auto":
            raise UsageError(
                f"--clip {self.clip} is refused with --dp-epsilon: DP bounds every upload itself (its L2 norm "
                "to --dp-clip), which replaces --clip; leave --clip unset"
            )
        try:
            privacy = self.privacy()
        except ValueError as error:
            raise UsageError(f"--{error}") from None
        object.__setattr__(self, "dp_delta", privacy.delta)
        object.__setattr__(self, "dp_clip", privacy.clip)

    def privacy(self) -> Privacy | None:
        """The run's DP mechanism (``--dp-epsilon``), or None."""
        if self.dp_epsilon is None:
            return None
        return Privacy(self.spec(), self.rounds, self.dp_epsilon, self.dp_delta, self.dp_clip, self.dp_noise_seed)

    @property
    def first_order(self) -> bool:
        return self.method in FIRST_ORDER

    def _holdout(self) -> str:
        """--holdout as given on the command line: a count ("2") or names ("a,b")."""
        try:
            parsed = D.parse_holdout(self.holdout)
        except ValueError as error:
            raise UsageError(str(error)) from None
        return str(parsed) if isinstance(parsed, int) else ",".join(parsed)

    def _clip(self) -> str:
        """--clip as "auto", "off" or a positive number's text ("none" and "inf" mean "off")."""
        text = str(self.clip).strip().lower()
        try:
            parsed = parse_upload_bound("off" if text in ("none", "inf") else text)
        except ValueError as error:
            raise UsageError(f"--{error}") from None
        return parsed if isinstance(parsed, str) else repr(parsed)

    @property
    def paper(self) -> bool:
        return self.protocol == "paper"

    def max_length_tokens(self) -> int | None:
        """--max-length in tokens: None for auto (the data decides: ``data.auto_max_length``)."""
        return None if self.max_length == AUTO else int(self.max_length)

    def rouge_limit(self) -> int | None:
        """How many held-out examples Rouge-L scores: None for all of them."""
        return None if self.rouge_examples == ALL else int(self.rouge_examples)

    def spec(self) -> FedSpec:
        return FedSpec(
            num_clients=self.clients,
            clients_per_round=self.clients_per_round,
            k=self.k,
            local_steps=self.local_steps,
            lr=self.lr,
            eps=self.eps,
            dist=self.dist,
            batch_size=self.batch_size,
            pro=self.pro,
            precision=self.precision,
            seed=self.seed,
            aggregate=self.aggregate,
            clip=self.clip,
            weighting="batches" if self.paper else "examples",
            batching="epochs" if self.paper else "draws",
            weight_decay=self.weight_decay,
            shared_seeds=self.shared_seeds,
        )

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one (rounds may grow)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_FREE}


# Settings that do not change what a run computes: a resumed run may give them other values.
RUN_FREE = frozenset({"rounds", "resume", "overwrite", "output", "engine"})


@dataclass(frozen=True)
class ApplyConfig:
    """Rebuild a fine-tuned model from a base model and a delta file."""

    base: str = option(help="smollm2-135m, tiny or a local HF model folder")
    delta: str = option(help="a delta.fks file written by simulate")
    output: str = option(help="folder for the rebuilt model (not the base folder, nor inside it)")
    dtype: str = option("fp32", "dtype the base is loaded in: the run's --dtype", lambda: tuple(DTYPES))
    overwrite: bool = option(False, "replace --output when it holds files")

    def __post_init__(self) -> None:
        _validate_choices(self)
