"""The metrics of a global model: eval loss on held-back examples of the training tasks and
Rouge-L on the held-out examples (new-task generalisation), both per example so that reports can
give n and bootstrap intervals."""

from __future__ import annotations

from typing import Any

import torch

from .. import data as D
from ..metrics import rouge_l_report
from .prepare import Setup


def eval_losses(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, list[float]]:
    """(mean response-token loss over all evaluation tokens, each example's own mean loss)."""
    total = tokens = 0.0
    per_example: list[float] = []
    for batch in batches:
        losses = D.example_losses(model, batch)
        counts = (batch["labels"][:, 1:] != D.IGNORE_INDEX).sum(dim=1)
        total += float((losses.double() * counts).sum())
        tokens += float(counts.sum())
        per_example += [float(v) for v in losses]
    return total / tokens, per_example


def rouge(setup: Setup) -> dict[str, dict[str, Any]] | None:
    """Rouge-L (%) of greedy answers on the held-out examples, both scorers
    (``metrics.rouge_l_report``: mean, 95% interval, n, per example); None when none is scored."""
    limit = setup.config.rouge_limit()
    examples = setup.heldout if limit is None else setup.heldout[:limit]
    if not examples:
        return None
    max_length = setup.data["max_length"]  # resolved by prepare (--max-length auto)
    answers = D.generate(setup.model, setup.tokenizer, examples, setup.config.max_new_tokens, max_length=max_length)
    return rouge_l_report([e.output for e in examples], answers)
