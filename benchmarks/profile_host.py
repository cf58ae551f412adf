"""Host time per call at a tiny size on the GPU (the GPU finishes first, so every microsecond
measured is the CPU's), against SDPA, with the Python profile of each fx_flash case.

    python benchmarks/profile_host.py [--check] [--parts] [--compiled op,triton_op,sdpa] [--out DIR]
    python benchmarks/profile_host.py --compare OLD_DIR NEW_DIR   # two runs' rows.json side by side
    python benchmarks/profile_host.py --decode
    TRITON_INTERPRET=1 python benchmarks/profile_host.py --cpu [--profile]

Rows (B1 H1 N128 d64 causal, bf16, 200 calls after 20, median of 15 rounds in which the rows take
turns; their ratio to SDPA is the median of the per-round ratios, which cancels the host's drift):
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
rounds of 300 calls after 50: on a shared machine the minimum is the undisturbed cost). It
cannot see CUDA allocation, Triton's launcher or the autograd engine's device thread; it is the
A/B for the Python paths, the GPU table (and ``--parts``, the pieces one by one) for the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
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


# A dry run on a machine without a GPU (--device cpu --calls 2, under TRITON_INTERPRET=1) runs
# every row through the interpreter, to check the script before a device call.
DEVICE, CALLS = "cuda", 200
SHAPE = (128, 64)  # (N, d) of the host table's calls (--n, --d)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def host_us(fn, rounds=5) -> float:
    """Median over rounds of the microseconds of host time per call of ``fn`` (launches queue
    up; the GPU is only waited on between rounds)."""
    return _median(interleaved_us([fn], rounds)[0])


def interleaved_us(fns: list, rounds: int = 15, warmup: int = 20) -> list[list[float]]:
    """Per function, the µs of host time per call in each of ``rounds`` rounds, the functions
    taking turns within every round (CALLS calls each), so that a change of the host's speed
    during the run (seen: 2× between processes, 1.7× within one) falls on all of them alike and
    ratios taken round by round cancel it."""
    for fn in fns:
        for _ in range(min(warmup, CALLS)):
            fn()
    _sync()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            out.append((time.perf_counter() - t0) / CALLS * 1e6)
            _sync()
    return times


def _median(xs):
    return sorted(xs)[len(xs) // 2]


class Trivial(torch.autograd.Function):
    """The floor any Python op pays: an autograd.Function on CUDA tensors that allocates its
    outputs and gradients and launches nothing (--parts, --phases)."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, l = torch.empty_like(q), torch.empty(q.shape[:-1], device=q.device)
        ctx.save_for_backward(q, k, v, o, l)
        ctx.mark_non_differentiable(l)
        return o, l

    @staticmethod
    def backward(ctx, go, gl):
        q, k, v, o, l = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


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
        consts, (z, h, n_q, n_kv) = launch._forward_common(spec, q, k, scale)
        config = tiling.default_config("fwd", device_profile(q.device), q.shape[-1], q.element_size(), 0, 0,
                                       consts["N_Q_BUCKET"], consts["N_KV_BUCKET"])
        out = torch.empty_like(q)
        lse = torch.empty((z, h, n_q), device=q.device, dtype=torch.float32)
        wrap_triton(kernel)[(math.ceil(n_q / config.BLOCK_M), z * h)](
            q, k, v, out, lse, q, scale, 0.0, *q.stride(), *k.stride(), *v.stride(), *out.stride(), **consts,
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, num_warps=config.num_warps, num_stages=config.num_stages)
        return out

    return attn_fwd_causal


def host_table(out_dir: str, compiled_rows=("op", "triton_op", "sdpa")) -> list[tuple[str, str, float]]:
    """(case, implementation, µs per call) rows, printed as a table and written to
    out_dir/rows.json; profiles to out_dir. ``compiled_rows``: which torch.compile rows to add."""
    q, k, v = (torch.randn(1, 1, SHAPE[0], SHAPE[1], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
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
    if SHAPE != (128, 64):  # a shape the Gluon kernels may take: the portable ones beside them
        cases[1:1] = [("fwd", "fx_flash, FX_FLASH_GLUON=0", with_env(fx_fwd, FX_FLASH_GLUON="0"))]
        cases.insert(5, ("fwd+bwd", "fx_flash, FX_FLASH_GLUON_BWD=1", with_env(grad(fx_fwd), FX_FLASH_GLUON_BWD="1")))
        cases.insert(6, ("fwd+bwd", "fx_flash, FX_FLASH_GLUON=0 FX_FLASH_GLUON_BWD=0",
                         with_env(grad(fx_fwd), FX_FLASH_GLUON="0", FX_FLASH_GLUON_BWD="0")))
    qi, ki, vi = (t.detach() for t in (q, k, v))
    compiled = [("compiled: fx_flash op", lambda q, k, v: fx_flash.flash_attention(q, k, v, is_causal=True)),
                ("compiled: sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
    compiled = [c for c, row in zip(compiled, ("op", "sdpa")) if row in compiled_rows]
    try:
        if "triton_op" in compiled_rows:
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
    times = interleaved_us([fn for _, _, fn in cases])
    rows = [(case, impl, _median(ts)) for (case, impl, _), ts in zip(cases, times)]
    listing = io.StringIO()
    for case, impl, fn in cases:
        if impl.startswith("fx_flash") or "triton_op" in impl:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(CALLS):
                fn()
            profile.disable()
            _sync()
            listing.write(f"\n=== {case} {impl}: {CALLS} calls\n")
            pstats.Stats(profile, stream=listing).sort_stats("tottime").print_stats(30)
    with open(os.path.join(out_dir, "profile_host.txt"), "w") as f:
        f.write(listing.getvalue())
    with open(os.path.join(out_dir, "rows.json"), "w") as f:
        json.dump(rows, f)
    base = {}  # case → the round times of its reference row (sdpa; compiled sdpa for the compiled rows)
    for (case, impl, _), ts in zip(cases, times):
        if impl in ("sdpa", "compiled: sdpa"):
            base.setdefault(case, ts)
    print(f"\nHost time per call, B1 H1 N{SHAPE[0]} d{SHAPE[1]} causal bf16 (µs; median of {len(times[0])} rounds of {CALLS} "
          "calls, the rows taking turns in each round; / sdpa: the median of the per-round ratios, "
          "and their range):\n")
    print("| case | implementation | µs per call | / sdpa | range of / sdpa |")
    print("|---|---|---|---|---|")
    for (case, impl, _), ts in zip(cases, times):
        ref = base.get(case)
        if ref is None:
            print(f"| {case} | {impl} | {_median(ts):.1f} | - | - |")
            continue
        ratios = [a / b for a, b in zip(ts, ref)]
        print(f"| {case} | {impl} | {_median(ts):.1f} | {_median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")
    return rows


def check_against_sdpa() -> bool:
    """The eager path's answers on repeated calls (the first binds each kernel, later ones launch
    it directly) against SDPA in fp32: the table's causal shape, and a float mask that requires
    grad at d = 128 (operand and operand-gradient arguments). Prints one line per case."""
    ok = True
    for name, (b, h, n, d), mask_shape in (("causal d64", (1, 1, 128, 64), None),
                                           ("bias grad d128", (2, 3, 77, 128), (2, 1, 77, 77))):
        q, k, v = (torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = None if mask_shape is None else torch.randn(mask_shape, device=DEVICE, requires_grad=True)
        inputs = (q, k, v) + (() if mask is None else (mask,))
        do = torch.randn_like(q)
        causal = mask is None
        ref_in = [t.detach().float().requires_grad_() for t in inputs]
        ref_out = F.scaled_dot_product_attention(*ref_in[:3], attn_mask=None if mask is None else ref_in[3],
                                                 is_causal=causal)
        ref = (ref_out, *torch.autograd.grad(ref_out, ref_in, do.float()))
        worst = 0.0
        for _ in range(3):
            out = fx_flash.flash_attention(q, k, v, attn_mask=mask, is_causal=causal)
            got = (out, *torch.autograd.grad(out, inputs, do))
            worst = max(worst, *((g.float() - r).abs().max().item() / max(r.abs().max().item(), 1e-6)
                                 for g, r in zip(got, ref)))
        good = worst < 2e-2
        ok &= good
        print(f"check {name}: max relative |fx_flash - sdpa fp32| over out and grads, 3 calls = {worst:.2e}: "
              f"{'PASS' if good else 'FAIL'}", flush=True)
    return ok


def _single_threaded(fn):
    """``fn`` with autograd's backward run on the calling thread (no device-thread hand-off)."""
    def call():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()
    return call


def parts_table() -> list[tuple[str, float]]:
    """Where the host time of a call goes, piece by piece (µs per call, GPU host): the pieces of
    fx_flash's path and the floors any Python op pays (an autograd.Function on CUDA tensors)."""
    from fx_flash.codegen import launch
    from fx_flash.codegen.spec import sdpa_spec

    q, k, v = (torch.randn(1, 1, 128, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    qi, ki, vi = (t.detach() for t in (q, k, v))
    spec = sdpa_spec(causal=True)
    out, lse = launch.attention_forward(qi, ki, vi, [], None, 0.0, 0.125, spec)
    plan = launch._FORWARDS[launch._plan_key(spec, qi, 0.0, 0.125, (qi, ki, vi, None))]

    fx_graph = fx_flash.flash_attention(q, k, v, is_causal=True)
    sdpa_graph = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    parts = [
        ("torch.empty (B,H,N) fp32, CUDA", lambda: torch.empty((1, 1, 128), device=DEVICE, dtype=torch.float32)),
        ("torch.empty_like (B,H,N,d), CUDA", lambda: torch.empty_like(qi)),
        ("one direct launch of the forward kernel (plan.run, outputs given)",
         lambda: plan.run(qi, ki, vi, out, lse, [], None)),
        ("plan key of a forward", lambda: launch._plan_key(spec, qi, 0.0, 0.125, (qi, ki, vi, None))),
        ("launch.attention_forward (key, plan, 2 outputs, launch)",
         lambda: launch.attention_forward(qi, ki, vi, [], None, 0.0, 0.125, spec)),
        ("fx_flash.flash_attention, no grad", lambda: fx_flash.flash_attention(qi, ki, vi, is_causal=True)),
        ("trivial autograd.Function on CUDA tensors: forward (2 allocations)", lambda: Trivial.apply(q, k, v)),
        ("the same, forward + autograd.grad (3 more allocations)",
         lambda: torch.autograd.grad(Trivial.apply(q, k, v)[0], (q, k, v), do)),
        ("fx_flash backward only (autograd.grad, retain_graph)",
         lambda: torch.autograd.grad(fx_graph, (q, k, v), do, retain_graph=True)),
        ("sdpa backward only (autograd.grad, retain_graph)",
         lambda: torch.autograd.grad(sdpa_graph, (q, k, v), do, retain_graph=True)),
        # Autograd runs a CUDA graph's backward on its device thread, which must take the GIL to
        # call a Python node; on the calling thread instead, the hand-off is gone.
        ("fx_flash fwd+bwd", lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do)),
        ("fx_flash fwd+bwd, backward on the calling thread",
         _single_threaded(lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), do))),
        ("trivial autograd.Function fwd+bwd, backward on the calling thread",
         _single_threaded(lambda: torch.autograd.grad(Trivial.apply(q, k, v)[0], (q, k, v), do))),
        ("sdpa fwd+bwd", lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)),
        ("sdpa fwd+bwd, backward on the calling thread",
         _single_threaded(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do))),
    ]
    rows = [(name, host_us(fn)) for name, fn in parts]
    print("\nWhere the host time goes (µs per call, B1 H1 N128 d64 causal bf16):\n")
    print("| piece | µs |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    return rows


def compare(old_dir: str, new_dir: str) -> None:
    """The old and new rows.json side by side, each against SDPA's row of its own run."""
    def load(d):
        return {(case, impl): us for case, impl, us in json.load(open(os.path.join(d, "rows.json")))}

    old, new = load(old_dir), load(new_dir)
    print("\n| case | fx_flash old | fx_flash new | sdpa (old run / new run) | old / sdpa | new / sdpa |")
    print("|---|---|---|---|---|---|")
    for case, impl in new:
        if impl == "sdpa" or not impl.startswith("fx_flash"):
            continue
        o, n = old.get((case, impl)), new[(case, impl)]
        so, sn = old.get((case, "sdpa")), new.get((case, "sdpa"))
        if so is None or sn is None or o is None:
            continue
        print(f"| {case} ({impl}) | {o:.1f} | {n:.1f} | {so:.1f} / {sn:.1f} | {o / so:.2f} | {n / sn:.2f} |")


def decode_profile(top: int) -> None:
    q = torch.randn(1, 32, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 4096, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    step = lambda: fx_flash.flash_attention(q, k, v, enable_gqa=True)  # noqa: E731
    print(f"decode fwd: {host_us(step):.1f} us of host time per call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


def phases_table() -> list[tuple[str, ...]]:
    """Where one forward+backward's host time goes in time, phase by phase (µs, median of 200
    calls after 20): the forward; autograd.grad up to the backward's Python entry (the hand-off to
    the device thread); the backward's Python; from its return to autograd.grad's (the hand-back);
    freeing the graph (``del out``). For fx_flash, a trivial autograd.Function and SDPA (whose
    backward is C++: its grad is one phase), each also with Python's garbage collector off (a
    difference there is collection work the calls cause) and with the backward on the calling
    thread (no hand-off)."""
    import gc

    from fx_flash import ops

    q, k, v = (torch.randn(1, 1, 128, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    stamps = {}

    def stamped(backward):
        def wrapper(ctx, *grads):
            stamps["enter"] = time.perf_counter_ns()
            result = backward(ctx, *grads)
            stamps["leave"] = time.perf_counter_ns()
            return result
        return staticmethod(wrapper)

    impls = [("fx_flash", lambda: fx_flash.flash_attention(q, k, v, is_causal=True), ops._AttnFunction),
             ("trivial Function", lambda: Trivial.apply(q, k, v)[0], Trivial),
             ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), None)]
    rows = []
    for name, fwd, cls in impls:
        real = cls.backward if cls is not None else None
        if cls is not None:
            cls.backward = stamped(real)
        for variant in ("", "gc off", "calling thread"):
            phases = {key: [] for key in ("fwd", "to backward", "backward", "back", "grad", "free", "total")}
            guard = torch.autograd.set_multithreading_enabled(variant != "calling thread")
            with guard:
                if variant == "gc off":
                    gc.disable()
                try:
                    for i in range(20 + CALLS):
                        stamps.clear()
                        t0 = time.perf_counter_ns()
                        out = fwd()
                        t1 = time.perf_counter_ns()
                        grads = torch.autograd.grad(out, (q, k, v), do)
                        t2 = time.perf_counter_ns()
                        del out, grads
                        t3 = time.perf_counter_ns()
                        if i >= 20:
                            phases["fwd"].append(t1 - t0)
                            phases["grad"].append(t2 - t1)
                            phases["free"].append(t3 - t2)
                            phases["total"].append(t3 - t0)
                            if stamps:
                                phases["to backward"].append(stamps["enter"] - t1)
                                phases["backward"].append(stamps["leave"] - stamps["enter"])
                                phases["back"].append(t2 - stamps["leave"])
                finally:
                    gc.enable()
            _sync()
            med = {key: (sorted(vals)[len(vals) // 2] / 1e3 if vals else None) for key, vals in phases.items()}
            rows.append((name + (f", {variant}" if variant else ""), med))
        if cls is not None:
            cls.backward = staticmethod(real)
    keys = ("fwd", "to backward", "backward", "back", "grad", "free", "total")
    print("\nPhases of one fwd+bwd (µs, median of %d calls; B1 H1 N128 d64 causal bf16):\n" % CALLS)
    print("| implementation | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, med in rows:
        print(f"| {name} | " + " | ".join("-" if med[key] is None else f"{med[key]:.1f}" for key in keys) + " |")
    return rows


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
    ap.add_argument("--compiled", default="op,triton_op,sdpa",
                    help="torch.compile rows to add, comma-separated from op,triton_op,sdpa ('' for none)")
    ap.add_argument("--check", action="store_true", help="first: repeated calls against SDPA (PASS/FAIL)")
    ap.add_argument("--parts", action="store_true", help="after the table: where the host time goes")
    ap.add_argument("--phases", action="store_true", help="after the table: one fwd+bwd's phases in time")
    ap.add_argument("--compare", nargs=2, metavar=("OLD_DIR", "NEW_DIR"), help="print two runs' rows side by side")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    ap.add_argument("--calls", type=int, default=200, help="calls per round (2 for a dry run)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--n", type=int, default=128, help="the host table's sequence length")
    ap.add_argument("--d", type=int, default=64, help="the host table's head dim (128: the Gluon forward's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    global DEVICE, CALLS, SHAPE
    DEVICE, CALLS, SHAPE = args.device, args.calls, (args.n, args.d)
    if args.compare:
        compare(*args.compare)
    elif args.cpu:
        cpu_table(args.profile)
    elif args.decode:
        decode_profile(args.top)
    else:
        os.makedirs(args.out, exist_ok=True)
        if args.check and not check_against_sdpa():
            sys.exit("fx_flash disagrees with SDPA: no timings")
        host_table(args.out, tuple(x for x in args.compiled.split(",") if x))
        if args.parts:
            parts_table()
        if args.phases:
            phases_table()


if __name__ == "__main__":
    main()
