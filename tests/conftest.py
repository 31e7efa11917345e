"""Test configuration: on machines without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is first imported (by any test module), hence here.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
