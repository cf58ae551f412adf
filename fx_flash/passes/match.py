"""Walk from a softmax to the attention around it, and describe it in one canonical form.

``match_site(softmax_node)`` finds the boundaries of one attention: forward from the softmax to
the P·V product (through casts, dropout, clones and views of the batch·head axes), backward to
the one Q·Kᵀ product the softmax input is computed from (through ops the capture can read),
then peels the operands (scales on q/k, the transpose of K, a repeat_kv) and the run of
constant scales right after the product (the op's ``scale``). What happens to the scores in
between is read by ``capture.py``; whether the site may be rewritten is decided by the named
checks in ``checks.py``. Structure that does not read as attention is a ``Miss`` with the name
of the step that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from fx_flash.passes import spellings as sp
from fx_flash.passes.values import NotConstant, evaluate, same_shape, same_size, tensor_of

_MAX_WALK = 32  # ops between Q·Kᵀ and softmax, or softmax and P·V, before we give up


@dataclass
class Miss(Exception):
    """A softmax that was not rewritten: the check that failed and why."""

    check: str
    reason: str
    node: Optional[fx.Node] = None

    def __str__(self) -> str:
        where = f"{self.node.name}: " if self.node is not None else ""
        return f"{where}{self.check}: {self.reason}"


@dataclass
class Factor:
    """One multiplicative scale on the scores: where it was written and its proved value."""

    where: str  # "scores", "q", "k", "baddbmm alpha"
    value: Any  # number or sympy expression
    node: Optional[fx.Node] = None


@dataclass
class AttentionSite:
    """What one attention computes, in the op's terms, plus the nodes that spell it."""

    softmax: fx.Node
    softmax_spelling: str
    softmax_dim: Any
    qk: fx.Node
    qk_spelling: str
    pv: fx.Node
    pv_spelling: str
    q: fx.Node
    k: Optional[fx.Node]  # K itself; None when only Kᵀ is there (then ``k_transposed``)
    k_transposed: Optional[fx.Node]
    v: fx.Node
    key_spelling: str
    softmax_input: Optional[fx.Node] = None
    factors: list[Factor] = field(default_factory=list)
    scale_prefix: list[fx.Node] = field(default_factory=list)  # constant scales right after Q·Kᵀ
    baddbmm_input: Optional[fx.Node] = None  # baddbmm's beta·input, added to the scores
    baddbmm_beta: Any = 0.0
    dropout: Optional[sp.Dropout] = None
    dropout_node: Optional[fx.Node] = None
    weights_chain: list[fx.Node] = field(default_factory=list)  # softmax … input of P·V
    gqa_spelling: Optional[str] = None
    v_transposed: bool = False  # V is given as Vᵀ (an einsum contracting its last axis)
    peeled: list[fx.Node] = field(default_factory=list)  # scale/transpose/repeat nodes seen through

    @property
    def chain(self) -> list[fx.Node]:
        """The nodes from softmax to P·V: these go away when the site is rewritten (the score
        nodes are the capture's)."""
        return self.weights_chain + [self.pv]


def match_site(node: fx.Node) -> Optional[AttentionSite]:
    """Read the attention around softmax ``node``; None if ``node`` is no softmax; raise Miss."""
    read = sp.softmax(node)
    if read is None:
        return None
    if tensor_of(node) is None:
        raise Miss("has_shapes", "the graph records no shapes (trace it with example inputs)", node)
    weights_chain, pv, pv_read, drop, drop_node = _walk_to_value_product(node)
    qk = _find_score_product(read.input, node)
    q_read = sp.product(qk, scores=True)
    site = AttentionSite(
        softmax=node,
        softmax_spelling=read.spelling,
        softmax_dim=read.dim,
        qk=qk,
        qk_spelling=q_read.spelling,
        pv=pv,
        pv_spelling=pv_read.spelling,
        q=q_read.left,
        k=None,
        k_transposed=None,
        v=pv_read.right,
        key_spelling="",
        softmax_input=read.input,
        dropout=drop,
        dropout_node=drop_node,
        weights_chain=weights_chain,
        v_transposed=pv_read.right_is_transposed,  # einsum with V written channels-first: (…, d, N)
    )
    _read_baddbmm(site, q_read)
    _read_scale_prefix(site)
    _peel_operands(site, q_read)
    _peel_repeat_kv(site)
    return site


# ---------------------------------------------------------------------------------------------
# Forward: softmax → (casts, dropout) → P·V


def _walk_to_value_product(node: fx.Node):
    chain = [node]
    drop, drop_node = None, None
    for _ in range(_MAX_WALK):
        users = list(node.users)
        if len(users) != 1:
            names = ", ".join(u.name for u in users) or "nothing (the graph output?)"
            raise Miss("weights_used_once", f"attention weights {node.name} are used by {len(users)} nodes: {names}", node)
        user = users[0]
        read_pv = sp.product(user, scores=False)
        if read_pv is not None:
            if read_pv.left is not node:
                raise Miss("softmax_feeds_value_product", f"the weights are the right operand of {user.name}", user)
            return chain, user, read_pv, drop, drop_node
        read_drop = sp.dropout(user)
        if read_drop is not None and read_drop.input is node and drop is None:
            drop, drop_node = read_drop, user
        elif sp.cast(user) is not node and not _keeps_rows(user, node):
            raise Miss("softmax_feeds_value_product", f"softmax output goes to {user.format_node()}", user)
        chain.append(user)
        node = user
    raise Miss("softmax_feeds_value_product", "no P·V product within reach of the softmax", node)


def _keeps_rows(user: fx.Node, node: fx.Node) -> bool:
    """``user`` passes the weights on unchanged per element: a clone, ``contiguous``, or a view
    that splits or merges only the batch·head axes (the last two stay)."""
    if not (user.args and user.args[0] is node):
        return False
    if sp.is_method(user, "clone", "contiguous") or sp.is_function(user, torch.clone):
        return True
    if sp.is_method(user, "view", "reshape", "flatten", "unflatten") or sp.is_function(user, torch.reshape):
        a, b = tensor_of(node), tensor_of(user)
        return a is not None and b is not None and b.dim() >= 3 and same_shape(a.shape[-2:], b.shape[-2:])
    return False


# ---------------------------------------------------------------------------------------------
# Backward: softmax input → the one Q·Kᵀ product it is computed from


def _find_score_product(start: Any, softmax: fx.Node) -> fx.Node:
    """The matrix product the softmax input is computed from, through ops the capture reads."""
    from fx_flash.passes.lowering import is_in_place, rule_name

    out = tensor_of(start)
    found, seen, work = [], set(), [start]
    while work:
        n = work.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > 4 * _MAX_WALK * _MAX_WALK:
            break
        read = sp.product(n, scores=True)
        t = tensor_of(n)
        if read is not None and t is not None and out is not None and t.dim() >= 3 and \
                same_shape(t.shape[-2:], out.shape[-2:]):
            found.append(n)
            continue
        # Through anything with the scores' (Nq, Nk) extent, so that a step the capture cannot
        # read is reported by the capture, with its reason, rather than as a missing product.
        passes = rule_name(n) is not None or is_in_place(n) or (
            t is not None and out is not None and t.dim() >= 2 and same_shape(t.shape[-2:], out.shape[-2:]))
        if passes:
            work.extend(n.all_input_nodes)
            work.extend(u for u in n.users if is_in_place(u) and u.args and u.args[0] is n and u is not softmax)
    if not found:
        if isinstance(start, fx.Node):
            raise Miss("scores_from_qk_product", f"no Q·Kᵀ product feeds the softmax through ops read per element "
                       f"(it reads {start.format_node()})", start)
        raise Miss("scores_from_qk_product", f"softmax of a constant {start!r}")
    if len(found) > 1:
        names = ", ".join(sorted(n.name for n in found))
        raise Miss("scores_from_qk_product", f"more than one matrix product feeds the scores ({names})", softmax)
    return found[0]


def _read_scale_prefix(site: AttentionSite) -> None:
    """Constant scales applied to the product alone, right after it: the op's ``scale``."""
    node = site.qk
    if site.baddbmm_input is not None:
        return  # the scale would also scale baddbmm's input
    while len(node.users) == 1:
        (user,) = node.users
        try:
            through = _read_scale(user, site.factors, where="scores")
        except Miss:
            return
        if through is not node:
            if through is not None:
                site.factors.pop()
            return
        site.scale_prefix.append(user)
        node = user


def _read_scale(node: fx.Node, factors: list[Factor], where: str) -> Optional[fx.Node]:
    """If ``node`` multiplies or divides a tensor by a provable number, record it; return the tensor."""
    read = sp.scaling(node)
    if read is None:
        return None
    left, right, op = read
    result = tensor_of(node)
    candidates = [(left, right)] if op == "div" else [(left, right), (right, left)]
    for tensor, factor in candidates:
        t = tensor_of(tensor)
        if t is None or result is None or not same_shape(t.shape, result.shape) or t.dtype != result.dtype:
            continue
        factor_tensor = tensor_of(factor)
        if factor_tensor is not None and factor_tensor.dim() != 0:
            raise Miss("scale_is_constant", f"{node.name} scales by a tensor of shape {tuple(factor_tensor.shape)}", node)
        try:
            value = evaluate(factor)
        except NotConstant as e:
            raise Miss("scale_is_constant", f"{node.name} scales by something not provably constant ({e})", node)
        factors.append(Factor(where, 1 / value if op == "div" else value, node))
        return tensor
    raise Miss("scale_is_constant", f"{node.format_node()} changes the scores' shape or dtype", node)


# ---------------------------------------------------------------------------------------------
# Operands: scale on q/k, Kᵀ → K, repeat_kv


def _read_baddbmm(site: AttentionSite, read: sp.Product) -> None:
    """baddbmm is beta·input + alpha·(b1 @ b2): alpha scales the product, beta·input is added."""
    if read.spelling != "baddbmm":
        return
    try:
        alpha, beta = evaluate(read.alpha), evaluate(read.beta)
    except NotConstant as e:
        raise Miss("scale_is_constant", f"baddbmm alpha/beta not provably constant ({e})", site.qk)
    if alpha != 1:
        site.factors.append(Factor("baddbmm alpha", alpha, site.qk))
    if beta != 0:
        if not isinstance(read.bias, fx.Node):
            raise Miss("scores_from_qk_product", "baddbmm with a non-tensor input", site.qk)
        # The input is added after alpha scales the product: in units of the op's scale.
        site.baddbmm_input, site.baddbmm_beta = read.bias, beta


def _peel_scales(node: Any, site: AttentionSite, where: str) -> Any:
    while isinstance(node, fx.Node):
        try:
            through = _read_scale(node, site.factors, where)
        except Miss:
            return node  # a q or k that is scaled by a tensor is simply the operand as written
        if through is None:
            return node
        site.peeled.append(node)
        node = through
    return node


def _peel_operands(site: AttentionSite, read: sp.Product) -> None:
    site.q = _peel_scales(read.left, site, "q")
    right = _peel_scales(read.right, site, "k")
    if read.right_is_transposed:
        site.k, site.key_spelling = right, read.spelling
    else:
        k = sp.untranspose(right)
        if k is not None:
            site.peeled.append(right)
            site.k = _peel_scales(k, site, "k")
            site.key_spelling = _spelling_of_transpose(right)
        else:
            site.k_transposed, site.key_spelling = right, "stored transposed"


def _spelling_of_transpose(node: fx.Node) -> str:
    if node.op == "call_function" and node.target is getattr:
        return f".{node.args[1]}"
    args = ", ".join(map(str, node.args[1:]))
    return f"{node.target if isinstance(node.target, str) else node.target.__name__}({args})"


def _peel_repeat_kv(site: AttentionSite) -> None:
    """See through K and V repeated per query-head group, so the op reads Hkv heads."""
    if site.k is None:
        return
    k_read, v_read = _repeated_heads(site.k), _repeated_heads(site.v)
    if k_read is None and v_read is None and _broadcast_head(site):
        site.gqa_spelling = "one K/V head broadcast by the products"
        return
    if k_read is None or v_read is None or k_read[1] != v_read[1]:
        return
    site.peeled += [site.k, site.v]
    site.k, site.v = k_read[0], v_read[0]
    site.gqa_spelling = k_read[1]


def _broadcast_head(site: AttentionSite) -> bool:
    """K and V have one head that both products broadcast over q's heads (Falcon's multi-query)."""
    q, k, v = tensor_of(site.q), tensor_of(site.k), tensor_of(site.v)
    if q is None or k is None or v is None or not (q.dim() == k.dim() == v.dim() == 4) or site.v_transposed:
        return False
    return same_size(k.shape[1], 1) and same_size(v.shape[1], 1) and not same_size(q.shape[1], 1) and \
        same_size(k.shape[0], q.shape[0]) and same_size(v.shape[0], q.shape[0])


def _repeated_heads(node: Any) -> Optional[tuple[fx.Node, str]]:
    """``x`` if ``node`` repeats each head of ``x`` (B, Hkv, N, d) r times *in a row* (grouped).

    HF ``repeat_kv`` (x[:, :, None].expand(B, Hkv, r, N, d).reshape(B, Hkv·r, N, d)),
    ``repeat_interleave(r, dim=1)``, and ``expand`` of a single head (MQA). ``repeat`` tiles
    heads (h % Hkv, not h // r) and is deliberately not read here.
    """
    out = tensor_of(node)
    if out is None or out.dim() != 4:
        return None
    if sp.is_method(node, "repeat_interleave") or sp.is_function(node, torch.repeat_interleave):
        src, dim = node.args[0], sp.arg(node, 2, "dim")
        src_t = tensor_of(src)
        if src_t is not None and isinstance(sp.arg(node, 1, "repeats"), int) and dim in (1, -3):
            if sp.arg(node, 3, "output_size") is None and same_shape(_without_heads(src_t), _without_heads(out)):
                return src, "repeat_interleave"
        return None
    if sp.is_method(node, "reshape", "view"):
        expanded = node.args[0]
        exp_t = tensor_of(expanded)
        if not sp.is_method(expanded, "expand") or exp_t is None or exp_t.dim() != 5:
            return None
        unsq = expanded.args[0]
        src = _unsqueezed_at_2(unsq)
        src_t = tensor_of(src)
        if src_t is None:
            return None
        b, hkv, n, d = src_t.shape
        if same_shape(exp_t.shape[:2], (b, hkv)) and same_shape(exp_t.shape[3:], (n, d)) and same_shape(
            out.shape, (b, exp_t.shape[1] * exp_t.shape[2], n, d)
        ):
            return src, "repeat_kv (expand + reshape)"
        return None
    if sp.is_method(node, "expand"):
        src_t = tensor_of(node.args[0])
        if src_t is not None and src_t.dim() == 4 and src_t.shape[1] == 1 and same_shape(_without_heads(src_t), _without_heads(out)):
            return node.args[0], "expand (one K/V head)"
    return None


def _without_heads(t: torch.Tensor):
    return (t.shape[0],) + tuple(t.shape[2:])


def _unsqueezed_at_2(node: Any) -> Optional[fx.Node]:
    if sp.is_method(node, "unsqueeze") or sp.is_function(node, torch.unsqueeze):
        return node.args[0] if node.args[1] in (2, -3) else None
    if sp.is_function(node, __import__("operator").getitem):
        index = node.args[1]
        full = slice(None, None, None)
        if isinstance(index, tuple) and len(index) == 5 and index[2] is None:
            if all(i == full for j, i in enumerate(index) if j != 2):
                return node.args[0]
    return None
