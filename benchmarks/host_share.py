"""Whose pace a grid row runs at, the GPU's or the host's: per call, at rows of issue 12's grid
(batch·N = 16k, hidden 2048), fx_flash.flash_attention with its default switches against cuDNN
SDPA, forward and fwd+bwd (autograd).

    python benchmarks/host_share.py [--rows 128:1024:causal,64:1024:causal] [--dtype bf16] [--calls 16]

Columns, each the median of 7 rounds of ``--calls`` calls after a warm-up:
    host µs     the CPU's time per call, the calls queued one after the other with no wait (the GPU
                is busy throughout, so nothing the host does waits for it: what is left is the host's)
    batch µs    CUDA events around those calls, the time the GPU took over them, idle gaps included
    kernels µs  the kernels' own time per call (torch.profiler, one round of the calls)
    idle        1 − kernels / batch: the share of the batch the GPU waited for the host
A row whose host µs reaches its kernels µs runs at the host's pace, and a grid measurement there
(triton.testing.do_bench, which queues a 256 MB L2 flush before each call) times the host's work
as much as the kernels'.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import fx_flash  # noqa: E402
from target_grid import DTYPES, _cudnn  # noqa: E402  (the grid's dtypes and its cuDNN baseline)


def measure(fn, calls: int, rounds: int = 7) -> tuple[float, float, float]:
    """(host µs, batch µs, kernels µs) per call of ``fn`` (see the module's docstring)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host, batch = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        batch.append(start.elapsed_time(end) / calls * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / calls
    return sorted(host)[rounds // 2], sorted(batch)[rounds // 2], kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128:1024:causal,64:1024:causal", help="d:N:causal|plain, comma-separated")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--calls", type=int, default=16)
    args = ap.parse_args()
    print("| d | N | mask | case | host µs | batch µs | kernels µs | idle |\n|---|---|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        d, n, mask = row.split(":")
        d, n, causal = int(d), int(n), mask == "causal"
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=DTYPES[args.dtype], requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        cases = {
            "cudnn fwd": lambda: _cudnn(q.detach(), k.detach(), v.detach(), causal),
            "fx fwd": lambda: fx_flash.flash_attention(q.detach(), k.detach(), v.detach(), is_causal=causal),
            "cudnn fwd+bwd": lambda: torch.autograd.grad(_cudnn(q, k, v, causal), (q, k, v), do),
            "fx fwd+bwd": lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal),
                                                      (q, k, v), do),
        }
        for name, fn in cases.items():
            host, batch, kernels = measure(fn, args.calls)
            print(f"| {d} | {n} | {mask} | {name} | {host:.0f} | {batch:.0f} | {kernels:.0f} | "
                  f"{max(0.0, 1 - kernels / batch):.1%} |", flush=True)


if __name__ == "__main__":
    main()
