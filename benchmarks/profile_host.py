"""Host time per call at a tiny size on the GPU (the GPU finishes first, so every microsecond
measured is the CPU's), against SDPA, with the Python profile of each fx_flash case.

    python benchmarks/profile_host.py [--decode] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/profile_host.py --cpu [--profile]


Rows (B1 H1 N128 d64 causal, bf16, 200 calls after 20, median of 5 rounds):
    fx_flash                 the op as users call it (eager path, direct launches)
    fx_flash, JIT launches   FX_FLASH_DIRECT_LAUNCH=0: every launch through Triton's JITFunction.run
    sdpa                     F.scaled_dot_product_attention
    compiled: fx_flash op    torch.compile (Inductor) of a function calling fx_flash.flash_attention:
                             Inductor calls torch.ops.fx_flash.attn_fwd (a Python kernel) per call
    compiled: triton_op      the same forward as a torch.library.triton_op launching the kernel
                             through wrap_triton, which Inductor launches from its generated code
    compiled: sdpa           torch.compile of F.scaled_dot_product_attention
The triton_op rows decide whether converting fx_flash's ops pays (forward only; the backward
would follow the same way). cProfile listings of the fx_flash rows go to DIR/profile_host.txt.

``--cpu`` measures the Python side alone, on any machine: the Triton interpreter's kernel launch
(``launch._launch``) replaced by a no-op, 1×1×128×64 fp32 causal, µs per call (the fastest of 9
rounds of 300 calls after 50: on a shared machine the minimum is the undisturbed cost). It cannot see CUDA allocation, Triton's launcher or the autograd
engine's device thread; it is the A/B for the Python paths, the GPU table for the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fx_flash  # noqa: E402
from gpu_check import with_env  # noqa: E402


def host_us(fn, calls=200, warmup=20, rounds=5) -> float:
    """Median over rounds of the microseconds of host time per call of ``fn`` (launches queue
    up; the GPU is only waited on between rounds)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def triton_op_forward():
    """fx_flash's causal forward as a ``torch.library.triton_op``: the same generated kernel and
    default tile, launched through ``wrap_triton`` so that Inductor sees the kernel."""
    from torch.library import triton_op, wrap_triton

    from fx_flash.codegen import launch, loader, tiling
    from fx_flash.codegen.spec import sdpa_spec
    from fx_flash.device import device_profile

    spec = sdpa_spec(causal=True)
    kernel = loader.load(spec)._attn_fwd

    @triton_op("fx_flash_bench::attn_fwd_causal", mutates_args=())
    def attn_fwd_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        consts, (z, h, n_q, n_kv) = launch._common(spec, q, k)
        config = tiling.default_config("fwd", device_profile(q.device), q.shape[-1], q.element_size(), 0, 0,
                                       consts["N_Q_BUCKET"], consts["N_KV_BUCKET"])
        out = torch.empty_like(q)
        lse = torch.empty((z, h, n_q), device=q.device, dtype=torch.float32)
        wrap_triton(kernel)[(math.ceil(n_q / config.BLOCK_M), z * h)](
            q, k, v, out, lse, q, scale, 0.0, *q.stride(), *k.stride(), *v.stride(), *out.stride(), **consts,
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, num_warps=config.num_warps, num_stages=config.num_stages)
        return out

    return attn_fwd_causal


def host_table(out_dir: str) -> list[tuple[str, str, float]]:
    """(case, implementation, µs per call) rows, printed as a table; profiles to out_dir."""
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fx_fwd = lambda: fx_flash.flash_attention(q, k, v, is_causal=True)  # noqa: E731
    sdpa_fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    grad = lambda f: (lambda: torch.autograd.grad(f(), (q, k, v), do))  # noqa: E731
    cases = [
        ("fwd", "fx_flash", fx_fwd), ("fwd", "fx_flash, JIT launches", with_env(fx_fwd, FX_FLASH_DIRECT_LAUNCH="0")),
        ("fwd", "sdpa", sdpa_fwd),
        ("fwd+bwd", "fx_flash", grad(fx_fwd)),
        ("fwd+bwd", "fx_flash, JIT launches", with_env(grad(fx_fwd), FX_FLASH_DIRECT_LAUNCH="0")),
        ("fwd+bwd", "sdpa", grad(sdpa_fwd)),
    ]
    qi, ki, vi = (t.detach() for t in (q, k, v))
    compiled = [("compiled: fx_flash op", lambda q, k, v: fx_flash.flash_attention(q, k, v, is_causal=True)),
                ("compiled: sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
    try:
        op = triton_op_forward()
        compiled.insert(1, ("compiled: triton_op", lambda q, k, v: op(q, k, v, 0.125)))
    except Exception as e:  # noqa: BLE001 - a torch without triton_op still gives the other rows
        print(f"triton_op variant unavailable: {type(e).__name__}: {e}")
    for name, fn in compiled:
        try:
            c = torch.compile(fn, dynamic=False)
            ref = F.scaled_dot_product_attention(qi.float(), ki.float(), vi.float(), is_causal=True)
            err = (c(qi, ki, vi).float() - ref).abs().max().item()
            if not err < 2e-2:
                print(f"{name}: max |out - ref| = {err:.3g}: FAIL")
                continue
            cases.append(("fwd, no grad", name, lambda c=c: c(qi, ki, vi)))
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the table
            print(f"{name}: {type(e).__name__}: {e}")
    rows = []
    listing = io.StringIO()
    for case, impl, fn in cases:
        rows.append((case, impl, host_us(fn)))
        if impl.startswith("fx_flash") or "triton_op" in impl:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(200):
                fn()
            profile.disable()
            torch.cuda.synchronize()
            listing.write(f"\n=== {case} {impl}: 200 calls\n")
            pstats.Stats(profile, stream=listing).sort_stats("tottime").print_stats(30)
    with open(os.path.join(out_dir, "profile_host.txt"), "w") as f:
        f.write(listing.getvalue())
    sdpa = {case: us for case, impl, us in rows if impl == "sdpa"}
    print("\nHost time per call, B1 H1 N128 d64 causal bf16 (µs; median of 5 rounds of 200 calls):\n")
    print("| case | implementation | µs per call | / sdpa |")
    print("|---|---|---|---|")
    for case, impl, us in rows:
        base = sdpa.get(case) or next((u for c, i, u in rows if c == case and i == "compiled: sdpa"), None)
        print(f"| {case} | {impl} | {us:.1f} | {us / base:.2f} |" if base else f"| {case} | {impl} | {us:.1f} | - |")
    return rows


def decode_profile(top: int) -> None:
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    step = lambda: fx_flash.flash_attention(q, k, v, enable_gqa=True)  # noqa: E731
    print(f"decode fwd: {host_us(step):.1f} us of host time per call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


def cpu_table(profile: bool) -> None:
    """The Python side per call with kernel launches stubbed out (see the module docstring)."""
    from fx_flash.codegen import launch

    if not os.environ.get("TRITON_INTERPRET"):
        sys.exit("--cpu needs TRITON_INTERPRET=1 (the kernels' launch path on CPU tensors)")
    launch._launch = lambda *args, **kwargs: None
    q, k, v = (torch.randn(1, 1, 128, 64, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    qi, ki, vi = (t.detach() for t in (q, k, v))
    cases = [("fwd", lambda: fx_flash.flash_attention(q, k, v, is_causal=True)),
             ("fwd, no grad", lambda: fx_flash.flash_attention(qi, ki, vi, is_causal=True)),
             ("fwd+bwd", lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do))]
    print("| case | µs per call (Python only) |\n|---|---|")
    for name, fn in cases:
        for _ in range(50):
            fn()
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            times.append((time.perf_counter() - t0) / 300 * 1e6)
        print(f"| {name} | {min(times):.1f} |")
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                fn()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", action="store_true", help="one query against 4096 keys, GQA 32/8 (split-KV path)")
    ap.add_argument("--cpu", action="store_true", help="Python side only: TRITON_INTERPRET=1, launches stubbed")
    ap.add_argument("--profile", action="store_true", help="with --cpu: a cProfile listing per case")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.cpu:
        cpu_table(args.profile)
    elif args.decode:
        decode_profile(args.top)
    else:
        host_table(args.out)


if __name__ == "__main__":
    main()
