"""The options both SmolLM2 examples share (imported as a sibling module: `python examples/x.py`
puts examples/ on sys.path), so their meaning and help text live in one place."""

from __future__ import annotations

import argparse

from fedkseed import models


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parser(doc: str) -> argparse.ArgumentParser:
    """An example's parser: its docstring as the description, then the shared options (model,
    data encoding, the ZO step's lr, eps and weight decay, the seed)."""
    out = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    add = out.add_argument
    add("--model", default=models.SMOLLM2, help=f'"{models.SMOLLM2}", "{models.TINY}" or a local model folder')
    add("--batch-size", type=int, default=8, help="questions per step, and per held-out evaluation batch")
    add("--max-length", type=int, default=128, help="tokens per question and answer (longer ones are cut)")
    add("--lr", type=float, default=1e-5, help="learning rate")
    add("--eps", type=float, default=1e-3, help="perturbation scale eps of the two losses L+ and L-")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay on matrices (not biases or norms)")
    add("--seed", type=int, default=0, help="seed of the data split, the batch order and the ZO directions")
    return out
