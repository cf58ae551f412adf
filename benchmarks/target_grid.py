"""Issue 12's grid, side by side in one run: fx_flash.flash_attention as users call it (every switch
at its default) against cuDNN SDPA, forward and fwd+bwd, at every row of d 64 / 128, N 1k-16k, causal
or not, bf16 and fp16 (batch·N = 16k, hidden 2048).

    python benchmarks/target_grid.py [--dims 128,64] [--ns 1024,2048,4096,8192,16384] [--dtypes bf16,fp16]
        [--rounds 3] [--limit 300] [--bench-limit 400]

Two phases, each child process with its own time limit:
1. warm-up, one child per (dtype, head dim) in parallel: every row's forward and backward once, so
   that the Triton and Gluon compiles land in the caches the timing child reads;
2. timing, one child alone on the GPU: per row, cuDNN's and fx_flash's forward (inputs without
   grad) and fwd+bwd (autograd), each timed ``--rounds`` times in alternating order (cuDNN first,
   then fx_flash first, ...), the median reported; which kernel each direction ran (the Gluon
   tile, or "portable", from gluon_launch's routing decisions); and the largest difference of the
   two outputs (a gross check only: numerics by flash-attn's rule are gluon_check.py's and
   gluon_bwd_check.py's).
TFLOP/s = 4·B·H·N²·d (halved when causal) for the forward, 3.5× that for fwd+bwd. The ratio is
fx_flash over cuDNN.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rows(dims, ns, dtypes):
    return [(dt, d, n, causal) for dt in dtypes for d in dims for n in ns for causal in (False, True)]


def _inputs(dtype, d, n, grad):
    b, h = 16384 // n, 2048 // d
    return [torch.randn(b, h, n, d, device="cuda", dtype=DTYPES[dtype], requires_grad=grad) for _ in range(3)]


def _cudnn(q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def warm(rows):
    """Every row's forward and backward once (compiles only)."""
    import fx_flash

    for dtype, d, n, causal in rows:
        q, k, v = _inputs(dtype, d, n, True)
        out = fx_flash.flash_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()
        del q, k, v, out


def timing(rows, rounds):
    import triton.testing

    import fx_flash
    from gluon_bwd_check import _record_routes

    fwd_tiles, bwd_tiles = [], []
    _record_routes("routed_forward", fwd_tiles)
    _record_routes("routed_backward", bwd_tiles)
    for dtype, d, n, causal in rows:
        work = 4 * (16384 // n) * (2048 // d) * n * n * d / (2 if causal else 1)
        qf, kf, vf = _inputs(dtype, d, n, False)
        q, k, v = (t.detach().clone().requires_grad_() for t in (qf, kf, vf))
        do = torch.randn_like(qf)
        fwd_tiles.clear()
        bwd_tiles.clear()
        fx_out = fx_flash.flash_attention(qf, kf, vf, is_causal=causal)
        diff = (fx_out.float() - _cudnn(qf, kf, vf, causal).float()).abs().max().item()
        fx_train = fx_flash.flash_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(fx_train, (q, k, v), do)
        row = dict(dtype=dtype, d=d, n=n, causal=causal, diff=diff, fwd_tile=fwd_tiles[:1], bwd_tile=bwd_tiles[:1])
        cases = {
            "cudnn fwd": (lambda: _cudnn(qf, kf, vf, causal), work),
            "fx fwd": (lambda: fx_flash.flash_attention(qf, kf, vf, is_causal=causal), work),
            "cudnn fwd+bwd": (lambda: torch.autograd.grad(_cudnn(q, k, v, causal), (q, k, v), do), 3.5 * work),
            "fx fwd+bwd": (lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal),
                                                       (q, k, v), do), 3.5 * work),
        }
        rates = {name: [] for name in cases}
        for r in range(rounds):
            for pair in (("cudnn fwd", "fx fwd"), ("cudnn fwd+bwd", "fx fwd+bwd")):
                for name in pair if r % 2 == 0 else pair[::-1]:
                    fn, flops = cases[name]
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    rates[name].append(flops / ms / 1e9)
        for name, taken in rates.items():
            row[name] = round(sorted(taken)[len(taken) // 2])
        print("ROW " + json.dumps(row), flush=True)
        del q, k, v, qf, kf, vf, do, fx_out, fx_train


def child(what, rows, rounds):
    if what.startswith("warm"):
        warm(rows)
    else:
        timing(rows, rounds)
    print("CHILD PASS", flush=True)


def _tile(tiles):
    """Short text of a routing record: the Gluon tile, or "portable"."""
    if not tiles or tiles[0] is None:
        return "portable"
    text = tiles[0]
    for long, short in (("BLOCK_M=", "M"), ("BLOCK_N=", "N"), ("stages=", "s"), ("ws persistent ", ""),
                        ("three consumers", "3 consumers")):
        text = text.replace(long, short)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per warm-up child")
    ap.add_argument("--bench-limit", type=float, default=400.0, help="seconds of the timing child")
    ap.add_argument("--child", default="", help="internal")
    args = ap.parse_args()
    dims = [int(x) for x in args.dims.split(",")]
    ns = [int(x) for x in args.ns.split(",")]
    dtypes = args.dtypes.split(",")
    if args.child:
        kind, _, sel = args.child.partition(":")
        if sel:
            dt, d = sel.split("/")
            dtypes, dims = [dt], [int(d)]
        child(kind, _rows(dims, ns, dtypes), args.rounds)
        return
    import subprocess

    import triton

    def run(what, limit):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", what, "--dims", args.dims, "--ns", args.ns, "--dtypes",
               args.dtypes, "--rounds", str(args.rounds)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            text = done.stdout + done.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            text = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + f"\nTIMEOUT after {limit}s"
        return what, text, time.time() - t0

    t_start = time.time()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    jobs = [f"warm:{dt}/{d}" for dt in dtypes for d in dims]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for what, text, secs in pool.map(lambda w: run(w, args.limit), jobs):
            print(f"--- {what} ({secs:.0f}s): {'done' if 'CHILD PASS' in text else 'FAILED'}\n{text[-2000:]}",
                  flush=True)
    print(f"phase 1 (warm-up) done at {time.time() - t_start:.0f}s", flush=True)
    what, text, secs = run("time", args.bench_limit)
    print(f"--- {what} ({secs:.0f}s)\n{text}", flush=True)
    rows = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]
    print(f"\nTFLOP/s, batch*N = 16k, hidden 2048, medians of {args.rounds} alternating rounds; "
          "fx = flash_attention with the default switches; ratio = fx / cuDNN")
    print("| dtype | d | N | causal | fwd cuDNN | fwd fx | fwd ratio | fwd+bwd cuDNN | fwd+bwd fx | fwd+bwd ratio "
          "| fwd kernel | bwd kernel | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['cudnn fwd']} | "
              f"{r['fx fwd']} | {r['fx fwd'] / r['cudnn fwd']:.2f} | {r['cudnn fwd+bwd']} | {r['fx fwd+bwd']} | "
              f"{r['fx fwd+bwd'] / r['cudnn fwd+bwd']:.2f} | {_tile(r['fwd_tile'])} | {_tile(r['bwd_tile'])} | "
              f"{r['diff']:.1e} |")
    print(f"\n{len(rows)} of {len(_rows(dims, ns, dtypes))} rows timed")


if __name__ == "__main__":
    main()
