"""Instruction data for ZO fine-tuning: loading, held-out evaluation, the federated split,
length fitting, encoding, loss and greedy generation.

The built-in data set is the English Swedish Construction FAQ (PyPI ``zaragoza-construction-faq``,
CC BY 4.0, Zaragoza AB): 503 question/answer pairs in 39 categories. A user's own file works too
(:data:`DATA_FORMATS_HELP`). The split follows FedKSeed's Dolly protocol: whole categories held
out for new-task evaluation, Dirichlet(alpha) over categories into clients; ``balanced=True`` is
the official code's balanced variant with a minimum client size. Scoring lives in ``metrics``.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fedkseed.data")

FAQ_SOURCES = {"faq": "en", "faq-sv": "sv"}
FAQ_PIP = "pip install --no-deps zaragoza-construction-faq==1.2.1"
DEFAULT_CATEGORY = "default"
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
# Data with a single category holds out this share of its examples (at least one) at random.
RANDOM_HOLDOUT_SHARE = 0.1
# A prompt truncated to fit --max-length keeps at least this share of it (or all of itself when
# shorter), cutting the answer instead: an answer scored without its question teaches nothing about
# answering it.
MIN_PROMPT_SHARE = 0.25
# --max-length auto: the longest example, at most this many tokens (FedKSeed's official length).
AUTO_MAX_LENGTH_CAP = 1024
# Text beyond max_length * this many characters is cut before tokenizing (which costs ~110 MB of
# memory per MB of text). It cannot reach the kept tokens when no token spans more characters:
# SmolLM2's longest spans 81 (a run of spaces); with a tokenizer of longer tokens, the cut still
# comes from the side the token rule cuts, and is counted.
MAX_CHARS_PER_TOKEN = 128
# The official split's minimum client size (FederatedScope FedKSeed, partition_idx_labeldir).
MIN_CLIENT_SIZE = 10
# Redraws of the balanced split before giving up on the minimum client size.
BALANCED_ATTEMPTS = 1000

# Field names accepted per record: (names tried in order, required).
FIELDS = {
    "instruction": (("instruction",), True),
    "input": (("input", "context"), False),
    "output": (("output", "response"), True),
    "category": (("category",), False),
}
EXPECTED = (
    "expected JSON Lines or a JSON array of objects with string fields 'instruction' and "
    "'output' (or 'response'), optional 'input' (or 'context') and 'category'"
)
DATA_FORMATS_HELP = f"""\
"faq" (the English construction FAQ, 503 pairs in 39 categories), "faq-sv" (its Swedish original)
or a PATH to your own file, either JSON Lines (one object per line) or a JSON array of objects
(like alpaca_data.json). Each object holds:
  instruction              the task or question (required)
  input or context         extra input for the task (optional; Alpaca: input, Dolly: context)
  output or response       the reference answer (required; Alpaca: output, Dolly: response)
  category                 the task category (optional; Dolly: category)
Whole categories are held out for new-task evaluation (--holdout: a count or category names);
without categories a random {RANDOM_HOLDOUT_SHARE:.0%} of the examples is held out instead."""

# FedKSeed's official prompt (FederatedScope FedKSeed, utils_data/llm_dataset.py), used when the
# tokenizer has no chat template; the answer follows "### Response:" directly, then EOS.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response for the task request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response for the task request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    category: str


@dataclass(frozen=True)
class Split:
    """A federated split: the clients' examples, the held-out evaluation examples, the held-out
    categories, and ``note``, a line for the output when the hold-out is not by category."""

    clients: list[list[Example]]
    heldout: list[Example]
    heldout_categories: tuple[str, ...]
    note: str | None = None


# ------------------------------------------------------------------------------------ loading
def load_examples(source: str = "faq") -> list[Example]:
    """The examples of ``source``: "faq", "faq-sv" or a PATH (:data:`DATA_FORMATS_HELP`).
    Errors name the file and the line (JSON Lines) or the item index (JSON array)."""
    if source in FAQ_SOURCES:
        return _faq(FAQ_SOURCES[source])
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"--data {source!r}: neither 'faq', 'faq-sv' nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--data {path}: cannot read it as UTF-8 text ({error})") from None
    examples = [_parse(path, where, record) for where, record in _records(path, text)]
    if not examples:
        raise ValueError(f"--data {path}: holds no examples; {EXPECTED}")
    return examples


def _records(path: pathlib.Path, text: str) -> Iterator[tuple[str, Any]]:
    """(location, decoded JSON value) of every record: array items or non-blank lines."""
    if text.lstrip().startswith("["):
        items = _json(text, str(path), whole_file=True)
        if not isinstance(items, list):
            raise ValueError(f"--data {path}: {EXPECTED}")
        for index, item in enumerate(items):
            yield f"{path} item {index}", item
        return
    # Lines end at "\n" only: str.splitlines would also split at U+2028 and other separators
    # that JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield f"{path}:{number}", _json(line, f"{path}:{number}", whole_file=False)


def _json(text: str, where: str, *, whole_file: bool) -> Any:
    """``text`` decoded as JSON; every failure is one line naming ``where`` (and, in a
    ``whole_file``, the line of a syntax error): a syntax error, nesting too deep for the parser,
    an integer too long to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f":{error.lineno}" if whole_file else ""
        raise ValueError(f"--data {where}{line}: invalid JSON ({error.msg}); {EXPECTED}") from None
    except RecursionError:
        raise ValueError(f"--data {where}: JSON nested too deeply to read; {EXPECTED}") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"--data {where}: invalid JSON ({str(error).split(';')[0]}); {EXPECTED}") from None


def _parse(path: pathlib.Path, where: str, record: Any) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"--data {where}: got a JSON {type(record).__name__}; {EXPECTED}")
    values = {}
    for field, (names, required) in FIELDS.items():
        present = [name for name in names if record.get(name) is not None]
        if not present:
            if required:
                raise ValueError(f"--data {where}: missing field {' or '.join(map(repr, names))}; {EXPECTED}")
            values[field] = ""
            continue
        value = record[present[0]]
        if not isinstance(value, str):
            raise ValueError(f"--data {where}: field {present[0]!r} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:  # JSON's "\ud800": no tokenizer can take it
            raise ValueError(
                f"--data {where}: field {present[0]!r} holds a lone UTF-16 surrogate "
                f"(U+{ord(value[error.start]):04X} at character {error.start}), which is not Unicode text"
            ) from None
        values[field] = value
    values["category"] = values["category"] or DEFAULT_CATEGORY
    return Example(**values)


def _faq(lang: str) -> list[Example]:
    try:
        import zaragoza_construction_faq as faq
    except ImportError as error:
        raise RuntimeError(f"the FAQ data set is not installed: run `{FAQ_PIP}`") from error
    # load() carries the categories; the Alpaca export of the package drops them.
    return [Example(q["q"], "", q["a"], q["category"]) for q in faq.load(lang=lang)]


# --------------------------------------------------------------------------- hold-out and split
def parse_holdout(value: int | str | Sequence[str]) -> int | tuple[str, ...]:
    """``--holdout`` as a count (an int or a string of digits) or category names (a sequence, or
    one string of comma-separated names)."""
    if isinstance(value, bool):
        raise ValueError(f"--holdout must be a count or category names, got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"--holdout must be >= 0, got {value}")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        names = tuple(name.strip() for name in text.split(","))
    else:
        names = tuple(value)
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"--holdout must be a count or comma-separated category names, got {value!r}")
    return names


def split_data(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    holdout: int | str | Sequence[str],
    *,
    balanced: bool = False,
    min_size: int = MIN_CLIENT_SIZE,
) -> Split:
    """FedKSeed's split, deterministic from ``seed``.

    ``holdout`` (see :func:`parse_holdout`) whole categories are held out for new-task
    evaluation: a count drawn from ``seed``, or names. Data with a single category instead holds
    out a random :data:`RANDOM_HOLDOUT_SHARE` of its examples when the count is >= 1, and
    ``Split.note`` says so. The rest is divided among ``num_clients`` clients by Dirichlet(``alpha``)
    per category: by default each category's shares as drawn (a client left empty takes one
    example from the largest); with ``balanced`` the official code's variant (a client that holds
    its fair share N/num_clients takes no more; redrawn until every client has ``min_size``).
    Examples keep their data-set order within a client.
    """
    if num_clients < 1:
        raise ValueError(f"--clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"--alpha must be > 0, got {alpha}")
    if not examples:
        raise ValueError("split: no examples")
    holdout = parse_holdout(holdout)
    rng = np.random.default_rng(seed)
    categories = sorted({e.category for e in examples})
    note = None
    if len(categories) == 1 and isinstance(holdout, int) and holdout > 0:
        count = max(1, round(RANDOM_HOLDOUT_SHARE * len(examples)))
        held_rows = set(rng.choice(len(examples), size=count, replace=False).tolist())
        held: set[str] = set()
        note = (
            f"no categories: holding out a random {RANDOM_HOLDOUT_SHARE:.0%} of examples "
            f"({count} of {len(examples)}) for evaluation"
        )
    else:
        held = _heldout_categories(categories, holdout, rng)
        held_rows = {i for i, e in enumerate(examples) if e.category in held}
    pool = [i for i in range(len(examples)) if i not in held_rows]
    if len(pool) < num_clients:
        raise ValueError(
            f"--clients {num_clients}: only {len(pool)} examples remain for the clients after the hold-out"
        )
    by_category = [np.array([i for i in pool if examples[i].category == c]) for c in categories if c not in held]
    if balanced:
        owners = _balanced_dirichlet(by_category, len(pool), num_clients, alpha, min_size, rng)
    else:
        owners = _dirichlet(by_category, num_clients, alpha, rng)
    clients = [[examples[i] for i in sorted(indices)] for indices in owners]
    heldout = [examples[i] for i in sorted(held_rows)]
    return Split(clients, heldout, tuple(sorted(held)), note)


def split_clients(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    holdout: int | str | Sequence[str],
) -> tuple[list[list[Example]], list[Example]]:
    """(clients, heldout) of :func:`split_data` with the default (unbalanced) split."""
    split = split_data(examples, num_clients, alpha, seed, holdout)
    return split.clients, split.heldout


def _dirichlet(
    by_category: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    owners: list[list[int]] = [[] for _ in range(num_clients)]
    for members in by_category:
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            owners[client].extend(part.tolist())
    for client in range(num_clients):
        if not owners[client]:
            donor = max(range(num_clients), key=lambda c: len(owners[c]))
            owners[client].append(owners[donor].pop())
    return owners


def _balanced_dirichlet(
    by_category: list[np.ndarray],
    total: int,
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """The official balanced split: per category, Dirichlet shares with clients already at their
    fair share (total / num_clients) zeroed out; the whole split is redrawn until the smallest
    client holds ``min_size`` examples."""
    if total < min_size * num_clients:
        raise ValueError(
            f"--clients {num_clients}: {total} examples cannot give every client {min_size} (balanced split)"
        )
    for _ in range(BALANCED_ATTEMPTS):
        owners: list[list[int]] = [[] for _ in range(num_clients)]
        for category_members in by_category:
            members = category_members.copy()
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            shares = shares * np.array([len(o) < total / num_clients for o in owners])
            if shares.sum() == 0:  # every client at its fair share: spread the rest evenly
                shares = np.ones(num_clients)
            cuts = (np.cumsum(shares / shares.sum())[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owners[client].extend(part.tolist())
        if min(len(o) for o in owners) >= min_size:
            return owners
    raise ValueError(
        f"--clients {num_clients}: no balanced split with {min_size} examples per client in "
        f"{BALANCED_ATTEMPTS} draws at alpha {alpha}: use fewer clients or a larger alpha"
    )


def _heldout_categories(categories: list[str], holdout: int | tuple[str, ...], rng: np.random.Generator) -> set[str]:
    if isinstance(holdout, int):
        if not 0 <= holdout < len(categories):
            raise ValueError(f"--holdout must be between 0 and {len(categories) - 1} categories, got {holdout}")
        return {categories[i] for i in rng.choice(len(categories), size=holdout, replace=False)}
    unknown = sorted(set(holdout) - set(categories))
    if unknown:
        known = ", ".join(categories[:10]) + (", ..." if len(categories) > 10 else "")
        raise ValueError(f"--holdout: unknown categories {unknown} (the data has {known})")
    if len(set(holdout)) == len(categories):
        raise ValueError("--holdout leaves no category for the clients")
    return set(holdout)


# ------------------------------------------------------------------------- lengths and batches
@dataclass(frozen=True)
class Fitted:
    """An example's tokens within a length limit (:func:`fit_example`): the prompt (its tail when
    truncated) and the answer with its end token (its head when cut)."""

    prompt: list[int]
    answer: list[int]
    prompt_truncated: bool
    answer_cut: bool


@dataclass(frozen=True)
class Truncation:
    """How many of ``examples`` examples :func:`fit_example` truncated at ``max_length`` tokens."""

    max_length: int
    examples: int
    prompts_truncated: int
    answers_cut: int


def fit_example(tokenizer: Any, example: Example, max_length: int) -> Fitted:
    """``example`` within ``max_length`` tokens, keeping its answer: a prompt that does not fit
    beside the answer loses tokens from its left; the answer (with its end token) is cut from the
    right only when it does not fit beside the prompt's last ``ceil(MIN_PROMPT_SHARE *
    max_length)`` tokens (or the whole prompt, when shorter). The same tokens are scored by the
    loss (:func:`encode`) and start the generation (:func:`generate`).

    Text beyond ``max_length * MAX_CHARS_PER_TOKEN`` characters is cut first from the same sides
    (prompt from the left, answer from the right), so a huge record costs no more memory than one
    of that size; such an example counts as truncated."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    bounded, prompt_cut, answer_cut = _bounded(example, max_length * MAX_CHARS_PER_TOKEN)
    prompt = prompt_ids(tokenizer, bounded)
    answer = _tokens(tokenizer, _answer_text(tokenizer, bounded))
    reserve = min(len(prompt), math.ceil(MIN_PROMPT_SHARE * max_length))
    kept_answer = answer[: max_length - reserve]
    room = max_length - len(kept_answer)
    kept_prompt = prompt[-room:] if len(prompt) > room else prompt
    return Fitted(
        kept_prompt,
        kept_answer,
        prompt_cut or len(kept_prompt) < len(prompt),
        answer_cut or len(kept_answer) < len(answer),
    )


def count_truncation(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Truncation:
    """How many of ``examples`` :func:`fit_example` truncates at ``max_length``: what a run
    reports (nothing is dropped: every example keeps at least one prompt and one answer token)."""
    fitted = [fit_example(tokenizer, e, max_length) for e in examples]
    return Truncation(
        max_length,
        len(fitted),
        sum(f.prompt_truncated for f in fitted),
        sum(f.answer_cut for f in fitted),
    )


def truncation_line(fitted: Truncation, heldout: Truncation, *, auto: bool) -> str:
    """The run's one line on length fitting: the limit, how it was chosen, and the counts."""
    how = f" (auto: the longest example, at most {AUTO_MAX_LENGTH_CAP})" if auto else ""
    return (
        f"--max-length {fitted.max_length}{how}: {fitted.prompts_truncated} of {fitted.examples} prompts "
        f"truncated from the left, {fitted.answers_cut} answers cut; held-out: {heldout.prompts_truncated} "
        f"of {heldout.examples} prompts truncated"
    )


def auto_max_length(tokenizer: Any, examples: Sequence[Example], cap: int = AUTO_MAX_LENGTH_CAP) -> int:
    """``--max-length auto``: the token length of the longest of ``examples`` (prompt, answer and
    end token), at most ``cap``, so that data shorter than the cap is neither truncated nor cut."""
    if not examples:
        raise ValueError("auto_max_length: examples is empty")
    longest = 0
    for example in examples:
        fitted = fit_example(tokenizer, example, cap)  # bounded: a huge record costs no more than the cap
        if fitted.prompt_truncated or fitted.answer_cut:
            return cap
        longest = max(longest, len(fitted.prompt) + len(fitted.answer))
    return longest


def _bounded(example: Example, chars: int) -> tuple[Example, bool, bool]:
    """(``example`` with its prompt text cut to its last ``chars`` characters and its answer to
    its first ``chars``, whether the prompt was cut, whether the answer was cut)."""
    user = len(example.instruction) + len(example.input)
    prompt_cut, answer_cut = user > chars, len(example.output) > chars
    if not (prompt_cut or answer_cut):
        return example, False, False
    instruction, extra, output = example.instruction, example.input, example.output[:chars]
    if prompt_cut:  # the prompt's left is the instruction, then the input
        extra = extra[-chars:]
        instruction = instruction[len(instruction) - (chars - len(extra)) :] if chars > len(extra) else ""
    return Example(instruction, extra, output, example.category), prompt_cut, answer_cut


# ---------------------------------------------------------------------------------- encoding
def encode(tokenizer: Any, examples: Sequence[Example], max_length: int = 256) -> dict[str, torch.Tensor]:
    """Token batch for ``examples``: each fitted into ``max_length`` tokens (:func:`fit_example`:
    the prompt truncated from the left, the answer kept unless it alone exceeds the limit), the
    prompt then the answer and its end token. Right padding; ``labels`` are -100 on prompt and
    padding, so only the response (including its end-of-turn token) carries loss."""
    if max_length < 2:
        raise ValueError(f"encode: max_length must be >= 2, got {max_length}")
    if not examples:
        raise ValueError("encode: examples is empty")
    rows = []
    for example in examples:
        # Prompt and response are tokenised apart so that the prompt tokens are exactly those
        # generation starts from (fit_example, generate).
        fitted = fit_example(tokenizer, example, max_length)
        rows.append((fitted.prompt + fitted.answer, [IGNORE_INDEX] * len(fitted.prompt) + fitted.answer))
    width = max(len(ids) for ids, _ in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of ``batch`` (float32 scalar), with autograd:
    the loss first-order training calls ``.backward()`` on (``lm_loss`` is the same value
    without a graph, for ZO steps and evaluation).

    Logits are computed only from the first response position on (``logits_to_keep``): the
    vocabulary projection dominates a small model's forward, and prompt positions need none.
    """
    logits, targets = _scored_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``response_loss`` without autograd: what a ZO step's closure and evaluation need."""
    return response_loss(model, batch)


@torch.no_grad()
def example_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row of ``batch``, the mean cross-entropy over that row's response tokens (float32,
    one value per example: what bootstrap intervals over examples need)."""
    logits, targets = _scored_logits(model, batch)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if (counts == 0).any():
        raise ValueError("example_losses: a row has no response tokens (all labels are -100)")
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(targets.shape).sum(dim=1) / counts


def _scored_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, the labels they predict), [rows, positions, vocab] and [rows, positions],
    from the first response position on."""
    device = next(model.parameters()).device
    # Rows cut from a larger encode() keep its width: drop the columns that are padding in every
    # row (padding is on the right) rather than run the model over them.
    width = int(batch["attention_mask"].sum(dim=1).max())
    input_ids = batch["input_ids"][:, :width].to(device)
    attention_mask = batch["attention_mask"][:, :width].to(device)
    labels = batch["labels"][:, :width].to(device)
    scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if scored.numel() == 0:
        raise ValueError("lm_loss: the batch has no response tokens (all labels are -100)")
    # The first scored position (a token at position 0 has nothing to predict it): the logits
    # at first - 1 predict it.
    first = max(int(scored[0]), 1)
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return logits[:, :-1].float(), labels[:, first:]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 128,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[str]:
    """Greedy answers to ``examples`` (batched, left-padded prompts), special tokens stripped.
    With ``max_length``, each prompt is fitted as :func:`encode` fits it (:func:`fit_example`:
    truncated from the left when it and the reference answer exceed ``max_length``), so a
    held-out answer is generated from the same tokens its loss would be scored after."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        if max_length is None:
            prompts = [prompt_ids(tokenizer, e) for e in batch]
        else:
            prompts = [fit_example(tokenizer, e, max_length).prompt for e in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return [a.strip() for a in answers]


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the prompt for ``example``, ending where the answer begins: the chat template's
    user turn, or without a template the Alpaca prompt (with the tokenizer's own special tokens,
    as the official code tokenises it)."""
    if tokenizer.chat_template is None:
        _note_alpaca(tokenizer)
        return tokenizer(alpaca_prompt(example), add_special_tokens=True)["input_ids"]
    return _tokens(tokenizer, _chat_text(tokenizer, example, with_answer=False))


# Tokenizers whose Alpaca fallback has been logged: said once each, where the first prompt is built
# (loading a model says nothing: `fedkseed apply` loads one and builds no prompt).
_ALPACA_NOTED: weakref.WeakSet[Any] = weakref.WeakSet()


def _note_alpaca(tokenizer: Any) -> None:
    if tokenizer not in _ALPACA_NOTED:
        _ALPACA_NOTED.add(tokenizer)
        log.warning(
            "the tokenizer in %s has no chat template: prompts use FedKSeed's Alpaca template", tokenizer.name_or_path
        )


def alpaca_prompt(example: Example) -> str:
    """FedKSeed's Alpaca-style prompt for ``example`` (with or without the input section)."""
    if example.input:
        return ALPACA_PROMPT.format(instruction=example.instruction, input=example.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=example.instruction)


def _answer_text(tokenizer: Any, example: Example) -> str:
    """What follows the prompt: the answer and the end token (the template's end of turn)."""
    if tokenizer.chat_template is None:
        return example.output + (tokenizer.eos_token or "")
    prefix = _chat_text(tokenizer, example, with_answer=False)
    full = _chat_text(tokenizer, example, with_answer=True)
    if not full.startswith(prefix):
        raise ValueError("encode: the tokenizer's chat template does not extend the prompt with the answer")
    return full[len(prefix) :]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # The chat template (or the answer's end token) already holds the special tokens.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_text(tokenizer: Any, example: Example, *, with_answer: bool) -> str:
    user = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    messages = [{"role": "user", "content": user}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.output})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_answer)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad)
