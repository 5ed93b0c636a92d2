"""One torch thread for the trainer's tests, so that none depends on the machine being idle.

Their models are tiny: on 2 idle cores a second intra-op thread gains little (a 3-round micro run: 9.9 s
with 2 threads, 11.9 s with 1), but beside two busy processes the threads spin against each other (66 s
with 2 threads, 19 s with 1), and one run of the policy-gradient test passed its 600 s timeout that way.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
