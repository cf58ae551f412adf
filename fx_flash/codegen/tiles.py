"""Keep-predicate → tile classes: which rectangles of the score matrix are empty, full or partial.

``classifier(keep)`` decides one tile; ``class_grid`` every tile of a matrix (what
codegen/skipping.py turns into the kernels' tile ranges for predicates over positions alone).

A tile covers query rows [q0, q1) and key columns [k0, k1). It is EMPTY when the predicate is
false on every element (the kernel may skip it), FULL when true on every element (no per-element
predicate is needed) and PARTIAL otherwise, or whenever the reasoning below cannot decide.

Note: soundness first. ``classifier(keep)`` compiles the predicate once into a tree of closures
over interval bounds of its terms on the tile's box; each node answers in three-valued (Kleene)
logic, ordered EMPTY < PARTIAL < FULL, so And is min, Or is max and Not mirrors. A relation
``e <op> 0`` is decided only when sound bounds [lo, hi] of ``e`` over the box settle it. For an
affine ``e = a*q_idx + b*kv_idx + c`` the bounds are its values at the box's corners, so
inequalities are decided exactly; floor, ceiling, Mod, Min, Max, Abs, products and integer
powers use interval arithmetic (sound, and exact for chunked masks such as
``Eq(floor(kv_idx/c), floor(q_idx/c))``, whose two floors range independently over integers).
Operand symbols, b, h, unbound lengths, floats and unknown functions make their sub-predicate
PARTIAL; And/Or may still decide it (``CAUSAL & t0`` is EMPTY above the diagonal).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Callable, Optional

import sympy
from sympy.core.relational import Relational

from fx_flash.codegen.spec import KV_IDX, N_KV, N_Q, Q_IDX

EMPTY, PARTIAL, FULL = "empty", "partial", "full"
_NAMES = (EMPTY, PARTIAL, FULL)  # index = the three-valued truth: 0 false, 1 unknown, 2 true
_E, _P, _F = 0, 1, 2
CODES = {EMPTY: _E, PARTIAL: _P, FULL: _F}  # class_grid's integer codes

# A node of the compiled predicate: (q_lo, q_hi, k_lo, k_hi), inclusive bounds → 0, 1 or 2.
_Node = Callable[[int, int, int, int], int]
# A compiled term: the same box → (lo, hi), sound bounds of the term's value over it.
_Bounds = Callable[[int, int, int, int], tuple]

Classifier = Callable[[int, int, int, int], str]


@functools.lru_cache(maxsize=256)
def classifier(keep, n_q: Optional[int] = None, n_kv: Optional[int] = None) -> Classifier:
    """Compile ``keep`` once into ``classify(q0, q1, k0, k1) -> "empty" | "full" | "partial"``.

    Args:
        keep: the spec's keep-predicate, a sympy Boolean over q_idx, kv_idx, b, h, n_q, n_kv, t*.
        n_q, n_kv: the query and key lengths, when known, substituted before compiling, so that a
            bottom-right offset such as ``kv_idx <= q_idx + n_kv - n_q`` is decided too.
    Returns a function of a tile's half-open bounds (q0 < q1, k0 < k1; ValueError otherwise).
    """
    pred = sympy.sympify(keep)
    lengths = {s: v for s, v in ((N_Q, n_q), (N_KV, n_kv)) if v is not None}
    if lengths:  # by name, as the renderer prints symbols: a plain Symbol("n_kv") is the same length
        pred = pred.xreplace({s: sympy.Integer(lengths[n]) for s in pred.free_symbols
                              for n in lengths if s.name == n.name})
    node = _compile_bool(pred)

    def classify(q0: int, q1: int, k0: int, k1: int) -> str:
        if q0 >= q1 or k0 >= k1:
            raise ValueError(f"tile [{q0}, {q1}) x [{k0}, {k1}) is empty")
        return _NAMES[node(q0, q1 - 1, k0, k1 - 1)]

    return classify


def tile_class(keep, q0: int, q1: int, k0: int, k1: int) -> str:
    """The class of one tile: "empty", "full" or "partial" (see the module's note).

    Args:
        keep: the keep-predicate (a sympy Boolean).
        q0, q1: the tile's query rows [q0, q1), q0 < q1.
        k0, k1: the tile's key columns [k0, k1), k0 < k1.
    """
    return classifier(keep)(q0, q1, k0, k1)


def key_tiles(classify: Classifier, q0: int, q1: int, n_kv: int, block_n: int) -> range:
    """Key tiles a query tile must visit: from its first to its last non-empty one.

    Tile j covers keys [j*block_n, min((j+1)*block_n, n_kv)); every tile outside the range is
    EMPTY, tiles inside it may still be (a band with a hole). Empty range when all are.
    Args:
        classify: a ``classifier(keep)``.
        q0, q1: the query tile's rows [q0, q1).
        n_kv: the key length; block_n: BLOCK_N, the key tile's width.
    """
    return _nonempty_span(lambda k0, k1: classify(q0, q1, k0, k1), n_kv, block_n)


def query_tiles(classify: Classifier, k0: int, k1: int, n_q: int, block_m: int) -> range:
    """Query tiles a key tile meets (the backward's dK/dV loop): first to last non-empty one.

    Args:
        classify: a ``classifier(keep)``.
        k0, k1: the key tile's columns [k0, k1).
        n_q: the query length; block_m: BLOCK_M, the query tile's height.
    """
    return _nonempty_span(lambda m0, m1: classify(m0, m1, k0, k1), n_q, block_m)


def class_grid(classify: Classifier, n_q: int, n_kv: int, block_m: int, block_n: int) -> list:
    """The class of every tile of an (n_q, n_kv) score matrix cut in (block_m, block_n) tiles:
    a list of rows (one per query tile) of 0 (EMPTY), 1 (PARTIAL) or 2 (FULL).

    Tiles that run past the matrix are clipped to it. Decided by quadrants: a rectangle of tiles
    the classifier proves empty or full as a whole is so tile by tile (a fact over a box holds on
    each part of it), so a band-shaped predicate costs O(tiles along the band) calls, not one per
    tile.
    """
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"block sizes must be positive, got {block_m}, {block_n}")
    rows, cols = -(-max(n_q, 0) // block_m), -(-max(n_kv, 0) // block_n)
    grid = [[_P] * cols for _ in range(rows)]

    def split(i0, i1, j0, j1):
        c = CODES[classify(i0 * block_m, min(i1 * block_m, n_q), j0 * block_n, min(j1 * block_n, n_kv))]
        if c != _P or (i1 - i0 == 1 and j1 - j0 == 1):
            for i in range(i0, i1):
                grid[i][j0:j1] = [c] * (j1 - j0)
            return
        if i1 - i0 >= j1 - j0:
            mid = (i0 + i1) // 2
            split(i0, mid, j0, j1)
            split(mid, i1, j0, j1)
        else:
            mid = (j0 + j1) // 2
            split(i0, i1, j0, mid)
            split(i0, i1, mid, j1)

    if rows and cols:
        split(0, rows, 0, cols)
    return grid


def _nonempty_span(classify_1d, n: int, block: int) -> range:
    """range(first, last + 1) over the non-empty tiles of [0, n) cut in blocks of ``block``."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    tiles = -(-max(n, 0) // block)
    nonempty = [j for j in range(tiles) if classify_1d(j * block, min((j + 1) * block, n)) != EMPTY]
    return range(nonempty[0], nonempty[-1] + 1) if nonempty else range(0)


# ---- predicates: three-valued nodes -------------------------------------------------------------

def _const(value: int) -> _Node:
    return lambda ql, qh, kl, kh: value


def _compile_bool(p) -> _Node:
    """The three-valued node of Boolean ``p``; anything unrecognized is a constant PARTIAL."""
    if p is sympy.true:
        return _const(_F)
    if p is sympy.false:
        return _const(_E)
    if isinstance(p, sympy.And):
        return _fold(min, [_compile_bool(a) for a in p.args], stop=_E)
    if isinstance(p, sympy.Or):
        return _fold(max, [_compile_bool(a) for a in p.args], stop=_F)
    if isinstance(p, sympy.Not):
        inner = _compile_bool(p.args[0])
        return lambda ql, qh, kl, kh: 2 - inner(ql, qh, kl, kh)
    if isinstance(p, sympy.Implies):  # a → b is ¬a ∨ b
        premise, conclusion = _compile_bool(p.args[0]), _compile_bool(p.args[1])
        return lambda ql, qh, kl, kh: max(2 - premise(ql, qh, kl, kh), conclusion(ql, qh, kl, kh))
    if isinstance(p, sympy.Xor):
        return _xor([_compile_bool(a) for a in p.args])
    if isinstance(p, sympy.ITE):
        return _ite(*[_compile_bool(a) for a in p.args])
    if isinstance(p, Relational):
        return _compile_relation(p)
    return _const(_P)  # a bool operand t*, or a Boolean form this module does not reason about


def _fold(pick, nodes: list, stop: int) -> _Node:
    """And (pick=min, stop at EMPTY) or Or (pick=max, stop at FULL) of ``nodes``."""
    def node(ql, qh, kl, kh):
        out = 2 - stop  # the identity: FULL for And, EMPTY for Or
        for n in nodes:
            out = pick(out, n(ql, qh, kl, kh))
            if out == stop:
                break
        return out
    return node


def _xor(nodes: list) -> _Node:
    """Xor decides only when every argument is decided (its value flips with any of them)."""
    def node(ql, qh, kl, kh):
        parity = 0
        for n in nodes:
            v = n(ql, qh, kl, kh)
            if v == _P:
                return _P
            parity ^= v == _F
        return _F if parity else _E
    return node


def _ite(cond: _Node, then: _Node, other: _Node) -> _Node:
    """ITE: the branch's class when the condition is decided, else their agreement, if any."""
    def node(ql, qh, kl, kh):
        c = cond(ql, qh, kl, kh)
        if c != _P:
            return (then if c == _F else other)(ql, qh, kl, kh)
        a, b = then(ql, qh, kl, kh), other(ql, qh, kl, kh)
        return a if a == b else _P
    return node


def _compile_relation(rel) -> _Node:
    """``lhs <op> rhs`` as ``e <op> 0`` with e = lhs - rhs, decided from sound bounds of e."""
    if not (isinstance(rel.lhs, sympy.Expr) and isinstance(rel.rhs, sympy.Expr)):
        return _const(_P)  # a comparison of Booleans (Eq(t0, True)): not an index relation
    expr = rel.lhs - rel.rhs
    bounds = _compile_bounds(expr)
    if bounds is None:
        return _const(_P)
    # Each test is (true everywhere, false everywhere) given e ∈ [lo, hi].
    if isinstance(rel, sympy.StrictLessThan):
        decide = lambda lo, hi: (hi < 0, lo >= 0)  # noqa: E731
    elif isinstance(rel, sympy.LessThan):
        decide = lambda lo, hi: (hi <= 0, lo > 0)  # noqa: E731
    elif isinstance(rel, sympy.StrictGreaterThan):
        decide = lambda lo, hi: (lo > 0, hi <= 0)  # noqa: E731
    elif isinstance(rel, sympy.GreaterThan):
        decide = lambda lo, hi: (lo >= 0, hi < 0)  # noqa: E731
    elif isinstance(rel, (sympy.Equality, sympy.Unequality)):
        # An affine form with integer coefficients is a multiple of gcd(a, b) plus c: it is never
        # 0 when c is not such a multiple, whatever the box.
        never = _never_zero(expr)
        if isinstance(rel, sympy.Equality):
            decide = lambda lo, hi: (lo == hi == 0, never or lo > 0 or hi < 0)  # noqa: E731
        else:
            decide = lambda lo, hi: (never or lo > 0 or hi < 0, lo == hi == 0)  # noqa: E731
    else:
        return _const(_P)

    def node(ql, qh, kl, kh):
        always, never_true = decide(*bounds(ql, qh, kl, kh))
        return _F if always else _E if never_true else _P
    return node


def _never_zero(expr) -> bool:
    """``a*q_idx + b*kv_idx + c`` with integers a, b, c and c not a multiple of gcd(a, b)."""
    form = _affine(expr)
    if form is None or not all(isinstance(x, int) for x in form):
        return False
    a, b, c = form
    g = math.gcd(a, b)
    return c != 0 if g == 0 else c % g != 0


# ---- terms: sound bounds over the box -----------------------------------------------------------

def _number(x):
    """An exact Python number for a sympy Integer or Rational; None for floats and the rest."""
    if isinstance(x, sympy.Integer):
        return int(x)
    if isinstance(x, sympy.Rational):
        return Fraction(int(x.p), int(x.q))
    return None  # Floats: the kernel rounds them in fp32, exact rationals would not be sound


def _axis(s) -> Optional[int]:
    """0 for q_idx, 1 for kv_idx (matched by name, as the renderer prints them), else None."""
    if isinstance(s, sympy.Symbol):
        if s.name == Q_IDX.name:
            return 0
        if s.name == KV_IDX.name:
            return 1
    return None


def _affine(expr) -> Optional[tuple]:
    """(a, b, c) when ``expr`` expands to a*q_idx + b*kv_idx + c with exact numbers, else None."""
    a = b = c = 0
    for term, coeff in sympy.expand(expr).as_coefficients_dict().items():
        k = _number(coeff)
        if k is None:
            return None
        if term == 1:
            c += k
        elif _axis(term) == 0:
            a += k
        elif _axis(term) == 1:
            b += k
        else:
            return None
    return a, b, c


def _compile_bounds(expr) -> Optional[_Bounds]:
    """Sound (lo, hi) of ``expr`` over a box, exact for affine forms; None when unbounded."""
    form = _affine(expr)
    if form is not None:
        a, b, c = form

        # The extremes of an affine form over a box are at its corners: pick per coefficient sign.
        def affine(ql, qh, kl, kh):
            aq = (a * ql, a * qh) if a >= 0 else (a * qh, a * ql)
            bk = (b * kl, b * kh) if b >= 0 else (b * kh, b * kl)
            return c + aq[0] + bk[0], c + aq[1] + bk[1]
        return affine
    return _interval(expr)


def _interval(e) -> Optional[_Bounds]:
    """Interval arithmetic over ``e``'s tree (sound; loses precision when a symbol repeats)."""
    k = _number(e)
    if k is not None:
        return lambda ql, qh, kl, kh: (k, k)
    axis = _axis(e)
    if axis == 0:
        return lambda ql, qh, kl, kh: (ql, qh)
    if axis == 1:
        return lambda ql, qh, kl, kh: (kl, kh)
    parts = [_interval(a) for a in e.args]
    if not e.args or any(p is None for p in parts):
        return None
    if isinstance(e, sympy.Add):
        def add(*box):
            bs = [p(*box) for p in parts]
            return sum(b[0] for b in bs), sum(b[1] for b in bs)
        return add
    if isinstance(e, sympy.Mul):
        def mul(*box):
            lo, hi = parts[0](*box)
            for p in parts[1:]:
                plo, phi = p(*box)
                ends = (lo * plo, lo * phi, hi * plo, hi * phi)
                lo, hi = min(ends), max(ends)
            return lo, hi
        return mul
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        rnd = math.floor if isinstance(e, sympy.floor) else math.ceil
        inner = parts[0]
        return lambda *box: tuple(rnd(x) for x in inner(*box))  # monotone
    if isinstance(e, (sympy.Min, sympy.Max)):
        pick = min if isinstance(e, sympy.Min) else max

        def extreme(*box):  # monotone in every argument
            bs = [p(*box) for p in parts]
            return pick(b[0] for b in bs), pick(b[1] for b in bs)
        return extreme
    if isinstance(e, sympy.Abs):
        inner = parts[0]

        def absolute(*box):
            lo, hi = inner(*box)
            if lo >= 0:
                return lo, hi
            if hi <= 0:
                return -hi, -lo
            return 0, max(-lo, hi)
        return absolute
    if isinstance(e, sympy.Mod):
        return _mod(e, parts)
    if isinstance(e, sympy.Pow):
        n = _number(e.exp)
        if isinstance(n, int) and n >= 1:
            base = parts[0]

            def power(*box):  # odd powers are monotone; even ones fold at 0
                lo, hi = base(*box)
                if n % 2 or lo >= 0:
                    return lo ** n, hi ** n
                if hi <= 0:
                    return hi ** n, lo ** n
                return 0, max(lo ** n, hi ** n)
            return power
    return None  # b, h, unbound n_q/n_kv, operands, floats, unknown functions


def _mod(e, parts) -> Optional[_Bounds]:
    """Mod(x, m) for a positive constant m: x shifted by its period when x stays in one period."""
    m = _number(e.args[1])
    if m is None or m <= 0:
        return None
    inner = parts[0]
    # Mod is below m; for integer x and integer m, at most m - 1.
    top = m - 1 if isinstance(m, int) and e.args[0].is_integer else m

    def mod(*box):
        lo, hi = inner(*box)
        period = math.floor(Fraction(lo) / m)
        if math.floor(Fraction(hi) / m) == period:
            return lo - period * m, hi - period * m
        return 0, top
    return mod
