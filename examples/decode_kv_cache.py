"""Decoding with a KV cache: one new token per sequence attends to all cached keys.

fx_flash takes its split-KV path on its own when there are at most 16 queries per head: the
cached keys are split across programs so the whole GPU works even at batch 1, and the query
heads of a GQA group share one tile, so each K/V tile is read once per group. Nothing to
configure; FX_FLASH_SPLIT_KV=0 would turn it off.

    python examples/decode_kv_cache.py               # on a GPU
    TRITON_INTERPRET=1 python examples/decode_kv_cache.py   # on a CPU, through Triton's interpreter
"""

import torch
import torch.nn.functional as F

import fx_flash
from fx_flash.codegen import launch

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
B, HQ, HKV, D = 2, 8, 2, 64  # LLaMA-style grouped heads: 4 query heads per K/V head
cached = 32768 if device == "cuda" else 600  # the interpreter is slow: a short cache on the CPU

k_cache = torch.randn(B, HKV, cached, D, device=device, dtype=dtype)
v_cache = torch.randn(B, HKV, cached, D, device=device, dtype=dtype)
lengths = torch.tensor([cached, cached - 100], device=device)  # ragged sequences in one batch
valid = torch.arange(cached, device=device)[None, None, None, :] < lengths[:, None, None, None]

for step in range(3):
    q = torch.randn(B, HQ, 1, D, device=device, dtype=dtype)  # this step's query
    splits, rows = launch.decode_plan(q, k_cache)
    out = fx_flash.flash_attention(q, k_cache, v_cache, attn_mask=valid, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float(), attn_mask=valid,
                                         enable_gqa=True)
    err = (out.float() - ref).abs().max().item()
    print(f"step {step}: {splits} key splits, {rows}-row tiles, max |fx_flash - sdpa| = {err:.2e}")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
