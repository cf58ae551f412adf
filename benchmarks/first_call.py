"""First-call cost: seconds from fx_flash's first call in a process to its result, cold and warm.

    python benchmarks/first_call.py [--b 4 --h 16 --n 2048 --d 128] [--impls fx_flash,flex,sdpa]

Cases: forward, and forward + backward, bf16, causal and not. Each case gets new, empty
FX_FLASH_CACHE_DIR, TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR directories and runs in fresh
Python processes:
    cold            empty directories: generate the source, compile the default tile of each
                    kernel (tuning is off by default)
    cold, tuned     the same with FX_FLASH_AUTOTUNE=1 (other empty directories): compile and time
                    every candidate of each kernel
    warm disk       a new process on the cold run's directories: sources and Triton binaries
                    are on disk
    2nd call        the next call in the warm-disk process (everything in memory)
``--impls`` adds FlexAttention (``torch.compile(flex_attention)`` with a causal BlockMask; its
compile goes through Inductor, hence the fresh TORCHINDUCTOR_CACHE_DIR) and SDPA (cuDNN / flash,
precompiled) rows, timed the same way: cold, warm disk, 2nd call.
Times run from just before the call to after ``torch.cuda.synchronize()``; imports, CUDA start-up
and input creation come before and are not counted. Every process checks its results against
``F.scaled_dot_product_attention`` in fp32 (max |out − ref| < 2e-2, gradients < 2e-2 · max(1,
max |ref|)), so a broken kernel cannot be timed silently; a failed check marks the row FAIL and
the script exits 1.

The split of the cold and warm-disk calls is measured by wrapping, in the child process only,
``loader.render`` (spec → source with sympy), ``loader.load`` (the rest of it: writing the file,
importing the module and ``@triton.jit``), and ``launch._time_ms`` (each tuning trial: its first
call, which compiles that candidate or loads it from Triton's cache, then ``do_bench``'s
timing). "launch+other" is the remainder: the real launches (compiling or loading the chosen
binary when tuning did not), allocations and Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = [(mode, causal) for mode in ("fwd", "fwd+bwd") for causal in (False, True)]
SPLIT = ("generate", "import+jit", "tune: compile+1st run", "tune: timing")


def child(args) -> None:
    """One process: time the first and second call of one case, check them, print one JSON line."""
    started = time.perf_counter()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch
    import torch.nn.functional as F
    import triton

    import fx_flash
    from fx_flash.codegen import launch, loader

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    split = dict.fromkeys(SPLIT, 0.0)

    def timed(name, fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                split[name] += time.perf_counter() - t0
        return wrapped

    # load() includes render(): import+jit is load's time minus generate's, subtracted below.
    loader.render = timed("generate", loader.render)
    loader.load = timed("import+jit", loader.load)
    real_time_ms = launch._time_ms

    def time_ms(call):
        t0 = time.perf_counter()
        call()
        sync()
        split["tune: compile+1st run"] += time.perf_counter() - t0
        return timed("tune: timing", real_time_ms)(call)

    launch._time_ms = time_ms

    torch.manual_seed(0)
    b, h, n, d = args.b, args.h, args.n, args.d
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    backward = args.mode == "fwd+bwd"
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    if args.impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n,
                                       device=device) if args.causal else None
        attend = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
    elif args.impl == "sdpa":
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)  # noqa: E731
    else:
        attend = lambda: fx_flash.flash_attention(q, k, v, is_causal=args.causal)  # noqa: E731

    def call():
        out = attend()
        grads = torch.autograd.grad(out, (q, k, v), dout) if backward else ()
        sync()
        return out, grads

    sync()
    ready = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - ready
    split_first = dict(split)
    split_first["import+jit"] -= split_first["generate"]
    split_first["launch+other"] = first_s - sum(split_first[s] for s in SPLIT)
    t0 = time.perf_counter()
    second = call()
    second_s = time.perf_counter() - t0

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=args.causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.float()) if backward else ()
    errors, ok = {}, True
    for label, (out, grads) in (("first", first), ("second", second)):
        errors[f"{label} out"] = (out.float() - ref).abs().max().item()
        ok &= errors[f"{label} out"] < 2e-2
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[f"{label} {name}"] = err = (g.float() - r).abs().max().item()
            ok &= err < 2e-2 * max(1.0, r.abs().max().item())
    print(json.dumps(dict(first_s=first_s, second_s=second_s, split=split_first, errors=errors, ok=bool(ok),
                          startup_s=ready - started, torch=torch.__version__, triton=triton.__version__,
                          device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")))


def run_child(args, mode: str, causal: bool, root: str, tune: bool = False, impl: str = "fx_flash") -> dict:
    """One fresh process of ``impl`` on the cache directories under ``root`` (created if absent)."""
    env = {**os.environ, "FX_FLASH_CACHE_DIR": os.path.join(root, "fx"),
           "TRITON_CACHE_DIR": os.path.join(root, "triton"), "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
           "FX_FLASH_AUTOTUNE": "1" if tune else "0"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--device", args.device,
           "--impl", impl, *(["--causal"] if causal else []),
           *(f"--{x}={getattr(args, x)}" for x in ("b", "h", "n", "d"))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        return dict(ok=False, error=f"exit {done.returncode}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    ap.add_argument("--cases", default="all", help="e.g. 'fwd+bwd:causal,fwd:full' (default: all four)")
    ap.add_argument("--impls", default="fx_flash", help="fx_flash,flex,sdpa: which implementations to time")
    ap.add_argument("--no-tuned", action="store_true", help="skip the cold FX_FLASH_AUTOTUNE=1 column")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="fx_flash", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fwd", help=argparse.SUPPRESS)
    ap.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.exit(0 if report(args, measure(args)) else 1)


def measure(args) -> list[dict]:
    """Every (case, implementation) row: fresh processes on fresh cache directories."""
    rows = []
    cases = CASES if args.cases == "all" else [
        (c.split(":")[0], c.split(":")[1] == "causal") for c in args.cases.split(",")]
    for mode, causal in cases:
        for impl in args.impls.split(","):
            with tempfile.TemporaryDirectory(prefix="fx_first_call_") as root:
                cold = run_child(args, mode, causal, os.path.join(root, "a"), impl=impl)
                tuned = {} if impl != "fx_flash" or args.no_tuned else run_child(
                    args, mode, causal, os.path.join(root, "b"), tune=True)
                warm = run_child(args, mode, causal, os.path.join(root, "a"), impl=impl)
            row = dict(impl=impl, mode=mode, causal=causal, cold=cold, tuned=tuned, warm=warm)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(args, rows: list[dict]) -> bool:
    """Print the tables; True when every process's check passed."""
    s = lambda r, field="first_s": f"{r[field]:.2f}" if field in r else "-"  # noqa: E731
    info = next((r["cold"] for r in rows if "device" in r["cold"]), {})
    print(f"\nfirst-call cost, B={args.b} H={args.h} N={args.n} d={args.d} bf16 on {info.get('device')}, "
          f"torch {info.get('torch')}, triton {info.get('triton')}; FX_FLASH_DQ={os.environ.get('FX_FLASH_DQ', '')}")
    print("\nWhere fx_flash's cold and warm-disk first calls go (seconds):\n")
    print("| case | process | " + " | ".join(SPLIT) + " | launch+other | total |")
    print("|---|---|" + "---|" * (len(SPLIT) + 2))
    for r in rows:
        for label in ("cold", "tuned", "warm"):
            res = r[label]
            if r["impl"] == "fx_flash" and "split" in res:
                cells = [f"{res['split'][x]:.2f}" for x in (*SPLIT, "launch+other")]
                print(f"| {r['mode']}{' causal' if r['causal'] else ''} | {label} | " + " | ".join(cells)
                      + f" | {s(res)} |")
    print("\nSeconds from first call to result (fresh processes on empty caches; warm disk: a new process on "
          "the cold one's caches; 2nd call: the next call in that process):\n")
    print("| impl | case | cold | cold, FX_FLASH_AUTOTUNE=1 | warm disk | 2nd call | check |")
    print("|---|---|---|---|---|---|---|")
    all_ok = True
    for r in rows:
        ok = all(r[p].get("ok") for p in ("cold", "tuned", "warm") if r[p])
        all_ok &= ok
        print(f"| {r['impl']} | {r['mode']}{' causal' if r['causal'] else ''} | {s(r['cold'])} | {s(r['tuned'])} | "
              f"{s(r['warm'])} | {s(r['warm'], 'second_s')} | {'ok' if ok else 'FAIL'} |")
    return all_ok


if __name__ == "__main__":
    main()
