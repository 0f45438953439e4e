"""Shared test configuration: deterministic seeds, small thread pools, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # precision="auto" (the verbs' default) runs fp32 in the suite on every machine, so parity tolerances hold on
    # bf16 hardware too; tests of the detection unset it (tests/runtime/test_precision.py).
    os.environ.setdefault("MSFM_PRECISION_AUTO", "32")
    # Two cores are shared by two xdist workers: one intra-op thread each avoids oversubscription.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - only for third-party code that uses the global state


@pytest.fixture(autouse=True)
def _fresh_warn_once() -> None:
    # warn_once remembers messages per process; each test starts as a fresh process would, so pytest.warns holds.
    from msfm.runtime.warn_once import _reset_for_tests

    _reset_for_tests()


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def sf_fixture_dir() -> Path:
    return FIXTURES / "scfoundation"
