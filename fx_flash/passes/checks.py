"""The named proofs a matched site must pass before it is rewritten.

Each structural check takes an ``AttentionSite`` and returns None when the condition is proved,
or a reason (a sentence) when it is not. ``specify`` then turns the capture into the kernel's
spec and proves what the spec needs (``operands_supported``, ``score_is_differentiable``,
``spec_renders``), raising ``Miss``. The check's name is what ``explain().missed`` and the
``fx_flash`` logger report, so a reader can find the code that refused a site by its name.
The order matters only for which reason is reported first.
"""

from __future__ import annotations

import math
from typing import Optional

import sympy
import torch

from fx_flash.codegen.generate import operand_derivative, render
from fx_flash.codegen.simplify import normalize
from fx_flash.codegen.spec import QK, SCALE, AttentionSpec, Operand, exact_arithmetic
from fx_flash.passes.capture import Capture
from fx_flash.passes.match import AttentionSite, Factor, Miss
from fx_flash.passes.values import NotConstant, same_shape, same_size, tensor_of
from fx_flash.validate import MAX_HEAD_DIM, SUPPORTED_DTYPES

def softmax_over_keys(site: AttentionSite) -> Optional[str]:
    """The softmax normalizes over the key axis (the last one), not over queries or heads."""
    rank = tensor_of(site.softmax).dim()
    dim = site.softmax_dim
    if not isinstance(dim, int) or dim not in (-1, rank - 1):
        return f"softmax over dim={dim!r} of a rank-{rank} tensor; attention normalizes over the last (key) axis"
    return None


def operands_are_heads(site: AttentionSite) -> Optional[str]:
    """q, k, v are (B, H, N, d) or (B·H, N, d) with one batch, k and v the same length and width."""
    q, v = tensor_of(site.q), _v(site)
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
    # The weights as P·V reads them (a view may have merged batch and heads since the softmax).
    v, scores = _v(site), tensor_of(site.weights_chain[-1])
    if v is None or v.dim() != scores.dim():
        rank = None if v is None else v.dim()
        return f"the weights multiply a rank-{rank} tensor, not a rank-{scores.dim()} V (a weight matrix, not attention)"
    if not same_size(v.shape[-2], scores.shape[-1]):
        return f"the weights have {scores.shape[-1]} columns but V has {v.shape[-2]} rows"
    return None


def _v(site: AttentionSite):
    """V's (fake) tensor as (…, N, d), whether the graph wrote V or Vᵀ."""
    v = tensor_of(site.v)
    return v.transpose(-2, -1) if v is not None and site.v_transposed else v


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
    softmax_over_keys,
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
    """The op's ``scale``: a float, or None when the scale is symbolically c/sqrt(head dim)
    (the op's default; ``scale_residual`` is then c, which the spec multiplies in)."""
    return _scale_parts(site)[0]


def scale_residual(site: AttentionSite) -> float:
    """c when the scale is c/sqrt(head dim) with a symbolic head dim (dynamic shapes), else 1."""
    return _scale_parts(site)[1]


def _scale_parts(site: AttentionSite):
    total = 1.0
    for factor in site.factors:
        total = total * factor.value
    if isinstance(total, (int, float)):
        if not math.isfinite(total):
            raise NotConstant(f"the scale {total} is not finite")
        return float(total), 1.0
    expr = _plain(sympy.sympify(total))
    if expr.is_number:
        return float(expr), 1.0
    head_dim = _plain(_expr(tensor_of(site.q).shape[-1]))
    ratio = sympy.simplify(expr * sympy.sqrt(head_dim))
    if ratio.is_number and ratio != 0 and sympy.Float(ratio).is_finite:
        return None, float(ratio)
    raise NotConstant(f"the scale {expr} depends on sizes other than the head dim {head_dim}")


def _fold_scale(site: AttentionSite, score):
    """``c·scale·qk + rest`` (a constant written after a bias, as in ``(qk + bias) / 8``): c goes
    into the op's scale, so the kernel is the one every such scale shares."""
    terms = sympy.Add.make_args(score)
    with_qk = [t for t in terms if QK in t.free_symbols]
    if len(with_qk) != 1:
        return score
    coeff, rest = with_qk[0].as_coeff_Mul()
    if rest != SCALE * QK or coeff == 1 or not coeff.is_finite or coeff == 0:
        return score
    try:
        if site_scale(site) is None:
            return score  # a symbolic 1/sqrt(d) stays the op's default; c stays in the score
    except NotConstant:
        return score
    site.factors.append(Factor("scores", float(coeff)))
    return score - with_qk[0] + SCALE * QK


@exact_arithmetic
def specify(site: AttentionSite, capture: Capture) -> AttentionSpec:
    """The spec of a captured site, every part of it proved (else Miss with the check's name)."""
    score, keep, fill = normalize(capture.expr)
    try:
        residual = scale_residual(site)
    except NotConstant:
        residual = 1.0  # scale_is_constant reports it
    if residual != 1.0:  # the op's default 1/sqrt(d) leaves c of c/sqrt(d) to the score
        score = score.xreplace({SCALE: residual * SCALE})
    score = _fold_scale(site, score)
    operands = []
    for i, read in enumerate(capture.reads):
        t = tensor_of(read.node)
        if t.dtype == torch.float64:
            raise Miss("operands_supported", f"{read.node.name} is float64 (it would promote the scores)", read.node)
        operands.append(Operand(f"t{i}", read.kind, read.index))
    try:
        spec = AttentionSpec(score, keep, tuple(operands), fill)
    except ValueError as e:
        raise Miss("score_is_pointwise", str(e), site.softmax)
    # Gradients are decided at run time (autograd's needs), so prove the backward for every float
    # operand and for q·kᵀ: a graph traced without grad may run with it.
    needs = spec.with_grads([o.kind == "float" for o in spec.operands])
    d_qk = sympy.diff(needs.score, QK)
    if d_qk.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta):
        raise Miss("score_is_differentiable", f"the score {needs.score} has no derivative by qk the kernel can use",
                   site.softmax)
    try:
        for op in needs.grad_operands:
            operand_derivative(needs, op)
    except ValueError as e:
        raise Miss("score_is_differentiable", str(e), site.softmax)
    try:
        render(needs)
    except ValueError as e:
        raise Miss("spec_renders", str(e), site.softmax)
    return spec
