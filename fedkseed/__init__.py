"""fedkseed: fused, device-independent perturbations for seed-based zeroth-order fine-tuning
(MeZO) and FedKSeed. The perturbation stream is specified in docs/stream-spec.md; the layers of
the package are drawn in docs/architecture.md.

This module is the public API of the layers up to ``zo``; the federated (``fedkseed.fed``),
experiment (``fedkseed.experiment``) and Flower (``fedkseed.flower``) layers are imported by
name, so ``import fedkseed`` stays free of them."""

from . import reference, stream
from .ops import (
    BACKENDS,
    backend_setting,
    magnitude_mask,
    magnitude_thresholds,
    noise,
    perturb_,
    project,
    replay_,
    resolve_backend,
    use_backend,
)
from .paramset import ParamSet
from .version import __version__
from .zo import ZOSGD, History, ZOStepResult, zo_step

__all__ = [
    "BACKENDS",
    "ZOSGD",
    "History",
    "ParamSet",
    "ZOStepResult",
    "__version__",
    "backend_setting",
    "magnitude_mask",
    "magnitude_thresholds",
    "noise",
    "perturb_",
    "project",
    "reference",
    "replay_",
    "resolve_backend",
    "stream",
    "use_backend",
    "zo_step",
]
