"""Quality tests: one intra-op torch thread, as under ``make test`` (two xdist workers on two cores).

The asserted margins were measured with one thread; tiny models gain nothing from more, and on a busy 2-core
machine spinning OpenMP workers make every step many times slower.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
