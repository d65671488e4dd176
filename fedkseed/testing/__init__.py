"""Helpers the tests share: independent reference implementations to check the package against.

Nothing in the package imports this; it is installed with it so that tests (and users checking
their own backend or estimator) can import one copy. Each helper re-derives the semantics from
the normative stream (:mod:`fedkseed.reference`) tensor by tensor, without the fused passes.
:mod:`.mezo` is the MeZO-style step (torch.normal, four passes) the benchmarks measure ZOSGD against.
"""

from .mezo import mezo_perturb, mezo_step, mezo_update
from .naive import NaiveZO, naive_pass

__all__ = ["NaiveZO", "mezo_perturb", "mezo_step", "mezo_update", "naive_pass"]
