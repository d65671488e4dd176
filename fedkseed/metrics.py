"""Rouge-L of generated answers, both ways, and bootstrap intervals over examples.

Two scorers, because published numbers use both and they differ on the same pair:

- ``"rouge-score"``: Google's rouge-score (``rougeL``, Porter stemmer), as Super-NaturalInstructions
  scores: lower-cased, punctuation removed, words stemmed.
- ``"rouge"``: the ``rouge`` package (pltrdy, 1.0.1) that FedKSeed's official code scores with
  (``evaluations.py``): whitespace words as written, case and punctuation kept, no stemming; an
  empty answer, or one the package refuses (ValueError), scores 0 as in the official code.

On reference "Apply for a permit." and answer "You must apply for permits" rouge-score gives
0.667 (LCS "appli for permit": 3 of 4 and 3 of 5 words) and rouge gives 0.222 (LCS "for").
Scores here are fractions in [0, 1]; reports give percentages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SCORERS = ("rouge-score", "rouge")
CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` examples with its percentile-bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.mean * factor, self.low * factor, self.high * factor, self.n)


def rouge_l_scores(references: Sequence[str], answers: Sequence[str], scorer: str = "rouge-score") -> list[float]:
    """Per-example Rouge-L F-measure (fraction) of ``answers`` against ``references``."""
    if len(references) != len(answers):
        raise ValueError(f"rouge_l_scores: {len(references)} references but {len(answers)} answers")
    if scorer == "rouge-score":
        from rouge_score import rouge_scorer

        google = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return [float(google.score(r, a)["rougeL"].fmeasure) for r, a in zip(references, answers)]
    if scorer == "rouge":
        from rouge import Rouge

        official = Rouge(metrics=["rouge-l"])
        return [_official_score(official, r, a) for r, a in zip(references, answers)]
    raise ValueError(f"rouge_l_scores: scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")


def _official_score(official: Any, reference: str, answer: str) -> float:
    # FedKSeed's evaluations.rouge_score: 0 for an empty answer or one rouge cannot score.
    if not answer:
        return 0.0
    try:
        return float(official.get_scores([answer], [reference])[0]["rouge-l"]["f"])
    except ValueError:
        return 0.0


def bootstrap_interval(
    values: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """The mean of ``values`` and its percentile-bootstrap interval: ``resamples`` resamples of
    the values with replacement from a fixed ``seed``, so the interval is reproducible. For paired
    comparisons pass per-example differences."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_interval: values must be a non-empty 1-D sequence")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(
            f"bootstrap_interval: need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}"
        )
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // data.size)  # bounds memory at ~16 MB of indices per chunk
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start : start + rows] = data[rng.integers(0, data.size, size=(rows, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(data.mean()), float(low), float(high), int(data.size))


def rouge_l_report(references: Sequence[str], answers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rouge-L both ways, as metrics.json holds it: per scorer the mean, low, high (percent), n and
    the per-example scores (percent), so runs can be compared example by example."""
    report = {}
    for scorer in SCORERS:
        scores = [100.0 * s for s in rouge_l_scores(references, answers, scorer)]
        report[scorer] = {**asdict(bootstrap_interval(scores)), "per_example": scores}
    return report
