"""What the graph knows about a value: its (fake) tensor, and literals the pass must prove.

Shapes come from ``meta['val']`` (make_fx, FakeTensorProp) or ``meta['example_value']``
(Dynamo). Literals (a scale, a fill value) are evaluated from the graph, never assumed: a
Python number, a 0-d tensor constant, ``math.sqrt``/``**`` arithmetic, and sizes of tensors,
which may be symbolic under ``dynamic=True`` (then the value is a sympy expression).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import sympy
import torch
from torch import fx

META_KEYS = ("val", "example_value")


def meta_key(graph: fx.Graph) -> Optional[str]:
    """The key this graph keeps fake values under, or None if it has none."""
    for node in graph.nodes:
        for key in META_KEYS:
            if key in node.meta:
                return key
    return None


def tensor_of(node: Any) -> Optional[torch.Tensor]:
    """The (fake) tensor a node produces, if the graph recorded it."""
    if not isinstance(node, fx.Node):
        return None
    for key in META_KEYS:
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return val
    return None


def same_size(a: Any, b: Any) -> bool:
    """a == b for ints or SymInts, proved without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def as_expr(value: Any) -> Any:
    """A Python number, or the sympy expression behind a SymInt/SymFloat."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        node = value.node
        return node.expr if not node.is_constant() else node.constant  # type: ignore[attr-defined]
    return value


class NotConstant(Exception):
    """Raised by ``evaluate`` with the reason a value could not be proved."""


_BINARY = {
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.pow: operator.pow,
    operator.floordiv: operator.floordiv,
}
_TENSOR_FACTORIES = (torch.tensor, torch.as_tensor, torch.scalar_tensor)


def _sqrt(x):
    return sympy.sqrt(x) if isinstance(x, sympy.Basic) else math.sqrt(x)


def evaluate(value: Any, depth: int = 0) -> Any:
    """The number (or sympy expression of sizes) that ``value`` holds, or raise NotConstant.

    Accepts literals, 0-d tensor constants (get_attr, ``torch.tensor(c)``, ``torch.full([], c)``),
    sizes of tensors (``x.size(-1)``, ``x.shape[-1]``, Dynamo's SymInt placeholders), and
    arithmetic on those (``*``, ``/``, ``**``, ``math.sqrt``, ``torch.sqrt`` on a 0-d constant).
    """
    if depth > 32:
        raise NotConstant("expression too deep")
    if isinstance(value, bool):
        raise NotConstant("a bool is not a number")
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, fx.Node):
        raise NotConstant(f"{type(value).__name__} is not a number")
    node = value
    for key in META_KEYS:  # Dynamo records SymInt/SymFloat values of size arithmetic
        val = node.meta.get(key)
        if isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool):
            return as_expr(val)
    if node.op == "get_attr":
        tensor = _attr(node)
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 and not tensor.requires_grad:
            return tensor.item()
        raise NotConstant(f"{node.name} is not a 0-d constant")
    if node.op == "call_function":
        target, args = node.target, node.args
        if target in _BINARY and len(args) == 2:
            return _BINARY[target](evaluate(args[0], depth + 1), evaluate(args[1], depth + 1))
        if target is operator.neg:
            return -evaluate(args[0], depth + 1)
        if target in (math.sqrt, torch.sqrt, torch._sym_sqrt) and len(args) == 1:
            return _sqrt(evaluate(args[0], depth + 1))
        if target is torch.rsqrt and len(args) == 1:
            return 1 / _sqrt(evaluate(args[0], depth + 1))
        if target in (float, int) and len(args) == 1:
            return target(evaluate(args[0], depth + 1))
        if target in _TENSOR_FACTORIES and len(args) == 1:
            return evaluate(args[0], depth + 1)
        if target is torch.full and len(args) == 2 and tuple(args[0]) == ():
            return evaluate(args[1], depth + 1)
        if target in (torch.zeros, torch.ones) and len(args) == 1 and tuple(args[0]) == ():
            return 0.0 if target is torch.zeros else 1.0
        if target is getattr and args[1] == "shape":
            raise NotConstant("a whole shape is not a number")
        if target is operator.getitem and _is_shape(args[0]) and isinstance(args[1], int):
            return _size(args[0].args[0], args[1])
    if node.op == "call_method":
        if node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
            return _size(node.args[0], node.args[1])
        if node.target in ("sqrt",) and len(node.args) == 1:
            return _sqrt(evaluate(node.args[0], depth + 1))
        if node.target in ("item", "float") and len(node.args) == 1:
            return evaluate(node.args[0], depth + 1)
    raise NotConstant(f"{node.format_node()} is not a constant")


def _is_shape(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1)
    )


def _size(tensor_node: Any, dim: int) -> Any:
    t = tensor_of(tensor_node)
    if t is None:
        raise NotConstant(f"no shape recorded for {tensor_node}")
    return as_expr(t.shape[dim])


def _attr(node: fx.Node) -> Any:
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def concrete(node: Any, example_inputs: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The real tensor behind a get_attr node, or behind a placeholder whose example is given."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = _attr(node)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "placeholder" and example_inputs:
        value = example_inputs.get(node.name)
        return value if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor) else None
    return None


def is_module_buffer(node: fx.Node) -> bool:
    """A Dynamo placeholder that stands for a buffer (not a parameter, not an input) of a module."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source is not None and "._buffers[" in source.name
