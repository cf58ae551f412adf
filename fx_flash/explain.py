"""``fx_flash.explain``: what the pass did to a model, site by site, and why it skipped the rest.

Captures the model's graphs with Dynamo (nothing is compiled further: the rewritten graphs run
eagerly once), runs the pass on each, and reports per fused site the spelling it matched, the
op arguments, the kernel spec and block sizes; per missed softmax the check that refused it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from fx_flash.passes.fuse_attention import Fused, PassResult, run_pass
from fx_flash.passes.match import Miss
from fx_flash.passes.values import tensor_of


_TILE_MODES = {"dense": "dense (every tile full)", "causal": "causal (tiles past the diagonal skipped)"}


def _tiles(spec) -> str:
    """What SiteReport.tiles says: the kernels' tile mode and the source of a ranged table."""
    if spec.tile_mode != "ranged":
        return _TILE_MODES[spec.tile_mode]
    if spec.positional_keep is not None:
        return ("ranged (empty tiles skipped from a per-tile summary of the mask tensors; dK/dV key tiles "
                f"where they keep all that {spec.positional_keep} keeps walk its loop alone)")
    if spec.keep_operands:
        return "ranged (empty tiles skipped from a per-tile summary of the mask tensors)"
    return "ranged (empty tiles skipped, classified from the predicate)"


@dataclass
class SiteReport:
    """One fused attention: how it was written, the score and predicate captured, the op call."""

    name: str
    spelling: dict
    layout: str
    scale: str
    score: str  # the captured score, e.g. ``30*tanh(qk*scale/30)``
    keep: str  # the keep-predicate, e.g. ``kv_idx <= q_idx``; "all" when every element is kept
    fill: str  # what dropped elements become: "-inf", or a finite fill such as finfo.min
    operands: list  # "t0 = attention_mask[b, kv_idx] (float, grad)", ...
    tiles: str  # how the kernels skip tiles: spec.tile_mode and what the ranges come from
    dropout: str
    gqa_ratio: int
    spec: str
    blocks: str

    def __str__(self) -> str:
        spelled = ", ".join(f"{k}: {v}" for k, v in self.spelling.items())
        reads = "".join(f"\n    reads {o}" for o in self.operands)
        return (
            f"{self.name}: {self.layout}; scale={self.scale}; dropout={self.dropout}; gqa={self.gqa_ratio}\n"
            f"    score {self.score}\n    keep {self.keep} (else {self.fill}); tiles: {self.tiles}"
            f"{reads}\n    spelled as {spelled}\n    spec {self.spec}; {self.blocks}"
        )


@dataclass
class MissReport:
    """One softmax left alone: the check that failed, its reason, and the source line."""

    softmax: str
    check: str
    reason: str
    source: str

    def __str__(self) -> str:
        where = f"\n    at {self.source}" if self.source else ""
        return f"{self.softmax}: {self.check}: {self.reason}{where}"


@dataclass
class GraphReport:
    before: str
    after: str
    fused: int


@dataclass
class ExplainReport:
    """``fused``: attention sites rewritten; ``missed``: every softmax that was not, with reasons."""

    fused: int = 0
    sites: list[SiteReport] = field(default_factory=list)
    missed: list[MissReport] = field(default_factory=list)
    graphs: list[GraphReport] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fx_flash: {self.fused} attention(s) fused, {len(self.missed)} softmax not fused, "
                 f"{len(self.graphs)} graph(s)"]
        lines += ["", "Fused:"] + [f"  {s}" for s in self.sites] if self.sites else []
        lines += ["", "Not fused:"] + [f"  {m}" for m in self.missed] if self.missed else []
        for i, g in enumerate(self.graphs):
            lines += ["", f"--- graph {i} before ---", g.before.strip(), f"--- graph {i} after ({g.fused} fused) ---", g.after.strip()]
        return "\n".join(lines)


def explain(model_or_fn: Callable, *args: Any, **kwargs: Any) -> ExplainReport:
    """Trace ``model_or_fn(*args, **kwargs)`` with Dynamo and report what the pass does to it.

    Args:
        model_or_fn: an nn.Module or function, unmodified.
        args, kwargs: example inputs; the call runs once (eagerly, on the rewritten graphs).

    Returns:
        An ExplainReport: ``.fused``, ``.sites``, ``.missed``, ``.graphs``; ``str()`` shows all.
    """
    report = ExplainReport()

    def capture(gm: fx.GraphModule, example_inputs):
        before = gm.code
        result = run_pass(gm, example_inputs)
        report.graphs.append(GraphReport(before, gm.code, result.count))
        _add(report, result)
        return gm.forward

    torch.compile(model_or_fn, backend=capture)(*args, **kwargs)
    return report


def _add(report: ExplainReport, result: PassResult) -> None:
    report.fused += result.count
    report.sites += [_site_report(f) for f in result.fused]
    report.missed += [_miss_report(m) for m in result.missed]


def _miss_report(miss: Miss) -> MissReport:
    trace = getattr(miss, "stack_trace", None) or ""
    source = " ".join(line.strip() for line in trace.strip().splitlines()[-2:]) if trace else ""
    return MissReport(getattr(miss, "softmax", miss.node.name if miss.node else "?"), miss.check, miss.reason, source)


def _site_report(fused: Fused) -> SiteReport:
    site, done = fused.site, fused.result
    spec = done.spec
    q = tensor_of(site.q)
    k = tensor_of(site.k if site.k is not None else site.k_transposed)
    layout = f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype}".replace("torch.", "")
    if q.dim() == 3:
        layout += " (B·H, N, d): unsqueezed to (1, B·H, N, d)"
    spelling = {
        "Q·Kᵀ": site.qk_spelling,
        "Kᵀ": site.key_spelling,
        "scale": " · ".join(f"{f.where}" for f in site.factors) or "none",
        "softmax": site.softmax_spelling,
        "P·V": site.pv_spelling,
    }
    if site.gqa_spelling:
        spelling["GQA"] = site.gqa_spelling
    if site.dropout:
        spelling["dropout"] = site.dropout.spelling
    operands = [f"{op.name} = {node.name}[{', '.join(map(str, op.index))}] ({op.kind}{', grad' if grad else ''})"
                for op, node, grad in zip(spec.operands, done.operands, done.grads)]
    scale = "1/sqrt(d) (symbolic head dim)" if done.scale is None else f"{done.scale:.6g}"
    return SiteReport(
        name=done.node.name,
        spelling=spelling,
        layout=layout,
        scale=scale,
        score=str(spec.score),
        keep="all" if spec.keep is True or str(spec.keep) == "True" else str(spec.keep),
        fill=repr(spec.fill).replace("'", ""),
        operands=operands,
        tiles=_tiles(spec),
        dropout=done.dropout,
        gqa_ratio=done.gqa_ratio,
        spec=spec.text,
        blocks=_blocks(q, spec),
    )


def _blocks(q: torch.Tensor, spec) -> str:
    """The untuned forward tile of a long sequence (launches shrink it for short or few ones)."""
    try:
        from fx_flash.codegen.tiling import default_config, spec_options
        from fx_flash.device import device_profile

        head_dim = int(q.shape[-1])
        profile = device_profile(q.device)
        config = default_config("fwd", profile, head_dim, q.element_size(), **spec_options("fwd", spec))
        return f"forward tile on {profile.name}: {config}"
    except Exception as e:
        return f"blocks unavailable ({type(e).__name__}: {e})"
