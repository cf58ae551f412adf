"""Tile classes against brute force: a tile called empty holds no kept element, one called full no
dropped element, for every predicate family; affine families (causal, offsets, windows, prefix-LM)
are classified exactly, and the key/query tile ranges cover exactly the tiles that hold work.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import numpy as np
import pytest
import sympy
from hypothesis import given, settings

from fx_flash.codegen.spec import CAUSAL, H_IDX, KV_IDX, N_KV, N_Q, Q_IDX, operand_symbol
from fx_flash.codegen.tiles import EMPTY, FULL, PARTIAL, classifier, key_tiles, query_tiles, tile_class

Q, KV = Q_IDX, KV_IDX
T0, T1 = operand_symbol("t0", "bool"), operand_symbol("t1", "int")
SPAN = 64  # tiles are drawn inside [0, SPAN) on both axes: every family changes class in there


def window(w):
    return (KV <= Q) & (Q <= KV + w)


def chunked(c):
    return sympy.Eq(sympy.floor(KV / c), sympy.floor(Q / c)) & (KV <= Q)


# Families whose class the corner reasoning decides exactly: each relation is affine and the
# combinations are functions of one difference (windows) or decided by one side (prefix-LM).
AFFINE = {
    "causal": CAUSAL,
    "causal_strict": KV < Q,
    "offset_back": KV <= Q - 7,
    "bottom_right": KV <= Q + 13,  # Nk - Nq = 13
    "scaled": 2 * KV <= Q + 3,
    "window": window(5),
    "window_diagonal": window(0),
    "window_wide": window(40),
    "prefix_lm": (KV <= Q) | (KV <= 9),
    "prefix_lm_0": (KV <= Q) | (KV <= 0),
    "not_causal": ~CAUSAL,
}

# Families where only soundness is promised.
OTHER = {
    "chunked": chunked(4),
    "chunked_5": chunked(5),
    "chunk_only_8": sympy.Eq(sympy.floor(KV / 8), sympy.floor(Q / 8)),
    "not_chunked": sympy.Ne(sympy.floor(KV / 8), sympy.floor(Q / 8)) | (KV <= 2),
    "not_window": ~window(5),
    "window_or_prefix": window(5) | (KV <= 3),
    "two_bands": window(3) | ((KV <= Q - 20) & (Q <= KV + 24)),
    "causal_minus_window": CAUSAL & ~window(8),
    "diagonal_eq": sympy.Eq(Q, KV),
    "odd_never_eq": sympy.Eq(2 * Q, 2 * KV + 1),
    "stride_3": sympy.Eq(sympy.Mod(Q - KV, 3), 0),
    "mod_block": sympy.Mod(KV, 16) <= sympy.Mod(Q, 16),
    "xor": sympy.Xor(CAUSAL, KV <= 20),
    "implies": sympy.Implies(KV >= 10, CAUSAL),
    "ite": sympy.ITE(Q >= 32, window(4), KV <= 8),
    "min_max": sympy.Max(Q, KV) <= 2 * sympy.Min(Q, KV),
    "abs_band": sympy.Abs(Q - KV) <= 6,
    "square": (Q - KV) ** 2 <= 30,
    "floor_ceil": sympy.floor(Q / 3) - sympy.ceiling(KV / 5) >= 2,
    "unknown_function": sympy.sin(Q - KV) > 0,
}

# Predicates reading operands (or the program's head): the classes must hold for every value.
OPERAND = {
    "causal_and_t0": CAUSAL & T0,
    "causal_or_t0": CAUSAL | T0,
    "window_xor_t0": sympy.Xor(window(5), T0),
    "not_t0_or_prefix": ~T0 | (KV <= 9),
    "int_offset_t1": KV <= Q + T1,
    "head_window": (KV <= Q) & (Q <= KV + H_IDX),
}

ALL = {**AFFINE, **OTHER, **OPERAND}


@functools.lru_cache(maxsize=None)
def _evaluator(keep):
    """numpy form of ``keep`` over (q_idx, kv_idx, *other symbols), other symbols sorted by name."""
    others = tuple(sorted(keep.free_symbols - {Q, KV}, key=lambda s: s.name))
    return others, sympy.lambdify((Q, KV, *others), keep, "numpy")


def brute(keep, q0, q1, k0, k1, seed=0) -> list:
    """Boolean grids of ``keep`` over the tile: one per drawn assignment of its other symbols."""
    qq, kk = np.meshgrid(np.arange(q0, q1), np.arange(k0, k1), indexing="ij")
    others, fn = _evaluator(keep)
    rng = np.random.default_rng(seed)
    assignments = [[]]
    if others:  # extremes (all true / all false / large ints) and random per-element values
        assignments = [[np.full(qq.shape, v, dtype=bool if s.is_integer is None else np.int64) for s in others]
                       for v in ((True, False) if all(s.is_integer is None for s in others) else (0, 1, -SPAN, SPAN))]
        for _ in range(6):
            assignments.append([rng.random(qq.shape) < 0.5 if s.is_integer is None
                                else rng.integers(-SPAN, SPAN, qq.shape) for s in others])
    return [np.broadcast_to(fn(qq, kk, *vals), qq.shape).astype(bool) for vals in assignments]


def truth(keep, q0, q1, k0, k1) -> str:
    """The exact class of a tile of a predicate without operands."""
    (grid,) = brute(keep, q0, q1, k0, k1)
    return FULL if grid.all() else EMPTY if not grid.any() else PARTIAL


@st.composite
def tiles(draw, span=SPAN):
    """(q0, q1, k0, k1) with q0 < q1 <= span and k0 < k1 <= span."""
    q0 = draw(st.integers(0, span - 1))
    k0 = draw(st.integers(0, span - 1))
    return q0, draw(st.integers(q0 + 1, span)), k0, draw(st.integers(k0 + 1, span))


@pytest.mark.parametrize("name", sorted(ALL))
def test_brute_force_oracle_matches_sympy(name):
    """The numpy oracle agrees with sympy's own evaluation of the predicate (checks the checker)."""
    keep = ALL[name]
    others, fn = _evaluator(keep)
    rng = np.random.default_rng(1)
    for q, k in rng.integers(0, SPAN, (12, 2)):
        vals = {s: (bool(rng.random() < 0.5) if s.is_integer is None else int(rng.integers(-9, 9))) for s in others}
        want = bool(keep.subs({Q: int(q), KV: int(k), **vals}))
        got = bool(fn(int(q), int(k), *[vals[s] for s in others]))
        assert got == want, (q, k, vals)


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=80, deadline=None)
@given(tile=tiles())
def test_sound(name, tile):
    """An empty tile keeps no element and a full tile drops none, for every operand value drawn."""
    keep = ALL[name]
    got = classifier(keep)(*tile)
    for grid in brute(keep, *tile, seed=sum(tile)):
        if got == EMPTY:
            assert not grid.any(), f"{name}: called empty, keeps elements in {tile}"
        if got == FULL:
            assert grid.all(), f"{name}: called full, drops elements in {tile}"


@pytest.mark.parametrize("name", sorted(AFFINE))
@settings(max_examples=150, deadline=None)
@given(tile=tiles())
def test_affine_families_are_exact(name, tile):
    """For causal, offset, window and prefix-LM masks the class is exactly brute force's."""
    keep = AFFINE[name]
    assert classifier(keep)(*tile) == truth(keep, *tile), (name, tile)


@pytest.mark.parametrize("c", [1, 4, 8])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_chunked_exact_on_chunk_aligned_tiles(c, data):
    """Chunked-causal tiles whose edges fall on chunk boundaries are classified exactly."""
    q0, q1, k0, k1 = data.draw(tiles(span=SPAN // c))
    tile = (q0 * c, q1 * c, k0 * c, k1 * c)
    assert classifier(chunked(c))(*tile) == truth(chunked(c), *tile), tile


@pytest.mark.parametrize("name", ["chunked", "chunked_5", "chunk_only_8", "not_chunked", "diagonal_eq",
                                  "odd_never_eq", "stride_3", "xor", "implies", "ite", "abs_band"])
def test_decides_some_tiles(name):
    """Non-affine families are not left all partial: some 1x1 or 4x4 tile is called empty or full."""
    cls = classifier(ALL[name])
    classes = {cls(q0, q0 + b, k0, k0 + b) for b in (1, 4) for q0 in range(0, SPAN, b) for k0 in range(0, SPAN, b)}
    assert classes - {PARTIAL}, name


@settings(max_examples=150, deadline=None)
@given(tile=tiles())
def test_operand_is_decided_only_through_the_index_part(tile):
    """``causal & t0`` is empty exactly where causal is, never full; ``causal | t0`` dually."""
    causal = truth(CAUSAL, *tile)
    conj, disj = classifier(CAUSAL & T0)(*tile), classifier(CAUSAL | T0)(*tile)
    assert conj == (EMPTY if causal == EMPTY else PARTIAL)
    assert disj == (FULL if causal == FULL else PARTIAL)
    assert classifier(KV <= Q + T1)(*tile) == PARTIAL  # an int operand shifts the diagonal anywhere


def test_constant_predicates():
    """true is full, false (``False & t0`` folds to it) is empty, a bare bool operand is partial."""
    assert tile_class(sympy.true, 0, 5, 3, 9) == FULL
    assert tile_class(sympy.false & T0, 0, 5, 3, 9) == EMPTY
    assert tile_class(T0, 0, 5, 3, 9) == PARTIAL


@settings(max_examples=100, deadline=None)
@given(tile=tiles(), n_q=st.integers(1, SPAN), n_kv=st.integers(1, SPAN))
def test_bottom_right_with_bound_lengths(tile, n_q, n_kv):
    """``kv_idx <= q_idx + n_kv - n_q`` with the lengths bound is classified as its number offset."""
    keep = KV <= Q + N_KV - N_Q
    assert classifier(keep, n_q=n_q, n_kv=n_kv)(*tile) == truth(KV <= Q + (n_kv - n_q), *tile)
    assert classifier(keep)(*tile) == PARTIAL  # unbound lengths decide nothing


def test_rejects_empty_tiles():
    """A tile with no rows or no columns is a caller's error, not a class."""
    with pytest.raises(ValueError):
        tile_class(CAUSAL, 4, 4, 0, 8)
    with pytest.raises(ValueError):
        tile_class(CAUSAL, 0, 8, 9, 3)


def _brute_span(nonempty: list) -> range:
    hits = [j for j, any_kept in enumerate(nonempty) if any_kept]
    return range(hits[0], hits[-1] + 1) if hits else range(0)


def _check_span(name, got: range, nonempty: list):
    """Exact families: the span of work is brute force's; the others: it contains every tile with work."""
    if name in AFFINE:
        assert got == _brute_span(nonempty), (name, got, nonempty)
    else:
        assert all(j in got for j, any_kept in enumerate(nonempty) if any_kept), (name, got, nonempty)
        assert got.start >= 0 and got.stop <= len(nonempty)


@pytest.mark.parametrize("axis", ["keys", "queries"])
@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_tile_ranges_cover_the_work(name, axis, data):
    """key_tiles (one query tile over the keys) and query_tiles (one key tile over the queries)
    span the tiles holding a kept element, exactly so for the affine families."""
    keep = ALL[name]
    n_q, n_kv = data.draw(st.integers(1, SPAN)), data.draw(st.integers(1, SPAN))
    fixed_block = data.draw(st.sampled_from([1, 4, 16]))
    step = data.draw(st.sampled_from([1, 3, 8, 16]))
    if axis == "keys":  # rows [q0, q1) fixed, walk the key tiles
        q0 = data.draw(st.integers(0, n_q - 1)) // fixed_block * fixed_block
        q1 = min(q0 + fixed_block, n_q)
        nonempty = [any(g.any() for g in brute(keep, q0, q1, k0, min(k0 + step, n_kv), seed=k0))
                    for k0 in range(0, n_kv, step)]
        got = key_tiles(classifier(keep), q0, q1, n_kv, step)
    else:  # columns [k0, k1) fixed, walk the query tiles
        k0 = data.draw(st.integers(0, n_kv - 1)) // fixed_block * fixed_block
        k1 = min(k0 + fixed_block, n_kv)
        nonempty = [any(g.any() for g in brute(keep, m0, min(m0 + step, n_q), k0, k1, seed=m0))
                    for m0 in range(0, n_q, step)]
        got = query_tiles(classifier(keep), k0, k1, n_q, step)
    _check_span(name, got, nonempty)


def test_causal_key_tiles_stop_at_the_diagonal():
    """Causal with BLOCK_N = 16: query tile [32, 48) visits key tiles 0..2 of 8, a window 2..2."""
    assert key_tiles(classifier(CAUSAL), 32, 48, 128, 16) == range(0, 3)
    assert key_tiles(classifier(window(7)), 40, 48, 128, 16) == range(2, 3)
    assert key_tiles(classifier(KV > Q + 200), 0, 16, 128, 16) == range(0)
