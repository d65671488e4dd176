"""fedkseed: fused, device-independent perturbations for seed-based zeroth-order fine-tuning
(MeZO) and FedKSeed. The stream contract is shared/perturbation-stream.md."""

from . import reference, stream
from .ops import BACKENDS, noise, perturb_, replay_, resolve_backend
from .paramset import ParamSet

__all__ = [
    "BACKENDS",
    "ParamSet",
    "noise",
    "perturb_",
    "reference",
    "replay_",
    "resolve_backend",
    "stream",
]
__version__ = "0.1.0"
