"""AttentionSpec: what one attention does to its scores, as expressions over named symbols.

A spec is the contract between a matched graph (or the public op's arguments) and the
generated kernels. It holds
    score     the logits fed to softmax: a sympy expression in ``qk`` (q·kᵀ of one element),
              ``scale`` (a runtime float), the index symbols and the operand symbols;
    keep      a predicate over the same symbols: elements where it is false take ``fill``;
    fill      -inf (the element drops out of softmax) or a finite value (eager's finite fills,
              such as ``finfo.min``: a row with no kept element then averages uniformly);
    operands  the tensors the score and predicate read, each element addressed by one index
              expression per tensor dimension;
    dropout   weights are dropped inside the kernel with a Philox stream.
The renderer prints score and predicate as Triton code and differentiates the score with sympy
for the backward, so a new score modification is a new expression, never a new kernel file.

Symbols (each evaluated per (query row, key column) of a tile):
    qk       q·kᵀ of this element, fp32          scale    the softmax scale (runtime float)
    q_idx    query position, 0-based             kv_idx   key position, 0-based
    b, h     batch and query-head index of the program (q's layout: (B, H, N, d))
    n_q, n_kv  the query and key lengths (runtime integers)
    t0, t1…  operand elements: float (real), int (integer) or bool (a predicate atom)

A spec prints to one line of text (``spec.text``), which is what graphs carry as the op's
``spec`` argument and what names the generated file; ``spec_from_text`` reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import sympy
from sympy.printing.str import StrPrinter

QK, SCALE = sympy.symbols("qk scale", real=True)
Q_IDX, KV_IDX, B_IDX, H_IDX = sympy.symbols("q_idx kv_idx b h", integer=True, nonnegative=True)
N_Q, N_KV = sympy.symbols("n_q n_kv", integer=True, positive=True)
INDEX_SYMBOLS = (Q_IDX, KV_IDX, B_IDX, H_IDX, N_Q, N_KV)
LEAD_SYMBOLS = frozenset({B_IDX, H_IDX})  # constant within one program (one batch·head)
OPERAND_KINDS = ("float", "int", "bool")

# Predicate of top-left aligned causal attention, as ``torch.tril(ones(Nq, Nk))`` writes it.
CAUSAL = sympy.Le(KV_IDX, Q_IDX)
NEG_INF = float("-inf")
SKIPPABLE_FILL = -1e4  # a finite fill this low weighs 0 next to any realistic kept score


def exact_arithmetic(fn):
    """Run ``fn`` with sympy's distribution of numbers over sums turned off.

    Note: sympy rewrites ``c*(1 - m)`` as ``c - c*m``. With HF's ``c = finfo.min`` that is
    ``s + c - c*m``, which fp32 evaluates as 0 for kept elements (``(s + c) - c``): the
    expressions the pass captures must keep the order of operations the graph has.
    """
    from sympy.core.parameters import distribute

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with distribute(False):
            return fn(*args, **kwargs)

    return wrapper


class sigmoid(sympy.Function):  # noqa: N801 (printed as torch and Triton spell it)
    """The logistic function; sympy has none, and Triton has ``tl.sigmoid``."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None


def operand_kind(dtype) -> Optional[str]:
    """The operand kind a tensor of ``dtype`` is read as; None for complex dtypes."""
    import torch

    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return None
    return "float" if dtype.is_floating_point else "int"


def operand_symbol(name: str, kind: str) -> sympy.Symbol:
    """The symbol standing for one element of an operand of ``kind``."""
    if kind == "float":
        return sympy.Symbol(name, real=True)
    if kind == "int":
        return sympy.Symbol(name, integer=True)
    return sympy.Symbol(name)


@dataclass(frozen=True)
class Operand:
    """A tensor the score reads.

    Attributes:
        name: its symbol's name, ``t0``, ``t1``, … in order.
        kind: "float" (loaded as fp32), "int" or "bool".
        index: one expression per tensor dimension saying which element a score element reads:
            ``q_idx`` or ``kv_idx`` (plus a constant: a slice that starts later), an expression
            of ``b`` and ``h`` only, or 0 (a broadcast dimension of size 1).
        grad: the backward returns d(loss)/d(operand), summed over the elements that read each
            tensor element (a learned bias, temperature or slope).
    """

    name: str
    kind: str
    index: tuple
    grad: bool = False

    def __post_init__(self):
        if self.kind not in OPERAND_KINDS:
            raise ValueError(f"operand {self.name}: kind {self.kind!r} is not one of {OPERAND_KINDS}")
        if self.grad and self.kind != "float":
            raise ValueError(f"operand {self.name}: only float operands have gradients")
        for e in self.index:
            if axis_offset(e) is None and sympy.sympify(e).free_symbols - LEAD_SYMBOLS:
                raise ValueError(f"operand {self.name}: index {e} must be q_idx (+ c), kv_idx (+ c) or an "
                                 "expression of b and h")

    @property
    def symbol(self) -> sympy.Symbol:
        return operand_symbol(self.name, self.kind)

    # The layout is derived once per operand (launches read it on every call; sympy is slow).
    @functools.cached_property
    def q_dims(self) -> tuple:
        """(dimension, c) of the dimensions read at q_idx + c."""
        return tuple((d, axis_offset(e, Q_IDX)) for d, e in enumerate(self.index) if axis_offset(e, Q_IDX) is not None)

    @functools.cached_property
    def kv_dims(self) -> tuple:
        """(dimension, c) of the dimensions read at kv_idx + c."""
        return tuple((d, axis_offset(e, KV_IDX)) for d, e in enumerate(self.index)
                     if axis_offset(e, KV_IDX) is not None)

    @property
    def along_q(self) -> bool:
        return bool(self.q_dims)

    @property
    def along_kv(self) -> bool:
        return bool(self.kv_dims)

    @functools.cached_property
    def lead(self) -> tuple:
        """(dimension, expression) of the dimensions addressed by the program's batch·head."""
        return tuple((d, sympy.sympify(e)) for d, e in enumerate(self.index)
                     if axis_offset(e) is None and sympy.sympify(e) != 0)

    def text(self) -> str:
        body = f"{self.name}={self.kind}[{', '.join(_print(sympy.sympify(e)) for e in self.index)}]"
        return body + (" grad" if self.grad else "")


class _SpecPrinter(StrPrinter):
    """sympy's str form, except floats print exactly (repr), so text round-trips bit for bit."""

    def _print_Float(self, expr):
        value = float(expr)
        return "oo" if value == math.inf else "-oo" if value == -math.inf else repr(value)


def _print(expr) -> str:
    return _SpecPrinter().doprint(expr)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention pattern, independent of shapes and dtypes (those specialize at launch)."""

    score: sympy.Expr = SCALE * QK
    keep: sympy.Basic = sympy.true
    operands: tuple = ()
    fill: float = NEG_INF
    dropout: bool = False
    name: str = field(default="attention", compare=False)

    def __post_init__(self):
        known = {QK, SCALE, *INDEX_SYMBOLS} | {o.symbol for o in self.operands}
        free = self.score.free_symbols | self.keep.free_symbols
        unknown = {s.name for s in free} - {s.name for s in known}
        if unknown:
            raise ValueError(f"spec uses unknown symbols {sorted(unknown)}")
        if QK not in self.score.free_symbols:
            raise ValueError("the score must depend on qk")
        if QK in self.keep.free_symbols:
            raise ValueError("the keep-predicate must not depend on qk (it would have no gradient)")
        names = [o.name for o in self.operands]
        if names != [f"t{i}" for i in range(len(names))]:
            raise ValueError(f"operands must be named t0, t1, … in order, got {names}")
        if not (self.fill == NEG_INF or math.isfinite(self.fill)):
            raise ValueError(f"fill must be -inf or finite, got {self.fill}")

    # Derived facts are cached on the instance: sympy queries cost microseconds, and launches
    # ask them on every call.
    @functools.cached_property
    def text(self) -> str:
        """The one-line form graphs carry: ``score=…; keep=…; fill=…; t0=float[…]; dropout``."""
        parts = [f"score={_print(self.score)}"]
        if self.keep is not sympy.true:
            parts.append(f"keep={_print(self.keep)}")
        if self.fill != NEG_INF:
            parts.append(f"fill={self.fill!r}")
        parts += [o.text() for o in self.operands]
        if self.dropout:
            parts.append("dropout")
        return "; ".join(parts)

    @functools.cached_property
    def reads_score_tiles(self) -> bool:
        """True when an operand is indexed along both q_idx and kv_idx (a bias or mask tensor per
        score element): the forward stages its tile in shared memory (tiling.footprint's t)."""
        return any(any(axis_offset(e, Q_IDX) is not None for e in o.index)
                   and any(axis_offset(e, KV_IDX) is not None for e in o.index) for o in self.operands)

    @functools.cached_property
    def key(self) -> str:
        """A stable hash naming the generated source (same spec → same file, across processes)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @functools.cached_property
    def causal(self) -> bool:
        """True when tiles past the causal diagonal may be skipped: the keep-predicate implies
        ``kv_idx <= q_idx`` and the skipped elements are -inf; or the predicate is exactly causal
        (every row keeps key 0) and the fill is at most -1e4, whose weight exp(fill - max) is 0
        beside any kept score above fill + 104."""
        conjuncts = self.keep.args if isinstance(self.keep, sympy.And) else (self.keep,)
        if not any(is_causal_relation(c) for c in conjuncts):
            return False
        return self.fill == NEG_INF or (len(conjuncts) == 1 and self.fill <= SKIPPABLE_FILL)

    @functools.cached_property
    def tile_mode(self) -> str:
        """How the kernels walk a row (or column) of tiles; see codegen/skipping.py.

        "dense": every element is kept; "causal": the predicate is exactly ``kv_idx <= q_idx`` and
        the kernels derive their ranges from the diagonal, as for ``is_causal``; "ranged": any
        other predicate, whose tiles are classified (empty, full, partial) into per-tile ranges
        that the kernels read from a small table.
        """
        if self.keep is sympy.true:
            return "dense"
        if self.causal and is_causal_relation(self.keep):
            return "causal"
        return "ranged"

    @functools.cached_property
    def keep_operands(self) -> tuple:
        """Indices of the operands the keep-predicate reads (its tensor masks)."""
        reads = self.keep.free_symbols
        return tuple(i for i, op in enumerate(self.operands) if op.symbol in reads)

    @functools.cached_property
    def positional_keep(self) -> Optional[sympy.Basic]:
        """The conjuncts of the keep-predicate that read positions only, when the predicate also
        has conjuncts that read tensors (``t0 & (kv_idx <= q_idx)``: transformers' causal mask
        with its padding); else None. Where the tensor conjuncts hold on every element the
        positional part holds on, the predicate is the positional part alone: the dK/dV kernel
        then walks a key tile's query tiles as the causal kernel does (codegen/skipping.py)."""
        if not self.keep_operands:
            return None
        symbols = {o.symbol for o in self.operands}
        conjuncts = sympy.And.make_args(self.keep)
        positional = [c for c in conjuncts if not (c.free_symbols & symbols)]
        if not positional or len(positional) == len(conjuncts):
            return None
        return sympy.And(*positional)

    @functools.cached_property
    def grad_operands(self) -> tuple:
        return tuple(o for o in self.operands if o.grad)

    @functools.cached_property
    def score_in_log2(self) -> bool:
        """Whether the kernels keep scores in log2 units (log2 e folded into the scale; see the
        template's exp2 note). Only when no value in the score can be a huge finite number that
        the extra factor would overflow to ±inf: no float operand and no constant beyond ±1e30.
        A finite fill is no obstacle, unless it is a huge positive one: the kernels write it in
        log2 units, clamped to -finfo.max, and read wholly filled rows back (the template's note
        on filled rows)."""
        if any(o.kind == "float" for o in self.operands) or self.fill > 1e30:
            return False
        return all(abs(float(c)) <= 1e30 for c in self.score.atoms(sympy.Number) if c.is_finite)

    def describe(self) -> str:
        return f"{self.name}({self.text})"

    @exact_arithmetic
    def with_grads(self, grads) -> "AttentionSpec":
        """This spec with operand i's gradient flag set to ``grads[i]``."""
        ops = tuple(dataclasses.replace(o, grad=bool(g)) for o, g in zip(self.operands, grads))
        return dataclasses.replace(self, operands=ops)


def axis_offset(e, axis=None):
    """c when index ``e`` is ``axis + c`` (axis q_idx or kv_idx, either when None), else None."""
    e = sympy.sympify(e)
    for a in (Q_IDX, KV_IDX) if axis is None else (axis,):
        if e.free_symbols == {a}:
            c = sympy.expand(e - a)
            if c.is_Integer:
                return int(c)
    return None


def is_causal_relation(rel) -> bool:
    """``kv_idx <= q_idx`` in any of its spellings (``q_idx >= kv_idx``, ``kv_idx < q_idx + 1``…)."""
    if not isinstance(rel, sympy.core.relational.Relational):
        return False
    diff = sympy.expand(rel.lhs - rel.rhs)
    forms = {sympy.Le: KV_IDX - Q_IDX, sympy.Lt: KV_IDX - Q_IDX - 1, sympy.Ge: Q_IDX - KV_IDX,
             sympy.Gt: Q_IDX - KV_IDX + 1}
    return type(rel) in forms and sympy.expand(diff - forms[type(rel)]) == 0


_OPERAND_TEXT = re.compile(r"^(t\d+)=(float|int|bool)\[(.*)\]( grad)?$")


@functools.lru_cache(maxsize=512)
@exact_arithmetic
def spec_from_text(text: str) -> AttentionSpec:
    """The spec ``text`` describes (``spec_from_text(s.text) == s``); cached, so an op call with
    a spec it has seen costs a dict lookup. Unknown parts raise ValueError."""
    fields, operands, dropout = {}, [], False
    for part in text.split("; "):
        found = _OPERAND_TEXT.match(part)
        if found:
            name, kind, index, grad = found.groups()
            operands.append((name, kind, index, bool(grad)))
        elif part == "dropout":
            dropout = True
        elif "=" in part and part.split("=", 1)[0] in ("score", "keep", "fill"):
            key, value = part.split("=", 1)
            fields[key] = value
        else:
            raise ValueError(f"cannot read {part!r} in spec {text!r}")
    names = {s.name: s for s in (QK, SCALE, *INDEX_SYMBOLS)}
    names.update({name: operand_symbol(name, kind) for name, kind, _, _ in operands})
    names.update({"sigmoid": sigmoid, "oo": sympy.oo})

    def parse(s: str):
        return sympy.sympify(s, locals=names)

    ops = tuple(Operand(name, kind, tuple(parse(e) for e in _top_level_items(index)), grad)
                for name, kind, index, grad in operands)
    keep = _parse_predicate(fields["keep"], names) if "keep" in fields else sympy.true
    fill = float(fields["fill"]) if "fill" in fields else NEG_INF
    # A hand-written text need not be in printed order: the spec (and its key) is the same.
    return AttentionSpec(parse(fields["score"]), keep, ops, fill, dropout)


def _parse_predicate(text: str, names: dict):
    """A keep-predicate's text as a sympy Boolean ("False" parses as a bool, too).

    Parsed with sympy's distribution of numbers over sums on: the predicate is integer index
    arithmetic, where the order of operations cannot change a value, and with it off sympy's
    relational evaluation recurses without end on forms such as ``q_idx - kv_idx - 10 <= 0``.
    """
    from sympy.core.parameters import distribute

    with distribute(True):
        return sympy.sympify(sympy.sympify(text, locals=names))


def _top_level_items(text: str) -> list[str]:
    """``a, Mod(b, 4), c`` → ["a", "Mod(b, 4)", "c"]: commas outside parentheses."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if text.strip():
        items.append(text[start:].strip())
    return items


def _broadcast_index(rank: int, sizes_one: tuple) -> tuple:
    """Index expressions of a tensor right-aligned to (b, h, q_idx, kv_idx); 0 where size 1."""
    axes = (B_IDX, H_IDX, Q_IDX, KV_IDX)[4 - rank:]
    return tuple(sympy.Integer(0) if one else axis for axis, one in zip(axes, sizes_one))


@functools.lru_cache(maxsize=None)
@exact_arithmetic
def sdpa_spec(*, bias: Optional[tuple] = None, bias_grad: bool = False, mask: Optional[tuple] = None,
              causal: bool = False, dropout: bool = False) -> AttentionSpec:
    """The spec of ``F.scaled_dot_product_attention``-style arguments.

    Args:
        bias: a float attn_mask added to the scaled scores, given by which of its dimensions
            have size 1 (right-aligned to (B, H, Nq, Nk)); None without one.
        bias_grad: that bias requires grad.
        mask: a bool attn_mask (True = attend), given the same way.
        causal: is_causal=True (top-left aligned).
        dropout: dropout_p > 0.
    """
    operands, score, keep = [], SCALE * QK, []
    for sizes_one, kind in ((bias, "float"), (mask, "bool")):
        if sizes_one is None:
            continue
        op = Operand(f"t{len(operands)}", kind, _broadcast_index(len(sizes_one), sizes_one),
                     grad=bias_grad and kind == "float")
        operands.append(op)
        if kind == "float":
            score = score + op.symbol
        else:
            keep.append(op.symbol)
    if causal:
        keep.append(CAUSAL)
    tags = [t for t, on in (("bias", bias is not None), ("mask", mask is not None), ("causal", causal),
                            ("dropout", dropout)) if on]
    return AttentionSpec(score, sympy.And(*keep), tuple(operands), NEG_INF, dropout,
                         name="sdpa" + "".join("_" + t for t in tags))
