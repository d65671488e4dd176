"""Helpers the tests share: independent reference implementations to check the package against.

Nothing in the package imports this; it is installed with it so that tests (and users checking
their own backend or estimator) can import one copy. Each helper re-derives the semantics from
the normative stream (:mod:`fedkseed.reference`) tensor by tensor, without the fused passes.
"""

from .naive import NaiveZO, naive_pass

__all__ = ["NaiveZO", "naive_pass"]
