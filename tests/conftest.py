"""Test set-up: without a CUDA GPU, run the generated Triton kernels in Triton's CPU interpreter.

The variable must be set before Triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Each test builds its launch plans afresh: a plan keeps what launch.py derived when it was
    built, so a test that monkeypatches launch's functions or constants (device_profile,
    SPLIT_MIN_KEYS, ...) must not meet a plan an earlier test built without them."""
    from fx_flash.codegen import launch

    launch.clear_plans()
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo state: sizes marked dynamic by an earlier test's
    recompile (say, of the same HF attention code) must not leak into the next one."""
    torch._dynamo.reset()
    yield
