"""fedkseed: fused, device-independent perturbations for seed-based zeroth-order fine-tuning
(MeZO) and FedKSeed. The stream contract is shared/perturbation-stream.md."""

from . import reference, stream
from .ops import BACKENDS, noise, perturb_, replay_, resolve_backend
from .history import History
from .paramset import ParamSet
from .zo import ZOSGD, ZOStepResult, zo_step

__all__ = [
    "BACKENDS",
    "History",
    "ParamSet",
    "ZOSGD",
    "ZOStepResult",
    "noise",
    "perturb_",
    "reference",
    "replay_",
    "resolve_backend",
    "stream",
    "zo_step",
]
__version__ = "0.1.0"
