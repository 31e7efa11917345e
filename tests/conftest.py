"""Test configuration: on machines without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is first imported (by any test module), hence here.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture()
def one_thread():
    """Run a test on one CPU thread (tiny models are faster so, and CI's 2 cores stay free for the others)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
