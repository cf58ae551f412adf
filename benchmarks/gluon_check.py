"""GPU evidence for the Gluon sm90 forward (fx_flash/codegen/gluon.py), in one run: numerics
against an fp32 reference for every kernel variant, the backward reading its logsumexp, and
forward TFLOP/s against cuDNN SDPA and the portable fx_flash forward.

    python benchmarks/gluon_check.py [--dims 128,64] [--ns 2048,8192] [--variants "pp 128/2,v1 128/3"]

Call 5 (the persistent kernel against ws and cuDNN; benchmarks/GLUON_NOTES.md):

    python benchmarks/gluon_check.py --dims 128 --variants "ws 128/3,wsp 128/3,wsp 128/2,wsp1 128/3" \
        --full wsp,wsp1 --fp16 "ws 128/3,wsp 128/3,wsp 128/2" --bench noportable,nosoftcap,fp16

Two phases, each child process with its own time limit, so a kernel that hangs (a wrong mbarrier
phase waits forever) costs its own rows, not the run:
1. numerics, in parallel (compiling is most of the time, and the machine has the cores): one
   child per (head dim, variant, dtype), plus one per head dim that compiles the portable forward
   and runs the backward through the routed Gluon forward. The compiled kernels land in Triton's
   cache, which phase 2 reads. A persistent variant runs each case twice: on one program per SM,
   and on 5 programs with the causal order cut into sections of 3 heads (many output tiles per
   program, so the K/V ring's and Q's barrier phases cross many tile boundaries).
2. timing, one child per head dim, alone on the GPU: cuDNN, the portable forward and every variant
   whose numerics passed, in the same process.
Numerics follow flash-attn's rule (as benchmarks/gpu_check.py): max error at most 2x PyTorch's own
error in the test dtype plus 1e-2; outputs and LSE are poisoned (NaN) before each launch. The
portable forward is timed at its paper tile (FX_FLASH_AUTOTUNE=0: tuning every shape's candidates
would not fit the run); RESULTS.md has its tuned rates. TFLOP/s = 4·B·H·N²·d (halved when causal)
/ time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SOFTCAP = "score=50*tanh(qk*scale/50); keep=kv_idx <= q_idx"
PREFIX_LM = "score=qk*scale; keep=(kv_idx <= q_idx) | (kv_idx < 64)"


def variants(d: int) -> dict:
    """The kernels timed, by name: "v1" one partition of two warpgroups that loads for itself;
    "ws" the warp-specialized kernel (producer + two consumers); "pp" with the consumers taking
    turns (ping-pong); "e" also rescaling the accumulator while q·kᵀ runs; "h" with the hold that
    keeps each consumer's softmax under its p·v (gluon._hold); "wsp" ws as a persistent kernel
    (one program per SM walking output tiles; causal: longest first in L2-sized sections of heads),
    "wsp1" with the causal order in one section of every head, "wsp3" with three consumer
    warpgroups (BLOCK_M = 192), a trailing "s" with the causal walk in two loops (split), then "t"
    with each consumer's output rows stored by TMA (tma_store: a staging tile per consumer, so a
    K/V stage fewer at d = 128); a trailing "p" in a persistent
    kind: its consumers take turns through named barriers (pingpong), "ph" with the hold; then "d"
    (split kinds): the last key tile on its first half where the rest lies past the diagonal, "dh"
    with the hold too; "f" (persistent): the epilogue by reciprocals (GluonConfig.fast_epilogue); "q"
    (persistent): two Q buffers a consumer, with the deepest ring that then fits; "x":
    the row max after the score's factor (GluonConfig.raw_max off); "b" (persistent kinds, split ones
    with "f"): each program's output tiles from the launcher's table (GluonConfig.balanced: balanced
    by work where causal, the kernel's own order otherwise). BLOCK_M/ or BLOCK_N/STAGES; "k64/STAGES":
    key tiles of 64."""
    from fx_flash.codegen.gluon_launch import GluonConfig as C
    from fx_flash.codegen.gluon_launch import footprint
    from tests.gluon_kinds import TWINS

    found = _variants(d, C)
    m = _shared_memory()

    def fits(cfg):
        """cfg at the deepest ring of at most its stages whose footprint fits this device's M (a
        twin with more shared memory, two Q buffers, may take fewer stages), or None."""
        stages = [s for s in range(2, cfg.STAGES + 1)
                  if footprint(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, s, cfg.ws, cfg.consumers, cfg.tma_store,
                               cfg.q_buffers) <= m]
        return dataclasses.replace(cfg, STAGES=max(stages)) if stages else None

    # the twins (tests/gluon_kinds.TWINS, the sm_90 checks' letters): the letter after the kind's,
    # the tile after it "BLOCK_N/STAGES" as the twin's own
    for letter, extra, takes in TWINS:
        for name, cfg in list(found.items()):
            twin = fits(dataclasses.replace(cfg, **extra)) if takes(dataclasses.asdict(cfg)) else None
            if twin is not None:
                found[f"{name.split()[0]}{letter} {name.split()[1].split('/')[0]}/{twin.STAGES}"] = twin
    # "KIND k64/S": a persistent kind with key tiles of 64 (BLOCK_N = 64) and the deepest ring of at
    # most 6 stages whose footprint fits this device's M (GLUON_NOTES call 69; S = 6 at d = 64 and
    # 5 at d = 128 on the H200)
    for name, cfg in list(found.items()):
        if cfg.persistent and cfg.BLOCK_N == 128 and cfg.raw_max and cfg.q_buffers == 1:
            k64 = fits(dataclasses.replace(cfg, BLOCK_N=64, STAGES=6))
            found[f"{name.split()[0]} k64/{k64.STAGES}"] = k64
    return found


def _shared_memory() -> int:
    """M of the GPU this runs on (of an H200 where none is: 232448 bytes, so that names list)."""
    from fx_flash.device import device_profile

    return device_profile(torch.device("cuda")).shared_memory if torch.cuda.is_available() else 232448


def _variants(d: int, C) -> dict:
    ws, pp, pph, ppeh = ({}, dict(pingpong=True), dict(pingpong=True, hold=True),
                         dict(pingpong=True, hold=True, early=True))
    if d == 128:
        return {"v1 128/2": C(128, 128, 2), "v1 128/3": C(128, 128, 3),
                "ws 128/2": C(128, 128, 2, True, **ws), "ws 128/3": C(128, 128, 3, True, **ws),
                "wsh 128/2": C(128, 128, 2, True, hold=True), "wsh 128/3": C(128, 128, 3, True, hold=True),
                "pp 128/2": C(128, 128, 2, True, **pp), "pph 128/2": C(128, 128, 2, True, **pph),
                "pph 128/3": C(128, 128, 3, True, **pph), "ppeh 128/2": C(128, 128, 2, True, **ppeh),
                "wsp 128/3": C(128, 128, 3, True, persistent=True), "wsp 128/2": C(128, 128, 2, True, persistent=True),
                "wsp1 128/3": C(128, 128, 3, True, persistent=True, one_section=True),
                "wsps 128/3": C(128, 128, 3, True, persistent=True, split=True),
                "wspt 128/2": C(128, 128, 2, True, persistent=True, tma_store=True),
                "wspst 128/2": C(128, 128, 2, True, persistent=True, split=True, tma_store=True),
                "wsptp 128/2": C(128, 128, 2, True, True, persistent=True, tma_store=True),
                "wsptph 128/2": C(128, 128, 2, True, True, persistent=True, tma_store=True, hold=True),
                "wspstp 128/2": C(128, 128, 2, True, True, persistent=True, split=True, tma_store=True),
                "wspstph 128/2": C(128, 128, 2, True, True, persistent=True, split=True, tma_store=True, hold=True)}
    return {"v1 128/4": C(128, 128, 4), "v1 64/4": C(128, 64, 4), "ws 128/4": C(128, 128, 4, True, **ws),
            "wsp 128/4": C(128, 128, 4, True, persistent=True),
            "wspt 128/4": C(128, 128, 4, True, persistent=True, tma_store=True),
            "wsps 128/4": C(128, 128, 4, True, persistent=True, split=True),
            "wsp3 192/4": C(192, 128, 4, True, persistent=True, consumers=3),
            "wsp3s 192/4": C(192, 128, 4, True, persistent=True, consumers=3, split=True),
            "wsp3t 192/4": C(192, 128, 4, True, persistent=True, consumers=3, tma_store=True),
            "wspst 128/4": C(128, 128, 4, True, persistent=True, split=True, tma_store=True),
            "wsptp 128/4": C(128, 128, 4, True, True, persistent=True, tma_store=True),
            "wsptph 128/4": C(128, 128, 4, True, True, persistent=True, tma_store=True, hold=True),
            "wspsp 128/4": C(128, 128, 4, True, True, persistent=True, split=True),
            "wspstp 128/4": C(128, 128, 4, True, True, persistent=True, split=True, tma_store=True),
            "wspsph 128/4": C(128, 128, 4, True, True, persistent=True, split=True, hold=True),
            "wsp3p 192/4": C(192, 128, 4, True, True, persistent=True, consumers=3),
            "wsp3tp 192/4": C(192, 128, 4, True, True, persistent=True, consumers=3, tma_store=True),
            "wsp3st 192/4": C(192, 128, 4, True, persistent=True, consumers=3, split=True, tma_store=True),
            "wsp3sp 192/4": C(192, 128, 4, True, True, persistent=True, consumers=3, split=True),
            "wsp3stp 192/4": C(192, 128, 4, True, True, persistent=True, consumers=3, split=True, tma_store=True),
            "pph 128/4": C(128, 128, 4, True, **pph), "ppeh 128/4": C(128, 128, 4, True, **ppeh)}


def _eager(q, k, v, scale, causal, softcap, prefix=0):
    """Eager attention and its logsumexp; ``prefix`` > 0: causal, but every row also sees the
    first ``prefix`` keys (prefix-LM)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = 50 * torch.tanh(s / 50)
    if causal:
        nq, nk = s.shape[-2:]
        keep = torch.ones(nq, nk, device=q.device, dtype=torch.bool).tril()
        keep[:, :prefix] = True
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    return torch.softmax(s, -1) @ v, lse


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _cases(which: str):
    """(label, b, hq, hkv, nq, nk, spec, causal, softcap[, prefix]); "short": the three specs at
    the benchmark's specialization (compiles what phase 2 times), "full": every spec kind and odd shape."""
    from fx_flash.codegen.spec import sdpa_spec, spec_from_text

    short = [
        ("plain 2x16x2048", 2, 16, 16, 2048, 2048, sdpa_spec(), False, False),
        ("causal 2x16x2048", 2, 16, 16, 2048, 2048, sdpa_spec(causal=True), True, False),
        ("softcap causal 2x16x2048", 2, 16, 16, 2048, 2048, spec_from_text(SOFTCAP), True, True),
    ]
    if which == "short":
        return short
    return short + [
        # Nq not a multiple of BLOCK_M: the last Q tile reads the next head's rows, stores none.
        ("causal ragged Nq 1000x1024", 2, 8, 8, 1000, 1024, sdpa_spec(causal=True), True, False),
        ("plain Nq 77 x Nk 512", 3, 4, 4, 77, 512, sdpa_spec(), False, False),
        ("causal GQA 16/2 1024", 2, 16, 2, 1024, 1024, sdpa_spec(causal=True), True, False),
        ("causal Nq>Nk 2048x1024", 1, 8, 8, 2048, 1024, sdpa_spec(causal=True), True, False),
        # Nq < Nk, causal (top-left aligned: later keys are masked for every row), and few rows
        ("causal Nq<Nk 1000x2048", 2, 8, 8, 1000, 2048, sdpa_spec(causal=True), True, False),
        ("plain Nq 16 x Nk 4096", 4, 16, 16, 16, 4096, sdpa_spec(), False, False),
        # (B, N, H, d) storage seen as (B, H, N, d), as models' q.view(...).transpose(1, 2) give
        # (the persistent kernel's heads-side-by-side descriptor; the others refuse it)
        ("causal (B,N,H,d) ragged 2x16x1000x1024", 2, 16, 16, 1000, 1024, sdpa_spec(causal=True), True, False),
        ("plain (B,N,H,d) GQA 16/4 2048", 2, 16, 4, 2048, 2048, sdpa_spec(), False, False),
        # A predicate that is not causal (MASK = 2: applied on every tile, none skipped).
        ("prefix-LM 64 1024", 2, 8, 8, 1024, 1024, spec_from_text(PREFIX_LM), True, False, 64),
    ]


def numerics(d, name, which, dtype):
    """Variant ``name`` of the Gluon forward vs fp32 eager on the cases ``which``; True if all pass."""
    from fx_flash.codegen import gluon_launch
    from fx_flash.device import device_profile

    cfg = variants(d)[name]
    prof = device_profile(torch.device("cuda"))
    if gluon_launch.footprint(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES, cfg.ws, cfg.consumers) > prof.shared_memory:
        print(f"SKIP d{d} [{name}]: footprint over M", flush=True)
        return True
    ok = True
    for label, b, hq, hkv, nq, nk, spec, causal, softcap, *prefix in _cases(which):
        if "(B,N,H,d)" in label:
            q = torch.randn(b, nq, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
            k, v = (torch.randn(b, nk, hkv, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
        else:
            q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype) for _ in range(2))
        scale = 1 / math.sqrt(d)
        kk, vv = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
        ref, ref_lse = _eager(q.float(), kk.float(), vv.float(), scale, causal, softcap, *prefix)
        torch_out, _ = _eager(q, kk, vv, scale, causal, softcap, *prefix)
        label_c = f"d{d} {str(dtype)[6:]} {label} [{name}]"
        reason = gluon_launch.unsupported_call(spec, q, k, v, cfg)
        if reason:
            print(f"SKIP {label_c}: {reason}", flush=True)
            continue
        # A persistent kernel also on few programs: each walks many output tiles (the ring's and
        # Q's phases cross tile boundaries), and the causal order has several sections.
        grids = [("", {})]
        if cfg.persistent:
            grids.append((" on 5 programs, sections of 3", dict(programs=5, section=3)))
        e_torch = _err(torch_out, ref)
        for grid_label, grid in grids:
            out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
            lse = torch.full((b, hq, nq), float("nan"), device="cuda")
            try:
                gluon_launch.launch(spec, q, k, v, out, lse, scale, cfg, **grid)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported per case, the rest still runs
                print(f"FAIL {label_c}{grid_label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                ok = False
                continue
            e_out, e_lse = _err(out, ref), _err(lse, ref_lse)
            good = (torch.isfinite(out).all().item() and torch.isfinite(lse).all().item()
                    and e_out <= 2 * e_torch + 1e-2 and e_lse <= 1e-2)
            ok &= good
            print(f"{'PASS' if good else 'FAIL'} {label_c}{grid_label}: out {e_out:.2e} (torch {e_torch:.2e}), "
                  f"lse {e_lse:.2e}", flush=True)
    return ok


def backward_through_gluon(d):
    """fx_flash.flash_attention as users call it (the Gluon forward on by default), where it routes:
    at d = 128 causal at N = 2k and at N = 1k (an output tile walks 4.5 key tiles there, routed
    since call 33); at d = 64 without a mask at N = 8k (three consumers, from 64 key tiles) and
    causal at N = 4k (two consumers, the causal walk split, from 16 key tiles): the forward plan
    routed to the Gluon kernel, its second and third calls launched directly through
    the bound launcher and equal to the first bitwise, and the backward, reading its logsumexp,
    gives flash-attn-rule gradients."""
    if d == 64:
        return all([_through_op(d, 8192, causal=False), _through_op(d, 4096)])
    return all([_through_op(d, n) for n in (2048, 1024)])


def _through_op(d, n, causal=True):
    import fx_flash
    from fx_flash.codegen import gluon_launch

    calls = []
    real = gluon_launch.routed_forward
    gluon_launch.routed_forward = lambda *a, **kw: (lambda r: (calls.append(r), r)[1])(real(*a, **kw))
    os.environ.pop("FX_FLASH_GLUON", None)
    try:
        # (B, N, H, d) storage seen as (B, H, N, d), as HF models pass q, k, v
        q, k, v = (torch.randn(2, n, 8, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        runs = []
        for _ in range(3):
            out = fx_flash.flash_attention(q, k, v, is_causal=causal)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
        out, *grads = runs[0]
        # The forward, dK and dV are bitwise the same each call; dQ too unless the Gluon backward
        # takes the call (its dQ tiles are added in no fixed order: checked by the rule below).
        differ = [name for i, name in enumerate(("out", "dq", "dk", "dv"))
                  if not all(torch.equal(runs[0][i], run[i]) for run in runs[1:])]
        same = not [name for name in differ if name != "dq"]
    finally:
        gluon_launch.routed_forward = real
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ins16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, _ = _eager(*ins32, 1 / math.sqrt(d), causal, False)
    ref_g = torch.autograd.grad(ref, ins32, do.float())
    tor, _ = _eager(*ins16, 1 / math.sqrt(d), causal, False)
    tor_g = torch.autograd.grad(tor, ins16, do)
    ok = len(calls) == 1 and calls[0] is not None and same  # decided once per key, then planned
    rows = []
    for name, a, t, r in [("out", out, tor, ref)] + list(zip(["dq", "dk", "dv"], grads, tor_g, ref_g)):
        e, et = _err(a, r), _err(t, r)
        good = e <= 2 * et + 1e-2 * max(1.0, r.abs().max().item() ** 0.5)
        ok &= good
        rows.append(f"{name} {e:.2e}/{et:.2e}{'' if good else '!'}")
    kind = f"{calls[0].fn.__name__} {calls[0].config}" if calls and calls[0] is not None else "-"
    print(f"{'PASS' if ok else 'FAIL'} d{d} N{n} causal={causal} fwd (gluon [{kind}], 3 calls equal: {same}, "
          f"differing: {differ or 'none'}) + bwd: "
          f"{' '.join(rows)}", flush=True)
    return ok


def kernel_of(column: str) -> str:
    """The variant a timing column runs: "NAME=2" is NAME again under a second label (a control),
    "NAME~MIB" NAME with its causal sections sized to MIB MiB of K/V (L2_SECTION_BYTES's
    budget), and "NAME~MIB=2" that column's control."""
    return column.partition("=")[0].partition("~")[0]


def section_of(column: str, n: int, d: int, elem_bytes: int, causal: bool):
    """Heads in a causal section of column ``column`` at N = n: as many as share its budget of K/V
    ("NAME~MIB", gluon_launch.heads_per_section's rule with MIB MiB for L2_SECTION_BYTES), or None
    (the launcher's own)."""
    budget = column.partition("=")[0].partition("~")[2]
    return max(1, int(float(budget) * 2**20) // (2 * n * d * elem_bytes)) if budget and causal else None


def _shapes(d, ns, softcap=True, fp16=False, kinds=(False, True)):
    """(N, causal, spec text, dtype) rows of the timing table: ``kinds`` says which of plain (False)
    and causal (True); ``softcap``: its row at d = 128, or at every d when it is "every"."""
    shapes = [(n, causal, "", torch.bfloat16) for n in ns for causal in kinds]
    if (d == 128 or softcap == "every") and softcap:  # the second spec: Gemma 2's soft-capping (cuDNN has none)
        shapes.append((ns[-1], True, SOFTCAP, torch.bfloat16))
    if fp16:  # at the longest N, of each mask timed
        shapes += [(ns[-1], causal, "", torch.float16) for causal in kinds]
    return shapes


def warm(d, ns):
    """Compile the portable forward at the benchmark's shapes (phase 2 then reads the cache) and,
    at routed head dims, run the backward through the routed Gluon forward."""
    from fx_flash.codegen import launch
    from fx_flash.codegen.gluon_launch import ROUTED_HEAD_DIMS
    from fx_flash.codegen.spec import sdpa_spec, spec_from_text

    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    for n, causal, text, _ in _shapes(d, ns):
        q, k, v = (torch.randn(16384 // n, 2048 // d, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        spec = spec_from_text(text) if text else sdpa_spec(causal=causal)
        launch.attention_forward(q, k, v, [], None, 0.0, 1 / math.sqrt(d), spec)
    torch.cuda.synchronize()
    if d in ROUTED_HEAD_DIMS:
        return backward_through_gluon(d)
    return True


def bench(d, ns, names, extra, rounds=1):
    """TFLOP/s rows: cuDNN SDPA (first, and again last: the card's clocks drift within a row), the
    portable forward (paper tile, FX_FLASH_GLUON=0: before call 34 this column ran the default
    switches, so the Gluon forward where the op routes to it) and each Gluon variant in
    ``names``. ``extra``: "noportable", "portablex" (a column of the portable forward with the row
    max after the scale, FX_FLASH_RAW_MAX=0), "nosoftcap", "softcap" (its row at d = 64 too),
    "noplain", "nocausal" (no rows of that mask), "fp16" (rows at the longest N in fp16), "op" (a
    column through the op with the default switches, as benchmarks/target_grid.py times it: what the
    op adds to the routed kernel's direct launch, GLUON_NOTES after call 85).
    ``rounds`` > 1: every column is timed that many times, in turn forward and backward order, and
    each cell is the median of its rounds (the drift then favours no column)."""
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fx_flash
    from fx_flash.codegen import gluon_launch, launch
    from fx_flash.codegen.spec import sdpa_spec, spec_from_text

    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    configs = variants(d)
    softcap = "every" if "softcap" in extra else "nosoftcap" not in extra
    kinds = tuple(causal for causal in (False, True) if ("noplain", "nocausal")[causal] not in extra)
    for n, causal, text, dtype in _shapes(d, ns, softcap, "fp16" in extra, kinds):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
        scale = 1 / math.sqrt(d)
        spec = spec_from_text(text) if text else sdpa_spec(causal=causal)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, device="cuda")

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        fns = {"cudnn": cudnn}

        def portable(**switches):  # the op with these switches set for the call, then unset
            def run():
                os.environ.update(switches)
                try:
                    return launch.attention_forward(q, k, v, [], None, 0.0, scale, spec)
                finally:
                    for name in switches:
                        os.environ.pop(name)

            return run

        # FX_FLASH_GLUON=0: with the default switches the op routes to the Gluon kernel
        if "noportable" not in extra:
            fns["portable"] = portable(FX_FLASH_GLUON="0")
        if "portablex" in extra:  # and the row max after the scale (the template's note on it)
            fns["portable x"] = portable(FX_FLASH_GLUON="0", FX_FLASH_RAW_MAX="0")
        if "op" in extra:  # the public entry point where the spec has one (target_grid's), else the op
            fns["op"] = ((lambda: fx_flash.flash_attention(q, k, v, is_causal=causal)) if not text
                         else portable())
        for name in names:
            cfg, section = configs[kernel_of(name)], section_of(name, n, d, k.element_size(), causal)
            fns[name] = lambda cfg=cfg, section=section: gluon_launch.launch(spec, q, k, v, out, lse, scale, cfg,
                                                                             section=section)
        fns["cudnn again"] = cudnn
        ref = cudnn() if not text else launch.attention_forward(q, k, v, [], None, 0.0, scale, spec)[0]
        row = dict(d=d, n=n, causal=causal, spec=("softcap" if text else "") + (" fp16" if dtype == torch.float16 else ""))
        timed = {}
        for name, fn in fns.items():
            if name.startswith("cudnn") and text:
                continue  # cuDNN has no soft-capping
            try:
                fn()
                if kernel_of(name) in configs:
                    err = _err(out, ref)
                    if not err < 2e-2:
                        row[name] = f"err {err:.2g}"
                        continue
                timed[name] = fn
            except Exception as e:  # noqa: BLE001
                row[name] = f"{type(e).__name__}"
                print(f"{name} d{d} n{n} causal={causal}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rates = {name: [] for name in timed}
        order = list(timed)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                ms = triton.testing.do_bench(timed[name], warmup=25, rep=100, return_mode="median")
                rates[name].append(flops / ms / 1e9)
        for name, xs in rates.items():
            row[name] = round(sorted(xs)[len(xs) // 2])
        print("ROW " + json.dumps(row), flush=True)


def child(what, ns):
    """One child process: "numerics:D:NAME:CASES:DTYPE", "warm:D" or "bench:D:NAME;NAME…:EXTRA,…:ROUNDS"."""
    parts = what.split(":")
    if parts[0] == "numerics":
        ok = numerics(int(parts[1]), parts[2], parts[3], getattr(torch, parts[4]))
    elif parts[0] == "warm":
        ok = warm(int(parts[1]), ns)
    else:
        bench(int(parts[1]), ns, [x for x in parts[2].split(";") if x], parts[3].split(","), int(parts[4]))
        ok = True
    print("CHILD " + ("PASS" if ok else "FAIL"), flush=True)


def _run_child(what, ns, limit, script=__file__):
    """(what, output, seconds, passed) of one child process of ``script`` (this one by default)
    killed after ``limit`` seconds."""
    t0 = time.time()
    try:
        done = subprocess.run([sys.executable, script, "--child", what, "--ns", ns],
                              capture_output=True, text=True, timeout=limit)
        text = done.stdout + done.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\nTIMEOUT {what} after {limit}s"
    return what, text, time.time() - t0, "CHILD PASS" in text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--ns", default="2048,8192")
    ap.add_argument("--variants", default="", help="comma-separated names (see variants()); default all; "
                    "NAME=2, NAME~MIB: other columns of NAME's kernel (kernel_of)")
    ap.add_argument("--full", default="pph,ppeh", help="kinds whose numerics run every case (others: the 3 timed specs)")
    ap.add_argument("--fp16", default="pph 128/2,pph 128/4,v1 128/3,v1 128/4",
                    help="variants also checked in fp16 (on the cases of their bf16 check)")
    ap.add_argument("--jobs", type=int, default=12, help="numerics children at a time")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds per numerics child")
    ap.add_argument("--bench-limit", type=float, default=120.0, help="seconds per timing child")
    ap.add_argument("--bench", default="", help="timing extras: noportable, portablex, nosoftcap, softcap, noplain, nocausal, fp16, "
                    "op (comma-separated)")
    ap.add_argument("--rounds", type=int, default=1, help="times each column is timed, alternating the order (median)")
    ap.add_argument("--no-warm", action="store_true", help="skip the portable compile and the backward check")
    ap.add_argument("--child", default="", help="internal")
    args = ap.parse_args()
    if args.child:
        child(args.child, [int(x) for x in args.ns.split(",")])
        return
    import triton

    t_start = time.time()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    dims = [int(x) for x in args.dims.split(",")]
    wanted = [x.strip() for x in args.variants.split(",") if x.strip()]
    full = args.full.split(",")
    # columns of another's kernel ("NAME=2", "NAME~MIB": kernel_of): numerics run once, for NAME
    chosen = {d: [n for n in variants(d) if not wanted or n in wanted]
              + [w for w in wanted if w != kernel_of(w) and kernel_of(w) in variants(d)] for d in dims}
    jobs = [] if args.no_warm else [f"warm:{d}" for d in dims]
    for d in dims:
        for name in (n for n in chosen[d] if n == kernel_of(n)):
            cases = "full" if name.split()[0] in full else "short"
            jobs.append(f"numerics:{d}:{name}:{cases}:bfloat16")
            if name in args.fp16.split(","):
                jobs.append(f"numerics:{d}:{name}:{cases}:float16")
    passed = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for what, text, secs, ok in pool.map(lambda w: _run_child(w, args.ns, args.limit), jobs):
            print(f"--- {what} ({secs:.0f}s): {'PASS' if ok else 'FAIL'}\n{text}", flush=True)
            passed[what] = ok
    print(f"phase 1 (numerics) done at {time.time() - t_start:.0f}s", flush=True)

    rows = {}
    for d in dims:
        names = [n for n in chosen[d]
                 if all(ok for w, ok in passed.items() if w.startswith(f"numerics:{d}:{kernel_of(n)}:"))]
        what, text, secs, ok = _run_child(f"bench:{d}:{';'.join(names)}:{args.bench}:{args.rounds}", args.ns,
                                          args.bench_limit)
        print(f"--- {what} ({secs:.0f}s)\n{text}", flush=True)
        for line in text.splitlines():
            if line.startswith("ROW "):
                r = json.loads(line[4:])
                rows[(r["d"], r["n"], r["causal"], r["spec"])] = r
    print(f"phase 2 (timing) done at {time.time() - t_start:.0f}s", flush=True)

    print("\nNumerics: " + ", ".join(f"{w[9:]} {'PASS' if ok else 'FAIL'}" for w, ok in passed.items()
                                      if w.startswith("numerics")))
    print("Backward through the routed Gluon forward: " + ", ".join(
        f"d{w[5:]} {'PASS' if ok else 'FAIL'}" for w, ok in passed.items() if w.startswith("warm")))
    for d in dims:
        cols = (["cudnn"] + ([] if "noportable" in args.bench else ["portable"])
                + (["portable x"] if "portablex" in args.bench else [])
                + (["op"] if "op" in args.bench.split(",") else [])  # a whole item: "noportable" holds "op"
                + chosen[d] + ["cudnn again"])
        print(f"\nTFLOP/s forward, bf16, d = {d}, batch*N = 16k, hidden 2048 (portable at its paper tile, untuned)")
        persistent = [c for c in chosen[d] if c.startswith("wsp")]
        gain = "ws 128/3" in chosen[d] and persistent  # the persistent kernels against the routed one
        print("| N | causal | " + " | ".join(cols) + " | best gluon | / faster cudnn |"
              + (" best wsp / ws 128/3 |" if gain else ""))
        print("|---|---|" + "---|" * len(cols) + "---|---|" + ("---|" if gain else ""))
        for r in (r for r in rows.values() if r["d"] == d):
            best = max(((r[c], c) for c in chosen[d] if isinstance(r.get(c), int)), default=None)
            ref = max((r[c] for c in ("cudnn", "cudnn again") if isinstance(r.get(c), int)), default=None)
            ratio = f"{best[0] / ref:.2f}" if best and ref else "-"
            mask = ("yes" if r["causal"] else "no") + (f" ({r['spec'].strip()})" if r["spec"] else "")
            line = (f"| {r['n']} | {mask} | "
                    + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {best[1] if best else '-'} | {ratio} |")
            if gain:
                best_p = max((r[c] for c in persistent if isinstance(r.get(c), int)), default=None)
                ws = r.get("ws 128/3")
                line += f" {best_p / ws:.2f} |" if best_p and isinstance(ws, int) else " - |"
            print(line)
    print("\nALL PASS" if all(passed.values()) else "\nSOME FAILED")


if __name__ == "__main__":
    main()
