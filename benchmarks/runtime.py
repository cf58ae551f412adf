"""The runtime a user feels, in one command (issue 11): first call, host time, the tile on a
batch after a first call on a small one, the untuned default against the tuned tile, CUDA
graph capture.

    python benchmarks/runtime.py --skip default                                             # ~3.5 min
    python benchmarks/runtime.py --skip first_call,host,waves,capture --ns 1024,4096,16384  # ~5 min

Sections, in order (each prints its table at the end; bulky output goes under $OUT):
    first_call  benchmarks/first_call.py --cases fwd+bwd:causal --impls fx_flash,flex,sdpa
                (B4 H16 N2k d128 bf16: cold, cold with FX_FLASH_AUTOTUNE=1, warm disk, 2nd call)
    host        benchmarks/profile_host.py's table (µs per call against SDPA, triton_op A/B)
    waves       forward TFLOP/s of (16, 32, 1024, 64) after a first call on (1, 4, 1024, 64),
                untuned and tuned (the tuned tile of the small batch must not be reused)
    default     untuned default vs tuned tile, bf16, B·N = 16k, hidden 2048, d ∈ {64, 128},
                N ∈ --ns, causal or not: TFLOP/s fwd and fwd+bwd, and the ratio (--dims)
    capture     torch.cuda.graph capture of the op: replays equal the eager result; with
                dropout, successive replays draw different masks; nothing is tuned inside;
                on sm_90, fwd+bwd through the Gluon kernels captured whole, replays as eager
Every timed fx_flash result is first checked against SDPA (max |diff| < 2e-2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import fx_flash  # noqa: E402
from fx_flash.codegen import autotune, launch  # noqa: E402

OK = [True]


def check(out, ref, label: str) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    if not err < 2e-2:
        OK[0] = False
        print(f"FAIL {label}: max |out - sdpa| = {err:.3g}")


def tflops(fn, flops: float) -> float:
    import triton.testing

    return flops / triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-9


def first_call_section(timeout: int) -> str:
    cmd = [sys.executable, os.path.join(HERE, "first_call.py"), "--cases", "fwd+bwd:causal",
           "--impls", "fx_flash,flex,sdpa"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        OK[0] = False
        sys.stderr.write(done.stderr[-4000:])
    return done.stdout[done.stdout.find("\nfirst-call cost"):]


def _tuned(on: bool) -> None:
    """Tuning on (in memory only: every key is timed in this process) or off."""
    os.environ["FX_FLASH_AUTOTUNE_CACHE"] = "0"
    fx_flash.set_autotune(on)


def _configs(name: str) -> str:
    """The tiles launch chose for kernel ``name`` so far, as text."""
    return "; ".join(sorted({f"{c.config.BLOCK_M}x{c.config.BLOCK_N}/{c.config.num_warps}w/{c.config.num_stages}s"
                             for key, c in launch.CHOSEN.items() if key[1] == name}))


def waves_section() -> list[str]:
    """The (16, 32, 1024, 64) forward after a first call on (1, 4, 1024, 64)."""
    rows = []
    for tuned in (False, True):
        launch.CHOSEN.clear()
        autotune.clear_memory()
        _tuned(tuned)
        small = [torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        fx_flash.flash_attention(*small)
        q, k, v = (torch.randn(16, 32, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        check(fx_flash.flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), "waves row")
        flops = 4 * 16 * 32 * 1024 * 1024 * 64
        rate = tflops(lambda: fx_flash.flash_attention(q, k, v), flops)
        sdpa = tflops(lambda: F.scaled_dot_product_attention(q, k, v), flops)
        rows.append(f"| {'tuned' if tuned else 'default (untuned)'} | {rate:.0f} | {sdpa:.0f} | {_configs('_attn_fwd')} |")
    _tuned(False)
    return ["| fx_flash tiles | fwd TFLOP/s of (16,32,1024,64) | sdpa | forward tiles chosen (small, then big) |",
            "|---|---|---|---|", *rows]


def default_section(ns: list[int], dims: list[int]) -> list[str]:
    """Untuned default vs tuned tile over grid rows."""
    rows = ["| d | N | causal | default fwd | tuned fwd | ratio | default fwd+bwd | tuned fwd+bwd | ratio | "
            "default tiles (fwd, dq, dkdv) | tuned tiles |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in dims:
        for n in ns:
            for causal in (False, True):
                b, h = max(1, 16384 // n), 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                fwd = lambda: fx_flash.flash_attention(q, k, v, is_causal=causal)  # noqa: E731
                step = lambda: torch.autograd.grad(fwd(), (q, k, v), do)  # noqa: E731
                cells, tiles = [], []
                for tuned in (False, True):
                    launch.CHOSEN.clear()
                    autotune.clear_memory()
                    _tuned(tuned)
                    check(fwd(), F.scaled_dot_product_attention(q, k, v, is_causal=causal), f"d{d} N{n} {causal}")
                    step()
                    cells.append((tflops(fwd, flops), tflops(step, 3.5 * flops)))
                    tiles.append(", ".join(_configs(x) for x in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")))
                (df, db), (tf, tb) = cells
                rows.append(f"| {d} | {n} | {'yes' if causal else 'no'} | {df:.0f} | {tf:.0f} | {df / tf:.2f} | "
                            f"{db:.0f} | {tb:.0f} | {db / tb:.2f} | {tiles[0]} | {tiles[1]} |")
                print(rows[-1], flush=True)
    _tuned(False)
    return rows


def capture_section() -> list[str]:
    """The op inside torch.cuda.graph: replays match eager; dropout replays differ; no tuning."""
    rows = []
    _tuned(True)  # tuning on: a capture must still not time anything
    launch.CHOSEN.clear()
    autotune.clear_memory()
    timed = []
    real_time_ms = launch._time_ms
    launch._time_ms = lambda call: timed.append(torch.cuda.is_current_stream_capturing()) or real_time_ms(call)
    try:
        q, k, v = (torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for p in (0.0, 0.1):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fx_flash.flash_attention(q, k, v, dropout_p=p, is_causal=True)  # warm-up (compiles) outside
            torch.cuda.current_stream().wait_stream(stream)
            launch.CHOSEN.clear()  # the capture meets an unknown key: it must run the default, untimed
            autotune.clear_memory()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fx_flash.flash_attention(q, k, v, dropout_p=p, is_causal=True)
            graph.replay()
            first = out.clone()
            graph.replay()
            if p == 0.0:
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                same = torch.equal(first, out) and (out.float() - ref.float()).abs().max().item() < 2e-2
                rows.append(f"| no dropout | replays equal each other and SDPA: {'PASS' if same else 'FAIL'} |")
            else:
                same = not torch.equal(first, out)
                rows.append(f"| dropout 0.1 | two replays draw different masks: {'PASS' if same else 'FAIL'} |")
            OK[0] &= same
        inside = any(timed)
        rows.append(f"| tuning on | nothing timed inside a capture: {'FAIL' if inside else 'PASS'} |")
        OK[0] &= not inside
        rows += _gluon_capture_rows()
    finally:
        launch._time_ms = real_time_ms
        fx_flash.set_autotune(False)
    return ["| case | check |", "|---|---|", *rows]


def _gluon_capture_rows() -> list[str]:
    """fwd+bwd on the Gluon kernels (sm_90, their defaults: (4, 16, 2048, 128) bf16 causal is routed
    both ways) captured whole in one graph: replays give the eager call's out, dk, dv bitwise and
    its dq within 1e-2 (the TMA reduce-adds' order varies), and both kernels were the Gluon ones."""
    from gluon_bwd_check import _record_routes

    if torch.cuda.get_device_capability()[0] != 9:
        return ["| Gluon fwd+bwd | not sm_90: not run |"]
    forwards, restore_forward = _record_routes("routed_forward")
    backwards, restore_backward = _record_routes("routed_backward")
    try:
        q, k, v = (torch.randn(4, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)

        def step():
            out = fx_flash.flash_attention(q, k, v, is_causal=True)
            return (out, *torch.autograd.grad(out, (q, k, v), do))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager = [t.clone() for t in step()]  # decides the routes and compiles, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        replays = []
        for _ in range(2):
            graph.replay()
            replays.append([t.clone() for t in captured])
        torch.cuda.synchronize()
    finally:
        restore_forward()
        restore_backward()
    routed = set(forwards) == set(backwards) == {True}
    same = all(torch.equal(r[i], eager[i]) for r in replays for i in (0, 2, 3))
    dq_err = max((r[1].float() - eager[1].float()).abs().max().item() for r in replays)
    good = routed and same and dq_err < 1e-2
    OK[0] &= good
    return [f"| Gluon fwd+bwd, (4,16,2048,128) causal | routed both ways: {routed}; replays: out, dk, dv bitwise "
            f"equal to eager: {same}, dq within {dq_err:.1e}: {'PASS' if good else 'FAIL'} |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1024,4096,16384")
    ap.add_argument("--dims", default="64,128", help="head dims of the default section")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    t0 = time.time()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}", flush=True)
    tables = []
    if "first_call" not in skip:
        tables.append(first_call_section(timeout=300))
        print(f"first_call done at {time.time() - t0:.0f}s", flush=True)
    if "host" not in skip:
        import profile_host

        profile_host.host_table(args.out)
        print(f"host done at {time.time() - t0:.0f}s", flush=True)
    if "waves" not in skip:
        tables.append("\n".join(["\nAfter a first call on (1, 4, 1024, 64):\n", *waves_section()]))
        print(f"waves done at {time.time() - t0:.0f}s", flush=True)
    if "capture" not in skip:
        tables.append("\n".join(["\nCUDA graph capture of the op:\n", *capture_section()]))
    if "default" not in skip:
        rows = default_section([int(x) for x in args.ns.split(",")], [int(x) for x in args.dims.split(",")])
        tables.append("\n".join(["\nUntuned default vs tuned, bf16, B·N = 16k, hidden 2048 (TFLOP/s):\n", *rows]))
    for table in tables:
        print(table)
    print(f"\ntotal {time.time() - t0:.0f}s")
    print("ALL PASS" if OK[0] else "SOME FAILED")
    sys.exit(0 if OK[0] else 1)


if __name__ == "__main__":
    main()
