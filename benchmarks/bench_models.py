"""Whole-model timings: eager attention compiled with backend="fx_flash" against HF's SDPA
attention compiled with Inductor, each with and without CUDA graphs, training step (and
forward), with peak memory. Models are unmodified HF models from configs (random weights).

    python benchmarks/bench_models.py --cases gpt2:1024,gpt2:8192,llama:2048   # GPU, bf16, training step
    python benchmarks/bench_models.py --toy                                     # CPU smoke run (checks the script)
    python benchmarks/bench_models.py --markdown results.md                     # also write the table

Variants (--variants):
    eager              HF eager attention, no compilation
    inductor           HF eager attention, torch.compile (Inductor)
    fx_flash           HF eager attention, torch.compile(backend=fx_flash.backend())
    fx_flash_cg        the same with fx_flash.backend(cudagraphs=True) (Inductor's CUDA graphs)
    sdpa_inductor      HF's SDPA attention, torch.compile (Inductor)
    sdpa_inductor_cg   the same with Inductor's CUDA graphs (options={"triton.cudagraphs": True})
Each sequence length runs a batch of --tokens // seq sequences (--batch overrides), so rows
compare the same number of tokens per step.
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
import fx_flash  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpt2_small(toy: bool, max_len: int, attn: str = "eager"):
    """GPT-2 small's shape (12 layers, 768 wide, 12 heads); positions grown to the longest sequence."""
    if toy:
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=max_len, vocab_size=128)
    else:
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max_len)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    config._attn_implementation = attn
    return transformers.GPT2LMHeadModel(config), config.vocab_size


def llama_stack(toy: bool, max_len: int, attn: str = "eager"):
    """A LLaMA-style stack with GQA (8 layers, 2048 wide, 16 heads, 4 K/V heads, head dim 128)."""
    if toy:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                          max_position_embeddings=max_len)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=8, hidden_size=2048, num_attention_heads=16,
                                          num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                          max_position_embeddings=max_len)
    config._attn_implementation = attn
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


VARIANTS = {  # name → (HF attention implementation, compile)
    "eager": ("eager", None),
    "inductor": ("eager", lambda m: torch.compile(m)),
    "fx_flash": ("eager", lambda m: torch.compile(m, backend=fx_flash.backend())),
    "fx_flash_cg": ("eager", lambda m: torch.compile(m, backend=fx_flash.backend(cudagraphs=True))),
    "sdpa_inductor": ("sdpa", lambda m: torch.compile(m)),
    "sdpa_inductor_cg": ("sdpa", lambda m: torch.compile(m, options={"triton.cudagraphs": True})),
}


def run_case(args, name, variant, mode, seq, batch, device, dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn, compile_fn = VARIANTS[variant]
    model, vocab = MODELS[name](args.toy, args.max_len, attn)
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    fn_model = compile_fn(model) if compile_fn else model
    # CUDA graph trees need to know where an iteration starts (the previous step's outputs may go).
    mark = torch.compiler.cudagraph_mark_step_begin if variant.endswith("_cg") else (lambda: None)
    if mode == "forward":
        model.eval()

        def step():
            mark()
            with torch.no_grad():
                fn_model(ids).logits
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            mark()
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
    parser.add_argument("--cases", default="gpt2:1024,gpt2:2048,gpt2:8192,llama:1024,llama:2048,llama:8192",
                        help="model:seq pairs")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step: batch = tokens // seq")
    parser.add_argument("--batch", type=int, default=0, help="a fixed batch instead of --tokens // seq")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--modes", default="train")
    parser.add_argument("--variants", default="fx_flash,fx_flash_cg,sdpa_inductor,sdpa_inductor_cg")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--toy", action="store_true", help="tiny models, seq 16/32, CPU fp32: checks the script runs")
    parser.add_argument("--markdown", help="write the results table to this file")
    args = parser.parse_args(argv)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.toy:
        cases = [(m, s) for m in dict.fromkeys(m for m, _ in cases) for s in (16, 32)]
        args.warmup, args.iters, args.tokens, dtype = 1, 2, 64, torch.float32
    args.max_len = max(s for _, s in cases)
    variants = args.variants.split(",")

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import triton

    header = [
        f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"device: {device_name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        f"{'batch ' + str(args.batch) if args.batch else str(args.tokens) + ' tokens per step'}, dtype {dtype}, "
        f"median of {args.iters} after {args.warmup} warm-up calls (compilation excluded)",
        "",
        "| model | mode | seq | batch | " + " | ".join(f"{v} ms | {v} GiB" for v in variants) + " |",
        "|" + "---|" * (4 + 2 * len(variants)),
    ]
    print("\n".join(header), flush=True)
    rows = []
    for name, seq in cases:
        batch = args.batch or max(1, args.tokens // seq)
        for mode in args.modes.split(","):
            cells = []
            for variant in variants:
                cells += run_case(args, name, variant, mode, seq, batch, device, dtype)
            row = f"| {name} | {mode} | {seq} | {batch} | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)
    print("\n".join(["", *header[-2:], *rows]))  # the table again, whole, at the end of the output
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
