"""GPU backends of fedkseed. The Triton kernels live in ``triton_replay``, ``triton_project`` and
``triton_mask`` and are imported on
first use, so ``import fedkseed`` works without triton and ``TRITON_INTERPRET`` is read when a
kernel is first needed. The CUDA kernels are in ``csrc/cuda`` (served through ``torch.ops``)."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def replay_(pset, seeds: torch.Tensor, alphas: torch.Tensor, tag: int, decay, rounding_seed, mask=None) -> None:
    """See ``triton_replay.replay_``."""
    from . import triton_replay

    triton_replay.replay_(pset, seeds, alphas, tag, decay, rounding_seed, mask)


def noise_(out: torch.Tensor, seed: torch.Tensor, offset: int, tag: int) -> None:
    """See ``triton_replay.noise_``."""
    from . import triton_replay

    triton_replay.noise_(out, seed, offset, tag)


def project(tensors, offsets, seeds: torch.Tensor, tag: int) -> torch.Tensor:
    """See ``triton_project.project``."""
    from . import triton_project

    return triton_project.project(tensors, offsets, seeds, tag)


def magnitude_mask(pset, thresholds: list[float]) -> torch.Tensor:
    """See ``triton_mask.magnitude_mask``."""
    from . import triton_mask

    return triton_mask.magnitude_mask(pset, thresholds)
