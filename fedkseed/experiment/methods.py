"""The federated methods ``fedkseed simulate --method`` runs, and what the first-order ones train.

    fedkseed  FedKSeed: ZO local steps on every weight, K seeds; only seeds and scalars travel
              (``--pro``: FedKSeed-Pro)
    fedit     FedIT: FedAvg of LoRA adapters (peft) trained with first-order local steps (AdamW)
    fedavg    FedAvg of every weight, first-order local steps (AdamW)
    ferret    Ferret: first-order local steps (SGD) on every weight, the update projected onto the
              round's shared seeds; FedKSeed's uploads, table, server and lr (``fed.ferret``)

All four share the data split, client sampling, batches (``fed.firstorder.local_batch_rows``
draws what FedKSeed's client draws), evaluation, output folder and resume. ``--local-steps``
counts local optimizer steps (batches) for every method. The first-order methods' default
learning rates (``FIRST_ORDER_LR``, used where ``--lr`` is unset; an explicit ``--lr`` wins)
are the ones measured on this project's model and data: LoRA r 8 on q/v with AdamW lr 1e-4,
full-parameter AdamW lr 1e-5.
"""

from __future__ import annotations

from typing import Any

import torch

METHODS = ("fedkseed", "fedit", "fedavg", "ferret")
FIRST_ORDER_LR = {"fedit": 1e-4, "fedavg": 1e-5}
FIRST_ORDER = ("fedit", "fedavg")  # the tensor-averaging methods (FirstOrderServer); Ferret is seed-based


def trainable_tensors(model: Any) -> dict[str, torch.Tensor]:
    """name -> tensor of every parameter that requires grad, in ``named_parameters`` order
    (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def first_order_model(
    model: Any, method: str, *, rank: int, alpha: float, targets: tuple[str, ...], seed: int
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the model a first-order method trains, its trainable tensors). FedIT wraps ``model``
    with peft LoRA adapters (no dropout, no bias; A initialised from ``seed`` alone, so every
    process of a run builds the same adapters); FedAvg trains every weight of ``model``."""
    if method == "fedavg":
        return model, trainable_tensors(model)
    if method != "fedit":
        raise ValueError(f"{method!r} is not a first-order method ({', '.join(FIRST_ORDER)})")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, lora)
    wrapped.eval()
    return wrapped, trainable_tensors(wrapped)


def final_model(model: Any, method: str) -> Any:
    """The plain transformers model to save: FedIT's adapters merged into the base weights."""
    return model.merge_and_unload() if method == "fedit" else model
