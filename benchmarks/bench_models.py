"""Whole-model timings: eager vs torch.compile (Inductor) vs backend="fx_flash", forward and
training step, with peak memory. Models are unmodified HF models from configs (random weights).

    python benchmarks/bench_models.py                       # GPU: GPT-2 small + LLaMA-style stack, bf16, seq 1k-8k
    python benchmarks/bench_models.py --toy                 # CPU smoke run at toy size (checks the script)
    python benchmarks/bench_models.py --markdown results.md # also write the table (with command, device, versions)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402,F401  (registers backend="fx_flash" where the package is not pip-installed)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpt2_small(toy: bool, max_len: int):
    """GPT-2 small's shape (12 layers, 768 wide, 12 heads); positions grown to the longest sequence."""
    if toy:
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=max_len, vocab_size=128)
    else:
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max_len)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config), config.vocab_size


def llama_stack(toy: bool, max_len: int):
    """A LLaMA-style stack with GQA (8 layers, 2048 wide, 16 heads, 4 K/V heads, head dim 128)."""
    if toy:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                          max_position_embeddings=max_len)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=8, hidden_size=2048, num_attention_heads=16,
                                          num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                          max_position_embeddings=max_len)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config), config.vocab_size


MODELS = {"gpt2": gpt2_small, "llama": llama_stack}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Milliseconds per call (median of iters), after warmup calls (which include compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def compiled(model, backend: str):
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="fx_flash")


def run_case(args, name, backend, mode, seq, device, dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, vocab = MODELS[name](args.toy, max(args.seqs))
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (args.batch, seq), device=device)
    fn_model = compiled(model, backend)
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                fn_model(ids).logits
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            loss = fn_model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ms = timed(step, device, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        return "OOM", "-"
    except Exception as e:  # one failing case must not lose the rest of a GPU run
        import traceback

        traceback.print_exc()
        return f"error: {type(e).__name__}", "-"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return f"{ms:.2f}", f"{peak:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--seqs", default="1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--modes", default="forward,train")
    parser.add_argument("--backends", default="eager,inductor,fx_flash")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--toy", action="store_true", help="tiny models, seq 16/32, CPU fp32: checks the script runs")
    parser.add_argument("--markdown", help="write the results table to this file")
    args = parser.parse_args(argv)
    args.seqs = [int(s) for s in args.seqs.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.toy:
        args.seqs, args.warmup, args.iters, dtype = [16, 32], 1, 2, torch.float32

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import triton

    header = [
        f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"device: {device_name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        f"batch {args.batch}, dtype {dtype}, median of {args.iters} after {args.warmup} warm-up calls (compilation excluded)",
        "",
        "| model | mode | seq | " + " | ".join(f"{b} ms | {b} peak GiB" for b in args.backends.split(",")) + " |",
        "|" + "---|" * (3 + 2 * len(args.backends.split(","))),
    ]
    print("\n".join(header), flush=True)
    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            for seq in args.seqs:
                cells = []
                for backend in args.backends.split(","):
                    cells += run_case(args, name, backend, mode, seq, device, dtype)
                row = f"| {name} | {mode} | {seq} | " + " | ".join(cells) + " |"
                rows.append(row)
                print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
