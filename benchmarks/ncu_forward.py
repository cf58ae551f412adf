"""One Gluon forward at one shape, for Nsight Compute: a variant of benchmarks/gluon_check.py's
(the routed plain one at d = 128, wspt 128/2, by default) launched once between cudaProfilerStart/Stop after a
warm-up (bf16 or fp16, batch·N = 16k, hidden 2048).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        --section SourceCounters -k regex:'_attn_fwd_sm90' -o REPORT \\
        python benchmarks/ncu_forward.py --n 2048 [--causal] [--variant "wsp 128/2"] [--cudnn]
    ncu -i REPORT.ncu-rep --page source --print-source sass --csv > REPORT_sass.csv

The CSV has one line per SASS instruction with its warp stall samples by reason: where the
consumers wait (on a q·kᵀ, on p·v, on Q at a tile's start, in the epilogue's stores).
``python benchmarks/ncu_sass.py REPORT_sass.csv`` summarizes it by partition, reason and store width.

--cudnn profiles cuDNN SDPA's forward at the same shape after it (widen -k to take its kernel), so
that the two kernels' counters can be set side by side.

Without ncu it prints the kernel's time (CUDA events, median of 20), a check that the run is the
shape meant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    from gluon_check import kernel_of, section_of, variants
    from ncu_backward import median_ms, profile_once

    from fx_flash.codegen import gluon_launch
    from fx_flash.codegen.spec import sdpa_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--variant", default="wspt 128/2",
                    help="a name of gluon_check.variants (NAME~MIB: causal sections of MIB MiB of K/V), or portable")
    ap.add_argument("--cudnn", action="store_true", help="profile cuDNN SDPA's forward at the same shape too")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args()
    n, d = args.n, args.d
    b, h = 16384 // n, 2048 // d
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, n, device="cuda")
    spec, scale = sdpa_spec(causal=args.causal), 1 / math.sqrt(d)
    if args.variant == "portable":  # the portable forward, through the op with the Gluon path off
        import fx_flash

        os.environ["FX_FLASH_GLUON"] = "0"
        os.environ["FX_FLASH_AUTOTUNE"] = "0"
        step = lambda: fx_flash.flash_attention(q, k, v, is_causal=args.causal)  # noqa: E731
    else:
        cfg = variants(d)[kernel_of(args.variant)]
        section = section_of(args.variant, n, d, q.element_size(), args.causal)
        step = lambda: gluon_launch.launch(spec, q, k, v, out, lse, scale, cfg, section=section)  # noqa: E731
    ms = median_ms(step, 20)
    profile_once(step)
    work = 4 * b * h * n * n * d / (2 if args.causal else 1)
    print(f"{args.variant} forward, B{b} H{h} N{n} d{d} causal={args.causal}: {ms:.3f} ms, "
          f"{work / ms / 1e9:.0f} TFLOP/s", flush=True)
    if args.cudnn:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

        ms = median_ms(cudnn, 20)
        profile_once(cudnn)
        print(f"cuDNN forward, B{b} H{h} N{n} d{d} causal={args.causal}: {ms:.3f} ms, "
              f"{work / ms / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
