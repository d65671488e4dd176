"""The zeroth-order training layer (L3): a MeZO step, the optimizer over it, and the History that
replays a run bit for bit.

    passes.py      what one step applies (entries, passes, coefficients, rounding seeds): one place
    runner.py      applying a pass: one op call per coefficient class, global offsets kept
    step.py        zo_step, the step engine run_step, ZOStepResult
    estimators.py  q directions (n-SPSA), FZOO's one-sided normalised step, sign-ZO, momentum
    history.py     History: the record of a run and its file format
    optim.py       ZOSGD, a torch.optim.Optimizer
"""

from .estimators import ESTIMATORS, Estimator
from .history import History
from .optim import ZOSGD
from .passes import Entry
from .step import ZOStepResult, zo_step

__all__ = ["ESTIMATORS", "ZOSGD", "Entry", "Estimator", "History", "ZOStepResult", "zo_step"]
