"""AttentionSpec: what one matched attention does to its scores, as expressions, not flags.

A spec is the contract between a matched graph (or the public op's arguments) and the
generated kernel. The score is a sympy expression over the raw product ``qk`` and the
per-element symbols below; the mask is a sympy predicate over the same symbols. The renderer
turns both into Triton code, and differentiates the score to generate the backward's chain
rule, so a new score modification (soft-capping, ALiBi, ...) is a new expression, not a new
kernel.

Symbols available to scores and masks (each evaluated per (query row, key column) of a tile):
    qk      q·kᵀ of this element, fp32.          scale   the softmax scale (runtime float).
    bias    the additive-mask tensor's element.   mask    the bool-mask tensor's element.
    q_idx   query position (0-based).            kv_idx  key position (0-based).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import sympy

QK, SCALE, BIAS = sympy.symbols("qk scale bias", real=True)
Q_IDX, KV_IDX = sympy.symbols("q_idx kv_idx", integer=True, nonnegative=True)
MASK = sympy.Symbol("mask")  # a bool tensor element, used as a predicate atom

# Predicate of top-left aligned causal attention, as ``torch.tril(ones(Nq, Nk))`` writes it.
CAUSAL = sympy.Le(KV_IDX, Q_IDX)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention pattern, independent of shapes and dtypes (those specialize at launch).

    Attributes:
        score: the logits fed to softmax, an expression in QK, SCALE, BIAS, Q_IDX, KV_IDX.
        keep: elements that take part in softmax; the rest are -inf. ``sympy.true`` keeps all.
        bias_grad: the kernel also returns d(loss)/d(bias) (a learned, T5-style bias).
        dropout: weights are dropped inside the kernel with a Philox stream.
        name: a short label for reports and generated-file headers.
    """

    score: sympy.Expr = SCALE * QK
    keep: sympy.Basic = sympy.true
    bias_grad: bool = False
    dropout: bool = False
    name: str = field(default="attention", compare=False)

    def __post_init__(self):
        free = self.score.free_symbols | self.keep.free_symbols
        unknown = free - {QK, SCALE, BIAS, Q_IDX, KV_IDX, MASK}
        if unknown:
            raise ValueError(f"spec uses unknown symbols {sorted(map(str, unknown))}")
        if QK not in self.score.free_symbols:
            raise ValueError("the score must depend on qk")
        if self.bias_grad and not self.has_bias:
            raise ValueError("bias_grad needs a bias term in the score")

    # Derived facts are cached on the instance: sympy queries cost microseconds, and launches
    # ask them on every call.
    @functools.cached_property
    def has_bias(self) -> bool:
        return BIAS in self.score.free_symbols

    @functools.cached_property
    def has_mask(self) -> bool:
        return MASK in self.keep.free_symbols

    @functools.cached_property
    def causal(self) -> bool:
        """True when the keep-predicate implies the causal one, so tiles past the diagonal skip."""
        conjuncts = self.keep.args if isinstance(self.keep, sympy.And) else (self.keep,)
        return any(c == CAUSAL for c in conjuncts)

    @functools.cached_property
    def key(self) -> str:
        """A stable hash naming the generated source (same spec → same file, across processes)."""
        text = f"{sympy.srepr(self.score)}|{sympy.srepr(self.keep)}|{self.bias_grad}|{self.dropout}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        parts = [f"score={self.score}"]
        if self.keep is not sympy.true:
            parts.append(f"keep={self.keep}")
        if self.bias_grad:
            parts.append("bias_grad")
        if self.dropout:
            parts.append("dropout")
        return f"{self.name}({', '.join(parts)})"


@functools.lru_cache(maxsize=None)
def sdpa_spec(*, bias: bool, bias_grad: bool, mask: bool, causal: bool, dropout: bool) -> AttentionSpec:
    """The spec for ``F.scaled_dot_product_attention``-style arguments.

    Args:
        bias: a float attn_mask is added to the scaled scores.
        bias_grad: that bias requires grad.
        mask: a bool attn_mask selects the keys each query may attend to.
        causal: is_causal=True (top-left aligned).
        dropout: dropout_p > 0.
    """
    score = SCALE * QK + (BIAS if bias else 0)
    keep = sympy.And(*([MASK] if mask else []), *([CAUSAL] if causal else []))
    tags = [t for t, on in (("bias", bias), ("mask", mask), ("causal", causal), ("dropout", dropout)) if on]
    return AttentionSpec(score, keep, bias_grad, dropout, name="sdpa" + "".join("_" + t for t in tags))
