"""fx_flash.flash_attention as a drop-in for F.scaled_dot_product_attention: masks, GQA, a learned
bias, dropout and the backward, checked against PyTorch.

    python examples/flash_attention_op.py               # on a GPU
    TRITON_INTERPRET=1 python examples/flash_attention_op.py   # on a CPU, through Triton's interpreter
"""

import torch
import torch.nn.functional as F

import fx_flash

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
B, HQ, HKV, N, D = 2, 8, 2, 200, 64  # 4 query heads share each K/V head

q = torch.randn(B, HQ, N, D, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(B, HKV, N, D, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(B, HKV, N, D, device=device, dtype=dtype, requires_grad=True)

# A padding mask (B, 1, 1, N): read through broadcast strides, never expanded to (B, H, N, N).
lengths = torch.tensor([N, N - 37], device=device)
padding = torch.arange(N, device=device)[None, None, None, :] < lengths[:, None, None, None]

out = fx_flash.flash_attention(q, k, v, attn_mask=padding, is_causal=True, enable_gqa=True)
ref = F.scaled_dot_product_attention(q, k, v, attn_mask=padding & torch.ones(N, N, dtype=torch.bool,
                                                                              device=device).tril(), enable_gqa=True)
print("causal + padding + GQA, max |fx_flash - sdpa| =", (out - ref).abs().max().item())

grads = torch.autograd.grad(out.float().sum(), (q, k, v))
ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
print("gradients, max |diff| =", max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)))

# A learned per-head position bias (T5-style): it receives its gradient from the kernel.
bias = torch.zeros(1, HQ, N, N, device=device, dtype=dtype, requires_grad=True)
fx_flash.flash_attention(q, k, v, attn_mask=bias, enable_gqa=True).float().sum().backward()
print("bias gradient shape:", tuple(bias.grad.shape))

# Dropout is drawn inside the kernel; torch.manual_seed makes it repeat.
torch.manual_seed(1)
a = fx_flash.flash_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
torch.manual_seed(1)
b = fx_flash.flash_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
print("dropout reproducible under manual_seed:", torch.equal(a, b))
