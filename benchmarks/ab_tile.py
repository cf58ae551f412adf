"""A/B of one kernel's untuned tile: the default rule's tile against forced ones, fwd+bwd (or the
forward alone, for the forward kernel) through ``fx_flash.flash_attention`` (bf16, batch·N = 16k,
hidden 2048), causal and not, in one process. Only that kernel's tile changes; the others keep
the default.

    python benchmarks/ab_tile.py [--kernel bwd_dkdv] [--d 128] [--ns 4096] [--tiles 64x64/4/3,64x64/4/2]
    python benchmarks/ab_tile.py --kernel fwd --ns 1024,4096,16384 --tiles 64x64/4/3

Tiles are BLOCK_MxBLOCK_N/warps/stages. Every variant's output and gradients are checked by
bench_capture's numerics rule, against SDPA in fp32.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fx_flash  # noqa: E402
from fx_flash.codegen import launch, tiling  # noqa: E402
from bench_capture import _check  # noqa: E402


def _tile(text: str) -> tiling.TileConfig:
    blocks, warps, stages = text.split("/")
    m, n = blocks.split("x")
    return tiling.TileConfig(int(m), int(n), int(warps), int(stages))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="bwd_dkdv", choices=["fwd", "bwd_dq", "bwd_dkdv"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--ns", default="4096")
    ap.add_argument("--tiles", default="64x64/4/3,64x64/4/2")
    args = ap.parse_args()
    rule = tiling.default_config
    variants = ["default"] + args.tiles.split(",")
    print("| N | causal | " + " | ".join(f"{args.kernel} {v}" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for n in (int(x) for x in args.ns.split(",")):
        for causal in (False, True):
            b, h = max(1, 16384 // n), 2048 // args.d
            q, k, v = (torch.randn(b, h, n, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            user = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
            fwd = lambda q, k, v, c=causal: fx_flash.flash_attention(q, k, v, is_causal=c)  # noqa: E731
            flops = 4 * b * h * n * n * args.d / (2 if causal else 1)
            if args.kernel == "fwd":
                step = lambda: fx_flash.flash_attention(q, k, v, is_causal=causal)  # noqa: E731
            else:
                flops *= 3.5
                step = lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal), (q, k, v), do)  # noqa: E731
            cells = []
            for variant in variants:
                forced = None if variant == "default" else _tile(variant)

                def patched(kernel, *a, forced=forced, **kw):
                    return forced if forced is not None and kernel == args.kernel else rule(kernel, *a, **kw)

                tiling.default_config = patched
                launch.CHOSEN.clear()
                ok = _check(f"d{args.d} N{n} causal={causal} {args.kernel} {variant}", fwd, user, [q, k, v], do)
                rate = flops / triton.testing.do_bench(step) / 1e9
                cells.append(f"{rate:.0f}" + ("" if ok else " FAIL"))
            tiling.default_config = rule
            launch.CHOSEN.clear()
            print(f"| {n} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
