"""The torch.library contract of fx_flash: schemas, fake kernels, autograd, dispatch.

    fx_flash::flash_attention   SDPA's signature; CompositeImplicitAutograd: checks arguments,
                                draws the dropout seed and calls the forward op. This is what the
                                graph pass emits, one call per attention.
    fx_flash::flash_attn_fwd    (out, logsumexp); registered autograd calls flash_attn_bwd.
    fx_flash::flash_attn_bwd    (dq, dk, dv, dbias); dbias is empty unless the bias needs grad.

CUDA tensors run the generated Triton kernels; CPU tensors run the same kernels under
``TRITON_INTERPRET=1`` and the eager oracle (``reference.py``) otherwise. Triton is imported
only when a kernel is launched.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fx_flash import validate
from fx_flash.device import interpreting

LIB = "fx_flash"


def runs_kernels(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the generated kernels (else the reference)."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _interpreter_dtype(t: Optional[Tensor]) -> Optional[Tensor]:
    # Note: Triton's CPU interpreter computes bf16 tl.dot wrongly (seen with triton 3.9: errors
    # of 1e10), so under the interpreter bf16 runs the kernels on fp32 copies. bf16 proper is
    # tested on the GPU (benchmarks/gpu_check.py).
    if t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return t.float()
    return t


def _reference_keep(seed: Tensor, shape, dropout_p: float) -> Tensor:
    """Dropout mask of the reference path: a torch Generator seeded by the op's seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]))
    return (torch.rand(shape, generator=gen) >= dropout_p).to(seed.device)


def _reference_mask(bias: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
    if bias is not None and mask is not None:
        return bias.masked_fill(~mask, float("-inf"))
    return bias if bias is not None else mask


def _reference_forward(q, k, v, bias, mask, seed, dropout_p, is_causal, scale):
    from fx_flash.reference import attention_logsumexp, attention_reference

    attn_mask = _reference_mask(bias, mask)
    keep = None
    if dropout_p > 0.0:
        keep = _reference_keep(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p)
    out = attention_reference(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa=True,
                              dropout_keep=keep, upcast=torch.float32)
    lse = attention_logsumexp(q, k, attn_mask, is_causal, scale, enable_gqa=True, upcast=torch.float32)
    return out.to(q.dtype), lse


# The ops are defined with torch.library.define/impl rather than torch.library.custom_op, whose
# per-call wrapper (Dynamo guard, aliasing checks) cost ~80 µs of host time per forward+backward
# on the H200 (benchmarks/RESULTS.md, host overhead).
torch.library.define(
    f"{LIB}::flash_attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? seed, float dropout_p, bool is_causal, "
    "float scale) -> (Tensor, Tensor)",
)
torch.library.define(
    f"{LIB}::flash_attn_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, Tensor? mask, Tensor? seed, "
    "float dropout_p, bool is_causal, float scale, bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.impl(f"{LIB}::flash_attn_fwd", ("CPU", "CUDA"))
def _flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], seed: Optional[Tensor],
    dropout_p: float, is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """Fused attention forward. Returns (out (B, Hq, Nq, d), logsumexp (B, Hq, Nq) fp32)."""
    if not runs_kernels(q.device):
        return _reference_forward(q, k, v, bias, mask, seed, dropout_p, is_causal, scale)
    from fx_flash.codegen.launch import attention_forward

    dtype = q.dtype
    q, k, v, bias = (_interpreter_dtype(t) for t in (q, k, v, bias))
    out, lse = attention_forward(q, k, v, bias, mask, seed, dropout_p, is_causal, scale)
    return out.to(dtype), lse


@torch.library.register_fake(f"{LIB}::flash_attn_fwd")
def _(q, k, v, bias, mask, seed, dropout_p, is_causal, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.impl(f"{LIB}::flash_attn_bwd", ("CPU", "CUDA"))
def _flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Optional[Tensor], mask: Optional[Tensor], seed: Optional[Tensor],
    dropout_p: float, is_causal: bool, scale: float, bias_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention backward. Returns (dq, dk, dv, dbias); dbias is empty (0,) unless requested."""
    if not runs_kernels(q.device):
        dq, dk, dv, dbias = _reference_backward(dout, q, k, v, bias, mask, seed, dropout_p, is_causal, scale,
                                                bias_requires_grad)
    else:
        from fx_flash.codegen.launch import attention_backward

        dtypes = (q.dtype, k.dtype, v.dtype)
        args = [_interpreter_dtype(t) for t in (dout, q, k, v, out, bias)]
        dq, dk, dv, dbias = attention_backward(*args[:5], lse, args[5], mask, seed, dropout_p, is_causal, scale,
                                               bias_requires_grad)
        dq, dk, dv = (g.to(dt) for g, dt in zip((dq, dk, dv), dtypes))
        dbias = dbias.to(bias.dtype) if dbias is not None else None
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty((0,)))


def _reference_backward(dout, q, k, v, bias, mask, seed, dropout_p, is_causal, scale, bias_requires_grad):
    from fx_flash.reference import attention_reference_backward

    keep = None
    if dropout_p > 0.0:
        keep = _reference_keep(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p)
    dq, dk, dv, ds = attention_reference_backward(dout, q, k, v, _reference_mask(bias, mask), keep, dropout_p,
                                                  is_causal, scale, enable_gqa=True)
    dbias = None
    if bias_requires_grad:
        dbias = ds.sum_to_size(bias.shape).to(bias.dtype).contiguous()  # summed over the broadcast axes
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dbias


@torch.library.register_fake(f"{LIB}::flash_attn_bwd")
def _(dout, q, k, v, out, lse, bias, mask, seed, dropout_p, is_causal, scale, bias_requires_grad):
    # Gradients come back contiguous whatever the inputs' strides (q/k/v are often transposed views).
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_requires_grad else q.new_empty((0,))
    return (*grads, dbias)


class _FlashAttnFunction(torch.autograd.Function):
    """The autograd of flash_attn_fwd, registered at its Autograd key.

    Written as a plain autograd.Function rather than through torch.library.register_autograd,
    whose per-call wrapper (argument normalization with fill_defaults) cost ~20-45 us of host
    time per call on the H200, a large share of a decoding step (benchmarks/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, seed, dropout_p, is_causal, scale):
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = torch.ops.fx_flash.flash_attn_fwd.default(q, k, v, bias, mask, seed, dropout_p, is_causal,
                                                                 scale)
        ctx.save_for_backward(q, k, v, out, lse, bias, mask, seed)
        ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
        ctx.bias_requires_grad = bias is not None and ctx.needs_input_grad[3]
        # The logsumexp is an auxiliary output (as in SDPA's kernels): it has no gradient, and
        # an unused output's gradient is passed as None rather than a materialized zero tensor.
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # Only out is differentiable, so the backward runs only when out has a gradient.
        q, k, v, out, lse, bias, mask, seed = ctx.saved_tensors
        dq, dk, dv, dbias = torch.ops.fx_flash.flash_attn_bwd.default(
            grad_out, q, k, v, out, lse, bias, mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale,
            ctx.bias_requires_grad)
        return dq, dk, dv, (dbias if ctx.bias_requires_grad else None), None, None, None, None, None


@torch.library.impl(f"{LIB}::flash_attn_fwd", "Autograd")
def _flash_attn_fwd_autograd(q, k, v, bias, mask, seed, dropout_p, is_causal, scale):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _FlashAttnFunction.apply(q, k, v, bias, mask, seed, dropout_p, is_causal, scale)
    # Nothing to differentiate (inference, decoding): skip the autograd.Function's bookkeeping,
    # a third of the op's Python time per call.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fx_flash.flash_attn_fwd.default(q, k, v, bias, mask, seed, dropout_p, is_causal, scale)


flash_attn_fwd = torch.ops.fx_flash.flash_attn_fwd.default
flash_attn_bwd = torch.ops.fx_flash.flash_attn_bwd.default


torch.library.define(
    f"{LIB}::flash_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, "
    "float? scale=None, bool enable_gqa=False) -> Tensor",
)


@torch.library.impl(f"{LIB}::flash_attention", "CompositeImplicitAutograd")
def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    validate.check_arguments(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bias = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    mask = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
    seed = None
    if dropout_p > 0.0:
        # Drawn from torch's generator of q's device, so torch.manual_seed makes runs repeat.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    out, _ = flash_attn_fwd(q, k, v, bias, mask, seed, float(dropout_p), bool(is_causal), scale)
    return out
