"""Argument checks of ``flash_attention``: every unsupported input is a clear error naming the
argument, raised before any kernel is generated (never a Triton compile error or a wrong answer).
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_arguments(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """Raise TypeError/ValueError if the op cannot compute SDPA's result for these arguments."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; fx_flash supports float16, bfloat16 and float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v)} | ({attn_mask.device} if isinstance(attn_mask, torch.Tensor) else set())
    if len(devices) > 1:
        raise ValueError(f"q, k, v and attn_mask must be on one device, got {sorted(map(str, devices))}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; fx_flash runs on CUDA (and on CPU for testing)")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"head_dim must agree for q, k and v, got {d}, {k.shape[3]}, {v.shape[3]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not supported; fx_flash supports 1 to {MAX_HEAD_DIM}")
    hkv = k.shape[1]
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"q has {hq} heads and k/v {hkv}: pass enable_gqa=True for grouped-query attention")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"enable_gqa needs q's heads ({hq}) to be a multiple of k/v's ({hkv})")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask must be bool (True = attend) or floating point (added), got {attn_mask.dtype}")
        if attn_mask.dtype == torch.float64:
            raise TypeError("attn_mask has dtype float64; use float32, float16 or bfloat16")
        target = (b, hq, nq, k.shape[2])
        try:
            broadcast = torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            broadcast = None
        if attn_mask.dim() > 4 or broadcast != torch.Size(target):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, q_len, kv_len) = {target}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not float(scale) == float(scale):
        raise ValueError("scale is NaN")


_NUMBERS = (float, int, bool)


def argument_key(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Everything check_arguments reads, and everything SDPA's arguments turn into (the spec, the
    scale), as one hashable tuple: two calls with equal keys pass or fail together, so a key whose
    check passed need not be checked again. None when an argument is of another kind than the
    schema's (not a tensor, a number or None): check_arguments then runs, and raises.

    Note: a NaN scale never passes, so it never becomes a key (NaN != NaN would make a dict
    hit depend on the float object's identity).
    """
    try:
        mask = None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device)
        if not (type(dropout_p) in _NUMBERS and (scale is None or type(scale) in _NUMBERS)
                and type(is_causal) in _NUMBERS and type(enable_gqa) in _NUMBERS):
            return None
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, mask,
                dropout_p, bool(is_causal), scale, bool(enable_gqa))
    except AttributeError:  # an argument that is not a tensor: check_arguments says which
        return None


def check_operands(q, k, operands, spec) -> None:
    """Raise ValueError/TypeError unless ``operands`` are the tensors ``spec`` reads: one per
    operand of the spec, of its kind, with its number of dimensions, on q's device, and long
    enough along every dimension the spec indexes by query or key position."""
    if len(operands) != len(spec.operands):
        raise ValueError(f"the spec {spec.text!r} reads {len(spec.operands)} operand(s), got {len(operands)}")
    n_q, n_kv = q.shape[2], k.shape[2]
    from fx_flash.codegen.spec import operand_kind

    for op, t in zip(spec.operands, operands):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"operand {op.name} must be a Tensor, got {type(t).__name__}")
        if operand_kind(t.dtype) != op.kind:
            raise TypeError(f"operand {op.name} is read as {op.kind}, got a {t.dtype} tensor")
        if t.dim() != len(op.index):
            raise ValueError(f"operand {op.name} has {len(op.index)} dimension(s) in the spec, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"operand {op.name} is on {t.device}, q on {q.device}")
        for (d, c), n, axis in [(dc, n_q, "q_idx") for dc in op.q_dims] + [(dc, n_kv, "kv_idx") for dc in op.kv_dims]:
            if t.shape[d] < n + c:
                raise ValueError(f"operand {op.name} of shape {tuple(t.shape)} is indexed by {op.index[d]} up to "
                                 f"{n + c - 1} ({axis} < {n})")
