"""The two backwards at one shape, for Nsight Compute: the Gluon sm90 backward (FX_FLASH_GLUON_BWD=1)
and the portable one (its dQ and dK/dV kernels), each run once between cudaProfilerStart/Stop after
a warm-up, from one saved forward (bf16, d = 128, batch·N = 16k, hidden 2048).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k regex:'_attn_bwd_(sm90|dq|dkdv)$' python benchmarks/ncu_backward.py --n 8192 [--causal] [--schedule keys]

--cudnn also runs cuDNN SDPA's backward (from its own saved forward) once in the profiled range
(widen -k to take its kernels).

--schedule NAME runs the Gluon backward at that step schedule (gluon_bwd_check.SCHEDULES) instead of
the default's, so that two schedules can be profiled one after the other. Per-instruction stall
samples: add ``--section SourceCounters -o REPORT`` and read them back with
``ncu -i REPORT.ncu-rep --page source --print-source sass --csv``.

Without ncu it prints each backward's time (CUDA events, median of 10), a check that the run
is the shape meant.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fx_flash  # noqa: E402


def median_ms(step, runs: int, warmup: int = 3) -> float:
    """``step``'s median time in ms over ``runs`` calls timed by CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile_once(step) -> None:
    """One call of ``step`` between cudaProfilerStart and Stop (what ``--profile-from-start off`` profiles)."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--schedule", default="", help="a step schedule of gluon_bwd_check.SCHEDULES")
    ap.add_argument("--cudnn", action="store_true", help="profile cuDNN SDPA's backward at the same shape too")
    args = ap.parse_args()
    n, d = args.n, args.d
    if args.schedule:
        from gluon_bwd_check import _flags

        from fx_flash.codegen import gluon_launch

        gluon_launch.BWD_SCHEDULES[d] = {name: True for name in _flags(args.schedule)}
    b, h = 16384 // n, 2048 // d
    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    out = fx_flash.flash_attention(q, k, v, is_causal=args.causal)
    runs = {}
    for name, gluon in (("gluon", "1"), ("portable", "0")):
        os.environ["FX_FLASH_GLUON_BWD"] = gluon
        step = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
        runs[name] = (step, median_ms(step, 10))
    if args.cudnn:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        step = lambda: torch.autograd.grad(ref, (q, k, v), do, retain_graph=True)  # noqa: E731
        runs["cudnn"] = (step, median_ms(step, 10))
    for name, (step, ms) in runs.items():
        os.environ["FX_FLASH_GLUON_BWD"] = "1" if name == "gluon" else "0"
        profile_once(step)
        work = 2.5 * 4 * b * h * n * n * d / (2 if args.causal else 1)
        print(f"{name} backward, B{b} H{h} N{n} d{d} causal={args.causal}: {ms:.3f} ms, "
              f"{work / ms / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
