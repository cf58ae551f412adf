"""The readable eager oracles: ``attention_reference`` for ``fx_flash.flash_attention`` (SDPA's
signature and semantics) and ``spec_attention`` for any AttentionSpec.

Plain tensor algebra, so that tests can compute them in float64. The fused path never calls
them, except on CPU tensors when the Triton interpreter is off (there is no kernel to run there;
the backward is then autograd through ``spec_attention``).
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


# ---------------------------------------------------------------------------------------------
# Any AttentionSpec, evaluated with tensor algebra: the oracle of captured attention


def spec_attention(q, k, v, operands, spec, scale, dropout_p=0.0, *, dropout_keep=None, upcast=None, with_lse=False):
    """Eager attention of an AttentionSpec: softmax(where(keep, score, fill)) · v.

    Args:
        q: (B, Hq, Nq, d). k, v: (B, Hkv, Nk, d), Hq a multiple of Hkv.
        operands: the tensors the spec reads, in its order.
        spec: an ``fx_flash.codegen.spec.AttentionSpec``.
        scale: the value of the spec's ``scale`` symbol.
        dropout_keep: bool (B, Hq, Nq, Nk), True where a weight is kept (with ``dropout_p``).
        upcast: compute in this dtype (e.g. torch.float64) and return the result in it.
        with_lse: also return the logsumexp of each row, (B, Hq, Nq).

    Returns:
        (B, Hq, Nq, d); rows whose every element is -inf give 0, as SDPA does.
    """
    dtype = upcast or q.dtype
    scores = spec_scores(q.to(dtype), k.to(dtype), operands, spec, scale)
    v = v.to(dtype)
    if q.shape[-3] != v.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    weights = safe_softmax(scores)
    if dropout_p > 0.0 and spec.dropout:
        weights = weights * dropout_keep / (1.0 - dropout_p)
    out = weights @ v
    if with_lse:
        return out, torch.logsumexp(scores, dim=-1).float()
    return out


def spec_scores(q, k, operands, spec, scale) -> torch.Tensor:
    """The masked scores where(keep, score, fill), (B, Hq, Nq, Nk), in q's dtype."""
    from fx_flash.codegen import spec as S

    b, hq, nq, _ = q.shape
    nk = k.shape[-2]
    if k.shape[-3] != hq:
        k = k.repeat_interleave(hq // k.shape[-3], dim=-3)
    dev = q.device
    env = {
        S.QK: q @ k.transpose(-2, -1), S.SCALE: float(scale),
        S.B_IDX: torch.arange(b, device=dev).view(b, 1, 1, 1), S.H_IDX: torch.arange(hq, device=dev).view(1, hq, 1, 1),
        S.Q_IDX: torch.arange(nq, device=dev).view(1, 1, nq, 1), S.KV_IDX: torch.arange(nk, device=dev).view(1, 1, 1, nk),
        S.N_Q: nq, S.N_KV: nk,
    }
    for op, t in zip(spec.operands, operands):
        index = tuple(_index(_evaluate(e, env)) for e in op.index)
        value = t[index] if index else t
        env[op.symbol] = value.to(q.dtype) if value.dtype.is_floating_point else value
    score = torch.as_tensor(_evaluate(spec.score, env), dtype=q.dtype, device=dev)
    keep = _evaluate(spec.keep, env)
    fill = torch.tensor(spec.fill, dtype=q.dtype, device=dev)
    shape = env[S.QK].shape
    return torch.where(torch.as_tensor(keep, device=dev), score, fill).expand(shape)


def _index(value):
    return value.long() if isinstance(value, torch.Tensor) else int(value)


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _evaluate(e, env):
    """The value of sympy expression ``e`` with its symbols bound to tensors or numbers."""
    import sympy

    if e in env:
        return env[e]
    if e is sympy.true or e is sympy.false:
        return bool(e)
    if e.is_Number:
        if e is sympy.oo or e is sympy.S.NegativeInfinity:
            return float(e)
        return int(e) if e.is_Integer else float(e)
    if isinstance(e, sympy.Piecewise):  # branches are evaluated lazily: a condition is no value
        result = _evaluate(e.args[-1][0], env)
        for value, cond in reversed(e.args[:-1]):
            c, v = _evaluate(cond, env), _evaluate(value, env)
            result = torch.where(_tensor(c), _tensor(v), _tensor(result)) if isinstance(c, torch.Tensor) else (v if c else result)
        return result
    args = [_evaluate(a, env) for a in e.args]
    if isinstance(e, sympy.Add):
        return _fold(lambda a, b: a + b, args)
    if isinstance(e, sympy.Mul):
        return _fold(lambda a, b: a * b, args)
    if isinstance(e, sympy.Pow):
        return args[0] ** args[1]
    if isinstance(e, sympy.core.relational.Relational):
        ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
               "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
        return ops[e.rel_op](*args)
    if isinstance(e, sympy.And):
        return _fold(lambda a, b: a & b, args)
    if isinstance(e, sympy.Or):
        return _fold(lambda a, b: a | b, args)
    if isinstance(e, sympy.ITE):
        c, a, b = args
        return torch.where(_tensor(c), _tensor(a), _tensor(b)) if isinstance(c, torch.Tensor) else (a if c else b)
    if isinstance(e, sympy.Not):
        return ~args[0] if isinstance(args[0], torch.Tensor) else not args[0]
    if isinstance(e, sympy.Min):
        return _fold(lambda a, b: torch.minimum(_tensor(a), _tensor(b)), args)
    if isinstance(e, sympy.Max):
        return _fold(lambda a, b: torch.maximum(_tensor(a), _tensor(b)), args)
    if isinstance(e, sympy.Mod):
        return args[0] % args[1]
    if isinstance(e, sympy.ceiling):
        return torch.ceil(_tensor(args[0])) if isinstance(args[0], torch.Tensor) else math.ceil(args[0])
    if isinstance(e, sympy.floor):
        return torch.floor(_tensor(args[0])) if isinstance(args[0], torch.Tensor) else math.floor(args[0])
    functions = {"tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "Abs": torch.abs, "sigmoid": torch.sigmoid,
                 "sign": torch.sign}
    name = type(e).__name__
    if name in functions:
        return functions[name](_tensor(args[0]))
    raise ValueError(f"the reference cannot evaluate {e}")


def _fold(fn, args):
    result = args[0]
    for a in args[1:]:
        result = fn(result, a)
    return result
