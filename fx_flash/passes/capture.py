"""Capture: translate everything the graph does between Q·Kᵀ and softmax into one expression.

Input: a matched site (its Q·Kᵀ product and softmax are known). Output: a ``Capture``, the
softmax input as a sympy expression over ``qk``, ``scale``, the index symbols (b, h, q_idx,
kv_idx) and reads of tensor operands, plus the graph nodes it covers.

How values are read (one direction, from the softmax back to the product and the leaves):
    - the product (and a run of constant scales right after it) is ``scale·qk``;
    - pointwise ops follow the table in ``lowering.py``;
    - tensors that do not depend on the scores are expressions of *positions* (p1 = last
      dimension, …): ``arange`` is its position, ``ones``/``full`` constants, ``tril``/``triu``
      comparisons of positions, indexing and views renumber or substitute positions, and a
      constant buffer the pass may read (nanoGPT's ``tril``) is the predicate it holds;
    - anything else is a *leaf*: an operand the kernel reads at those positions;
    - where a position-valued tensor meets the scores, its positions become index symbols of
      that view of the scores ("level"): the last two are q_idx and kv_idx, the leading ones
      the batch·head of q's layout (a (B·H, N, N) view and a (B, H, N, N) view of the same
      scores read b and h differently, and both are exact);
    - uses of the scores that read only their shape or dtype (``expand_as``, ``type_as``,
      ``size``) are not uses of their values; in-place ops (``masked_fill_``) are applied where
      the graph applies them.
Whatever cannot be read exactly raises ``Miss`` with the name of the failed check.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
from torch import fx
from sympy.core.function import AppliedUndef

from fx_flash.codegen.spec import B_IDX, H_IDX, KV_IDX, N_KV, N_Q, Q_IDX, QK, SCALE, exact_arithmetic
from fx_flash.passes import lowering as low
from fx_flash.passes import spellings as sp
from fx_flash.passes.lowering import Unsupported, Value, position
from fx_flash.passes.match import AttentionSite, Miss
from fx_flash.passes.positions import (
    arange_pattern,
    cast_value,
    is_one,
    keep_where,
    lead_index,
    only_broadcasts,
    plain_position,
    py_number,
    static_size,
    triangle_pattern,
    unit_dims_map,
    valid_index,
)
from fx_flash.passes.values import (
    NotConstant,
    as_expr,
    concrete,
    evaluate,
    is_module_buffer,
    same_shape,
    same_size,
    tensor_of,
)

MAX_NODES = 400  # nodes one capture may visit before it gives up


@dataclass
class Read:
    """One operand: a graph tensor read at one index expression per dimension."""

    node: fx.Node
    kind: str
    index: tuple


@dataclass
class Capture:
    """The softmax input as one expression, and what it reads."""

    expr: Any
    reads: list[Read]
    score_nodes: set  # nodes whose value depends on the scores (erased with the site)
    nodes: set  # every node the expression was read from (candidates for erasing)
    n_q: Any
    n_kv: Any


# Methods and functions that only move or re-type a value (no positions change).
_IDENTITY_METHODS = ("contiguous", "clone", "detach")
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
                 "bool": torch.bool, "long": torch.int64, "int": torch.int32}
_LIKE_FUNCTIONS = (torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like)
_METADATA_METHODS = ("size", "dim", "numel", "type_as", "expand_as", "view_as", "new_zeros", "new_ones", "new_full",
                     "new_empty", "new_tensor", "get_device")


@exact_arithmetic
def capture_scores(site: AttentionSite, inputs: Optional[dict] = None, trust_buffers: bool = True) -> Capture:
    """Read the chain between ``site.qk`` and ``site.softmax`` as one expression (or raise Miss)."""
    return _Capturer(site, inputs, trust_buffers).run()


class _Capturer:
    def __init__(self, site: AttentionSite, inputs, trust_buffers):
        self.site = site
        self.inputs = inputs
        self.trust = trust_buffers
        self.graph = site.softmax.graph
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.memo: dict = {}
        self.leaves: dict = {}  # node → sympy function standing for its elements
        self.visited: set = set()
        qk_t = tensor_of(site.qk)
        self.n_q, self.n_kv = qk_t.shape[-2], qk_t.shape[-1]
        q_t = tensor_of(site.q)
        # The index space of the op: q's (B, H) (rank 4) or (1, B·H) (a rank-3 q gets a leading axis).
        self.lead = (q_t.shape[0], q_t.shape[1]) if q_t.dim() == 4 else (1, q_t.shape[0])
        self.score_nodes = self._score_nodes()
        self.levels: dict = {}

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> Capture:
        self._check_score_users()
        top = self._value(self.site.softmax_input, self.site.softmax)
        if not top.scores:
            raise Miss("scores_from_qk_product", "the softmax input does not depend on the Q·Kᵀ product", self.site.softmax)
        expr, reads = self._operands(top.expr)
        operands = {f"t{i}" for i in range(len(reads))}
        stray = {s for s in expr.free_symbols if s.name not in {x.name for x in _KNOWN} | operands}
        if stray:
            names = ", ".join(sorted(map(str, stray)))
            raise Miss("score_is_pointwise", f"the scores depend on {names}, a size the kernel does not know "
                       "(a symbolic length other than the query and key lengths)", self.site.softmax)
        return Capture(expr, reads, self.score_nodes, self.visited, self.n_q, self.n_kv)

    def _score_nodes(self) -> set:
        """Nodes on a path from the Q·Kᵀ product to the softmax input, and in-place ops on them."""
        down, work = set(), [self.site.qk]
        while work:
            n = work.pop()
            if n in down or self.order.get(n, 1 << 30) > self.order[self.site.softmax]:
                continue
            down.add(n)
            work += [u for u in n.users if not self._reads_only_metadata(u, n)]
        up, work = set(), [self.site.softmax_input]
        while work:
            n = work.pop()
            if not isinstance(n, fx.Node) or n in up or n not in down:
                continue
            up.add(n)
            work += n.all_input_nodes
        for n in list(up):  # mutations of a score tensor are part of the scores
            for u in n.users:
                if low.is_in_place(u) and u.args and u.args[0] is n and u in down:
                    up.add(u)
        return up

    def _check_score_users(self) -> None:
        for n in self.score_nodes:
            for u in n.users:
                if u in self.score_nodes or u is self.site.softmax or self._reads_only_metadata(u, n):
                    continue
                if u in self.site.weights_chain and sp.cast(u) is not n:  # type_as(scores) after softmax
                    continue
                # An in-place op after the softmax lands here too: score nodes stop at the softmax.
                raise Miss("scores_only_in_chain", f"{n.name} is also used by {u.name} (the scores are needed "
                           "elsewhere)", n)

    def _reads_only_metadata(self, user: fx.Node, node: fx.Node) -> bool:
        """``user`` reads only ``node``'s shape, dtype or device (and its result is no score)."""
        if user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "dtype", "device", "ndim"):
            return True
        if user.op == "call_function" and user.target in _LIKE_FUNCTIONS:
            return user.args[0] is node and node not in user.args[1:] and node not in user.kwargs.values()
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            if user.target in ("type_as", "expand_as", "view_as"):
                return user.args[0] is not node and user.args[1] is node
            return user.args[0] is node and node not in user.args[1:] and node not in user.kwargs.values()
        return False

    def _value(self, arg: Any, consumer: Optional[fx.Node] = None) -> Optional[Value]:
        if arg is None:
            return None
        if not isinstance(arg, fx.Node):
            try:
                return low.number(arg)
            except Unsupported as e:
                raise Miss("score_is_pointwise", str(e), consumer)
        if consumer is not None:
            mutations = sorted((u for u in arg.users if low.is_in_place(u) and u.args and u.args[0] is arg
                                and u is not consumer and self.order[u] < self.order[consumer]), key=self.order.get)
            if mutations:
                return self._value(mutations[-1])
        if arg in self.memo:
            return self.memo[arg]
        if len(self.visited) > MAX_NODES:
            raise Miss("score_is_pointwise", f"more than {MAX_NODES} ops between Q·Kᵀ and softmax", arg)
        self.visited.add(arg)
        value = self._compute(arg)
        self.memo[arg] = value
        return value

    def _compute(self, node: fx.Node) -> Value:
        scores = node in self.score_nodes
        if node is self.site.qk:
            return self._product_value(node)
        if node in self.site.scale_prefix:
            return Value(SCALE * QK, "float", tuple(tensor_of(node).shape), True)
        if low.is_in_place(node) and not scores:
            raise Miss("score_is_pointwise", f"{node.format_node()} changes a tensor in place", node)
        try:
            found = self._pointwise(node)
            if found is None:
                found = self._view_or_constructor(node, scores)
        except Unsupported as e:
            if scores:
                raise Miss("score_is_pointwise", f"{node.format_node()}: {e}", node)
            found = None
        if found is not None:
            return found
        if scores:
            raise Miss("score_is_pointwise", f"{node.format_node()} is not a pointwise op on the scores "
                       "(a reduction or another op the kernel cannot apply per element)", node)
        return self._leaf(node)

    def _product_value(self, node: fx.Node) -> Value:
        shape = tuple(tensor_of(node).shape)
        expr = SCALE * QK
        bias = self.site.baddbmm_input
        if bias is not None:
            beta = self.site.baddbmm_beta
            b = self._value(bias, node)
            if b.scores:
                raise Miss("scores_from_qk_product", "baddbmm's input depends on the scores", node)
            added = low.as_num(self._bind(b, shape))
            expr = expr + (added if beta == 1 else beta * added)
        return Value(expr, "float", shape, True)

    # -- pointwise ops -------------------------------------------------------------------------

    def _pointwise(self, node: fx.Node) -> Optional[Value]:
        name = low.rule_name(node)
        if name is None:
            return None
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if name == "clamp":
            lo, hi = (args[1:3] + [None, None])[:2]
            lo, hi = kwargs.pop("min", lo), kwargs.pop("max", hi)
            args = [args[0], lo, hi]
        elif name in ("clamp_min", "clamp_max"):
            args = [args[0], kwargs.pop("min", kwargs.pop("max", args[1] if len(args) > 1 else None))]
        extra = set(kwargs) - low.KEYWORDS.get(name, set())
        if extra:
            raise Unsupported(f"{name} with {sorted(extra)}")
        arity = low.ARITY.get(name, 1 if name in low.UNARY else 2)
        if len(args) != arity:
            raise Unsupported(f"{name} with {len(args)} arguments")
        values = [self._value(a, node) for a in args]
        if not any(v is not None and v.scores for v in values):
            return self._settle(low.RULES[name](*values, **kwargs), node)
        level = tuple(tensor_of(node).shape)
        self._check_level(node, level)
        values = [self._bind(v, level) if v is not None and not v.scores else v for v in values]
        result = low.RULES[name](*values, **kwargs)
        return Value(result.expr, result.kind, level, True)

    def _check_level(self, node: fx.Node, level: tuple) -> None:
        """A view of the scores must keep (Nq, Nk) last and exactly B·H elements before them."""
        t = tensor_of(node)
        if t is None or t.dim() < 2:
            raise Miss("scores_keep_their_shape", f"{node.name} has no recorded shape", node)
        if t.dtype == torch.float64:
            raise Miss("scores_keep_their_shape", f"{node.name} promotes the scores to float64", node)
        if not (same_size(level[-2], self.n_q) and same_size(level[-1], self.n_kv)):
            raise Miss("scores_keep_their_shape", f"{node.name} reshapes the scores to {tuple(level)}", node)
        lead = sympy.Integer(1)
        for n in level[:-2]:
            lead = lead * sympy.sympify(as_expr(n))
        total = sympy.sympify(as_expr(self.lead[0])) * sympy.sympify(as_expr(self.lead[1]))
        if sympy.simplify(lead - total) != 0:
            raise Miss("scores_keep_their_shape", f"broadcasting at {node.name} grows the scores to {tuple(level)}", node)

    # -- positions ------------------------------------------------------------------------------

    def _settle(self, v: Value, node: Optional[fx.Node] = None) -> Value:
        """Take the node's recorded shape; size-1 dimensions read element 0."""
        if node is not None:
            t = tensor_of(node)
            shape = tuple(t.shape) if t is not None else v.shape
        else:
            shape = v.shape
        if shape is None:
            return v
        subs = {position(len(shape) - d): 0 for d, n in enumerate(shape) if is_one(n)}
        expr = v.expr.xreplace(subs) if subs else v.expr
        return Value(expr, v.kind, shape, v.scores)

    def _bind(self, v: Value, level: tuple) -> Value:
        """A position-valued tensor meeting the scores at ``level``: positions → index symbols."""
        rank = len(level)
        if v.rank > rank:
            raise Miss("scores_keep_their_shape", f"a rank-{v.rank} tensor meets rank-{rank} scores")
        mapping = self._level_map(level)
        subs = {position(i): mapping[i] for i in range(1, rank + 1)}
        return Value(v.expr.xreplace(subs), v.kind, v.shape, False)

    def _level_map(self, level: tuple) -> dict:
        """Positional index i (from the right) of ``level`` → its expression in b, h, q_idx, kv_idx."""
        key = tuple(map(str, level))
        if key not in self.levels:
            self.levels[key] = self._lead_map(level)
        return self.levels[key]

    def _lead_map(self, level: tuple) -> dict:
        mapping = {1: KV_IDX, 2: Q_IDX}
        z_size, h_size = self.lead
        lead_dims = list(level[:-2])
        if len(lead_dims) == 2 and same_size(lead_dims[0], z_size) and same_size(lead_dims[1], h_size):
            return {**mapping, 3: H_IDX, 4: B_IDX}  # q's own layout: no size needs to be known
        if len(lead_dims) == 1 and is_one(z_size) and same_size(lead_dims[0], h_size):
            return {**mapping, 3: H_IDX}  # (B·H, N, N) scores of a rank-3 q
        h_static = static_size(h_size)
        for d, size in enumerate(lead_dims):
            right = lead_dims[d + 1:]
            stride = 1
            for r in right:
                s = static_size(r)
                if s is None:
                    raise Miss("scores_keep_their_shape", f"scores viewed with a symbolic size {r} before a batch/head axis")
                stride *= s
            size_s = static_size(size)
            mapping[len(level) - d] = lead_index(d, stride, size_s, h_static, is_one(z_size))
        return mapping

    # -- views, casts, constructors --------------------------------------------------------------

    def _view_or_constructor(self, node: fx.Node, scores: bool) -> Optional[Value]:
        method = node.target if node.op == "call_method" else None
        fn = node.target if node.op == "call_function" else None
        if method in _IDENTITY_METHODS or (fn is torch.clone):
            if method == "detach" and scores:
                raise Unsupported("detach of the scores stops their gradient")
            return self._same(node, self._value(node.args[0], node))
        cast = self._cast_dtype(node)
        if cast is not None:
            return self._same(node, cast_value(self._value(node.args[0], node), cast))
        if method in ("view", "reshape", "expand", "expand_as", "view_as", "broadcast_to", "unflatten", "flatten",
                      "squeeze", "unsqueeze") or fn in (torch.reshape, torch.broadcast_to, torch.squeeze,
                                                        torch.unsqueeze, torch.flatten):
            return self._reshape(node)
        if scores:
            return None
        if method in ("permute", "transpose", "t", "mT") or fn in (torch.permute, torch.transpose):
            return self._permute(node)
        if fn is getattr and node.args[1] in ("mT", "T"):
            return self._permute(node)
        if fn is operator.getitem:
            return self._getitem(node)
        if fn is torch.arange:
            return self._arange(node)
        if fn in (torch.ones, torch.zeros, torch.full, torch.ones_like, torch.zeros_like, torch.full_like) or method in (
                "new_ones", "new_zeros", "new_full"):
            return self._filled(node)
        if fn in (torch.tril, torch.triu) or method in ("tril", "triu"):
            return self._triangle(node)
        if fn in (torch.tensor, torch.scalar_tensor, torch.as_tensor) and len(node.args) == 1:
            return self._settle(low.number(evaluate(node.args[0])), node) if not isinstance(node.args[0], fx.Node) else None
        return None

    def _same(self, node, v: Value) -> Value:
        """``v`` as ``node``'s value when node changes neither positions nor values (a copy, a cast)."""
        if v.scores:
            return self._score_view(node, v)
        return self._settle(v, node)

    def _score_view(self, node: fx.Node, v: Value) -> Value:
        level = tuple(tensor_of(node).shape)
        self._check_level(node, level)
        return Value(v.expr, v.kind, level, True)

    def _cast_dtype(self, node: fx.Node) -> Optional[torch.dtype]:
        if node.op != "call_method":
            return None
        if node.target in _CAST_METHODS and len(node.args) == 1:
            return _CAST_METHODS[node.target]
        if node.target in ("to", "type", "type_as"):
            out = tensor_of(node)
            src = tensor_of(node.args[0])
            if out is None or src is None or out.device != src.device or not same_shape(out.shape, src.shape):
                return None
            return out.dtype
        return None

    def _reshape(self, node: fx.Node) -> Optional[Value]:
        src = node.args[0]
        v = self._value(src, node)
        out = tensor_of(node)
        if out is None:
            return None
        if v.scores:
            return self._score_view(node, v)
        src_shape = v.shape if v.shape is not None else ()
        new = tuple(out.shape)
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name in ("expand", "expand_as", "broadcast_to") or only_broadcasts(src_shape, new):
            return self._settle(Value(v.expr, v.kind, new), node)
        mapping = unit_dims_map(src_shape, new)
        if mapping is None:
            return None
        subs = {position(len(src_shape) - d_old): position(len(new) - d_new) for d_old, d_new in mapping.items()}
        return self._settle(Value(v.expr.xreplace(subs), v.kind, new), node)

    def _permute(self, node: fx.Node) -> Optional[Value]:
        v = self._value(node.args[0], node)
        rank = v.rank
        if node.op == "call_function" and node.target is getattr or node.target in ("t", "mT"):
            order = list(range(rank - 2)) + [rank - 1, rank - 2]
        elif node.target in ("transpose",) or node.target is torch.transpose:
            a, b = (d % rank for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            order = [d % rank for d in order]
        subs = {position(rank - old): position(rank - new) for new, old in enumerate(order)}
        return self._settle(Value(v.expr.xreplace(subs), v.kind, tuple(tensor_of(node).shape)), node)

    def _getitem(self, node: fx.Node) -> Optional[Value]:
        base, index = node.args
        v = self._value(base, node)
        if v.shape is None:
            return None
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) for i in index):
            return self._gather(node, v, index)
        rank = v.rank
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = rank - (len(index) - 1 - sum(i is None for i in index))
            index = index[:at] + (slice(None),) * fill + index[at + 1:]
        old_dim, new_dims = 0, []  # new_dims: for each new dim, the old dim (or None)
        subs_old = {}
        for i in index:
            if i is None:
                new_dims.append(None)
            elif isinstance(i, slice):
                if i.step not in (None, 1):
                    return None
                start = i.start or 0
                if not isinstance(start, int):
                    return None
                if start < 0:
                    size = static_size(v.shape[old_dim])
                    if size is None:
                        return None
                    start += size
                subs_old[old_dim] = ("shift", start)
                new_dims.append(old_dim)
                old_dim += 1
            elif isinstance(i, int):
                size = static_size(v.shape[old_dim])
                subs_old[old_dim] = ("fix", i if i >= 0 else (size + i if size is not None else None))
                if subs_old[old_dim][1] is None:
                    return None
                old_dim += 1
            else:
                return None
        new_dims += list(range(old_dim, rank))
        out_shape = tuple(tensor_of(node).shape)
        new_rank = len(new_dims)
        subs = {}
        for d in range(rank):
            p_old = position(rank - d)
            how = subs_old.get(d, ("shift", 0))
            if how[0] == "fix":
                subs[p_old] = how[1]
            else:
                p_new = position(new_rank - new_dims.index(d))
                subs[p_old] = p_new + how[1]
        return self._settle(Value(v.expr.xreplace(subs), v.kind, out_shape), node)

    def _gather(self, node: fx.Node, v: Value, index: tuple) -> Optional[Value]:
        """``x[i0, i1, …]`` with one position-valued integer tensor per dimension of x."""
        if len(index) != v.rank or not all(isinstance(i, fx.Node) for i in index):
            return None
        idx = [self._value(i, node) for i in index]
        if any(i.scores or i.kind != "int" or not plain_position(i.expr) for i in idx):
            return None  # a computed index (a bucket of q - kv): the gathered tensor is the operand
        subs = {position(v.rank - d): i.expr for d, i in enumerate(idx)}
        out = tensor_of(node)
        return self._settle(Value(v.expr.xreplace(subs), v.kind, tuple(out.shape)), node)

    def _arange(self, node: fx.Node) -> Optional[Value]:
        args = [evaluate(a) for a in node.args]
        if len(args) == 1:
            start, step = 0, node.kwargs.get("step", 1)
        elif len(args) in (2, 3):
            start, step = args[0], args[2] if len(args) == 3 else node.kwargs.get("step", 1)
        else:
            return None
        if "start" in node.kwargs:
            start = evaluate(node.kwargs["start"])
        out = tensor_of(node)
        kind = low.kind_of_dtype(out.dtype)
        expr = sympy.sympify(as_expr(start)) + sympy.sympify(as_expr(step)) * position(1)
        return self._settle(Value(self._sizes_as_symbols(expr), kind, tuple(out.shape)), node)

    def _sizes_as_symbols(self, expr):
        """Sizes of the graph that are the query or key length become n_q/n_kv (dynamic shapes);
        any other symbolic size stays and is refused at the end of the capture."""
        subs = {}
        for size, symbol in ((self.n_kv, N_KV), (self.n_q, N_Q)):
            e = sympy.sympify(as_expr(size))
            if isinstance(e, sympy.Symbol):
                subs[e] = symbol
        return sympy.sympify(expr).xreplace(subs) if subs else expr

    def _filled(self, node: fx.Node) -> Optional[Value]:
        out = tensor_of(node)
        kind = low.kind_of_dtype(out.dtype)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if "full" in name:
            fill_arg = sp.arg(node, 2 if name == "new_full" else 1, "fill_value")  # full(size, v), full_like(x, v)
            try:
                value = evaluate(fill_arg)
            except NotConstant:
                return None
        else:
            value = 1 if "ones" in name else 0
        expr = low.number(bool(value) if kind == "bool" else (float(value) if kind == "float" else value)).expr
        return Value(expr, kind, tuple(out.shape))

    def _triangle(self, node: fx.Node) -> Optional[Value]:
        v = self._value(node.args[0], node)
        if v.rank < 2:
            return None
        diagonal = sp.arg(node, 1, "diagonal", 0)
        if not isinstance(diagonal, int):
            try:
                diagonal = evaluate(diagonal)
            except NotConstant:
                return None
        row, col = position(2), position(1)
        keep = (col - row <= diagonal) if _name(node) == "tril" else (col - row >= diagonal)
        return self._settle(Value(keep_where(keep, v), v.kind, v.shape), node)

    # -- leaves -----------------------------------------------------------------------------------

    def _leaf(self, node: fx.Node) -> Value:
        t = tensor_of(node)
        if t is None:
            try:
                value = evaluate(node)
            except NotConstant as e:
                raise Miss("score_is_pointwise", f"{node.name} is neither a tensor nor a constant ({e})", node)
            if isinstance(value, sympy.Basic) and not value.is_number:  # a symbolic size
                return Value(self._sizes_as_symbols(value), "int", None)
            return low.number(py_number(value))
        try:
            kind = low.kind_of_dtype(t.dtype)
        except Unsupported as e:
            raise Miss("operands_supported", f"{node.name}: {e}", node)
        if t.dim() == 0 and not t.requires_grad:
            try:
                return low.number(py_number(evaluate(node)))
            except (NotConstant, Unsupported):
                pass
        constant = self._trusted_constant(node)
        if constant is not None:
            pattern = triangle_pattern(constant)
            if pattern is None:
                pattern = arange_pattern(constant)
            if pattern is not None:
                return self._settle(Value(pattern, kind, tuple(t.shape)), node)
        read = self.leaves.get(node)
        if read is None:
            read = self.leaves[node] = sympy.Function(f"read{len(self.leaves)}")
        args = [sympy.Integer(0) if is_one(n) else position(t.dim() - d) for d, n in enumerate(t.shape)]
        app = read(*args) if args else read()
        expr = sympy.Ne(app, 0) if kind == "bool" else app
        return Value(expr, kind, tuple(t.shape))

    def _trusted_constant(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The value of a get_attr constant, or of a Dynamo buffer placeholder when trusted."""
        if node.op == "placeholder" and not (self.trust and is_module_buffer(node)):
            return None
        value = concrete(node, self.inputs)
        if value is None or value.requires_grad or value.is_meta or value.numel() > 1 << 24:
            return None
        return value

    # -- operands ---------------------------------------------------------------------------------

    def _operands(self, expr):
        """Replace each leaf read by an operand symbol t0, t1, …; bool reads ``Ne(read, 0)`` by
        the symbol itself."""
        apps = sorted(expr.atoms(AppliedUndef), key=lambda a: (str(a.func), sympy.srepr(a)))
        by_func = {f: n for n, f in self.leaves.items()}
        reads, subs, bool_subs = [], {}, {}
        for app in apps:
            node = by_func.get(app.func)
            if node is None:
                continue
            kind = low.kind_of_dtype(tensor_of(node).dtype)
            for e in app.args:
                if not valid_index(e):
                    raise Miss("operands_supported", f"{node.name} is read at [{', '.join(map(str, app.args))}]: "
                               "the kernel reads operands at q_idx (+ c), kv_idx (+ c) or a batch/head expression", node)
            from fx_flash.codegen.spec import operand_symbol

            sym = operand_symbol(f"t{len(reads)}", kind)
            reads.append(Read(node, kind, tuple(app.args)))
            if kind == "bool":
                bool_subs[sympy.Ne(app, 0)] = sym
                bool_subs[sympy.Eq(app, 0)] = sympy.Not(sym)
            else:
                subs[app] = sym
        expr = expr.xreplace(bool_subs).xreplace(subs)
        left = expr.atoms(AppliedUndef)
        if left:
            raise Miss("operands_supported", f"a bool mask used as a number in {expr}")
        return expr, reads


_KNOWN = (QK, SCALE, Q_IDX, KV_IDX, B_IDX, H_IDX, N_Q, N_KV)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else node.target.__name__
