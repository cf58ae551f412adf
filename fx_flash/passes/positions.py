"""Positions: index arithmetic of the tensors a capture reads that do not depend on the scores.

Pure helpers of ``capture.py``: which index expressions the kernel can read, how a leading axis
of a view of the scores maps to q's (b, h), constant tensors that hold a predicate or an
``arange``, and how views renumber positional symbols. Positional symbols are ``lowering``'s
p1, p2, … (p1 the last dimension).
"""

from __future__ import annotations

from typing import Optional

import sympy
import torch

from fx_flash.codegen.spec import B_IDX, H_IDX, KV_IDX, Q_IDX
from fx_flash.passes import lowering as low
from fx_flash.passes.lowering import Unsupported, Value, position
from fx_flash.passes.match import Miss
from fx_flash.passes.values import as_expr, same_size


def valid_index(e) -> bool:
    e = sympy.sympify(e)
    free = e.free_symbols
    if free <= {B_IDX, H_IDX}:
        return True
    for axis in (Q_IDX, KV_IDX):
        if free == {axis} and sympy.expand(e - axis).is_Integer:
            return True
    return False


def plain_position(e) -> bool:
    """An index that is one position plus a constant, or a constant: the kernel reads it in range."""
    e = sympy.sympify(e)
    free = e.free_symbols
    return not free or (len(free) == 1 and next(iter(free)) in low.POSITIONS and sympy.expand(e - next(iter(free))).is_Integer)


def lead_index(d: int, stride: int, size: Optional[int], h_size: Optional[int], z_is_one: bool):
    """The index of leading dimension d of a view of the scores in q's (z, h) layout, where
    that dimension has ``size`` and the dimensions to its right multiply to ``stride``.

    The flat batch·head index is z·H + h; the dimension reads (flat // stride) % size. When
    the dimension lies wholly inside h or wholly inside z the expression avoids the other.
    """
    if h_size is None:
        raise Miss("scores_keep_their_shape", "the number of heads is symbolic")
    flat = B_IDX * h_size + H_IDX
    if z_is_one:
        flat = H_IDX
    if size is None:
        if d == 0:  # the outermost dimension needs no modulus
            return sympy.floor(flat / stride) if stride != 1 else flat
        raise Miss("scores_keep_their_shape", "scores viewed with a symbolic size inside the batch·head axes")
    if not z_is_one and stride % h_size == 0:
        inner = sympy.floor(B_IDX / (stride // h_size)) if stride != h_size else B_IDX
        return inner if d == 0 else sympy.Mod(inner, size)
    if stride * size <= h_size and h_size % (stride * size) == 0:
        inner = sympy.floor(H_IDX / stride) if stride != 1 else H_IDX
        return inner if stride * size == h_size else sympy.Mod(inner, size)
    inner = sympy.floor(flat / stride) if stride != 1 else flat
    return inner if d == 0 else sympy.Mod(inner, size)


def cast_value(v: Value, dtype: torch.dtype) -> Value:
    kind = low.kind_of_dtype(dtype)
    if kind == v.kind:
        return v
    if kind == "bool":
        return Value(low.as_bool(v), "bool", v.shape, v.scores)
    if v.kind == "float" and kind == "int":
        raise Unsupported("a float → integer cast (it truncates)")
    return Value(low.as_num(v), kind, v.shape, v.scores)


def keep_where(keep, v: Value):
    if v.kind == "bool":
        return sympy.And(keep, v.expr)
    return sympy.Piecewise((v.expr, keep), (0, True))


def triangle_pattern(value: torch.Tensor):
    """For a constant whose last two axes (leading axes of size 1) hold one value on and below
    (or above) a diagonal and another elsewhere, as ``tril(ones, d)``, ``1e4 * (1 - tril)`` and
    nanoGPT's buffer do: the positional expression it holds."""
    if value.dim() < 2 or any(n != 1 for n in value.shape[:-2]) or value.dtype.is_complex:
        return None
    plane = value.reshape(value.shape[-2:])
    n, m = plane.shape
    row, col = position(2), position(1)
    ones = torch.ones(n, m, dtype=torch.bool, device=plane.device)
    for lower in (True, False):
        inside, outside = (plane[0, 0], plane[0, -1]) if lower else (plane[-1, -1], plane[-1, 0])
        if bool(inside == outside):
            continue
        where = plane == inside
        count = int(where[0].sum()) if lower else int(where[-1].sum())
        d = count - 1 if lower else m - count - (n - 1)
        tri = ones.tril(d) if lower else ones.triu(d)
        if not (torch.equal(where, tri) and bool((plane[~tri] == outside).all())):
            continue
        cond = (col - row <= d) if lower else (col - row >= d)
        if value.dtype == torch.bool:
            return cond if bool(inside) else sympy.Not(cond)
        a, b = (v.item() for v in (inside, outside))
        return sympy.Piecewise((low.number(a).expr, cond), (low.number(b).expr, True))
    return None


def arange_pattern(value: torch.Tensor):
    """A constant whose one non-unit axis holds start, start + step, …: symbolic_trace folds
    ``torch.arange(n)`` of a literal n into such a constant. Its position expression."""
    big = [d for d, n in enumerate(value.shape) if n != 1]
    if len(big) != 1 or value.dtype.is_floating_point or value.dtype == torch.bool or value.shape[big[0]] < 2:
        return None
    flat = value.reshape(-1).long()
    start, step = int(flat[0]), int(flat[1] - flat[0])
    if not torch.equal(flat, start + step * torch.arange(flat.numel(), device=flat.device)):
        return None
    return start + step * position(value.dim() - big[0])


def only_broadcasts(src: tuple, new: tuple) -> bool:
    """``new`` is ``src`` broadcast: right-aligned, every differing source size is 1."""
    if len(new) < len(src):
        return False
    for a, b in zip(reversed(src), reversed(new)):
        if not (is_one(a) or same_size(a, b)):
            return False
    return True


def unit_dims_map(src: tuple, new: tuple) -> Optional[dict]:
    """old dim → new dim when ``new`` is ``src`` with size-1 dimensions inserted or removed."""
    big_src = [d for d, n in enumerate(src) if not is_one(n)]
    big_new = [d for d, n in enumerate(new) if not is_one(n)]
    if len(big_src) != len(big_new) or not all(same_size(src[a], new[b]) for a, b in zip(big_src, big_new)):
        return None
    return dict(zip(big_src, big_new))


def is_one(n) -> bool:
    return isinstance(n, int) and n == 1 or (not isinstance(n, int) and same_size(n, 1))


def static_size(n) -> Optional[int]:
    if isinstance(n, int):
        return n
    e = sympy.sympify(as_expr(n))
    return int(e) if e.is_Integer else None


def py_number(x):
    if isinstance(x, sympy.Basic):
        if x.is_Integer:
            return int(x)
        if x.is_Number:
            return float(x)
        raise Unsupported(f"{x} is symbolic")
    return x
