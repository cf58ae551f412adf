"""Captured score modifications on the GPU: the user's own spelling through ``backend="fx_flash"``
beside FlexAttention with the equivalent hand-written ``score_mod`` / ``BlockMask``.

    python benchmarks/bench_capture.py [--cases gemma2_softcap,bloom_alibi,mistral_window]

Each case is written the way the model writes it (eager ops: Q·Kᵀ, the modification, a mask
built from ``arange``, softmax, ·V) and compiled unchanged with ``backend="fx_flash"``; the same
function under plain ``torch.compile`` (Inductor) is a second baseline where it fits in memory.
Before timing, every variant's output and gradients are checked against the function in fp32
(flash-attn's rule: error ≤ 2× the bf16 eager error + 1e-2). Timing: triton.testing.do_bench
median; TFLOP/s counted on the kept elements (fwd = 4·d per kept score, fwd+bwd = 3.5× fwd);
peak memory is the fwd+bwd's allocation above the inputs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402,F401  (registers the backend)

DEV, DT = "cuda", torch.bfloat16
MIN = torch.finfo(torch.float32).min


def gemma2_softcap(b, h, n, d, cap=50.0):
    """Gemma 2's eager attention: scale, tanh soft-capping, HF's additive causal mask."""
    def user(q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
        s = torch.tanh(s / cap) * cap
        i = torch.arange(q.shape[2], device=q.device)
        mask = torch.where(i[None, :] <= i[:, None], torch.zeros((), device=q.device), MIN)
        w = F.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)

    def score_mod(score, bb, hh, qi, ki):
        return torch.tanh(score / cap) * cap

    return user, score_mod, lambda bb, hh, qi, ki: ki <= qi, n * (n + 1) / 2, (b, h, n, d), "bhnd"


def bloom_alibi(b, h, n, d):
    """Bloom: ALiBi as a (B·H, 1, N) tensor into baddbmm, scores viewed (B, H, N, N) for the
    causal mask, softmax in fp32, viewed back to (B·H, N, N) for the bmm with V."""
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEV)

    def user(q, k, v):  # q, k, v: (B·H, N, d)
        pos = torch.arange(q.shape[1], device=q.device)
        alibi = (slopes[:, None] * pos[None, :]).repeat(b, 1)[:, None, :].to(q.dtype)  # (B·H, 1, N)
        s = alibi.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=d ** -0.5).view(b, h, n, n)
        i = torch.arange(n, device=q.device)
        s = s + torch.where(i[None, :] <= i[:, None], 0.0, MIN)[None, None].to(s.dtype)
        w = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype).view(b * h, n, n)
        return torch.bmm(w, v)

    def score_mod(score, bb, hh, qi, ki):
        return score + slopes[hh] * ki  # = slope·(kv − q) up to a per-row constant

    return user, score_mod, lambda bb, hh, qi, ki: ki <= qi, n * (n + 1) / 2, (b, h, n, d), "bh_merged"


def mistral_window(b, h, n, d, window=1024):
    """Mistral's sliding window: causal and fewer than ``window`` keys back, as a bool mask."""
    def user(q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
        i = torch.arange(q.shape[2], device=q.device)
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        w = F.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.matmul(w, v)

    kept = window * (window + 1) / 2 + (n - window) * window
    return user, None, lambda bb, hh, qi, ki: (ki <= qi) & (qi - ki < window), kept, (b, h, n, d), "bhnd"


CASES = {
    "gemma2_softcap": lambda: gemma2_softcap(4, 16, 4096, 128),
    "bloom_alibi": lambda: bloom_alibi(4, 16, 4096, 128),
    "mistral_window": lambda: mistral_window(1, 16, 16384, 128),
}


def _inputs(shape, layout):
    b, h, n, d = shape
    qkv = [torch.randn(b, h, n, d, device=DEV, dtype=DT) for _ in range(3)]
    if layout == "bh_merged":
        qkv = [t.view(b * h, n, d) for t in qkv]
    return [t.requires_grad_() for t in qkv]


def _flex(score_mod, mask_fn, shape, layout):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, n, d = shape
    block_mask = create_block_mask(mask_fn, None, None, n, n, device=DEV)
    flex = torch.compile(flex_attention)

    def run(q, k, v):
        if layout == "bh_merged":
            q, k, v = (t.view(b, h, n, d) for t in (q, k, v))
        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return out.reshape(b * h, n, d) if layout == "bh_merged" else out

    return run


def _check(name, fn, user, inputs, do):
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = user(*ref_in)
    ref_g = torch.autograd.grad(ref, ref_in, do.float())
    eager_in = [t.detach().requires_grad_() for t in inputs]
    eager = user(*eager_in)
    eager_g = torch.autograd.grad(eager, eager_in, do)
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, do)
    ok, worst = True, 0.0
    for a, e, r in zip([out, *grads], [eager, *eager_g], [ref, *ref_g]):
        err, bound = (a.float() - r).abs().max().item(), 2 * (e.float() - r).abs().max().item() + 1e-2
        ok &= err <= bound
        worst = max(worst, err / bound)
    print(f"  {name}: numerics {'PASS' if ok else 'FAIL'} (worst error / bound = {worst:.2f})", flush=True)
    return ok


def _time(fn, inputs, do, flops):
    fwd = triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100)

    def step():
        torch.autograd.grad(fn(*inputs), inputs, do)

    both = triton.testing.do_bench(step, warmup=25, rep=100)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd, both, flops / fwd / 1e9, 3.5 * flops / both / 1e9, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-inductor", action="store_true", help="skip plain torch.compile (N×N tensors)")
    args = parser.parse_args()
    fx_flash.set_autotune(True)  # tuned tiles, as in the tables measured before tuning became opt-in
    rows = []
    for case in args.cases.split(","):
        user, score_mod, mask_fn, kept, shape, layout = CASES[case]()
        b, h, n, d = shape
        flops = 4 * b * h * kept * d
        torch.manual_seed(0)
        inputs = _inputs(shape, layout)
        do = torch.randn_like(inputs[0])
        print(f"{case}: B={b} H={h} N={n} d={d} bf16", flush=True)
        variants = {"fx_flash": torch.compile(user, backend="fx_flash"),
                    "flex": _flex(score_mod, mask_fn, shape, layout)}
        if not args.no_inductor and n <= 4096:
            variants["inductor"] = torch.compile(user)
        for name, fn in variants.items():
            ok = _check(name, fn, user, inputs, do)
            rows.append((case, name, ok, *_time(fn, inputs, do, flops)))
            torch.cuda.empty_cache()
    print_table(rows)


def print_table(rows):
    """The markdown table of (case, variant, numerics ok, then _time's five numbers) rows."""
    print("\n| case | variant | numerics | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case, name, ok, fwd, both, tf, tfb, peak in rows:
        print(f"| {case} | {name} | {'PASS' if ok else 'FAIL'} | {fwd:.3f} | {both:.3f} | {tf:.0f} | {tfb:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
