"""A/B of one captured score under two equivalent specs: HF's finfo.min fill kept as a finite
fill, or read as -inf (causal keeps key 0 of every row, so the two agree exactly).

    python benchmarks/ab_fill.py

Calls torch.ops.fx_flash.attention directly at Gemma 2's benchmark shape (bf16, B=4, H=16,
N=4k, d=128, causal, soft-capping 50), each spec twice in alternation, fwd and fwd+bwd, with
the tuned tiles and with the untuned default (FX_FLASH_AUTOTUNE=0 semantics via --default-tile).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402,F401

SPECS = {
    "finite fill": "score=50.0*tanh(qk*scale); keep=kv_idx <= q_idx; fill=-3.4028234663852886e+38",
    "-inf fill": "score=50.0*tanh(qk*scale); keep=kv_idx <= q_idx",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--default-tile", action="store_true")
    args = ap.parse_args()
    os.environ["FX_FLASH_AUTOTUNE"] = "0" if args.default_tile else "1"  # tuning is off by default
    b, h, n, d = 4, 16, 4096, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    scale = d ** -0.5 / 50
    flops = 4 * b * h * n * (n + 1) / 2 * d
    for name, spec in SPECS.items():  # compile and tune both first
        torch.autograd.grad(torch.ops.fx_flash.attention(q, k, v, [], 0.0, scale, False, spec), (q, k, v), do)
    print(f"default tile: {args.default_tile}")
    for rep in range(2):
        for name, spec in SPECS.items():
            fwd = triton.testing.do_bench(lambda: torch.ops.fx_flash.attention(q, k, v, [], 0.0, scale, False, spec))
            both = triton.testing.do_bench(lambda: torch.autograd.grad(
                torch.ops.fx_flash.attention(q, k, v, [], 0.0, scale, False, spec), (q, k, v), do))
            print(f"| {name} | {rep} | {flops / fwd / 1e9:.0f} | {3.5 * flops / both / 1e9:.0f} |", flush=True)
    from fx_flash.codegen import launch
    for key, chosen in launch.CHOSEN.items():
        print(key[1], getattr(key[0], "text", "?")[-40:], chosen.config)


if __name__ == "__main__":
    main()
