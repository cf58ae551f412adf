"""The readable eager oracle for ``fx_flash.flash_attention``.

Same signature and semantics as the op (and as ``F.scaled_dot_product_attention``), written as
plain tensor algebra so that tests can compute it in float64. The fused path never calls it,
except on CPU tensors when the Triton interpreter is off (there is no kernel to run there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    dropout_keep: Optional[torch.Tensor] = None,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Eager attention, softmax(q·kᵀ·scale + mask)·v, computed in ``upcast`` precision if given.

    Args:
        q: (B, Hq, Nq, d). k: (B, Hkv, Nk, d). v: (B, Hkv, Nk, dv).
        attn_mask: bool (True = attend) or float (added), broadcastable to (B, Hq, Nq, Nk).
        dropout_p: probability of dropping a weight; needs ``dropout_keep`` to be exact.
        is_causal: top-left aligned causal mask, ``tril(ones(Nq, Nk))``.
        scale: multiplier of q·kᵀ; defaults to 1/sqrt(d).
        enable_gqa: allow Hq to be a multiple of Hkv (each K/V head serves Hq/Hkv query heads).
        dropout_keep: bool (B, Hq, Nq, Nk), True where a weight is kept; the kernel's own mask
            comes from ``fx_flash.testing.dropout_keep_mask``. Without it, torch's dropout is used.
        upcast: compute in this dtype (e.g. torch.float64) and return the result in it.

    Returns:
        (B, Hq, Nq, dv). Rows whose keys are all masked out give 0, as SDPA does.
    """
    dtype = upcast or q.dtype
    scores = masked_scores(q.to(dtype), k.to(dtype), attn_mask, is_causal, scale, enable_gqa)
    v = v.to(dtype)
    if q.shape[-3] != v.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    weights = safe_softmax(scores)
    if dropout_p > 0.0:
        if dropout_keep is None:
            weights = torch.nn.functional.dropout(weights, dropout_p)
        else:
            weights = weights * dropout_keep / (1.0 - dropout_p)
    return weights @ v


def masked_scores(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """q·kᵀ·scale with the mask applied (-inf where a key is masked out), (B, Hq, Nq, Nk)."""
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        if not enable_gqa or hq % hkv:
            raise ValueError(f"q has {hq} heads and k/v {hkv}: needs enable_gqa and Hq % Hkv == 0")
        k = k.repeat_interleave(hq // hkv, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores.masked_fill(~allowed, float("-inf"))


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, with 0 for rows whose every score is -inf.

    Note: such a row has no softmax; SDPA (and the kernels) return 0 there, where a bare softmax
    would give NaN.
    """
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1).masked_fill(empty_row, 0.0)


def attention_logsumexp(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, upcast=None):
    """The logsumexp of each query row's masked scores, (B, Hq, Nq); -inf for fully masked rows."""
    dtype = upcast or q.dtype
    return torch.logsumexp(masked_scores(q.to(dtype), k.to(dtype), attn_mask, is_causal, scale, enable_gqa), dim=-1)


def attention_reference_backward(dout, q, k, v, attn_mask=None, dropout_keep=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Gradients (dq, dk, dv, dscores) of ``attention_reference`` by the textbook formulas, in fp32.

    Written out rather than through autograd because custom-op kernels run below autograd.
    ``dscores`` (B, Hq, Nq, Nk) is the gradient of the scaled, masked scores, which is also the
    gradient of an additive mask before it is summed over its broadcast axes.
    """
    dtype = torch.float32
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = masked_scores(q, kk, attn_mask, is_causal, scale)
    p = safe_softmax(scores)
    keep_scale = 1.0 if dropout_keep is None else dropout_keep / (1.0 - dropout_p)
    dv = (p * keep_scale).transpose(-2, -1) @ dout
    dp = (dout @ vv.transpose(-2, -1)) * keep_scale
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    b, hq = q.shape[0], q.shape[1]
    dk = dk.reshape(b, hq // group, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(b, hq // group, group, *dv.shape[2:]).sum(2)
    return dq, dk, dv, ds
