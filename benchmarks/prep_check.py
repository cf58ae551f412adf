"""The Gluon backward's memory-bound kernels against what the H200's memory does on its own.

    python benchmarks/prep_check.py [--ns 1024,4096] [--dims 128,64] [--dtype bf16]

Besides its main kernel, a Gluon backward runs the Delta kernel (``_attn_bwd_sm90_prep``:
rowsum(dO ∘ O) read from two (Z, H, N, d) tensors, and the fp32 dQ accumulator zeroed) and the
final cast of that accumulator to the inputs' dtype (BackwardLaunch.finish). Their bytes grow with
N·d and the main kernel's time with N², so they weigh most at N = 1k. At the grid's shapes (batch·N
= 16k, hidden 2048) this times, with triton's do_bench (L2 flushed between calls), the Delta kernel
as launched and with other tiles (each first checked against torch's rowsum and for a fully
zeroed accumulator), its two halves apart (the rowsum alone, DQ_ROWS = 0 so that no
row is zeroed; torch's zero_ of the accumulator), the cast, and an fp32 copy of the accumulator's
size as the memory's reference rate. Each row prints µs and GB/s (bytes read plus written).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fx_flash.codegen import gluon_launch  # noqa: E402
from fx_flash.codegen.spec import spec_from_text  # noqa: E402

# (query rows a program, warps) of the Delta kernel's tiles to time; the first is the launcher's.
PREP_TILES = ((gluon_launch.BWD_PREP_ROWS, 4), (32, 4), (64, 8), (128, 4), (128, 8))


def _us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def rows(d: int, n: int, dtype: torch.dtype) -> list:
    """(name, µs, bytes moved) of each kernel at head dim ``d`` and N = ``n``."""
    h, z = 2048 // d, max(1, 16384 // n)
    spec = spec_from_text("score=qk*scale")
    prep = gluon_launch.load_backward(spec)._attn_bwd_sm90_prep
    out, dout = (torch.randn(z, h, n, d, device="cuda", dtype=dtype) for _ in range(2))
    delta = torch.empty(z, h, n, device="cuda", dtype=torch.float32)
    dq_acc = torch.empty(z, h, n, d, device="cuda", dtype=torch.float32)
    other = torch.empty_like(dq_acc)
    read, acc = 2 * out.numel() * out.element_size(), dq_acc.numel() * 4

    def launch(block, warps, dq_rows=n):
        return lambda: prep[(triton.cdiv(n, block), z * h)](
            out, dout, delta, dq_acc, *out.stride(), *dout.stride(), h, n, dq_rows,
            HEAD_DIM=d, BLOCK=block, NUM_WARPS=warps, num_warps=warps)

    for tile in PREP_TILES:  # each checked: Delta as torch computes it, every accumulator element zero
        delta.fill_(float("nan"))
        dq_acc.fill_(float("nan"))
        launch(*tile)()
        torch.testing.assert_close(delta, (out.float() * dout.float()).sum(-1), rtol=1e-5, atol=1e-4)
        assert not dq_acc.count_nonzero(), f"the Delta kernel's {tile} tile left accumulator elements unzeroed"
    table = [(f"Delta + zero, {b} rows {w} warps", _us(launch(b, w)), read + acc) for b, w in PREP_TILES]
    table += [("Delta alone (no zeroing)", _us(launch(*PREP_TILES[0], dq_rows=0)), read),
              ("zero_ of the accumulator", _us(dq_acc.zero_), acc),
              ("cast to the dtype (finish)", _us(lambda: dq_acc.to(dtype)), acc + acc * dtype.itemsize // 4),
              ("fp32 copy, the reference", _us(lambda: other.copy_(dq_acc)), 2 * acc)]
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for d in map(int, args.dims.split(",")):
        for n in map(int, args.ns.split(",")):
            print(f"\nd = {d}, N = {n} ({args.dtype}, batch·N = 16k, hidden 2048)")
            for name, us, moved in rows(d, n, dtype):
                print(f"  {name:36s} {us:8.1f} us {moved / us / 1e3:7.0f} GB/s")


if __name__ == "__main__":
    main()
