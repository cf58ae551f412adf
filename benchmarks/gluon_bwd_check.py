"""GPU evidence for the Gluon sm90 backward (fx_flash/codegen/gluon_bwd.py), in one run: dq, dk, dv
against an fp32 reference on every case kind, then fwd+bwd TFLOP/s beside cuDNN SDPA and the
portable backward.

    python benchmarks/gluon_bwd_check.py [--ns 2048,8192] [--dims 128] [--small 2048,8192] [--limit 120] [--bench-limit 110]
        [--schedules base,dv,rows,dv+rows,keys,keys+rows,rows@128] [--rounds 3] [--no-grid] [--fp16 2048,8192]

Call 6 (benchmarks/GLUON_NOTES.md): the command above with its defaults.

Two phases, each child process with its own time limit, so a kernel that hangs (a wrong mbarrier
phase waits forever) costs its own rows, not the run:
1. numerics, in parallel: one child per (dtype, head dim): the Gluon backward (launched directly
   at the tile each case's spec is routed to, its outputs and dQ accumulator poisoned with NaN
   first) on plain, causal, soft-capping, ragged
   N_Q, N_Q = 77, GQA 16/2, N_Q > N_KV and prefix-LM, checked with flash-attn's rule (the max error at most
   twice PyTorch's own error in the test dtype, plus 1e-2·max(1, √max|ref|)) against fp32 eager
   autograd; and, in the bf16 children (d = 128 and 64), ``fx_flash.flash_attention`` with the switches at their
   defaults (the routed path: the Gluon backward decided once, three calls, see ``routed``).
2. timing, one child alone on the GPU, at each head dim of --dims (128 by default), bf16 (and
   fp16 at d = 128 for each N of --fp16), batch·N = 16k, hidden 2048: fwd+bwd of cuDNN SDPA (first
   and last in each row: its rate drifts within a process), fx_flash with every kernel portable,
   with the Gluon forward forced and the portable backward (FX_FLASH_GLUON=1,
   FX_FLASH_GLUON_BWD=0), and with the switches at their defaults if phase 1 passed (whether its
   backward was the Gluon kernel is recorded); and the backward alone of the last two (autograd's
   backward from a saved forward). TFLOP/s = 3.5·4·B·H·N²·d (halved when causal) / time; the
   backward alone counts 2.5·4·B·H·N²·d.
   --no-grid skips it.
3. with --schedules: the backward alone at each head dim of --dims and N of --ns, the Gluon kernel
   at each named step schedule (SCHEDULES: GluonBwdConfig's flags; "rows+lpt": with the causal
   longest-first program order too, "rows+tmaepi" with dK and dV stored by TMA (EXTRAS);
   "rows@128": with 128 query rows a step; "NAME=2": NAME again under a second label, a control
   column that measures the spread between identical kernels) launched directly, beside cuDNN's and the portable backward (--rounds R: each
   schedule R times, alternating the order, the median reported). Phase 1 then checks every
   schedule in its bf16 children (one whose tile does not fit at a head dim is skipped there), the
   first and last named in the fp16 ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

sys.path.insert(0, HERE)
import gluon_check  # noqa: E402  (the forward's check: its eager reference and child runner)
from gluon_check import PREFIX_LM, SOFTCAP, _err  # noqa: E402


def _eager(q, k, v, scale, causal, softcap, prefix=0):
    return gluon_check._eager(q, k, v, scale, causal, softcap, prefix)[0]


def _cases():
    """(label, b, hq, hkv, nq, nk, spec text, causal, softcap[, prefix]); a label with "BNHD": q, k,
    v and dO as (B, N, H, d) storage seen as (B, H, N, d), what HF models pass; ``prefix``: every
    row also sees the first ``prefix`` keys (gluon_check._eager)."""
    return [
        ("plain 2x8x1024", 2, 8, 8, 1024, 1024, "score=qk*scale", False, False),
        ("causal 2x8x1024", 2, 8, 8, 1024, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        ("softcap causal 2x8x1024", 2, 8, 8, 1024, 1024, SOFTCAP, True, True),
        # N_Q not a multiple of 64: the last Q/dO tile reads the next head's rows, weighs 0.
        ("causal ragged Nq 1000x1024", 2, 8, 8, 1000, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        ("plain Nq 77 x Nk 512", 3, 4, 4, 77, 512, "score=qk*scale", False, False),
        # A program walks the 8 query heads of its K/V head, its Q/dO ring running on across them.
        ("causal GQA 16/2 1024", 2, 16, 2, 1024, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        ("causal Nq>Nk 2048x1024", 1, 8, 8, 2048, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        # Key tiles past N_Q see no query (top-left aligned): their walks are empty, dK = dV = 0.
        ("causal Nq<Nk 384x1024", 2, 8, 8, 384, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        # Heads side by side in each row: the last query tile of a batch reads the next batch's rows.
        ("BNHD causal ragged Nq 1000x1024", 2, 8, 8, 1000, 1024, "score=qk*scale; keep=kv_idx <= q_idx", True, False),
        ("BNHD softcap causal GQA 16/4 1024", 2, 16, 4, 1024, 1024, SOFTCAP, True, True),
        # A predicate that is not causal: applied on every tile (MASK = 2), both positions read.
        ("prefix-LM 64 1024", 2, 8, 8, 1024, 1024, PREFIX_LM, True, False, 64),
    ]


def _randn(b, h, n, d, dtype, bnhd):
    if bnhd:
        return torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    return torch.randn(b, h, n, d, device="cuda", dtype=dtype)


def _grouped(qkv, group):
    """q, and k, v repeated over the GROUP query heads that read each (GQA)."""
    q, k, v = qkv
    return q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


@contextlib.contextmanager
def _poisoned_empty():
    """torch.empty returns NaN-filled floating tensors (every output element must be written; the
    dQ accumulator must be zeroed by the Delta kernel)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def _rule(name, ours, torch_same, ref):
    e, et = _err(ours, ref), _err(torch_same, ref)
    good = bool(torch.isfinite(ours).all().item()) and e <= 2 * et + 1e-2 * max(1.0, ref.abs().max().item() ** 0.5)
    return good, f"{name} {e:.2e}/{et:.2e}{'' if good else '!'}"


# step schedules (GluonBwdConfig's flags) by name, for --schedules
SCHEDULES = {"base": (), "dv": ("DV_EARLY", ), "rows": ("ROWS_AHEAD", ), "dv+rows": ("DV_EARLY", "ROWS_AHEAD"),
             "keys": ("KEYS_ON_ROWS", ), "keys+rows": ("KEYS_ON_ROWS", "ROWS_AHEAD"), "shared": ("ROWS_SHARED", ),
             "dv+shared": ("DV_EARLY", "ROWS_SHARED"), "keys+shared": ("KEYS_ON_ROWS", "ROWS_SHARED"),
             "rows+msplit": ("ROWS_AHEAD", "SPLIT_M")}  # SPLIT_M: with "@128" only


# options a SCHEDULES name may add at its end (GluonBwdConfig's flags)
EXTRAS = {"+lpt": "LPT", "+tmaepi": "TMA_EPILOGUE", "+pers": "PERSISTENT", "+dqil": "DQ_INTERLEAVE"}


def _flags(name):
    """The flags of a SCHEDULES name, which may end in EXTRAS' suffixes: "+lpt", the causal
    longest-first order (LPT) too; "+tmaepi", dK and dV stored by TMA (TMA_EPILOGUE); "+pers", one
    program per SM walking key tiles from the launcher's table (PERSISTENT); "+dqil", the dQ shares'
    rows interleaved in their staging tile (DQ_INTERLEAVE)."""
    extra = ()
    while True:
        for suffix, flag in EXTRAS.items():
            if name.endswith(suffix):
                name, extra = name[:-len(suffix)], (flag, ) + extra
                break
        else:
            return SCHEDULES[name] + extra


def _config(d, schedule=None, spec=None):
    """The backward's tile on this GPU at head dim d; with ``schedule`` (a SCHEDULES name) its flags
    set to that schedule's, else the default's (for ``spec``: the routed tile,
    gluon_launch.routed_backward_config). A name may add "+lpt" (_flags), then end in "@M": BLOCK_M = M query rows a
    step, with the deepest Q/dO ring (at most BWD_MAX_STAGES) that then fits M; None when two
    stages do not fit."""
    import dataclasses

    from fx_flash.codegen import gluon_launch
    from fx_flash.device import device_profile

    device = device_profile(torch.device("cuda"))
    if schedule is not None:
        schedule = schedule.partition("=")[0]  # "NAME=2": NAME timed again under its own label (a control)
    if schedule is None:
        if spec is not None:
            return gluon_launch.routed_backward_config(device, spec, d, 2)
        return gluon_launch.backward_config(device, d, 2)
    cfg = gluon_launch.backward_config(device, d, 2)
    schedule, _, rows = schedule.partition("@")
    flags = _flags(schedule)
    cfg = dataclasses.replace(cfg, **{name: name in flags for name in cfg.schedule})
    if rows:
        stages = [s for s in range(2, gluon_launch.BWD_MAX_STAGES + 1)
                  if gluon_launch.footprint_bwd(int(rows), cfg.BLOCK_N, d, 2, s, cfg.KEYS_ON_ROWS,
                                                cfg.ROWS_SHARED) <= device.shared_memory]
        cfg = dataclasses.replace(cfg, BLOCK_M=int(rows), STAGES=max(stages)) if stages else None
    return cfg


def numerics(d, dtype, schedules=(None, )):
    """The Gluon backward on every case, launched directly, at each schedule; True if all pass."""
    ok = True
    for schedule in schedules:
        if schedule is not None and _config(d, schedule) is None:
            print(f"SKIP d{d} {schedule}: two stages of its tile do not fit in shared memory", flush=True)
            continue
        ok &= _numerics(d, dtype, schedule)
    if dtype == torch.bfloat16:  # the default path at each head dim it is routed for
        ok &= routed(d)
    return ok


def _numerics(d, dtype, schedule):
    """Every case of _cases at ``schedule``'s tile (None: the routed tile of each case's spec)."""
    from fx_flash.codegen import gluon_launch, launch
    from fx_flash.codegen.spec import spec_from_text

    ok = True
    for label, b, hq, hkv, nq, nk, text, causal, softcap, *prefix in _cases():
        spec = spec_from_text(text)
        cfg = _config(d, schedule, spec)
        bnhd = "BNHD" in label
        q, do = (_randn(b, hq, nq, d, dtype, bnhd) for _ in range(2))
        k, v = (_randn(b, hkv, nk, d, dtype, bnhd) for _ in range(2))
        scale = 1 / math.sqrt(d)
        out, lse = launch.attention_forward(q, k, v, [], None, 0.0, scale, spec)
        reason = gluon_launch.unsupported_backward_call(spec, do, q, k, v, lse, cfg)
        if reason:
            print(f"FAIL d{d} {str(dtype)[6:]} {label} [{cfg}]: refused: {reason}", flush=True)
            ok = False
            continue
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        same_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(_eager(*_grouped(ref_in, hq // hkv), scale, causal, softcap, *prefix), ref_in,
                                  do.float())
        same = torch.autograd.grad(_eager(*_grouped(same_in, hq // hkv), scale, causal, softcap, *prefix), same_in, do)
        # PERSISTENT: also on 5 programs, each walking several key tiles, its ring running on across them
        for programs in (None, 5) if cfg.PERSISTENT else (None, ):
            tag = f"d{d} {str(dtype)[6:]} {label} [{cfg}]" + (f" on {programs} programs" if programs else "")
            try:
                with _poisoned_empty():
                    grads = gluon_launch.launch_backward(spec, do, q, k, v, out, lse, scale, cfg, programs)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported per case, the rest still runs
                print(f"FAIL {tag}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                ok = False
                continue
            rows, good = [], True
            for name, a, t, r in zip(("dq", "dk", "dv"), grads, same, ref):
                g, row = _rule(name, a, t, r)
                good &= g
                rows.append(row)
            ok &= good
            print(f"{'PASS' if good else 'FAIL'} {tag}: {' '.join(rows)}", flush=True)
    return ok


def _record_routes(decider="routed_backward", configs=None):
    """Wrap gluon_launch's ``decider`` (routed_backward, or routed_forward) so that each decision
    appends whether the Gluon kernel took the call (and, to ``configs`` if given, its tile as text,
    or None); returns that list and a function putting the real one back."""
    from fx_flash.codegen import gluon_launch

    real, record = getattr(gluon_launch, decider), []

    def recording(*args):
        launch = real(*args)
        record.append(launch is not None)
        if configs is not None:
            configs.append(str(launch.config) if launch is not None else None)
        return launch

    setattr(gluon_launch, decider, recording)
    return record, lambda: setattr(gluon_launch, decider, real)


def routed(d):
    """fx_flash.flash_attention(is_causal=True) with the switches at their defaults: the backward
    is routed to the Gluon kernel (decided once for the key, launched three times: the first
    through JITFunction.run, the others through the bound launchers), dk and dv bitwise equal
    across the calls (dQ's sum has no fixed order), and out, dq, dk, dv follow the rule."""
    import fx_flash

    tiles = []
    decided, restore = _record_routes(configs=tiles)
    saved = {name: os.environ.pop(name, None) for name in ("FX_FLASH_GLUON", "FX_FLASH_GLUON_BWD")}
    try:
        q, k, v = (torch.randn(4, 16, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        out = fx_flash.flash_attention(q, k, v, is_causal=True)
        runs = [torch.autograd.grad(out, (q, k, v), do, retain_graph=True) for _ in range(3)]
        grads = runs[0]
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
        restore()
    same = all(torch.equal(a[i], b[i]) for a in runs[1:] for b in runs[:1] for i in (1, 2))
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ins16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = _eager(*ins32, 1 / math.sqrt(d), True, False)
    tor = _eager(*ins16, 1 / math.sqrt(d), True, False)
    ok, rows = decided == [True] and same, []
    tor_grads = torch.autograd.grad(tor, ins16, do)
    ref_grads = torch.autograd.grad(ref, ins32, do.float())
    for name, a, t, r in [("out", out, tor, ref)] + list(zip(["dq", "dk", "dv"], grads, tor_grads, ref_grads)):
        good, row = _rule(name, a, t, r)
        ok &= good
        rows.append(row)
    for run in runs[1:]:  # the later calls' dq by the rule too
        ok &= _rule("dq", run[0], tor_grads[0], ref_grads[0])[0]
    print(f"{'PASS' if ok else 'FAIL'} d{d} flash_attention causal 4x16x2048 (1024 query-head/key-tile pairs), "
          f"default switches (routed to the gluon "
          f"backward, decided once: {decided}, tile {tiles[0]}; dk, dv of 3 calls bitwise equal: {same}): "
          f"{' '.join(rows)}", flush=True)
    return ok


# fx_flash columns: (name, FX_FLASH_GLUON, FX_FLASH_GLUON_BWD)
# (None: unset, the default path: at full batch the Gluon forward at d = 128, the Gluon backward at
# the head dims it is routed for)
FX_COLUMNS = [("fx portable", "0", "0"), ("fx gluon fwd + portable bwd", "1", "0"), ("fx default", None, None)]


def bench(ns, gluon_ok, dims=(128, ), fp16_ns=()):
    """TFLOP/s rows, fwd+bwd (and the backward alone of the fx columns but the portable one), bf16
    at each head dim of ``dims`` and N of ``ns``, then fp16 at d = 128 and each N of ``fp16_ns``."""
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fx_flash

    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    gluon_calls, _ = _record_routes()  # this child process only
    columns = FX_COLUMNS if gluon_ok else FX_COLUMNS[:2]
    cases = [(torch.bfloat16, d, n) for d in dims for n in ns] + [(torch.float16, 128, n) for n in fp16_ns]
    for dtype, d, n in cases:
        for causal in (False, True):
            b, h = 16384 // n, 2048 // d
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            work = 4 * b * h * n * n * d / (2 if causal else 1)
            row = dict(d=d, n=n, causal=causal, dtype=str(dtype)[6:])

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return torch.autograd.grad(out, (q, k, v), do)

            def run(name, fn, flops):
                try:
                    fn()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row[name] = round(flops / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    row[name] = type(e).__name__
                    print(f"{name} n{n} causal={causal}: {type(e).__name__}: {str(e)[:300]}", flush=True)

            run("cudnn", cudnn, 3.5 * work)
            for name, fwd, bwd in columns:
                for switch, value in (("FX_FLASH_GLUON", fwd), ("FX_FLASH_GLUON_BWD", bwd)):
                    if value is None:
                        os.environ.pop(switch, None)
                    else:
                        os.environ[switch] = value
                gluon_calls.clear()
                run(name, lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal), (q, k, v),
                                                      do), 3.5 * work)
                if name != "fx portable":  # the backward alone, from one saved forward
                    out = fx_flash.flash_attention(q, k, v, is_causal=causal)
                    run(name + " (bwd)", lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                        2.5 * work)
                if bwd is None:
                    row["gluon bwd"] = any(gluon_calls)  # the default's backward was routed
            os.environ.pop("FX_FLASH_GLUON", None)
            os.environ.pop("FX_FLASH_GLUON_BWD", None)
            run("cudnn again", cudnn, 3.5 * work)
            print("ROW " + json.dumps(row), flush=True)


def schedule_rows(ns, dims, names, rounds=1):
    """The backward alone, TFLOP/s (2.5·4·B·H·N²·d, halved when causal), bf16, batch·N = 16k,
    hidden 2048, plain, causal, and causal with soft-capping (SOFTCAP; the Gluon kernel only): the
    Gluon kernel at each step schedule of ``names`` (launched directly from one
    saved forward: the Delta kernel, the main one, dQ's cast), beside cuDNN's backward and the
    portable one (autograd's, from a saved forward), in one process, cuDNN first and last. The
    GPU's rate drifts down within a row (cuDNN's last timing 0-9% below its first, call 21), which
    favours the schedules timed first: with ``rounds`` > 1 the schedules are timed that many times,
    in turn forward and backward order, and each cell is the median of its rounds."""
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fx_flash
    from fx_flash.codegen import gluon_launch, launch
    from fx_flash.codegen.spec import spec_from_text

    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    for d, n in [(d, n) for d in dims for n in ns]:
        for causal in (False, True, "softcap"):
            softcap = causal == "softcap"  # causal with soft-capping: the Gluon schedules only
            b, h = 16384 // n, 2048 // d
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            work = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
            row = dict(d=d, n=n, causal=causal)

            def timed(name, fn):
                try:
                    fn()
                    torch.cuda.synchronize()
                    row[name] = round(work / triton.testing.do_bench(fn, warmup=25, rep=100,
                                                                     return_mode="median") / 1e9)
                except Exception as e:  # noqa: BLE001
                    row[name] = type(e).__name__
                    print(f"{name} d{d} n{n} causal={causal}: {type(e).__name__}: {str(e)[:300]}", flush=True)

            if not softcap:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                timed("cudnn", lambda: torch.autograd.grad(ref_out, (q, k, v), do, retain_graph=True))
                os.environ["FX_FLASH_GLUON_BWD"] = "0"
                out = fx_flash.flash_attention(q, k, v, is_causal=causal)
                timed("portable", lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                os.environ.pop("FX_FLASH_GLUON_BWD")
            spec = spec_from_text(SOFTCAP if softcap else "score=qk*scale; keep=kv_idx <= q_idx" if causal
                                  else "score=qk*scale")
            scale = 1 / math.sqrt(d)
            qd, kd, vd = (t.detach() for t in (q, k, v))
            o, lse = launch.attention_forward(qd, kd, vd, [], None, 0.0, scale, spec)
            taken = {name: [] for name in names}
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    cfg = _config(d, name)
                    if cfg is None:  # its tile does not fit at this head dim
                        row[name] = "-"
                    else:
                        timed(name, lambda: gluon_launch.launch_backward(spec, do, qd, kd, vd, o, lse, scale, cfg))
                    taken[name].append(row[name])
            for name, rates in taken.items():
                numbers = sorted(x for x in rates if isinstance(x, int))
                row[name] = numbers[len(numbers) // 2] if len(numbers) == len(rates) else rates[-1]
            if not softcap:
                timed("cudnn again", lambda: torch.autograd.grad(ref_out, (q, k, v), do, retain_graph=True))
            print("SCHED " + json.dumps(row), flush=True)


def few_programs(ns):
    """The Gluon backward has one program per 128-key tile and K/V head: with few heads it fills
    few of the SMs, and small calls are host-bound. fwd+bwd milliseconds at d = 128, bf16, B = 1
    and H = 1..32 (causal or not), with the switches at their defaults (routed: whether the Gluon
    backward took the call), with FX_FLASH_GLUON_BWD=1 (it takes every call) and =0 (do_bench:
    the GPU's time where it is longer than the host's, the host's otherwise)."""
    import triton.testing

    import fx_flash

    routed, _ = _record_routes()  # this child process only
    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n in ns:
        for causal in (False, True):
            for h in (1, 2, 4, 8, 16, 32):
                q, k, v = (torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                row = dict(n=n, causal=causal, h=h, programs=n // 128 * h, sms=sms)
                routed.clear()
                for name, value in (("default", None), ("gluon bwd", "1"), ("portable bwd", "0")):
                    if value is not None:
                        os.environ["FX_FLASH_GLUON_BWD"] = value
                    step = lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal),  # noqa: E731
                                                       (q, k, v), do)
                    step()
                    row[name] = round(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"), 4)
                    os.environ.pop("FX_FLASH_GLUON_BWD", None)
                row["routed"] = routed[0]
                row["ratio"] = round(row["portable bwd"] / row["gluon bwd"], 3)
                print("SMALL " + json.dumps(row), flush=True)


def child(what, ns):
    parts = what.split(":")
    if parts[0] == "numerics":
        names = parts[3].split(",") if len(parts) > 3 and parts[3] else [None]
        ok = numerics(int(parts[1]), getattr(torch, parts[2]), names)
    elif parts[0] == "schedules":
        schedule_rows(ns, [int(x) for x in parts[1].split(",")], parts[2].split(","), int(parts[3]))
        ok = True
    elif parts[0] == "small":
        few_programs(ns)
        ok = True
    else:
        bench(ns, parts[1] == "1", [int(x) for x in parts[2].split(",")],
              [int(x) for x in parts[3].split(",") if x] if len(parts) > 3 else ())
        ok = True
    print("CHILD " + ("PASS" if ok else "FAIL"), flush=True)


def _run_child(what, ns, limit):
    return gluon_check._run_child(what, ns, limit, script=__file__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="2048,8192")
    ap.add_argument("--dims", default="128", help="head dims of the timing rows")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds per numerics child")
    ap.add_argument("--bench-limit", type=float, default=110.0, help="seconds of the timing child")
    ap.add_argument("--small", default="", help="N values for the few-programs rows (B = 1, H = 1..32)")
    ap.add_argument("--schedules", default="", help="step schedules (SCHEDULES' names) to check and time beside "
                    "each other; the bf16 numerics run every one, the fp16 ones the first and last")
    ap.add_argument("--rounds", type=int, default=1, help="times each schedule is timed, in turn forward and "
                    "backward order; the median is reported")
    ap.add_argument("--no-grid", action="store_true", help="skip the fwd+bwd rows through flash_attention")
    ap.add_argument("--fp16", default="", help="N values of fp16 rows (d = 128) after the bf16 ones")
    ap.add_argument("--child", default="", help="internal")
    args = ap.parse_args()
    if args.child:
        child(args.child, [int(x) for x in args.ns.split(",")])
        return
    import triton

    t_start = time.time()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    names = args.schedules.split(",") if args.schedules else []
    checked = [name for name in names if "=" not in name]  # a control ("NAME=2") is NAME again
    ends = ",".join(dict.fromkeys(checked[:1] + checked[-1:]))
    jobs = [f"numerics:128:bfloat16:{','.join(checked)}", f"numerics:128:float16:{ends}",
            f"numerics:64:bfloat16:{','.join(checked)}", f"numerics:64:float16:{ends}"]
    passed = {}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for what, text, secs, ok in pool.map(lambda w: _run_child(w, args.ns, args.limit), jobs):
            print(f"--- {what} ({secs:.0f}s): {'PASS' if ok else 'FAIL'}\n{text}", flush=True)
            passed[what] = ok
    print(f"phase 1 (numerics) done at {time.time() - t_start:.0f}s", flush=True)

    gluon_ok = passed[jobs[0]]
    rows = []
    if not args.no_grid:
        what, text, secs, _ = _run_child(f"bench:{int(gluon_ok)}:{args.dims}:{args.fp16}", args.ns, args.bench_limit)
        print(f"--- {what} ({secs:.0f}s)\n{text}", flush=True)
        rows = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]
        print(f"phase 2 (timing) done at {time.time() - t_start:.0f}s", flush=True)

    print("\nNumerics: " + ", ".join(f"{w[9:]} {'PASS' if ok else 'FAIL'}" for w, ok in passed.items()))
    if names and gluon_ok:
        what, text, secs, _ = _run_child(f"schedules:{args.dims}:{','.join(names)}:{args.rounds}", args.ns,
                                         args.bench_limit)
        print(f"--- {what} ({secs:.0f}s)\n{text}", flush=True)
        sched = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("SCHED ")]
        cols = ["cudnn", "portable", *names, "cudnn again"]
        print("\nTFLOP/s of the backward alone, bf16, batch*N = 16k, hidden 2048; Gluon at each step schedule")
        print("| d | N | causal | " + " | ".join(cols) + f" | {names[-1]} / {names[0]} |")
        print("|---|---|---|" + "---|" * len(cols) + "---|")
        for r in sched:
            a, z = r.get(names[0]), r.get(names[-1])
            ratio = f"{z / a:.3f}" if isinstance(a, int) and isinstance(z, int) else "-"
            kind = "soft-capping" if r["causal"] == "softcap" else "yes" if r["causal"] else "no"
            print(f"| {r['d']} | {r['n']} | {kind} | " + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {ratio} |")
    cols = ["cudnn"] + [c for name, _, _ in FX_COLUMNS for c in (name, name + " (bwd)") if c != "fx portable (bwd)"]
    cols.append("cudnn again")
    print("\nTFLOP/s fwd+bwd (\"(bwd)\": the backward alone), batch*N = 16k, hidden 2048; \"gluon bwd\": the "
          "default's backward was the Gluon kernel")
    print("| dtype | d | N | causal | " + " | ".join(cols) + " | gluon bwd | default / faster cudnn |")
    print("|---|---|---|---|" + "---|" * len(cols) + "---|---|")
    for r in rows:
        ref = max((r[c] for c in ("cudnn", "cudnn again") if isinstance(r.get(c), int)), default=None)
        ours = r.get("fx default")
        ratio = f"{ours / ref:.2f}" if ref and isinstance(ours, int) else "-"
        print(f"| {r['dtype']} | {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | "
              + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {r.get('gluon bwd', '-')} | {ratio} |")
    if args.small:
        what, text, secs, _ = _run_child("small", args.small, args.bench_limit)
        print(f"--- {what} ({secs:.0f}s)\n{text}", flush=True)
        small = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("SMALL ")]
        print("\nfwd+bwd ms, d = 128, bf16, B = 1 (programs: of the Gluon backward)")
        print("| N | causal | H | pairs | default (routed?) | FX_FLASH_GLUON_BWD=1 | =0 | =0 / =1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in small:
            print(f"| {r['n']} | {'yes' if r['causal'] else 'no'} | {r['h']} | {r['programs']} | {r['default']} "
                  f"({'yes' if r['routed'] else 'no'}) | {r['gluon bwd']} | {r['portable bwd']} | {r['ratio']} |")
    print("\nALL PASS" if all(passed.values()) else "\nSOME FAILED")


if __name__ == "__main__":
    main()
