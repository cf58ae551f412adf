"""A/B timing of an experimental copy of fx_flash (this folder) against the repository's."""
import os, sys, json
which = sys.argv[1]
if which == "main":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch, triton, triton.testing
import fx_flash
which += os.environ.get("FX_EXP_FWD", "0") + os.environ.get("FX_EXP_DQ", "0")
print(which, fx_flash.__file__, flush=True)
rows = []
for d, n in [(128, 1024), (128, 2048), (128, 8192), (64, 2048), (96, 2048)]:
    for causal in (True,):
        h, b = 2048 // d, max(1, 16384 // n)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = fx_flash.flash_attention(q, k, v, is_causal=causal)
        err = (out - ref).abs().max().item()
        g = torch.autograd.grad(out, (q, k, v), do)
        gr = torch.autograd.grad(ref, (q, k, v), do)
        gerr = max((a - b_).abs().max().item() for a, b_ in zip(g, gr))
        step = lambda: torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=causal), (q, k, v), do)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
        fms = triton.testing.do_bench(lambda: fx_flash.flash_attention(q, k, v, is_causal=causal), warmup=50, rep=200, return_mode="median")
        r = dict(which=which, d=d, n=n, causal=causal, fwdbwd=round(3.5 * flops / ms / 1e9), fwd=round(flops / fms / 1e9),
                 bwd_ms=round(ms - fms, 4), err=err, gerr=gerr)
        print(json.dumps(r), flush=True)
