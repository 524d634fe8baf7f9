"""Test session setup.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when kernels are defined, and torch.compile may import triton early, so
it is set here, before any test module imports anything.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # property tests: a bounded default run; HYPOTHESIS_PROFILE=slow runs many more examples
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("slow", max_examples=400, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:
    pass
