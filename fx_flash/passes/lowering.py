"""One table from torch's pointwise ops to sympy, as Inductor's lowering table maps ops to IR.

A ``Value`` is what the capture knows about one tensor (or Python number) between Q·Kᵀ and
softmax: a sympy expression, the kind of its elements, its shape, and whether it depends on
the scores. Values that do not depend on the scores address their elements through
*positional* symbols ``p1, p2, …`` (p1 is the last dimension, right-aligned as broadcasting
aligns them); a dimension of size 1 has no symbol (broadcasting reads its element 0).

``POINTWISE`` maps each spelling of an op (function, method, operator) to a rule that builds the
result's expression from its arguments' Values. Adding an op is one row here plus a test.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
import torch.nn.functional as F

from fx_flash.codegen.spec import operand_kind, sigmoid

POSITIONS = tuple(sympy.Symbol(f"p{i}", integer=True, nonnegative=True) for i in range(1, 9))


def position(i: int) -> sympy.Symbol:
    """The positional symbol of the i-th dimension from the right (1-based)."""
    return POSITIONS[i - 1]


@dataclass(frozen=True)
class Value:
    """expr: sympy Expr (kind float/int) or Boolean (kind bool); shape: None for a number."""

    expr: Any
    kind: str
    shape: Optional[tuple]
    scores: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.shape is None else len(self.shape)


class Unsupported(Exception):
    """The op has no rule (or not for these arguments); the message says why."""


def kind_of_dtype(dtype: torch.dtype) -> str:
    kind = operand_kind(dtype)
    if kind is None:
        raise Unsupported(f"a {dtype} tensor")
    return kind


def as_num(v: Value):
    """The value as a number: bools read as 1 and 0, as torch promotes them."""
    if v.kind == "bool":
        return sympy.Piecewise((1, v.expr), (0, True))
    return v.expr


def as_bool(v: Value):
    if v.kind == "bool":
        return v.expr
    return sympy.Ne(v.expr, 0)


def _promote(*vs: Value) -> str:
    kinds = {v.kind for v in vs}
    return "float" if "float" in kinds else "int" if "int" in kinds else "bool"


def broadcast_shape(*vs: Value) -> Optional[tuple]:
    shapes = [v.shape for v in vs if v.shape is not None]
    if not shapes:
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(1, rank + 1):
        sizes = [s[-i] for s in shapes if len(s) >= i]
        big = [n for n in sizes if not (isinstance(n, int) and n == 1)]
        out.append(big[0] if big else 1)
    return tuple(reversed(out))


def _result(expr, kind: str, *vs: Value) -> Value:
    return Value(expr, kind, broadcast_shape(*vs), any(v.scores for v in vs))


# ---------------------------------------------------------------------------------------------
# The rules: each takes the argument Values (and the node's keyword arguments) and returns a Value


def _arith(fn: Callable, kind: Optional[str] = None):
    def rule(a: Value, b: Value, **_):
        k = kind or _promote(a, b)
        if k == "bool":
            k = "int"  # bool + bool is an int in torch
        return _result(fn(as_num(a), as_num(b)), k, a, b)

    return rule


def _true_div(a: Value, b: Value, rounding_mode=None, **_):
    if rounding_mode == "floor":
        return _floor_div(a, b)
    if rounding_mode is not None:
        raise Unsupported(f"division with rounding_mode={rounding_mode!r}")
    return _result(as_num(a) / as_num(b), "float", a, b)


def _floor_div(a: Value, b: Value, **_):
    return _result(sympy.floor(as_num(a) / as_num(b)), _promote(a, b), a, b)


def _sub(a: Value, b: Value, alpha=1, **_):
    if a.kind == "bool" or b.kind == "bool":
        raise Unsupported("subtraction of bool tensors (torch refuses it)")
    return _result(as_num(a) - alpha * as_num(b), _promote(a, b), a, b)


def _add(a: Value, b: Value, alpha=1, **_):
    return _result(as_num(a) + alpha * as_num(b), "int" if _promote(a, b) == "bool" else _promote(a, b), a, b)


def _rsub(a: Value, b: Value, alpha=1, **_):
    return _sub(b, a, alpha)


def _pow(a: Value, b: Value, **_):
    return _result(as_num(a) ** as_num(b), _promote(a, b) if b.kind != "float" else "float", a, b)


def _unary(fn: Callable, kind: Optional[str] = "float"):
    def rule(a: Value, **_):
        if a.kind == "bool" and fn is not operator.neg:
            a = Value(as_num(a), "float", a.shape, a.scores)
        return Value(fn(as_num(a)), kind or a.kind, a.shape, a.scores)

    return rule


def _compare(fn: Callable):
    def rule(a: Value, b: Value, **_):
        return _result(fn(as_num(a), as_num(b)), "bool", a, b)

    return rule


def _logical(fn: Callable):
    def rule(a: Value, b: Value, **_):
        if a.kind != "bool" or b.kind != "bool":
            raise Unsupported("a bitwise op on non-bool tensors (only bool masks are read)")
        return _result(fn(a.expr, b.expr), "bool", a, b)

    return rule


def _logical_not(a: Value, **_):
    return Value(sympy.Not(as_bool(a)), "bool", a.shape, a.scores)


def _invert(a: Value, **_):
    if a.kind != "bool":
        raise Unsupported("~ of an integer tensor is bitwise, not a mask")
    return _logical_not(a)


def _where(cond: Value, a: Value, b: Value, **_):
    c = as_bool(cond)
    kind = _promote(a, b)
    if kind == "bool":
        expr = sympy.Or(sympy.And(c, a.expr), sympy.And(sympy.Not(c), b.expr))
    else:
        expr = sympy.Piecewise((as_num(a), c), (as_num(b), True))
    return _result(expr, kind, cond, a, b)


def _masked_fill(x: Value, mask: Value, value: Value, **_):
    return _where(mask, value, x)


def _piecewise_max(a, b):
    return sympy.Piecewise((a, a >= b), (b, True))


def _piecewise_min(a, b):
    return sympy.Piecewise((a, a <= b), (b, True))


def _clamp(x: Value, lo: Optional[Value] = None, hi: Optional[Value] = None, **_):
    # torch's clamp passes the gradient where lo <= x <= hi: Piecewise keeps that boundary.
    e = as_num(x)
    branches = []
    if lo is not None and lo.expr is not None:
        branches.append((as_num(lo), e < as_num(lo)))
    if hi is not None and hi.expr is not None:
        branches.append((as_num(hi), e > as_num(hi)))
    if not branches:
        return x
    vs = [v for v in (x, lo, hi) if v is not None and v.expr is not None]
    return _result(sympy.Piecewise(*branches, (e, True)), _promote(*vs), *vs)


def _maximum(a: Value, b: Value, **_):
    return _result(_piecewise_max(as_num(a), as_num(b)), _promote(a, b), a, b)


def _minimum(a: Value, b: Value, **_):
    return _result(_piecewise_min(as_num(a), as_num(b)), _promote(a, b), a, b)


def _sqrt(a: Value, **_):
    return Value(sympy.sqrt(as_num(a)), "float", a.shape, a.scores)


def _rsqrt(a: Value, **_):
    return Value(1 / sympy.sqrt(as_num(a)), "float", a.shape, a.scores)


def _square(a: Value, **_):
    return Value(as_num(a) ** 2, a.kind if a.kind != "bool" else "int", a.shape, a.scores)


# Rules keyed by how the graph spells the op. Methods are listed by name (``x.add(y)``);
# in-place methods (``masked_fill_``) share their out-of-place rule, the capture handles the
# mutation. Each entry: (rule, names of the arguments after the inputs, in order).
RULES: dict[str, Callable] = {
    "add": _add, "sub": _sub, "rsub": _rsub, "mul": _arith(operator.mul), "div": _true_div,
    "floor_divide": _floor_div, "pow": _pow, "maximum": _maximum, "minimum": _minimum,
    "lt": _compare(sympy.Lt), "le": _compare(sympy.Le), "gt": _compare(sympy.Gt), "ge": _compare(sympy.Ge),
    "eq": _compare(sympy.Eq), "ne": _compare(sympy.Ne),
    "and": _logical(sympy.And), "or": _logical(sympy.Or), "xor": _logical(sympy.Xor),
    "logical_and": _logical(sympy.And), "logical_or": _logical(sympy.Or), "logical_xor": _logical(sympy.Xor),
    "neg": _unary(operator.neg, None), "exp": _unary(sympy.exp), "log": _unary(sympy.log),
    "tanh": _unary(sympy.tanh), "sigmoid": _unary(sigmoid), "abs": _unary(sympy.Abs, None),
    "sqrt": _sqrt, "rsqrt": _rsqrt, "square": _square,
    "floor": _unary(sympy.floor, None), "ceil": _unary(sympy.ceiling, None),
    "logical_not": _logical_not, "invert": _invert,
    "where": _where, "masked_fill": _masked_fill, "clamp": _clamp,
}

FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub", torch.rsub: "rsub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    torch.divide: "div", operator.floordiv: "floor_divide", torch.floor_divide: "floor_divide",
    operator.pow: "pow", torch.pow: "pow",
    torch.maximum: "maximum", torch.minimum: "minimum",
    operator.lt: "lt", torch.lt: "lt", operator.le: "le", torch.le: "le", operator.gt: "gt", torch.gt: "gt",
    operator.ge: "ge", torch.ge: "ge", operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    operator.and_: "and", operator.iand: "and", torch.bitwise_and: "and", torch.logical_and: "logical_and",
    operator.or_: "or", operator.ior: "or", torch.bitwise_or: "or", torch.logical_or: "logical_or",
    operator.xor: "xor", torch.logical_xor: "logical_xor",
    operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
    torch.floor: "floor", torch.ceil: "ceil", torch.exp: "exp", torch.log: "log", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.abs: "abs", operator.abs: "abs", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt",
    torch.square: "square",
    torch.logical_not: "logical_not", operator.invert: "invert", torch.bitwise_not: "invert",
    torch.where: "where", torch.masked_fill: "masked_fill", torch.clamp: "clamp", torch.clip: "clamp",
}

METHODS = {
    "add": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add", "sub": "sub", "__sub__": "sub",
    "subtract": "sub", "__rsub__": "rsub", "mul": "mul", "__mul__": "mul", "__rmul__": "mul",
    "multiply": "mul", "div": "div", "__truediv__": "div", "divide": "div", "true_divide": "div",
    "floor_divide": "floor_divide", "__floordiv__": "floor_divide", "pow": "pow", "__pow__": "pow",
    "maximum": "maximum", "minimum": "minimum",
    "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne", "__lt__": "lt", "__le__": "le",
    "__gt__": "gt", "__ge__": "ge", "__eq__": "eq", "__ne__": "ne", "less": "lt", "greater": "gt",
    "__and__": "and", "bitwise_and": "and", "logical_and": "logical_and", "__or__": "or",
    "bitwise_or": "or", "logical_or": "logical_or", "__xor__": "xor", "logical_xor": "logical_xor",
    "neg": "neg", "__neg__": "neg", "negative": "neg", "exp": "exp", "log": "log", "tanh": "tanh",
    "sigmoid": "sigmoid", "floor": "floor", "ceil": "ceil", "abs": "abs", "__abs__": "abs", "sqrt": "sqrt", "rsqrt": "rsqrt", "square": "square",
    "logical_not": "logical_not", "__invert__": "invert", "bitwise_not": "invert",
    "masked_fill": "masked_fill", "clamp": "clamp", "clip": "clamp",
    "clamp_min": "clamp_min", "clamp_max": "clamp_max",
}
RULES["clamp_min"] = lambda x, lo, **_: _clamp(x, lo, None)
RULES["clamp_max"] = lambda x, hi, **_: _clamp(x, None, hi)

# Keyword arguments a rule reads; any other keyword makes the op unsupported.
KEYWORDS = {"add": {"alpha"}, "sub": {"alpha"}, "rsub": {"alpha"}, "div": {"rounding_mode"},
            "clamp": {"min", "max"}, "clamp_min": {"min"}, "clamp_max": {"max"}}
# How many leading positional arguments are operands (the rest are keywords by position).
ARITY = {"where": 3, "masked_fill": 3, "clamp": 3, "clamp_min": 2, "clamp_max": 2}
UNARY = {"floor", "ceil", "neg", "exp", "log", "tanh", "sigmoid", "abs", "sqrt", "rsqrt", "square", "logical_not", "invert"}


def rule_name(node) -> Optional[str]:
    """The table's name for ``node``'s op, or None when the table has no rule for it.

    In-place methods (``add_``, ``masked_fill_``) map to their out-of-place rule.
    """
    if node.op == "call_function":
        return FUNCTIONS.get(node.target)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__") and name[:-1] in METHODS:
            name = name[:-1]
        return METHODS.get(name)
    return None


def is_in_place(node) -> bool:
    """A method that mutates its first argument (``x.masked_fill_(m, v)``, ``x.add_(y)``)."""
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


def number(x) -> Value:
    """A Python number (or bool) as a Value."""
    if isinstance(x, bool):
        return Value(sympy.true if x else sympy.false, "bool", None)
    if isinstance(x, int):
        return Value(sympy.Integer(x), "int", None)
    if isinstance(x, float):
        if math.isinf(x):
            return Value(sympy.oo if x > 0 else -sympy.oo, "float", None)
        if math.isnan(x):
            raise Unsupported("a NaN constant")
        return Value(sympy.Float(x), "float", None)
    raise Unsupported(f"{type(x).__name__} {x!r} is not a number")
