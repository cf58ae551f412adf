"""GPU evidence for the fused op, in one run: numerics at real sizes, tiles vs shared memory,
and a timing table against PyTorch's attentions.

    python benchmarks/gpu_check.py --numerics --tiles --bench --dims 64,128 --out $OUT

Numerics follow flash-attn's rule: against an fp32 reference (fp64 for fp32 inputs),
fx_flash's max error must be at most 2x that of PyTorch's own attention in the same dtype
(SDPA math backend), plus a small absolute term; gradients too. Timing: median of
triton.testing.do_bench, TFLOP/s counted as fwd = 4·B·H·Nq·Nk·d (halved when causal),
fwd+bwd = 3.5x fwd.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402
from fx_flash import testing  # noqa: E402
from fx_flash.device import device_profile  # noqa: E402
from fx_flash.ops import sdpa_forward  # noqa: E402
from fx_flash.reference import attention_reference  # noqa: E402

DEV = "cuda"
BENCH_OK = [True]


# ----------------------------------------------------------------------------- numerics
def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_case(name, b, hq, hkv, nq, nk, d, dtype, causal=False, mask=None, dropout_p=0.0, bias_grad=False,
               layout="bhnd"):
    """Forward and backward of fx_flash vs an fp32 reference, against SDPA-math's own error; the
    line ends in the case's seconds (its first call compiles: a slow run says which case was slow)."""
    t0 = time.time()
    gen = lambda *s: torch.randn(*s, device=DEV, dtype=dtype)  # noqa: E731
    if layout == "packed":  # q/k/v as permuted views of one (B, N, 3, H, d) tensor
        qkv = gen(b, nq, 3, hq, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = gen(b, hq, nq, d), gen(b, hkv, nk, d), gen(b, hkv, nk, d)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(b, 1, nq, nk, device=DEV) > 0.3
    elif mask == "bias":
        attn_mask = torch.randn(1, hq, nq, nk, device=DEV, dtype=dtype).requires_grad_(bias_grad)
    elif mask == "bias_row":
        attn_mask = torch.randn(b, 1, 1, nk, device=DEV, dtype=dtype).requires_grad_(bias_grad)
    gqa = hq != hkv
    do = gen(*q.shape[:-1], d)
    scale = 1 / math.sqrt(d)
    inputs = [q, k, v] + ([attn_mask] if bias_grad else [])

    seed = torch.tensor([1234 + nq], device=DEV, dtype=torch.int64)
    keep = testing.dropout_keep_mask(seed, (b, hq, nq, nk), dropout_p) if dropout_p else None
    if dropout_p:
        out, _ = sdpa_forward(q, k, v, attn_mask, seed, dropout_p, causal, scale)
    else:
        out = fx_flash.flash_attention(q, k, v, attn_mask, 0.0, causal, scale, gqa)
    grads = torch.autograd.grad(out, inputs, do)

    def run_ref(cast):
        ins = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in inputs]
        qq, kk, vv = ins[:3]
        m = ins[3] if bias_grad else (attn_mask.to(cast) if attn_mask is not None and attn_mask.dtype != torch.bool
                                      else attn_mask)
        r = attention_reference(qq, kk, vv, m, dropout_p, causal, scale, gqa, dropout_keep=keep)
        return r, torch.autograd.grad(r, ins, do.to(cast))

    ref, ref_grads = run_ref(torch.float64 if dtype == torch.float32 else torch.float32)
    torch_out, torch_grads = run_ref(dtype)  # PyTorch's own arithmetic in the test dtype
    ok = True
    rows = []
    for what, ours, theirs, exact in [("out", out, torch_out, ref)] + [
            (f"d{n}", g, tg, rg) for n, g, tg, rg in zip(["q", "k", "v", "bias"], grads, torch_grads, ref_grads)]:
        e_ours, e_torch = _max_err(ours, exact), _max_err(theirs, exact)
        atol = 1e-3 if dtype == torch.float32 else 1e-2 * max(1.0, exact.abs().max().item() ** 0.5)
        bad = not (e_ours <= 2 * e_torch + atol) or not torch.isfinite(ours).all()
        ok &= not bad
        rows.append(f"{what}:{e_ours:.2e}/{e_torch:.2e}{'!' if bad else ''}")
    print(f"{'PASS' if ok else 'FAIL'} {name:<44} {' '.join(rows)} [{time.time() - t0:.1f}s]", flush=True)
    return ok


def numerics(match: str = ""):
    """Every case (or those whose name holds one of the comma-separated ``match`` strings)."""
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        t = str(dtype).split(".")[-1]
        for d in (64, 128):
            for causal in (False, True):
                cases.append((f"{t} d{d} N2048 causal={causal}", 2, 16, 16, 2048, 2048, d, dtype, causal))
        cases += [
            (f"{t} d80 odd lengths 1000x777", 2, 8, 8, 1000, 777, 80, dtype, False),
            (f"{t} d96 causal 1000x1000", 2, 8, 8, 1000, 1000, 96, dtype, True),
            (f"{t} d256 N1024", 1, 8, 8, 1024, 1024, 256, dtype, False),
            (f"{t} d16 Nq1 decode 1x4097", 4, 8, 8, 1, 4097, 16, dtype, False),
            (f"{t} GQA 32/4 d128 causal", 1, 32, 4, 1024, 1024, 128, dtype, True),
            # the routes by walk on the H200 (gluon_launch.ROUTES): d = 64 plain at 1k (two consumers,
            # output by TMA); d = 128 causal at 4k with enough (query head, key tile) pairs per SM for
            # the Gluon backward, whose causal programs start longest first there (LPT)
            (f"{t} d64 N1024 plain (two consumers)", 2, 16, 16, 1024, 1024, 64, dtype, False),
            # d = 64 causal from 4k: three consumers in turn (a score of qk and the scale alone)
            (f"{t} d64 N4096 causal (three consumers)", 2, 16, 16, 4096, 4096, 64, dtype, True),
            (f"{t} d128 N4096 causal (backward LPT)", 2, 16, 16, 4096, 4096, 128, dtype, True),
            # split-KV decoding: packed GQA rows, keys split across programs
            (f"{t} decode split-KV GQA 32/8 1x20000", 2, 32, 8, 1, 20000, 128, dtype, False),
            (f"{t} decode split-KV MHA 4x9000 d64", 2, 16, 16, 4, 9000, 64, dtype, False),
        ]
        extra = [
            (f"{t} bool mask (B,1,N,N) d64", dict(mask="bool")),
            (f"{t} bias grad (1,H,N,N) d64", dict(mask="bias", bias_grad=True)),
            (f"{t} bias grad (B,1,1,N) causal", dict(mask="bias_row", bias_grad=True, causal=True)),
            (f"{t} dropout 0.1 causal d64", dict(dropout_p=0.1, causal=True)),
            (f"{t} packed qkv views d64", dict(layout="packed")),
        ]
        for name, kw in extra:
            causal = kw.pop("causal", False)
            cases.append((name, 2, 8, 8, 777, 777, 64, dtype, causal, kw))
        cases.append((f"{t} decode split-KV GQA bool mask 2x8000", 2, 16, 4, 2, 8000, 128, dtype, False,
                      dict(mask="bool")))
    cases.append(("fp32 (ieee) d64 causal 513x513", 2, 4, 4, 513, 513, 64, torch.float32, True))
    ok = True
    if match:
        cases = [c for c in cases if any(m in c[0] for m in match.split(","))]
    for c in cases:
        kw = c[9] if len(c) > 9 else {}
        ok &= check_case(*c[:9], **kw)
    # Dropout keep rate over ~8M draws: within 5 standard deviations of 1 - p.
    seed = torch.tensor([99], device=DEV, dtype=torch.int64)
    keep = testing.dropout_keep_mask(seed, (4, 8, 512, 512), 0.2).float().mean().item()
    sd = math.sqrt(0.2 * 0.8 / (4 * 8 * 512 * 512))
    rate_ok = abs(keep - 0.8) < 5 * sd
    print(f"{'PASS' if rate_ok else 'FAIL'} dropout keep rate {keep:.5f} (expected 0.8 ± {5 * sd:.5f})")
    return ok and rate_ok


# ----------------------------------------------------------------------------- tiles
def tiles():
    """Every binary compiled for the launched kernels (the tuning trials' too, in a process that
    tuned rather than read its choices from disk) uses at most M bytes of shared memory."""
    from fx_flash.codegen import launch

    prof = device_profile(torch.device(DEV))
    print(f"device {prof.name}: M = {prof.shared_memory} B, {prof.multiprocessors} SMs, "
          f"sm_{prof.capability[0]}{prof.capability[1]}")
    ok = True
    for (spec, name, _, dtype, consts, waves, _tuned), chosen in launch.CHOSEN.items():
        shared = []
        for cache in getattr(chosen.fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            shared += [k.metadata.shared for k in kernels.values()]
        worst = max(shared, default=0)
        ok &= worst <= prof.shared_memory
        c = dict(consts)
        print(f"{'PASS' if worst <= prof.shared_memory else 'FAIL'} {name} d{c['HEAD_DIM']} e{dtype.itemsize} "
              f"Nq~{c['N_Q_BUCKET']} Nk~{c['N_KV_BUCKET']} waves~{waves} {spec.name}: {len(shared)} binaries, "
              f"max shared {worst} B; chosen {chosen.config}")
    return ok


# ----------------------------------------------------------------------------- timing
def with_env(fn, **env):
    """``fn`` run with environment variables set (fx_flash reads FX_FLASH_DQ at each call)."""
    def wrapped():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return wrapped


# fx_flash variants: the same op under other settings, switched by environment variables that
# fx_flash reads at each call (set around the whole fwd+bwd step).
FX_VARIANTS = {
    "fx_flash": {},
    "fx_tma": {"FX_FLASH_TMA": "1"},
    "fx_atomic_dq": {"FX_FLASH_DQ": "atomic"},
    "fx_nosplit": {"FX_FLASH_SPLIT_KV": "0"},
}
DEFAULT_VARIANTS = "fx_flash,sdpa,sdpa_cudnn,sdpa_flash,flex,eager"


def fx_variant(name, fn):
    """``fn`` run under fx_flash variant ``name``'s settings. Wrap the whole fwd+bwd step, not
    just the forward: the backward reads the same settings when it launches."""
    return with_env(fn, **FX_VARIANTS[name])


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled FlexAttention per shape: lift Dynamo's recompile limit, or later shapes fall
    # back to flex's unfused eager path and time at a few TFLOP/s.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    return torch.compile(flex_attention, dynamic=False)


def _variant_fns(name, q, k, v, causal, gqa, block_mask, flex, settings=True):
    """The forward of implementation ``name`` on (q, k, v), or None if it does not exist; for an
    fx_flash variant, run under its settings unless ``settings`` is False (the caller wraps)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return f

    d, n = q.shape[-1], q.shape[-2]
    if name in FX_VARIANTS:
        call = lambda: fx_flash.flash_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        return fx_variant(name, call) if settings else call
    table = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
        "sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa),
        "eager": lambda: torch.softmax(
            (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(
                ~torch.ones(n, n, device=DEV, dtype=torch.bool).tril(), float("-inf"))
            if causal else q @ k.transpose(-2, -1) / math.sqrt(d), -1) @ v,
    }
    return table[name]


def time_variants(label, q, k, v, do, causal, flops, variants, flex, rep=100):
    """TFLOP/s of fwd and fwd+bwd per variant, after checking fx_flash against SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, hq, n, d = q.shape
    gqa = hq != k.shape[1]
    bm = create_block_mask((lambda bb, hh, qi, ki: qi >= ki) if causal else (lambda bb, hh, qi, ki: qi >= 0),
                           None, None, n, k.shape[2], device=DEV)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    for name in [x for x in variants if x in FX_VARIANTS]:
        try:
            err = (_variant_fns(name, q, k, v, causal, gqa, bm, flex)() - ref).abs().max().item()
        except Exception as e:  # an experimental variant may not compile: reported in its row
            print(f"{name} {label} raised {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if not err < 2e-2:  # each tuned configuration must be as right as the default one
            print(f"FAIL {name} {label}: max |out - sdpa| = {err:.3g}", flush=True)
            BENCH_OK[0] = False
    rows = []
    for name in variants:
        res = dict(label, impl=name)
        if name == "eager" and b * hq * n * k.shape[2] * q.element_size() * 6 > 60e9:
            rows.append(dict(res, fwd=None, fwdbwd=None, mem=None))
            continue
        raw = _variant_fns(name, q, k, v, causal, gqa, bm, flex, settings=False)
        fwd = fx_variant(name, raw) if name in FX_VARIANTS else raw
        try:
            fwd()
            res["fwd"] = flops / triton.testing.do_bench(fwd, warmup=25, rep=rep, return_mode="median") / 1e9
            step = lambda: torch.autograd.grad(raw(), (q, k, v), do)  # noqa: E731
            if name in FX_VARIANTS:
                step = fx_variant(name, step)  # the backward reads the settings too
            step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            res["mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            res["fwdbwd"] = 3.5 * flops / triton.testing.do_bench(step, warmup=25, rep=rep, return_mode="median") / 1e9
        except Exception as e:  # a backend that refuses a shape is reported, not fatal
            res.update(fwd=res.get("fwd"), fwdbwd=None, mem=None, error=f"{type(e).__name__}: {str(e)[:80]}")
        rows.append(res)
        print(json.dumps(res), flush=True)
    return rows


def bench(dims, ns, variants, dtypes, tokens=16384, hidden=2048, causals=(False, True), group=1):
    """The grid: batch·N = ``tokens``, H = hidden / d query heads (H / group K/V heads)."""
    flex = _flex()
    rows = []
    for dtype in dtypes:
        for d in dims:
            h = hidden // d
            for n in ns:
                b = max(1, tokens // n)
                for causal in causals:
                    q = torch.randn(b, h, n, d, device=DEV, dtype=dtype, requires_grad=True)
                    k, v = (torch.randn(b, h // group, n, d, device=DEV, dtype=dtype, requires_grad=True)
                            for _ in range(2))
                    do = torch.randn_like(q)
                    flops = 4 * b * h * n * n * d / (2 if causal else 1)
                    label = dict(dtype=str(dtype).split(".")[-1], d=d, n=n, causal=causal, group=group)
                    rows += time_variants(label, q, k, v, do, causal, flops, variants, flex)
                    del q, k, v, do
                    torch.cuda.empty_cache()
    return rows


def bench_decode(cases, variants, d=128, dtype=torch.bfloat16):
    """One new token per sequence against a long K/V cache: microseconds and the K/V bandwidth
    (bytes of K and V read once, over the time). Inputs rotate through enough copies to exceed
    the L2 cache."""
    flex = _flex()
    rows = []
    for b, hq, hkv, nk in cases:
        kv_bytes = 2 * b * hkv * nk * d * torch.empty((), dtype=dtype).element_size()
        copies = max(1, math.ceil(512 * 2**20 / kv_bytes))
        sets = [(torch.randn(b, hq, 1, d, device=DEV, dtype=dtype),
                 torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype),
                 torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)) for _ in range(copies)]
        gqa = hq != hkv
        q0, k0, v0 = (t[:2] for t in sets[0])  # checked on two sequences: an fp32 GQA reference of all is huge
        # The eager oracle in fp32 (not SDPA: in fp32 with GQA at 8x8x131072 keys it differed
        # from every bf16 implementation, itself included, by 3.2 on the H200).
        ref = attention_reference(q0.float(), k0.float(), v0.float(), None, 0.0, False, None, gqa)
        label = dict(b=b, hq=hq, hkv=hkv, nk=nk)
        for name in variants:
            fns = [_variant_fns(name, q, k, v, False, gqa, None, flex) for q, k, v in sets]
            turn = [0]

            def fwd(fns=fns, turn=turn):
                turn[0] = (turn[0] + 1) % len(fns)
                return fns[turn[0]]()
            res = dict(label, impl=name)
            try:
                err = (fns[0]()[:2].float() - ref).abs().max().item()
                if name in FX_VARIANTS and not err < 2e-2:
                    print(f"FAIL decode {name} {label}: max |out - ref| = {err:.3g}", flush=True)
                    BENCH_OK[0] = False
                ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
                res.update(us=ms * 1e3, gbps=kv_bytes / ms / 1e6, err=err)
            except Exception as e:
                res.update(us=None, gbps=None, error=f"{type(e).__name__}: {str(e)[:80]}")
            rows.append(res)
            print(json.dumps(res), flush=True)
        del sets, fns
        torch.cuda.empty_cache()
    return rows


def decode_table(rows):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print("\nDecode (Nq = 1, d = 128, bf16): microseconds | GB/s of K/V read")
    print("| batch | Hq/Hkv | Nk | " + " | ".join(impls) + " |")
    print("|---|---|---|" + "---|" * len(impls))
    for key in dict.fromkeys((r["b"], r["hq"], r["hkv"], r["nk"]) for r in rows):
        cell = {r["impl"]: r for r in rows if (r["b"], r["hq"], r["hkv"], r["nk"]) == key}
        vals = ["-" if cell[i].get("us") is None else f"{cell[i]['us']:.0f} \\| {cell[i]['gbps']:.0f}" for i in impls]
        print(f"| {key[0]} | {key[1]}/{key[2]} | {key[3]} | " + " | ".join(vals) + " |")


def host_us(fn, calls=200, warmup=20) -> float:
    """Microseconds of host time per call of ``fn`` (launches queue up; the GPU is not waited on)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def overhead():
    """Host time per call at a tiny size (the GPU finishes first): what launches cost on the CPU."""
    q, k, v = (torch.randn(1, 1, 128, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    cases = {
        "fx_flash fwd": lambda: fx_flash.flash_attention(q, k, v, is_causal=True),
        "sdpa fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "fx_flash fwd+bwd": lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do),
        "sdpa fwd+bwd": lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do),
    }
    for name, fn in cases.items():
        print(f"host overhead {name:<18} {host_us(fn):7.1f} us/call")


def table(rows):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    print("\nTFLOP/s fwd | fwd+bwd (batch*N = 16k, hidden 2048); peak MiB of fwd+bwd for fx_flash | sdpa")
    print("| dtype | d | Hq/Hkv | N | causal | " + " | ".join(impls) + " | mem fx/sdpa |")
    print("|---|---|---|---|---|" + "---|" * len(impls) + "---|")
    keyf = lambda r: (r["dtype"], r["d"], r["group"], r["n"], r["causal"])  # noqa: E731
    for key in dict.fromkeys(keyf(r) for r in rows):
        cell = {r["impl"]: r for r in rows if keyf(r) == key}
        vals = [f"{fmt(cell[i].get('fwd'))} \\| {fmt(cell[i].get('fwdbwd'))}" if i in cell else "" for i in impls]
        mem = f"{fmt(cell.get('fx_flash', {}).get('mem'))}/{fmt(cell.get('sdpa', {}).get('mem'))}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {'yes' if key[4] else 'no'} | " + " | ".join(vals) + f" | {mem} |")


DECODE_CASES = [(b, 32, 8, nk) for b in (1, 8, 64) for nk in (4096, 32768, 131072)] + [
    (1, 32, 32, 32768), (1, 32, 32, 131072), (8, 32, 32, 131072)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numerics", action="store_true")
    ap.add_argument("--match", default="", help="numerics: only cases whose name holds one of these (comma-separated)")
    ap.add_argument("--tiles", action="store_true")
    ap.add_argument("--bench", action="store_true", help="the grid over --dtypes, --dims, --ns, causal and not")
    ap.add_argument("--extra-dims", default="", help="rows at N = 2k, 8k for these head dims, e.g. 80,96,256")
    ap.add_argument("--gqa", action="store_true", help="rows at N = 2k, 8k for d = 128 with Hq/Hkv = 8")
    ap.add_argument("--decode", action="store_true", help="Nq = 1 against long K/V caches")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--decode-variants", default="fx_flash,fx_nosplit,sdpa,flex")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--untuned", action="store_true", help="time fx_flash's default tiles (tuning is on here, "
                    "as in every earlier table, unless this is given)")
    args = ap.parse_args()
    fx_flash.set_autotune(not args.untuned)
    if args.tiles:  # tune afresh, ignoring disk records, so that every candidate is compiled and checked
        os.environ["FX_FLASH_AUTOTUNE_CACHE"] = "0"
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    ok = True
    t0 = time.time()
    dtypes = [getattr(torch, x) for x in args.dtypes.split(",")]
    variants = args.variants.split(",")
    tables = []
    if args.numerics:
        ok &= numerics(args.match)
        print(f"numerics took {time.time() - t0:.0f}s", flush=True)
    rows = []
    if args.bench:
        rows += bench([int(x) for x in args.dims.split(",")], [int(x) for x in args.ns.split(",")], variants, dtypes)
    for d in [int(x) for x in args.extra_dims.split(",") if x]:
        rows += bench([d], [2048, 8192], variants, dtypes)
    if args.gqa:
        rows += bench([128], [2048, 8192], variants, dtypes, group=8)
    if rows:
        with open(os.path.join(args.out, f"bench_{int(time.time())}.json"), "w") as f:
            json.dump(rows, f)
        tables.append(lambda: table(rows))
        ok &= BENCH_OK[0]
    if args.decode:
        drows = bench_decode(DECODE_CASES, args.decode_variants.split(","))
        with open(os.path.join(args.out, f"decode_{int(time.time())}.json"), "w") as f:
            json.dump(drows, f)
        tables.append(lambda: decode_table(drows))
        ok &= BENCH_OK[0]
    if args.overhead:
        overhead()
    if args.tiles:  # after the bench, so the tuner has compiled its candidates
        ok &= tiles()
    for show in tables:  # the tables last: the device tool returns the end of the output
        show()
    print(f"total {time.time() - t0:.0f}s")
    print("ALL PASS" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
