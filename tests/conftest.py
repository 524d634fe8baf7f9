"""Test session setup.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when kernels are defined, and torch.compile may import triton early, so
it is set here, before any test module imports anything.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
