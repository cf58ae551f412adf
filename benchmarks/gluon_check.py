"""GPU evidence for the Gluon sm90 forward (fx_flash/codegen/gluon.py), in one run: numerics
against an fp32 reference, the backward reading its logsumexp, and forward TFLOP/s against cuDNN
SDPA and the portable fx_flash forward.

    python benchmarks/gluon_check.py [--dims 128,64] [--ns 2048,8192]

Each head dim runs in its own process with a time limit, so a kernel that hangs (a wrong
mbarrier phase waits forever) costs that head dim's rows, not the run. Numerics follow
flash-attn's rule (as benchmarks/gpu_check.py): max error at most 2x PyTorch's own bf16 error
plus a small absolute term; outputs are poisoned (NaN) before each launch. The portable forward
is timed at its paper tile (FX_FLASH_AUTOTUNE=0: tuning every shape's 8 candidates would not fit
the run); RESULTS.md has its tuned rates. TFLOP/s = 4·B·H·N²·d (halved when causal) / time.
"""

from __future__ import annotations

import argparse
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


def _configs(d: int, kind: str):
    """The tiles timed: the single-partition kernel ("v1") or the warp-specialized one ("ws")."""
    from fx_flash.codegen.gluon_launch import GluonConfig

    ws = kind == "ws"
    if d == 128:
        return [GluonConfig(128, 128, 2, ws), GluonConfig(128, 128, 3, ws), GluonConfig(128, 64, 4, ws)]
    return [GluonConfig(128, 128, 4, ws), GluonConfig(128, 64, 4, ws)]


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


def numerics(d, kind):
    """Gluon forward vs fp32 eager on odd shapes and every spec kind; True if all pass."""
    from fx_flash.codegen import gluon_launch
    from fx_flash.codegen.spec import sdpa_spec, spec_from_text
    from fx_flash.device import device_profile

    ok = True
    cases = [  # (label, b, hq, hkv, nq, nk, spec, causal, softcap, prefix)
        ("plain 2x16x2048", 2, 16, 16, 2048, 2048, sdpa_spec(), False, False),
        ("causal 2x16x2048", 2, 16, 16, 2048, 2048, sdpa_spec(causal=True), True, False),
        ("softcap causal 2x16x2048", 2, 16, 16, 2048, 2048, spec_from_text(SOFTCAP), True, True),
        # Nq not a multiple of BLOCK_M: the last Q tile reads the next head's rows, stores none.
        ("causal ragged Nq 1000x1024", 2, 8, 8, 1000, 1024, sdpa_spec(causal=True), True, False),
        ("plain Nq 77 x Nk 512", 3, 4, 4, 77, 512, sdpa_spec(), False, False),
        ("causal GQA 16/2 1024", 2, 16, 2, 1024, 1024, sdpa_spec(causal=True), True, False),
        ("causal Nq>Nk 2048x1024", 1, 8, 8, 2048, 1024, sdpa_spec(causal=True), True, False),
        # A predicate that is not causal (MASK = 2: applied on every tile, none skipped).
        ("prefix-LM 64 1024", 2, 8, 8, 1024, 1024, spec_from_text(PREFIX_LM), True, False, 64),
    ]
    prof = device_profile(torch.device("cuda"))
    for label, b, hq, hkv, nq, nk, spec, causal, softcap, *prefix in cases:
        q = torch.randn(b, hq, nq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        scale = 1 / math.sqrt(d)
        kk, vv = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
        ref, ref_lse = _eager(q.float(), kk.float(), vv.float(), scale, causal, softcap, *prefix)
        torch_out, _ = _eager(q, kk, vv, scale, causal, softcap, *prefix)
        for cfg in _configs(d, kind):
            label_c = f"d{d} {label} [{cfg}]"
            reason = gluon_launch.unsupported_call(spec, q, k, v, cfg)
            if reason:
                print(f"SKIP {label_c}: {reason}", flush=True)
                continue
            if gluon_launch.footprint(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES, cfg.ws) > prof.shared_memory:
                print(f"SKIP {label_c}: footprint over M", flush=True)
                continue
            out = torch.full_like(q, float("nan"))
            lse = torch.full((b, hq, nq), float("nan"), device="cuda")
            try:
                gluon_launch.launch(spec, q, k, v, out, lse, scale, cfg)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported per case, the rest still runs
                print(f"FAIL {label_c}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                ok = False
                continue
            e_out, e_torch = _err(out, ref), _err(torch_out, ref)
            e_lse = _err(lse, ref_lse)
            good = (torch.isfinite(out).all().item() and torch.isfinite(lse).all().item()
                    and e_out <= 2 * e_torch + 1e-2 and e_lse <= 1e-2)
            ok &= good
            print(f"{'PASS' if good else 'FAIL'} {label_c}: out {e_out:.2e} (torch bf16 {e_torch:.2e}), "
                  f"lse {e_lse:.2e}", flush=True)
    return ok


def backward_through_gluon(d):
    """fx_flash.flash_attention with FX_FLASH_GLUON=1: the forward ran the Gluon kernel, and the
    portable backward, reading its logsumexp, gives flash-attn-rule gradients."""
    import fx_flash
    from fx_flash.codegen import gluon_launch

    calls = []
    real = gluon_launch.launch
    gluon_launch.launch = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    os.environ["FX_FLASH_GLUON"] = "1"
    try:
        q, k, v = (torch.randn(2, 8, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        out = fx_flash.flash_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
    finally:
        os.environ.pop("FX_FLASH_GLUON")
        gluon_launch.launch = real
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ins16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, _ = _eager(*ins32, 1 / math.sqrt(d), True, False)
    ref_g = torch.autograd.grad(ref, ins32, do.float())
    tor, _ = _eager(*ins16, 1 / math.sqrt(d), True, False)
    tor_g = torch.autograd.grad(tor, ins16, do)
    ok = bool(calls)
    rows = []
    for name, a, t, r in [("out", out, tor, ref)] + list(zip(["dq", "dk", "dv"], grads, tor_g, ref_g)):
        e, et = _err(a, r), _err(t, r)
        good = e <= 2 * et + 1e-2 * max(1.0, r.abs().max().item() ** 0.5)
        ok &= good
        rows.append(f"{name} {e:.2e}/{et:.2e}{'' if good else '!'}")
    print(f"{'PASS' if ok else 'FAIL'} d{d} fwd (gluon, {len(calls)} launch) + bwd (portable): {' '.join(rows)}", flush=True)
    return ok


def bench(d, ns, kind):
    """TFLOP/s rows: each Gluon tile of ``kind``; with "v1" also cuDNN SDPA and the portable
    forward (paper tile)."""
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fx_flash.codegen import gluon_launch, launch
    from fx_flash.codegen.spec import sdpa_spec, spec_from_text

    os.environ["FX_FLASH_AUTOTUNE"] = "0"
    rows = []
    shapes = [(n, causal, "") for n in ns for causal in (False, True)]
    if d == 128:  # the second spec: Gemma 2's soft-capping (cuDNN's column times plain causal)
        shapes.append((ns[-1], True, SOFTCAP))
    for n, causal, text in shapes:
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = 1 / math.sqrt(d)
        spec = spec_from_text(text) if text else sdpa_spec(causal=causal)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, device="cuda")

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        variants = {}
        if kind == "v1":
            variants = {"cudnn": cudnn,
                        "portable": lambda: launch.attention_forward(q, k, v, [], None, 0.0, scale, spec)}
        for cfg in _configs(d, kind):
            variants[f"{kind} {cfg.BLOCK_N}/{cfg.STAGES}"] = (
                lambda cfg=cfg: gluon_launch.launch(spec, q, k, v, out, lse, scale, cfg))
        ref = cudnn()
        row = dict(d=d, n=n, causal=causal, spec="softcap" if text else "")
        for name, fn in variants.items():
            try:
                fn()
                if name.startswith(kind + " ") and not text:
                    err = _err(out, ref)
                    if not err < 2e-2:
                        row[name] = f"err {err:.2g}"
                        continue
                if name == "cudnn" and text:
                    continue  # cuDNN has no soft-capping
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = round(flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001
                row[name] = f"{type(e).__name__}"
                print(f"{name} d{d} n{n} causal={causal}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


def child(d, ns, kind):
    from fx_flash.codegen.gluon_launch import ROUTED_HEAD_DIMS

    ok = numerics(d, kind)
    if kind == "v1" and d in ROUTED_HEAD_DIMS:  # only routed head dims reach the kernel through the op
        try:
            ok &= backward_through_gluon(d)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL d{d} backward through gluon: {type(e).__name__}: {str(e)[:400]}", flush=True)
            ok = False
    bench(d, ns, kind)
    print("CHILD " + ("PASS" if ok else "FAIL"), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--ns", default="2048,8192")
    ap.add_argument("--kinds", default="v1,ws", help="v1: one partition; ws: warp-specialized")
    ap.add_argument("--child", default="", help="internal: D:KIND")
    ap.add_argument("--limit", type=float, default=85.0, help="seconds per (head dim, v1) process")
    ap.add_argument("--ws-limit", type=float, default=50.0, help="seconds per (head dim, ws) process")
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    if args.child:
        d, kind = args.child.split(":")
        child(int(d), ns, kind)
        return
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    rows, verdicts = {}, []
    for kind in args.kinds.split(","):  # every v1 row first: a ws hang costs only ws rows
        for d in [int(x) for x in args.dims.split(",")]:
            t0 = time.time()
            limit = args.ws_limit if kind == "ws" else args.limit
            try:
                done = subprocess.run([sys.executable, __file__, "--child", f"{d}:{kind}", "--ns", args.ns],
                                      capture_output=True, text=True, timeout=limit)
                text = done.stdout + done.stderr[-3000:]
            except subprocess.TimeoutExpired as e:
                text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                text += f"\nTIMEOUT d{d} {kind} after {limit}s"
            print(text, flush=True)
            print(f"d{d} {kind} took {time.time() - t0:.0f}s", flush=True)
            for line in text.splitlines():
                if line.startswith("ROW "):
                    r = json.loads(line[4:])
                    rows.setdefault((r["d"], r["n"], r["causal"], r["spec"]), {}).update(r)
            verdicts.append("CHILD PASS" in text)
    cols = list(dict.fromkeys(c for r in rows.values() for c in r if c not in ("d", "n", "causal", "spec")))
    print("\nTFLOP/s forward, bf16, batch*N = 16k, hidden 2048 (portable at its paper tile, untuned)")
    print("| d | N | causal | " + " | ".join(cols) + " | best gluon / cudnn |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for r in rows.values():
        best = max([r[c] for c in cols if c.split()[0] in ("v1", "ws") and isinstance(r.get(c), int)], default=None)
        ratio = f"{best / r['cudnn']:.2f}" if best and isinstance(r.get("cudnn"), int) else "-"
        print(f"| {r['d']} | {r['n']} | {r['spec'] or ('yes' if r['causal'] else 'no')} | "
              + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {ratio} |")
    print("ALL PASS" if all(verdicts) else "SOME FAILED")


if __name__ == "__main__":
    main()
