"""How real code spells each piece of attention, one small reader per piece.

Every reader takes an FX node and returns what that piece *means* (the operands of a matmul,
the tensor under a transpose, the factor of a scale) or None when the node is not that piece.
The spellings come from symbolic_trace graphs (call_module, call_method) and from Dynamo graphs
(which inline nn.Softmax/nn.Dropout into their functional forms and write ``+=`` as iadd).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

from fx_flash.passes.values import tensor_of


def is_function(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def submodule(node: Any) -> Optional[torch.nn.Module]:
    """The module a call_module node calls, or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    return node.graph.owning_module.get_submodule(node.target)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally (self counts for methods) or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------
# Products: Q·Kᵀ and P·V

@dataclass
class Product:
    """``left @ right`` (plus ``beta * bias`` and times ``alpha`` for baddbmm).

    right_is_transposed: the second operand is written as K itself (einsum ``bhqd,bhkd``,
    baddbmm's batch2 is already Kᵀ so this is False there).
    """

    left: fx.Node
    right: fx.Node
    spelling: str
    right_is_transposed: bool = False
    alpha: Any = 1.0
    bias: Optional[fx.Node] = None
    beta: Any = 1.0


MATMUL_FUNCTIONS = {torch.matmul: "torch.matmul", operator.matmul: "@", torch.bmm: "torch.bmm"}
MATMUL_METHODS = {"matmul": "Tensor.matmul", "bmm": "Tensor.bmm", "__matmul__": "@"}


def _einsum_roles(equation: str, contract_last: bool) -> bool:
    """True for ``P x c, P y c -> P x y`` (contract_last, Q·Kᵀ) or ``P x y, P y z -> P x z``."""
    if "->" not in equation or "." in equation:
        return False
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return False
    a, b = terms
    if len(a) != len(b) or len(a) < 3 or a[:-2] != b[:-2] or out[:-2] != a[:-2] or len(out) != len(a):
        return False
    if len(set(a + b)) != len(a) + 1:  # exactly one letter shared outside the batch prefix
        return False
    if contract_last:
        x, c, y, c2 = a[-2], a[-1], b[-2], b[-1]
        return c == c2 and out[-2:] == x + y and x != y
    x, y, y2, z = a[-2], a[-1], b[-2], b[-1]
    return y == y2 and out[-2:] == x + z and x != z


def product(node: Any, *, scores: bool) -> Optional[Product]:
    """Read ``node`` as a batched matrix product; ``scores`` selects the Q·Kᵀ einsum roles."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in MATMUL_FUNCTIONS and len(node.args) == 2:
        return Product(node.args[0], node.args[1], MATMUL_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in MATMUL_METHODS and len(node.args) == 2:
        return Product(node.args[0], node.args[1], MATMUL_METHODS[node.target])
    if is_function(node, torch.einsum) and len(node.args) == 3 and isinstance(node.args[0], str):
        if _einsum_roles(node.args[0], contract_last=scores):
            return Product(node.args[1], node.args[2], f"einsum('{node.args[0]}')", right_is_transposed=scores)
        if not scores and _einsum_roles(node.args[0], contract_last=True):  # P·V with V given as (…, d, N)
            return Product(node.args[1], node.args[2], f"einsum('{node.args[0]}')", right_is_transposed=True)
        return None
    if scores and (is_function(node, torch.baddbmm) or is_method(node, "baddbmm")):
        bias, b1, b2 = arg(node, 0, "input"), arg(node, 1, "batch1"), arg(node, 2, "batch2")
        if isinstance(b1, fx.Node) and isinstance(b2, fx.Node):
            beta, alpha = node.kwargs.get("beta", 1.0), node.kwargs.get("alpha", 1.0)
            return Product(b1, b2, "baddbmm", alpha=alpha, bias=bias, beta=beta)
    return None


# ---------------------------------------------------------------------------------------------
# Transposes of the last two axes (the only permutation that turns Kᵀ back into K)

def rank_of(node: Any) -> Optional[int]:
    t = tensor_of(node)
    return None if t is None else t.dim()


def _is_last_two(dims, rank: Optional[int]) -> bool:
    if rank is None:
        return sorted(dims) == [-2, -1]
    return sorted(d % rank for d in dims) == [rank - 2, rank - 1]


def untranspose(node: Any) -> Optional[fx.Node]:
    """If ``node`` is ``x`` with its last two axes swapped, return ``x``.

    ``transpose(-2, -1)``, ``transpose(2, 3)`` on rank 4, ``.mT``, ``swapaxes``, ``.t()`` on
    rank 2, and ``permute`` whose order is the identity except for the last two axes. Any
    other permute (``permute(0, 2, 3, 1)``) is *not* a transpose of the last two axes.
    """
    if not isinstance(node, fx.Node):
        return None
    src = node.args[0] if node.args else None
    rank = rank_of(src)
    if is_method(node, "transpose", "swapaxes", "swapdims") or is_function(
        node, torch.transpose, torch.swapaxes, torch.swapdims
    ):
        dims = node.args[1:3]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims) and _is_last_two(dims, rank):
            return src
        return None
    if is_function(node, getattr) and node.args[1] in ("mT", "mH") and not _is_complex(src):
        return src
    if is_method(node, "t") or is_function(node, torch.t):
        return src if rank == 2 else None
    if is_method(node, "permute") or is_function(node, torch.permute):
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if not all(isinstance(d, int) for d in order) or rank is None or len(order) != rank:
            return None
        order = [d % rank for d in order]
        return src if order == list(range(rank - 2)) + [rank - 1, rank - 2] else None
    return None


def _is_complex(node: Any) -> bool:
    t = tensor_of(node)
    return t is not None and t.is_complex()


# ---------------------------------------------------------------------------------------------
# Elementwise pieces on the scores

MUL = (operator.mul, torch.mul)
DIV = (operator.truediv, torch.div, torch.true_divide)


def scaling(node: Any) -> Optional[tuple[Any, Any, str]]:
    """``x * c``, ``c * x``, ``x / c``: returns (x-or-c pair as (a, b), op) for the caller.

    Returned as (left, right, "mul"|"div"); the caller decides which side is the tensor.
    """
    if is_function(node, *MUL) or is_method(node, "mul", "__mul__", "multiply", "mul_"):
        if len(node.args) == 2 and not node.kwargs:
            return node.args[0], node.args[1], "mul"
    if is_function(node, *DIV) or is_method(node, "div", "__truediv__", "divide", "div_", "true_divide"):
        if len(node.args) == 2 and not node.kwargs:  # rounding_mode would make it a floor/trunc
            return node.args[0], node.args[1], "div"
    return None


# ---------------------------------------------------------------------------------------------
# Casts, softmax, dropout

CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double")


def cast(node: Any) -> Optional[fx.Node]:
    """A dtype-only cast (``.float()``, ``.to(dtype)``, ``.type_as(x)``): the tensor it casts."""
    if not (is_method(node, *CAST_METHODS) and node.args):
        return None
    if node.target == "to":
        dtype_args = [a for a in node.args[1:] if not (isinstance(a, torch.dtype) or _is_dtype_attr(a))]
        extra = set(node.kwargs) - {"dtype", "copy", "non_blocking"}
        if dtype_args or extra:
            return None  # a device move is not a cast we may look through
    return node.args[0]


def _is_dtype_attr(node: Any) -> bool:
    """``x.dtype`` as symbolic_trace records it (Dynamo folds it to a literal dtype)."""
    return is_function(node, getattr) and node.args[1] == "dtype"


@dataclass
class Softmax:
    input: fx.Node
    dim: Any
    dtype: Optional[torch.dtype]
    spelling: str


def softmax(node: Any) -> Optional[Softmax]:
    """F.softmax / torch.softmax / Tensor.softmax / nn.Softmax (log_softmax is *not* one)."""
    if is_function(node, F.softmax):  # F.softmax(input, dim, _stacklevel, dtype)
        return Softmax(node.args[0], arg(node, 1, "dim"), arg(node, 3, "dtype"), "F.softmax")
    if is_function(node, torch.softmax, torch.special.softmax):  # torch.softmax(input, dim, dtype)
        return Softmax(node.args[0], arg(node, 1, "dim"), arg(node, 2, "dtype"), "torch.softmax")
    if is_method(node, "softmax"):
        return Softmax(node.args[0], arg(node, 1, "dim"), arg(node, 2, "dtype"), "Tensor.softmax")
    module = submodule(node)
    if isinstance(module, torch.nn.Softmax):
        return Softmax(node.args[0], module.dim, None, "nn.Softmax")
    return None


@dataclass
class Dropout:
    input: fx.Node
    p: Any
    training: Any  # bool, or the module whose .training decides at run time
    spelling: str


def dropout(node: Any) -> Optional[Dropout]:
    """F.dropout(p, training), torch.dropout(p, train), nn.Dropout (follows the module's mode)."""
    if is_function(node, F.dropout):
        return Dropout(node.args[0], arg(node, 1, "p", 0.5), arg(node, 2, "training", True), "F.dropout")
    if is_function(node, torch.dropout, torch.dropout_):
        return Dropout(node.args[0], arg(node, 1, "p"), arg(node, 2, "train"), "torch.dropout")
    module = submodule(node)
    if type(module) is torch.nn.Dropout:
        return Dropout(node.args[0], module.p, module, "nn.Dropout")
    return None
