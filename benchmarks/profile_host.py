"""Where a call's host time goes: cProfile of fx_flash at a tiny size on the GPU, where the GPU
finishes first and every microsecond measured is the CPU's.

    python benchmarks/profile_host.py [--decode]
"""

import argparse
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import fx_flash  # noqa: E402
from gpu_check import host_us  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--decode", action="store_true", help="one query against 4096 keys, GQA 32/8 (split-KV path)")
ap.add_argument("--top", type=int, default=25)
args = ap.parse_args()
if args.decode:
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cases = {"decode fwd": lambda: fx_flash.flash_attention(q, k, v, enable_gqa=True)}
else:
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    cases = {
        "fwd": lambda: fx_flash.flash_attention(q, k, v, is_causal=True),
        "fwd+bwd": lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do),
    }
for name, step in cases.items():
    host = host_us(step)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        step()
    profile.disable()
    torch.cuda.synchronize()
    print(f"\n=== {name}: {host:.1f} us of host time per call (200 calls; profile below is per 200 calls)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
