"""Compile an unmodified HF GPT-2 (tiny random config) with ``backend="fx_flash"`` and explain it.

    python examples/compile_gpt2.py            # CPU: the op runs its eager reference
    TRITON_INTERPRET=1 python examples/...     # CPU through the generated Triton kernels
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from fx_flash.explain import explain


def main():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (2, 32))

    compiled = torch.compile(model, backend="fx_flash")  # no fx_flash import needed for this line
    with torch.no_grad():
        print("max |compiled - eager|:", (compiled(ids).logits - model(ids).logits).abs().max().item())
        report = explain(model, ids)
    print(f"fused {report.fused} attention(s)")
    for site in report.sites:
        print(" ", site)
    for miss in report.missed:
        print("  missed", miss)


if __name__ == "__main__":
    main()
