"""Captured expression → (score, keep, fill): the form an AttentionSpec takes, simplified.

The capture hands over the softmax input as one expression, masks and all. Before anything is
emitted it is put in the spec's form:
    - piecewise parts are folded outward, so ``s + where(keep, 0, -inf)``, ``where(keep, s, -inf)``
      and ``masked_fill(~keep, -inf)`` all become ``Piecewise((s, keep), (-oo, True))``;
    - branches that are a constant fill become the keep-predicate: -inf always; a finite fill
      (``finfo.min``, ``-1e4``) when every fill branch writes the same value, so that rows with
      no kept element still average uniformly, exactly as eager softmax does. Where the
      predicate keeps key 0 of every row (causal, as HF's masks are) no row is wholly filled,
      and a fill at most -1e4 weighs exactly 0 beside a kept key (exp underflows for any kept
      score above fill + 104): it becomes -inf, which the kernels handle more cheaply. An addition of a
      swamping constant (≤ -1e30, as HF adds ``finfo.min``) equals that constant in fp32 for any
      score below 1e22, so it counts as the fill too;
    - additive terms (as the graph adds them: products are never expanded) that are provably
      the same along the key axis (built from constants, q_idx, b and h only, so provably
      finite) are dropped: softmax is shift-invariant per row;
    - sympy folds constants as it builds the expression.
"""

from __future__ import annotations

import math

import sympy

from fx_flash.codegen.spec import KV_IDX, QK, SCALE, SKIPPABLE_FILL, exact_arithmetic

SWAMPS = -1e30  # an added constant at most this large is the value itself in fp32 (see above)


@exact_arithmetic
def normalize(expr) -> tuple:
    """(score, keep, fill) with expr == where(keep, score, fill) wherever a row keeps a key."""
    folded = sympy.piecewise_fold(expr)
    score, keep, fill = _split(folded)
    if QK in keep.free_symbols:  # a predicate on the scores themselves: leave it in the score
        return expr, sympy.true, float("-inf")
    if fill != float("-inf") and fill <= SKIPPABLE_FILL and keeps_a_key_per_row(keep):
        fill = float("-inf")
    return drop_row_constants(score), tidy_relations(keep), fill


def keeps_a_key_per_row(keep) -> bool:
    """The predicate keeps key 0 of every row (causal, prefix-LM, …): then no row is wholly
    filled, and a fill whose weight is 0 beside a kept key is the same as -inf."""
    at_key_0 = keep.subs(KV_IDX, 0)
    return at_key_0 is sympy.true or sympy.simplify(at_key_0) is sympy.true


def tidy_relations(pred):
    """Integer comparisons as ``a <= b`` with the positive terms on the left (``kv_idx <= q_idx``,
    ``q_idx <= kv_idx + 1023``): one readable form for the many a graph may spell."""
    rels = [r for r in pred.atoms(sympy.core.relational.Relational)
            if type(r) in (sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge) and all(x.is_integer for x in r.free_symbols)]
    subs = {}
    for r in rels:
        d = r.lhs - r.rhs
        d = {sympy.Le: d, sympy.Lt: d + 1, sympy.Ge: -d, sympy.Gt: -d + 1}[type(r)]
        d = sympy.expand(d)  # the relation is d <= 0, d = positive terms - negative terms + c
        terms = sympy.Add.make_args(d)
        positive = [t for t in terms if not t.is_Number and t.as_coeff_Mul()[0] > 0]
        negative = [-t for t in terms if not t.is_Number and t.as_coeff_Mul()[0] < 0]
        c = sympy.Add(*[t for t in terms if t.is_Number])
        if positive:  # positive <= negative - c
            subs[r] = sympy.Le(sympy.Add(*positive), sympy.Add(*negative) - c, evaluate=False)
        else:  # 0 <= negative - c, i.e. negative >= c
            subs[r] = sympy.Ge(sympy.Add(*negative), c, evaluate=False)
    return pred.xreplace(subs) if subs else pred


def _constant_fill(value):
    """The fill a branch writes: -inf, a finite constant, or a constant a score is added to that
    swamps it; None for a branch that computes a score."""
    if value == -sympy.oo:
        return float("-inf")
    if value.is_Number and value.is_finite:
        return float(value)
    if isinstance(value, sympy.Add):
        constants = [a for a in value.args if a.is_Number]
        if constants and float(constants[0]) <= SWAMPS and QK in value.free_symbols:
            rest = value - constants[0]
            if all(abs(float(c)) < 1e20 for c in rest.atoms(sympy.Number) if c.is_finite):
                return float(constants[0])
    return None


def _split(expr):
    if not isinstance(expr, sympy.Piecewise):
        return expr, sympy.true, float("-inf")
    branches = list(expr.args)
    fills = [_constant_fill(v) for v, _ in branches]
    if not any(f is not None for f in fills) or all(f is not None for f in fills):
        return expr, sympy.true, float("-inf")
    # -inf branches always mask; finite ones only if they all write one value and no -inf does.
    finite = {f for f in fills if f is not None and f != float("-inf")}
    if float("-inf") in fills:
        chosen = float("-inf")
    elif len(finite) == 1:
        chosen = finite.pop()
    else:
        return expr, sympy.true, float("-inf")
    taken, kept, earlier = [], [], []
    for (value, cond), f in zip(branches, fills):
        here = sympy.And(cond, *[sympy.Not(c) for c in earlier])
        if f == chosen:
            taken.append(here)
        else:
            kept.append((value, cond))
        earlier.append(cond)
    keep = sympy.simplify_logic(sympy.Not(sympy.Or(*taken))) if len(taken) > 1 else sympy.Not(taken[0])
    if len(kept) == 1:
        score = kept[0][0]
    else:
        score = sympy.Piecewise(*kept[:-1], (kept[-1][0], True))
    inner_score, inner_keep, inner_fill = _split(score)
    if inner_keep is not sympy.true and inner_fill == chosen:
        return inner_score, sympy.And(keep, inner_keep), chosen
    return score, keep, chosen


def drop_row_constants(score):
    """``score`` without the additive terms that are the same for every key of a row."""
    terms = sympy.Add.make_args(score)  # as written: expanding products could cancel catastrophically
    keep = [t for t in terms if not _row_constant(t)]
    if len(keep) == len(terms) or not keep:
        return score
    return sympy.Add(*keep)


def _row_constant(term) -> bool:
    from fx_flash.codegen.spec import B_IDX, H_IDX, N_KV, N_Q, Q_IDX

    allowed = {Q_IDX, B_IDX, H_IDX, N_Q, N_KV, SCALE}
    if not term.free_symbols <= allowed or KV_IDX in term.free_symbols:
        return False
    return all(math.isfinite(float(c)) for c in term.atoms(sympy.Number)) and not term.has(sympy.log, sympy.Pow)
