"""A switch's effect on a whole-model training step, measured inside one process: one model compiled
with backend="fx_flash", timed with the environment switch set and unset in alternating order (set
first in even rounds, unset first in odd ones), so that the GPU's drift between processes (calls 22
and 25 of benchmarks/GLUON_NOTES.md: up to 8% on the same setting) does not enter the difference.
fx_flash reads its switches per call and its launch plans key on them, so a flip takes effect at
the next call without recompiling.

    python benchmarks/switch_ab.py --case gpt2:2048 --switch FX_FLASH_GLUON_BWD=0 --rounds 4   # GPU, bf16
    python benchmarks/switch_ab.py --toy                                                        # CPU smoke run

Prints each round's milliseconds (median of --iters steps after --warmup), then the medians and
their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402  (its models and timer)

import fx_flash  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="gpt2:2048", help="model:seq, a model of bench_models.MODELS")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step: batch = tokens // seq")
    ap.add_argument("--switch", default="FX_FLASH_GLUON_BWD=0", help="NAME=VALUE, set in half the timings")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--toy", action="store_true", help="a tiny model, seq 32, CPU fp32: checks the script runs")
    args = ap.parse_args(argv)
    name, seq = args.case.split(":")
    seq = 32 if args.toy else int(seq)
    key, value = args.switch.split("=", 1)
    device = torch.device("cpu" if args.toy else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    torch.manual_seed(0)
    model, vocab = bench_models.MODELS[name](args.toy, seq)
    model = model.to(device=device, dtype=dtype).train()
    ids = torch.randint(0, vocab, (max(1, args.tokens // seq) if not args.toy else 2, seq), device=device)
    compiled = torch.compile(model, backend=fx_flash.backend())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        compiled(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = os.environ.get(key)
    times = {"unset": [], args.switch: []}
    try:
        for r in range(args.rounds):
            for label in (args.switch, "unset") if r % 2 == 0 else ("unset", args.switch):
                if label == "unset":
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
                times[label].append(bench_models.timed(step, device, args.warmup, args.iters))
                print(f"round {r}: {label}: {times[label][-1]:.2f} ms", flush=True)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    medians = {label: sorted(ms)[len(ms) // 2] for label, ms in times.items()}
    print(f"{args.case}, batch {ids.shape[0]}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: "
          f"median {key} unset {medians['unset']:.2f} ms, {args.switch} {medians[args.switch]:.2f} ms, "
          f"unset / set {medians['unset'] / medians[args.switch]:.3f}")


if __name__ == "__main__":
    main()
