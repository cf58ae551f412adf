"""Where a call's host time goes: cProfile of fx_flash fwd+bwd at a tiny size on the GPU.

    python benchmarks/profile_host.py
"""

import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402

q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)


def step():
    torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do)


for _ in range(20):
    step()
torch.cuda.synchronize()
profile = cProfile.Profile()
profile.enable()
for _ in range(200):
    step()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(25)
