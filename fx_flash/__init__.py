"""fx_flash: attention written any way, run as generated FlashAttention kernels.

Public surface:
    flash_attention   SDPA's signature, fused forward and backward (generated Triton kernels).
    fuse_attention    the FX pass: rewrites attention chains of a GraphModule in place.
    explain           what the pass fused and missed in a model, and why.
    backend           options for ``torch.compile(model, backend=fx_flash.backend(...))``;
                      plain ``backend="fx_flash"`` works through the package's entry point.
    set_autotune      time the tile candidates of each new kernel key (off by default: the
                      tile derived from shared memory and occupancy runs untimed).
Importing registers the ``fx_flash::`` torch ops and the backend; it does no GPU work and
compiles nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from fx_flash import ops as _ops  # noqa: F401  (registers torch.ops.fx_flash.*)

# Imported eagerly, so the package attributes are these functions rather than the submodules of
# the same name (a later ``import fx_flash.backend``, as the entry point does, would not rebind).
from fx_flash.backend import backend
from fx_flash.codegen.autotune import set_autotune
from fx_flash.explain import explain
from fx_flash.passes import fuse_attention

__all__ = ["backend", "explain", "flash_attention", "fuse_attention", "set_autotune"]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Fused attention with ``torch.nn.functional.scaled_dot_product_attention``'s semantics.

    Args:
        q: (B, Hq, Nq, d); k, v: (B, Hkv, Nk, d). float16, bfloat16 or float32; any strides.
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (B, Hq, Nq, Nk); read through broadcast strides, never expanded. A float mask that
            requires grad receives a gradient.
        dropout_p: dropout on the attention weights, drawn inside the kernel (Philox, seeded
            from torch's generator).
        is_causal: top-left aligned causal mask (``tril(ones(Nq, Nk))``); may be combined with
            ``attn_mask``.
        scale: multiplier of q·kᵀ, default 1/sqrt(d).
        enable_gqa: allow Hq to be a multiple of Hkv; K/V are not repeated in memory.

    Returns:
        (B, Hq, Nq, d) in q's dtype. Rows with every key masked out are 0, as in SDPA.
    """
    if _ops.eager(q, k, v, attn_mask if isinstance(attn_mask, torch.Tensor) else None):
        return _ops._flash_attention(True, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return torch.ops.fx_flash.flash_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
