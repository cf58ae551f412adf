"""Replace one proved attention site by one ``torch.ops.fx_flash.attention`` call.

The new nodes go right before the P·V product: K (or V) is transposed back only when the graph
had nothing but its transpose, rank-3 (B·H, N, d) operands get a leading axis, and the call
takes q, k, v, the tensors the captured score reads, dropout p, the scale, GQA and the spec's
text. Fake values (``meta['val']``/``meta['example_value']``) are computed for every new node,
and the nodes the call replaces are erased once nothing uses them (masks shared with sites not
yet rewritten stay until ``erase_unused`` runs at the end of the pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import fx_flash.ops  # noqa: F401  (registers torch.ops.fx_flash.*)
from fx_flash.codegen.spec import AttentionSpec
from fx_flash.passes.capture import Capture
from fx_flash.passes.checks import site_scale
from fx_flash.passes.lowering import is_in_place
from fx_flash.passes.match import AttentionSite
from fx_flash.passes.values import meta_key, tensor_of

ATTENTION = torch.ops.fx_flash.attention.default


def module_dropout_p(module: torch.nn.Dropout) -> float:
    """An nn.Dropout's probability while it trains, 0 in eval: read at every call, like the module."""
    return module.p if module.training else 0.0


@dataclass
class Rewritten:
    """What the rewrite emitted for one site (for explain and the logger)."""

    node: fx.Node  # the attention call
    spec: AttentionSpec
    scale: Optional[float]
    dropout: str
    gqa_ratio: int
    operands: list  # the graph nodes the score reads
    grads: list  # whether each operand requires grad (its gradient is computed in the kernel)


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


def rewrite(site: AttentionSite, capture: Capture, spec: AttentionSpec) -> Rewritten:
    """Emit the op for ``site`` (already proved) and remove what it replaces."""
    graph = site.pv.graph
    emit = _Emitter(graph, site.pv)
    q, k, v = site.q, site.k, site.v
    if k is None:
        k = emit("call_method", "transpose", (site.k_transposed, -2, -1))
    if site.v_transposed:
        v = emit("call_method", "transpose", (v, -2, -1))
    rank = tensor_of(site.q).dim()
    if rank == 3:
        q, k, v = (emit("call_method", "unsqueeze", (x, 0)) for x in (q, k, v))
    dropout, dropout_text = _dropout_p(site, emit)
    scale = site_scale(site)
    hq, hkv = tensor_of(site.q).shape[-3], tensor_of(site.k if site.k is not None else site.k_transposed).shape[-3]
    gqa = site.gqa_spelling is not None
    operands = [read.node for read in capture.reads]
    out = emit("call_function", ATTENTION, (q, k, v, operands, dropout, scale, gqa, spec.text))
    result = emit("call_method", "squeeze", (out, 0)) if rank == 3 else out
    site.pv.replace_all_uses_with(result)
    erase_unused(site.chain + site.peeled + list(capture.score_nodes), allow_in_place=capture.score_nodes)
    return Rewritten(
        node=out, spec=spec, scale=scale, dropout=dropout_text, gqa_ratio=int(hq // hkv) if gqa else 1,
        operands=operands, grads=[bool(getattr(tensor_of(n), "requires_grad", False)) for n in operands],
    )


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


def erase_unused(candidates, allow_in_place=frozenset()) -> None:
    """Erase candidates (and what only they used) once nothing uses them; keep impure nodes and
    in-place ops other than those in ``allow_in_place`` (mutations of the erased scores). Any
    order works: a candidate still in use is reached again as the input of its erased user."""
    work = list(reversed(list(candidates)))
    seen = set()
    while work:
        node = work.pop()
        if node in seen or node.graph is None or node._erased:
            continue
        if node.users or node.op in ("placeholder", "output") or node.is_impure():
            continue
        if is_in_place(node) and node not in allow_in_place:
            continue
        seen.add(node)
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        work.extend(inputs)
