"""The named proofs a matched site must pass before it is rewritten.

Each check takes an ``AttentionSite`` and returns None when the condition is proved, or a
reason (a sentence) when it is not. The check's function name is what ``explain().missed`` and
the ``fx_flash`` logger report, so a reader can find the code that refused a site by its name.
The order matters only for which reason is reported first.
"""

from __future__ import annotations

import math
from typing import Optional

import sympy
import torch

from fx_flash.passes.match import AttentionSite
from fx_flash.passes.values import NotConstant, evaluate, same_shape, same_size, tensor_of
from fx_flash.validate import MAX_HEAD_DIM, SUPPORTED_DTYPES

# A masked_fill value this negative zeroes a weight in fp16/bf16/fp32 softmax (exp underflows),
# so adding it instead of writing it changes no row that keeps at least one key.
FILL_AT_MOST = -1e4
# A fill this negative also swamps any score when added, so fully masked rows stay uniform.
FILL_SWAMPS = -1e30


def scores_used_once(site: AttentionSite) -> Optional[str]:
    """Every intermediate from Q·Kᵀ to the softmax feeds only the next step."""
    for node in site.scores_chain:
        if len(node.users) != 1:
            names = ", ".join(u.name for u in node.users)
            return f"{node.name} is also used by {names} (the scores are needed elsewhere)"
    return None


def softmax_over_keys(site: AttentionSite) -> Optional[str]:
    """The softmax normalizes over the key axis (the last one), not over queries or heads."""
    rank = tensor_of(site.softmax).dim()
    dim = site.softmax_dim
    if not isinstance(dim, int) or dim not in (-1, rank - 1):
        return f"softmax over dim={dim!r} of a rank-{rank} tensor; attention normalizes over the last (key) axis"
    return None


def operands_are_heads(site: AttentionSite) -> Optional[str]:
    """q, k, v are (B, H, N, d) or (B·H, N, d) with one batch, k and v the same length and width."""
    q, v = tensor_of(site.q), tensor_of(site.v)
    k = tensor_of(site.k if site.k is not None else site.k_transposed)
    if q is None or k is None or v is None:
        return "no shapes recorded for q, k or v"
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        return f"q, k, v have ranks {q.dim()}, {k.dim()}, {v.dim()}; the op takes rank 4 (or 3, batch·heads first)"
    k_shape = k.shape if site.k is not None else k.shape[:-2] + (k.shape[-1], k.shape[-2])
    if not same_size(v.shape[-2], k_shape[-2]):
        return f"V has {v.shape[-2]} rows but there are {k_shape[-2]} keys"
    if not (same_size(v.shape[-1], q.shape[-1]) and same_size(k_shape[-1], q.shape[-1])):
        return f"head dims differ: q {q.shape[-1]}, k {k_shape[-1]}, v {v.shape[-1]} (the op needs one head dim)"
    if not (same_shape(q.shape[:-3], k_shape[:-3]) and same_shape(q.shape[:-3], v.shape[:-3])):
        return "q, k and v do not share a batch size (the op does not broadcast batches)"
    if not same_size(k_shape[-3], v.shape[-3]):
        return f"k has {k_shape[-3]} heads and v {v.shape[-3]}"
    hq, hkv = q.shape[-3], k_shape[-3]
    if not same_size(hq, hkv):
        ratio = sympy.simplify(_expr(hq) / _expr(hkv))
        if site.gqa_spelling is None or not ratio.is_integer:
            return f"q has {hq} heads and k/v {hkv}, not a grouped repeat the op can read"
    if isinstance(q.shape[-1], int) and not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is outside 1..{MAX_HEAD_DIM}"
    return None


def value_shaped(site: AttentionSite) -> Optional[str]:
    """The second product's other operand is V: same rank as the scores, one row per key."""
    v, scores = tensor_of(site.v), tensor_of(site.softmax)
    if v is None or v.dim() != scores.dim():
        rank = None if v is None else v.dim()
        return f"the weights multiply a rank-{rank} tensor, not a rank-{scores.dim()} V (a weight matrix, not attention)"
    if not same_size(v.shape[-2], scores.shape[-1]):
        return f"the weights have {scores.shape[-1]} columns but V has {v.shape[-2]} rows"
    return None


def dtypes_supported(site: AttentionSite) -> Optional[str]:
    """q, k, v share a dtype the kernels support, and the result comes back in it."""
    q, v, out = tensor_of(site.q), tensor_of(site.v), tensor_of(site.pv)
    k = tensor_of(site.k if site.k is not None else site.k_transposed)
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of the kernels' {', '.join(map(str, SUPPORTED_DTYPES))}"
    if out.dtype != q.dtype:
        return f"the attention output is {out.dtype}, not q's {q.dtype}"
    return None


def scale_is_constant(site: AttentionSite) -> Optional[str]:
    """The product of every scale on the scores is a proved number, or exactly 1/sqrt(head dim)."""
    try:
        site_scale(site)
    except NotConstant as e:
        return str(e)
    return None


def masks_supported(site: AttentionSite) -> Optional[str]:
    """Each mask is bool or float, broadcasts to the scores without growing them, and keeps its meaning."""
    for term in site.masks:
        reason = _mask_term_reason(site, term)
        if reason:
            return f"{term.node.name}: {reason}"
    return None


def dropout_is_known(site: AttentionSite) -> Optional[str]:
    """Dropout's probability is a number and its train/eval switch is known (or follows a module)."""
    drop = site.dropout
    if drop is None:
        return None
    if not isinstance(drop.training, (bool, torch.nn.Module)):
        return f"dropout's training flag is {drop.training!r}, not a literal"
    if isinstance(drop.p, bool) or not isinstance(drop.p, (int, float)):
        if drop.training is not False:
            return f"dropout's p is {drop.p!r}, not a literal (unspecialized float?)"
    elif not 0.0 <= drop.p < 1.0:
        return f"dropout p={drop.p} is outside [0, 1)"
    return None


CHECKS = (
    scores_used_once,
    softmax_over_keys,
    masks_supported,
    value_shaped,
    operands_are_heads,
    dtypes_supported,
    scale_is_constant,
    dropout_is_known,
)


def first_failure(site: AttentionSite) -> Optional[tuple[str, str]]:
    """(check name, reason) of the first check that does not hold, or None if all do."""
    for check in CHECKS:
        reason = check(site)
        if reason:
            return check.__name__, reason
    return None


# ---------------------------------------------------------------------------------------------
# Proved values the rewrite uses (shared with the checks so both see one answer)


def _expr(x):
    from fx_flash.passes.values import as_expr

    return sympy.sympify(as_expr(x))


def _plain(expr):
    """Torch's shape-env functions (ToFloat, FloatPow, …) as plain sympy, floats as rationals."""
    from torch.utils._sympy import functions as tf

    plain = {
        tf.ToFloat: lambda x: x,
        tf.FloatPow: lambda a, b: a**b,
        tf.PowByNatural: lambda a, b: a**b,
        tf.FloatTrueDiv: lambda a, b: a / b,
        tf.IntTrueDiv: lambda a, b: a / b,
        tf.OpaqueUnaryFn_sqrt: sympy.sqrt,
    }
    for fn, rule in plain.items():
        expr = expr.replace(fn, rule)
    return sympy.nsimplify(expr, rational=True)


def site_scale(site: AttentionSite):
    """The op's ``scale``: a float, or None when the scale is symbolically 1/sqrt(head dim)."""
    total = 1.0
    for factor in site.factors:
        total = total * factor.value
    if isinstance(total, (int, float)):
        if not math.isfinite(total):
            raise NotConstant(f"the scale {total} is not finite")
        return float(total)
    expr = _plain(sympy.sympify(total))
    if expr.is_number:
        return float(expr)
    head_dim = _plain(_expr(tensor_of(site.q).shape[-1]))
    if sympy.simplify(expr - 1 / sympy.sqrt(head_dim)) == 0:
        return None
    raise NotConstant(f"the scale {expr} depends on sizes other than the head dim {head_dim}")


def term_factor(term) -> float:
    """The product of the scales applied after a mask term (and baddbmm's beta)."""
    value = evaluate(term.coefficient) if not isinstance(term.coefficient, (int, float)) else term.coefficient
    for factor in term.scaled_by:
        value = value * factor.value
    if not isinstance(value, (int, float)):
        expr = sympy.sympify(value)
        if not expr.is_number:
            raise NotConstant(f"the mask is scaled by {expr}, which is not a number")
        value = float(expr)
    return value


def fill_value(term) -> float:
    """The value a masked_fill/where writes, after later scales: -inf, or a large negative."""
    value = evaluate(term.value)
    return float(value) * term_factor(term)


def _mask_term_reason(site: AttentionSite, term) -> Optional[str]:
    mask = tensor_of(term.tensor)
    scores_in = _term_input(site, term)
    result = tensor_of(term.node)
    if scores_in is not None and result is not None and term.spelling != "baddbmm":
        if not same_shape(scores_in.shape, result.shape):
            return f"broadcasting the mask grows the scores from {tuple(scores_in.shape)} to {tuple(result.shape)}"
        if result.dtype != scores_in.dtype:
            return f"the mask promotes the scores from {scores_in.dtype} to {result.dtype}"
    rank = tensor_of(site.softmax).dim()
    if mask is not None and mask.dim() > rank:
        return f"a rank-{mask.dim()} mask on rank-{rank} scores"
    try:
        factor = term_factor(term)
    except NotConstant as e:
        return str(e)
    if term.kind == "add":
        if mask is None:
            return None  # a Python number added to every score changes nothing after softmax
        if mask.dtype == torch.float64:
            return "a float64 mask (the kernels read fp32/fp16/bf16 masks)"
        if mask.is_complex():
            return f"a {mask.dtype} mask"
        if factor < 0 and mask.dtype == torch.bool:
            return "a bool mask added with a negative factor"
        return None
    if mask is None or mask.dtype != torch.bool:
        return f"masked_fill/where with a {None if mask is None else mask.dtype} condition"
    try:
        value = fill_value(term)
    except NotConstant as e:
        return f"the fill value is not provably constant ({e})"
    if value != float("-inf") and not value <= FILL_AT_MOST:
        return f"fill value {value} does not mask (the op can honour -inf or ≤ {FILL_AT_MOST:g})"
    return None


def _term_input(site: AttentionSite, term):
    """The scores as they were before this term (the chain node feeding term.node)."""
    node = term.node
    for a in node.all_input_nodes:
        if a in site.scores_chain:
            return tensor_of(a)
    return None
