"""Fixtures of the Flower tests: Flower itself (an optional extra: the tests that need it skip
without it) and a running ``federation.Federation``, closed however the test ends."""

from __future__ import annotations

import pytest
from federation import Federation


@pytest.fixture(scope="module")
def flwr():
    return pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedkseed[flower]'")


@pytest.fixture
def federation(flwr, tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()
