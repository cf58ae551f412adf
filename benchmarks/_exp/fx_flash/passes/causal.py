"""Proving that a mask is top-left causal, so the op can skip tiles instead of reading a mask.

Three spellings are proved, each only when the sliced or built mask has exactly the scores'
(Nq, Nk) extent (a broadcast row would not be causal):
    nanoGPT   ``self.bias[:, :, :T, :T] == 0`` filled, the buffer's value ``tril(ones)``
    tril      ``torch.tril(torch.ones(T, T))`` / ``torch.ones(T, T).tril()`` kept, or
              ``torch.triu(ones, diagonal=1)`` filled
    HF        ``kv_idx <= q_idx`` from two ``arange`` with equal offsets (transformers' masks)
A mask that is not proved stays a mask: still correct, only slower.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

from fx_flash.passes import spellings as sp
from fx_flash.passes.values import (
    NotConstant,
    concrete,
    evaluate,
    is_lower_triangular_ones,
    is_module_buffer,
    same_size,
    tensor_of,
)

_FULL = slice(None, None, None)


def is_causal_keep(node: Any, keep_when: bool, scores: torch.Tensor, inputs: Optional[dict], trust_buffers: bool) -> bool:
    """True if ``node == keep_when`` is exactly ``tril(ones(Nq, Nk))`` for these scores.

    Args:
        node: a bool-valued mask node (or one compared with 0).
        keep_when: True if True entries of ``node`` attend, False if they are filled.
        scores: the fake scores tensor, (…, Nq, Nk).
        inputs: placeholder name → real example tensor (Dynamo hands the backend these).
        trust_buffers: accept a module buffer placeholder's example value as its value.
    """
    for _ in range(16):
        if sp.is_method(node, "bool") or (sp.is_method(node, "to") and node.args[1:] == (torch.bool,)):
            node = node.args[0]
        elif sp.is_function(node, operator.invert, torch.logical_not, torch.bitwise_not) or sp.is_method(
            node, "logical_not", "bitwise_not", "__invert__"
        ):
            node, keep_when = node.args[0], not keep_when
        elif (sp.is_function(node, operator.eq, torch.eq) or sp.is_method(node, "eq")) and node.args[1] == 0:
            node, keep_when = node.args[0], not keep_when
        elif (sp.is_function(node, operator.ne, torch.ne) or sp.is_method(node, "ne")) and node.args[1] == 0:
            node = node.args[0]
        elif sp.is_method(node, "expand"):
            node = node.args[0]  # an expand only broadcasts; the extent check below still applies
        else:
            break
    if not _has_extent(node, scores):
        return False
    if _constant_is_tril(node, keep_when, inputs, trust_buffers):
        return True
    if keep_when:
        return _tril_buffer_slice(node, inputs, trust_buffers) or _tril_of_ones(node) or _index_compare(node)
    return _triu_of_ones(node)


def _has_extent(node: Any, scores: torch.Tensor) -> bool:
    t = tensor_of(node)
    if t is None or t.dim() < 2:
        return False
    return same_size(t.shape[-2], scores.shape[-2]) and same_size(t.shape[-1], scores.shape[-1])


def _readable(node: Any, inputs: Optional[dict], trust_buffers: bool) -> Optional[torch.Tensor]:
    """The value of a get_attr constant, or of a Dynamo buffer placeholder when trusted."""
    if isinstance(node, fx.Node) and node.op == "placeholder" and not (trust_buffers and is_module_buffer(node)):
        return None
    return concrete(node, inputs)


def _constant_is_tril(node: Any, keep_when: bool, inputs: Optional[dict], trust_buffers: bool) -> bool:
    """A constant mask (symbolic_trace folds ``buffer[...] == 0`` into one) whose keep-set is tril."""
    value = _readable(node, inputs, trust_buffers)
    if value is None:
        return False
    keep = (value != 0) if keep_when else (value == 0)
    return is_lower_triangular_ones(keep)


def _tril_buffer_slice(node: Any, inputs: Optional[dict], trust_buffers: bool) -> bool:
    """``buf[:, :, :T, :S]`` (starting at 0, step 1) of a buffer whose value is tril(ones)."""
    if not sp.is_function(node, operator.getitem):
        return False
    buf, index = node.args
    if not isinstance(index, tuple) or any(i is None or i is Ellipsis for i in index):
        return False
    buf_t = tensor_of(buf)
    if buf_t is None or len(index) != buf_t.dim():
        return False
    *lead, rows, cols = index
    if any(i != _FULL for i in lead):
        return False
    for s in (rows, cols):
        if not isinstance(s, slice) or s.start not in (None, 0) or s.step not in (None, 1):
            return False
    value = _readable(buf, inputs, trust_buffers)
    return value is not None and is_lower_triangular_ones(value)


def _ones(node: Any) -> bool:
    if sp.is_function(node, torch.ones) or sp.is_function(node, torch.ones_like):
        return True
    return sp.is_method(node, "new_ones")


def _diagonal(node: fx.Node, index: int) -> Any:
    return sp.arg(node, index, "diagonal", 0)


def _tril_of_ones(node: Any) -> bool:
    if sp.is_function(node, torch.tril):
        return _ones(node.args[0]) and _diagonal(node, 1) == 0
    if sp.is_method(node, "tril"):
        return _ones(node.args[0]) and _diagonal(node, 1) == 0
    return False


def _triu_of_ones(node: Any) -> bool:
    if sp.is_function(node, torch.triu) or sp.is_method(node, "triu"):
        return _ones(node.args[0]) and _diagonal(node, 1) == 1
    return False


def _index_compare(node: Any) -> bool:
    """``kv_idx <= q_idx`` (or ``q_idx >= kv_idx``) with both indices arange + the same offset."""
    if sp.is_function(node, operator.le, torch.le) or sp.is_method(node, "le"):
        kv, q = node.args
    elif sp.is_function(node, operator.ge, torch.ge) or sp.is_method(node, "ge"):
        q, kv = node.args
    else:
        return False
    q_offset, kv_offset = _positions(q, axis=-2), _positions(kv, axis=-1)
    if q_offset is None or kv_offset is None:
        return False
    try:
        return bool(q_offset == kv_offset)
    except TypeError:
        return False


def _positions(node: Any, axis: int) -> Any:
    """The offset c if ``node`` is ``arange(n) + c`` laid along ``axis`` (size 1 elsewhere)."""
    t = tensor_of(node)
    if t is None or t.dim() < 2:
        return None
    if any(not same_size(s, 1) for i, s in enumerate(t.shape) if i != t.dim() + axis):
        return None
    while sp.is_function(node, operator.getitem) or sp.is_method(node, "view", "reshape", "unsqueeze"):
        node = node.args[0]
    offset = 0
    added = sp.addition(node)
    if added is not None:
        base, extra = (added if _is_arange(added[0]) else added[::-1])
        try:
            offset = evaluate(extra)
        except NotConstant:
            return None
        node = base
    return offset if _is_arange(node) else None


def _is_arange(node: Any) -> bool:
    if not sp.is_function(node, torch.arange):
        return False
    args = node.args
    if len(args) == 1:
        return "start" not in node.kwargs and node.kwargs.get("step", 1) == 1
    return len(args) == 2 and args[0] == 0 and node.kwargs.get("step", 1) == 1
