"""Where the time of one attention goes, kernel by kernel: fx_flash against SDPA (cuDNN) and,
with --impls, FlexAttention.

    python benchmarks/profile_kernels.py [--d 128 --n 8192 --impls fx_flash,sdpa,cudnn,flex]
        [--causal both|yes|no] [--dtype bf16|fp16] [--defaults]

For each implementation, torch.profiler records five fwd+bwd steps (bf16 or --dtype, batch·N =
16k, hidden 2048) and prints each GPU kernel's mean time. "sdpa" is SDPA's own choice of backend,
"cudnn" SDPA held to cuDNN (target_grid.py's baseline). ``--defaults`` runs fx_flash with every
switch at its default (untuned tiles, as target_grid.py and users do) instead of tuned ones. For
fx_flash's kernels it also prints the matrix-unit rate each achieves counting the products that
kernel really computes:
    forward  2 products per tile (Q·Kᵀ, P·V)
    dQ       3 (Q·Kᵀ again, dO·Vᵀ, dS·K)
    dK/dV    4 (Q·Kᵀ again, Pᵀ·dO, dO·Vᵀ, dSᵀ·Q)
    sm90     5 (the Gluon backward: the four of dK/dV, and dS·K added into an fp32 dQ)
(the standard count, fwd+bwd = 3.5 × fwd, assumes 2 + 5 products: the separate dQ pass
recomputes Q·Kᵀ and dO·Vᵀ). Last, it reports which matrix instructions the compiled forward
uses (HGMMA is Hopper's warpgroup MMA; HMMA the older per-warp one), from the SASS when
Triton's disassembly is available.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402

PRODUCTS = {"_attn_fwd": 2, "_attn_bwd_dq": 3, "_attn_bwd_dkdv": 4, "_attn_bwd_sm90": 5}


def kernel_times(step, iters=5):
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] += e.device_time / iters  # microseconds per step
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def _cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sass_report():
    from fx_flash.codegen import launch

    for (spec, name, *_), chosen in launch.CHOSEN.items():
        if name != "_attn_fwd":
            continue
        for cache in getattr(chosen.fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for k in kernels.values():
                try:
                    sass = k.asm["sass"]
                except Exception as e:  # noqa: BLE001 - nvdisasm may be missing
                    print(f"SASS of {name} unavailable: {type(e).__name__}")
                    return
                counts = {op: sass.count(op) for op in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "MUFU.EX2")}
                print(f"SASS {name} ({spec.name}, {chosen.config}): {counts}")
                return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--impls", default="fx_flash,sdpa", help="any of fx_flash, sdpa, cudnn, flex")
    ap.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--defaults", action="store_true", help="fx_flash untuned (every switch at its default)")
    args = ap.parse_args()
    if not args.defaults:
        fx_flash.set_autotune(True)  # tuned tiles, as in the tables measured before tuning became opt-in
    wanted = args.impls.split(",")
    d, n = args.d, args.n
    h, b = 2048 // d, max(1, 16384 // n)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    for causal in {"both": (False, True), "yes": (True, ), "no": (False, )}[args.causal]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops_fwd = 4 * b * h * n * n * d / (2 if causal else 1)
        impls = {
            "fx_flash": lambda: fx_flash.flash_attention(q, k, v, is_causal=causal),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "cudnn": lambda: _cudnn(q, k, v, causal),
        }
        if "flex" in wanted:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            mask = create_block_mask((lambda bb, hh, qi, ki: qi >= ki) if causal else (lambda bb, hh, qi, ki: qi >= 0),
                                     None, None, n, n, device="cuda")
            flex = torch.compile(flex_attention, dynamic=False)
            impls["flex"] = lambda: flex(q, k, v, block_mask=mask)
        for name, fwd in ((x, impls[x]) for x in wanted):
            times = kernel_times(lambda: torch.autograd.grad(fwd(), (q, k, v), do))
            total = sum(times.values())
            wall = 1e3 * triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), (q, k, v), do), return_mode="median")
            print(f"\n{name} d={d} N={n} causal={causal}: {total:.0f} us of GPU time per fwd+bwd "
                  f"({wall:.0f} us wall), {3.5 * flops_fwd / total / 1e6:.0f} TFLOP/s by the standard count")
            for kname, us in list(times.items())[:8]:
                short = next((p for p in PRODUCTS if kname.startswith(p) and "prep" not in kname), None)
                rate = ""
                if short:
                    rate = f"  {PRODUCTS[short] / 2 * flops_fwd / us / 1e6:.0f} TFLOP/s of products computed"
                print(f"  {us:9.1f} us {100 * us / total:5.1f}%  {kname[:70]}{rate}")
    sass_report()


if __name__ == "__main__":
    main()
