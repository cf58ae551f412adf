"""Replace one proved attention site by one ``torch.ops.fx_flash.flash_attention`` call.

The new nodes go right before the P·V product: K is transposed back only when the graph had
nothing but Kᵀ, masks are combined into one ``attn_mask`` (bool where every term is a -inf
fill, additive otherwise), and rank-3 (B·H, N, d) operands get a leading axis. Fake values
(``meta['val']``/``meta['example_value']``) are computed for every new node, and the chain the
call replaces is erased once nothing uses it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import fx_flash.ops  # noqa: F401  (registers torch.ops.fx_flash.*)
from fx_flash.passes.causal import is_causal_keep
from fx_flash.passes.checks import FILL_SWAMPS, fill_value, site_scale, term_factor
from fx_flash.passes.match import AttentionSite, MaskTerm
from fx_flash.passes.values import meta_key, tensor_of

FLASH_ATTENTION = torch.ops.fx_flash.flash_attention.default


def module_dropout_p(module: torch.nn.Dropout) -> float:
    """An nn.Dropout's probability while it trains, 0 in eval: read at every call, like the module."""
    return module.p if module.training else 0.0


@dataclass
class Rewritten:
    """What the rewrite emitted for one site (for explain and the logger)."""

    node: fx.Node  # the flash_attention call
    scale: Optional[float]
    mask_kind: str  # "none", "bool", "additive", "bool+additive"
    is_causal: bool
    dropout: str
    gqa_ratio: int
    bias_requires_grad: bool


class _Emitter:
    """Creates nodes before ``anchor`` and gives each a fake value when the graph keeps them."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor = graph, anchor
        self.key = meta_key(graph)
        fakes = (tensor_of(n) for n in graph.nodes)
        self.fake_mode = next((t.fake_mode for t in fakes if hasattr(t, "fake_mode")), None)

    def __call__(self, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs or {})
        if self.key is not None:
            self._propagate(node)
        return node

    def _propagate(self, node: fx.Node) -> None:
        if node.op == "get_attr" or self.fake_mode is None:
            return
        if any(self.key not in n.meta for n in node.all_input_nodes):
            return
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta[self.key])
        fn = node.target if node.op == "call_function" else getattr(type(args[0]), node.target)
        with self.fake_mode:
            node.meta[self.key] = fn(*args, **kwargs)


def rewrite(site: AttentionSite, inputs: Optional[dict] = None, trust_buffers: bool = True) -> Rewritten:
    """Emit the op for ``site`` (already proved by the checks) and remove what it replaces."""
    graph = site.pv.graph
    emit = _Emitter(graph, site.pv)
    q, k, v = site.q, site.k, site.v
    if k is None:
        k = emit("call_method", "transpose", (site.k_transposed, -2, -1))
    rank = tensor_of(q).dim()
    if rank == 3:
        q, k, v = (emit("call_method", "unsqueeze", (x, 0)) for x in (q, k, v))
    attn_mask, mask_kind, causal = _emit_mask(site, emit, inputs, trust_buffers)
    dropout, dropout_text = _dropout_p(site, emit)
    scale = site_scale(site)
    hq, hkv = tensor_of(site.q).shape[-3], tensor_of(site.k if site.k is not None else site.k_transposed).shape[-3]
    gqa = site.gqa_spelling is not None
    out = emit("call_function", FLASH_ATTENTION, (q, k, v, attn_mask, dropout, causal, scale, gqa))
    result = emit("call_method", "squeeze", (out, 0)) if rank == 3 else out
    site.pv.replace_all_uses_with(result)
    _erase_unused(site.chain + site.peeled)
    mask_t = tensor_of(attn_mask)
    return Rewritten(
        node=out,
        scale=scale,
        mask_kind=mask_kind,
        is_causal=causal,
        dropout=dropout_text,
        gqa_ratio=int(hq // hkv) if gqa else 1,
        bias_requires_grad=bool(mask_t is not None and mask_t.dtype != torch.bool and mask_t.requires_grad),
    )


def _emit_mask(site: AttentionSite, emit: _Emitter, inputs, trust_buffers):
    scores = tensor_of(site.softmax)
    dtype = scores.dtype
    keeps: list[fx.Node] = []
    biases: list[fx.Node] = []
    causal = False
    for term in site.masks:
        if term.kind == "fill":
            value = fill_value(term)
            if value == float("-inf"):
                if is_causal_keep(term.tensor, not term.fill_where_true, scores, inputs, trust_buffers):
                    causal = True
                else:
                    keeps.append(_keep(term, emit))
            else:
                fill_on = term.tensor
                if not term.fill_where_true:
                    fill_on = emit("call_function", operator.invert, (fill_on,))
                bias = emit("call_function", torch.where, (fill_on, value, 0.0))
                biases.append(_cast(bias, dtype, emit))
        elif isinstance(term.tensor, fx.Node):
            if _additive_causal(term, scores, inputs, trust_buffers):
                causal = True
                continue
            bias = term.tensor
            mask_t = tensor_of(bias)
            if mask_t is not None and not mask_t.dtype.is_floating_point:
                bias = _cast(bias, dtype, emit, force=True)
            factor = term_factor(term)
            if factor != 1:
                bias = emit("call_function", operator.mul, (bias, factor))
            biases.append(bias)
    keep = _combine(keeps, operator.and_, emit)
    bias = _combine(biases, operator.add, emit)
    if keep is not None and bias is not None:
        return emit("call_function", torch.where, (keep, bias, float("-inf"))), "bool+additive", causal
    if keep is not None:
        return keep, "bool", causal
    if bias is not None:
        return bias, "additive", causal
    return None, "none", causal


def _additive_causal(term: MaskTerm, scores, inputs, trust_buffers) -> bool:
    """``scores + where(causal_keep, 0, finfo.min)``: the HF way of writing a causal mask."""
    node = term.tensor
    if not (node.op == "call_function" and node.target is torch.where and len(node.args) == 3):
        return False
    cond, when_true, when_false = node.args
    try:
        from fx_flash.passes.values import evaluate

        zero, fill = evaluate(when_true), evaluate(when_false) * term_factor(term)
    except Exception:
        return False
    # A causal row always keeps key 0, so a swamping fill and -inf give the same weights.
    return zero == 0 and fill <= FILL_SWAMPS and is_causal_keep(cond, True, scores, inputs, trust_buffers)


def _keep(term: MaskTerm, emit: _Emitter) -> fx.Node:
    """The bool mask with True = attend, from a mask that says where to fill (or to keep)."""
    mask = term.tensor
    if not term.fill_where_true:
        return mask
    if mask.op == "call_function" and mask.target in (operator.invert, torch.logical_not):
        return mask.args[0]
    if mask.op == "call_function" and mask.target is operator.eq and mask.args[1] == 0:
        return emit("call_function", operator.ne, (mask.args[0], 0))
    return emit("call_function", operator.invert, (mask,))


def _cast(node: fx.Node, dtype: torch.dtype, emit: _Emitter, force: bool = False) -> fx.Node:
    t = tensor_of(node)
    if not force and t is not None and t.dtype == dtype:
        return node
    return emit("call_method", "to", (node, dtype))


def _combine(nodes: list, op, emit: _Emitter) -> Optional[fx.Node]:
    result = None
    for node in nodes:
        result = node if result is None else emit("call_function", op, (result, node))
    return result


def _dropout_p(site: AttentionSite, emit: _Emitter):
    drop = site.dropout
    if drop is None:
        return 0.0, "none"
    if isinstance(drop.training, torch.nn.Module):
        module = emit("get_attr", site.dropout_node.target, ())
        return emit("call_function", module_dropout_p, (module,)), f"p={drop.p} while {site.dropout_node.target} trains"
    if drop.training is False:
        return 0.0, f"p={drop.p} off (eval)"
    return float(drop.p), f"p={drop.p} (training)"


def _erase_unused(candidates: list[fx.Node]) -> None:
    """Erase candidates (and what only they used) once nothing uses them; keep impure nodes."""
    work = list(reversed(candidates))
    seen = set()
    while work:
        node = work.pop()
        if node in seen or node.graph is None:
            continue
        if node.users or node.op in ("placeholder", "output") or node.is_impure():
            continue
        seen.add(node)
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        work.extend(inputs)
