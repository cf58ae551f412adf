"""The pass: find every softmax, match its boundaries, capture the scores, prove, rewrite.

``fuse_attention(gm)`` is in place and returns the number of rewrites. Every softmax that is
not rewritten is recorded with the check that refused it, in the ``PassResult`` that
``run_pass`` returns (``explain`` reads it) and on the ``fx_flash`` logger. ``counters`` keeps
running totals that tests can assert, like Inductor's ``counters["inductor"]``.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import fx

from fx_flash.codegen.spec import AttentionSpec
from fx_flash.passes.capture import Capture, capture_scores
from fx_flash.passes.checks import first_failure, specify
from fx_flash.passes.match import AttentionSite, Miss, match_site
from fx_flash.passes.rewrite import Rewritten, erase_unused, rewrite
from fx_flash.passes.values import meta_key

log = logging.getLogger(__name__)  # a child of "fx_flash"

# "fused", "missed", "missed.<check>", "spelling.<how q·kᵀ was written>": running totals.
counters: collections.Counter = collections.Counter()


@dataclass
class Fused:
    """One rewritten site: how it was written and what the op call does."""

    site: AttentionSite
    capture: Capture
    result: Rewritten

    @property
    def spec(self) -> AttentionSpec:
        return self.result.spec


@dataclass
class PassResult:
    fused: list[Fused] = field(default_factory=list)
    missed: list[Miss] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.fused)


def run_pass(
    gm: fx.GraphModule,
    example_inputs: Optional[Sequence] = None,
    *,
    trust_buffers: bool = True,
) -> PassResult:
    """Rewrite every provable attention in ``gm``; report the rest.

    Args:
        gm: a GraphModule from symbolic_trace, make_fx or Dynamo. Shapes are needed: Dynamo and
            make_fx graphs carry them; for others, pass ``example_inputs`` (real or fake).
        example_inputs: values of gm's placeholders, in order. Used to record shapes when the
            graph has none, and to read buffers Dynamo passes as inputs (a causal ``tril``).
        trust_buffers: treat a module buffer that Dynamo lifted to an input as the constant
            its example value shows (buffers are not mutated in place between calls).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = None
    if example_inputs is not None:
        inputs = {n.name: x for n, x in zip(placeholders, example_inputs)}
        if meta_key(gm.graph) is None:
            _record_shapes(gm, example_inputs)
    result = PassResult()
    captured: set = set()
    for node in list(gm.graph.nodes):
        if node._erased:  # removed by an earlier rewrite (a node of its chain)
            continue
        try:
            site = match_site(node)
            if site is None:
                continue
            failure = first_failure(site)
            if failure:
                raise Miss(failure[0], failure[1], node)
            capture = capture_scores(site, inputs, trust_buffers)
            spec = specify(site, capture)
            done = rewrite(site, capture, spec)
            captured |= capture.nodes
        except Miss as miss:
            miss.node = miss.node if miss.node is not None else node
            miss.softmax = node.name
            miss.stack_trace = node.meta.get("stack_trace")
            result.missed.append(miss)
            counters["missed"] += 1
            counters[f"missed.{miss.check}"] += 1
            log.info("fx_flash: not fusing softmax %s: %s: %s", node.name, miss.check, miss.reason)
            continue
        result.fused.append(Fused(site, capture, done))
        counters["fused"] += 1
        counters[f"spelling.{site.qk_spelling}"] += 1
        log.debug("fx_flash: fused %s (%s) into %s: %s", node.name, site.qk_spelling, done.node.name, spec.text)
    if result.fused:
        # Masks built once and read by every layer are dead only once every layer is rewritten.
        erase_unused(captured)
        gm.graph.lint()
        gm.recompile()
    return result


def fuse_attention(gm: fx.GraphModule, example_inputs: Optional[Sequence] = None, **options) -> int:
    """Rewrite each attention chain in ``gm`` into one fx_flash op call, in place.

    Args:
        gm: the graph module (symbolic_trace, make_fx or Dynamo); recompiled if changed.
        example_inputs: placeholder values, needed only when the graph records no shapes.
        options: see ``run_pass``.

    Returns:
        The number of attention sites rewritten.
    """
    return run_pass(gm, example_inputs, **options).count


def _record_shapes(gm: fx.GraphModule, example_inputs: Sequence) -> None:
    """Run the graph on fake copies of the inputs, recording ``meta['val']`` on every node."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
