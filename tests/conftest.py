"""Test set-up: without a CUDA GPU, run the generated Triton kernels in Triton's CPU interpreter.

The variable must be set before Triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
