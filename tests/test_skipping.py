"""Tile skipping: classes from predicates (against brute force), ranges from classes, kernels that
skip against the spec's eager oracle (forward and gradients), tensor-mask summaries, and their
invalidation when a mask changes in place."""

from __future__ import annotations

import gc
import math
import os

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fx_flash.codegen import launch, skipping, tiles
from fx_flash.codegen.spec import KV_IDX, N_KV, N_Q, Q_IDX, spec_from_text
from fx_flash.reference import spec_attention
from fx_flash.testing import dropout_keep_mask
from tests.numerics import poison_outputs, spec_call_against_reference

# Position-only predicates of the families the issue names, as the pass prints them.
FAMILIES = {
    "window": "(kv_idx <= q_idx) & (q_idx <= kv_idx + 40)",
    "prefix_lm": "(kv_idx <= 50) | (kv_idx <= q_idx)",
    "chunked": "Eq(floor(kv_idx/64), floor(q_idx/64))",
    "chunked_causal": "(kv_idx <= q_idx) & Eq(floor(kv_idx/48), floor(q_idx/48))",
    "bottom_right": "kv_idx + n_q <= n_kv + q_idx",
    "two_sided_band": "(kv_idx <= q_idx + 30) & (q_idx <= kv_idx + 30)",
    "causal_offset": "kv_idx <= q_idx + 7",
}


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    poison_outputs(monkeypatch)


def _keep(text: str):
    return spec_from_text(f"score=qk*scale; keep={text}").keep


def _truth(keep, n_q: int, n_kv: int) -> torch.Tensor:
    """The predicate on every element, (n_q, n_kv) bool, evaluated by sympy itself."""
    f = sympy.lambdify((Q_IDX, KV_IDX, N_Q, N_KV), keep, modules="numpy")
    i = torch.arange(n_q).reshape(-1, 1).expand(n_q, n_kv).numpy()
    j = torch.arange(n_kv).reshape(1, -1).expand(n_q, n_kv).numpy()
    return torch.as_tensor(f(i, j, n_q, n_kv)).expand(n_q, n_kv)


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), n_q=st.integers(1, 300), n_kv=st.integers(1, 300),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64, 128]))
def test_class_grid_is_sound_and_as_decided_as_each_tile(family, n_q, n_kv, bm, bn):
    """Every tile class_grid calls empty keeps no element and every full one keeps all; and it
    decides every tile the classifier decides on its own."""
    keep = _keep(FAMILIES[family])
    truth = _truth(keep, n_q, n_kv)
    classify = tiles.classifier(keep, n_q, n_kv)
    grid = tiles.class_grid(classify, n_q, n_kv, bm, bn)
    assert len(grid) == math.ceil(n_q / bm) and all(len(r) == math.ceil(n_kv / bn) for r in grid)
    for i, row in enumerate(grid):
        for j, c in enumerate(row):
            q0, q1, k0, k1 = i * bm, min((i + 1) * bm, n_q), j * bn, min((j + 1) * bn, n_kv)
            tile = truth[q0:q1, k0:k1]
            if c == skipping.EMPTY:
                assert not tile.any(), (family, i, j)
            elif c == skipping.FULL:
                assert tile.all(), (family, i, j)
            alone = classify(q0, q1, k0, k1)
            if alone != tiles.PARTIAL:
                assert c == {tiles.EMPTY: skipping.EMPTY, tiles.FULL: skipping.FULL}[alone]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 6), cols=st.integers(1, 9), lead=st.integers(1, 3),
       block=st.sampled_from([16, 32]))
def test_ranges_from_classes_against_brute_force(data, rows, cols, lead, block):
    """Per row: every non-empty tile lies in [lo, hi), [flo, fhi) is the first run of full tiles,
    bounds are clipped to n, the positional flag holds when every tile of [lo, hi) is positional;
    the order is a permutation by descending total work."""
    size = lead * rows * cols
    values = data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=size, max_size=size))
    classes = torch.tensor(values, dtype=torch.int8).reshape(lead, 1, rows, cols)
    positional = torch.tensor(data.draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(classes.shape)
    n = cols * block - data.draw(st.integers(0, block - 1))
    ranges, order = skipping.ranges_from_classes(classes, block, n, positional)
    assert ranges.shape == (lead, 1, rows, 5) and ranges.dtype == torch.int32
    assert not skipping.ranges_from_classes(classes, block, n)[0][..., 4].any()
    work = [0] * rows
    for z in range(lead):
        for r in range(rows):
            row = classes[z, 0, r].tolist()
            lo, flo, fhi, hi, flag = ranges[z, 0, r].tolist()
            nonempty = [j for j, c in enumerate(row) if c != 0]
            assert flag == all(positional[z, 0, r, j] for j in range(cols)
                               if nonempty and nonempty[0] <= j <= nonempty[-1])
            if not nonempty:
                assert (lo, hi) == (0, 0)
                continue
            assert lo == nonempty[0] * block and hi == min((nonempty[-1] + 1) * block, n)
            full = [j for j, c in enumerate(row) if c == 2]
            if not full:
                assert flo == fhi == hi
            else:
                end = full[0]
                while end < cols and row[end] == 2:
                    end += 1
                assert (flo, fhi) == (full[0] * block, min(end * block, n))
            work[r] += nonempty[-1] + 1 - nonempty[0]
    got = order.tolist()
    assert sorted(got) == list(range(rows))
    assert got == sorted(range(rows), key=lambda r: -work[r])


def _qkv(n_q, n_kv, d=16, h=2, b=1, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, h, n_q, d, requires_grad=True)
    k, v = (torch.randn(b, h, n_kv, d, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_position_predicates_skip_and_match_eager(family):
    """Each family through the kernels (forward, dQ, dK/dV each with their own tile tables),
    against the float64 oracle; the forward's table skips some key tiles."""
    n_q, n_kv = (200, 290) if family == "bottom_right" else (300, 300)
    q, k, v = _qkv(n_q, n_kv)
    text = f"score=qk*scale; keep={FAMILIES[family]}"
    spec = spec_from_text(text)
    assert spec.tile_mode == "ranged"
    spec_call_against_reference(text, q, k, v, [])
    tables = skipping.table_keywords(spec, [], [], q, k, "q")({"BLOCK_M": 16, "BLOCK_N": 32})
    lo, hi = tables["Ranges"][..., 0], tables["Ranges"][..., 3]
    assert ((hi - lo) < n_kv).any(), "no key tile was skipped"


def test_position_predicate_at_head_dim_64():
    """Square 64 x 64 tiles (d = 64 in the interpreter): a window over five tiles a side."""
    q, k, v = _qkv(300, 300, d=64)
    spec_call_against_reference(f"score=qk*scale; keep={FAMILIES['window']}", q, k, v, [])


def test_kernels_read_the_table(monkeypatch):
    """A table claiming every tile empty leaves every row without keys (output 0): the kernels
    take their ranges from the table, not from the whole matrix."""
    real = skipping.ranges_from_classes

    def nothing(classes, block, n, positional=None):
        ranges, order = real(classes, block, n, positional)
        return torch.zeros_like(ranges), order

    monkeypatch.setattr(skipping, "ranges_from_classes", nothing)
    q, k, v = _qkv(100, 100, seed=1)
    out = torch.ops.fx_flash.attention(q, k, v, [], 0.0, 0.25, False, "score=qk*scale; keep=kv_idx <= q_idx + 3")
    assert torch.equal(out, torch.zeros_like(out))


def test_finite_fill_position_predicate_skips_nothing_it_must_not():
    """fill = 0.0 (a weight that counts) with a window: empty tiles must run, full ones need no
    predicate; the result is eager's."""
    q, k, v = _qkv(250, 250, seed=2)
    spec_call_against_reference(f"score=qk*scale; keep={FAMILIES['window']}; fill=0.0", q, k, v, [])


# ---- tensor masks -------------------------------------------------------------------------------

PADDING = "score=qk*scale; keep=Ne(t0, 0); fill=-3.4028234663852886e+38; t0=float[b, kv_idx]"
CAUSAL_PADDING = "score=qk*scale; keep=t0 & (kv_idx <= q_idx); fill=-3.4028234663852886e+38; t0=bool[b, kv_idx]"
DOCUMENTS = "score=qk*scale; keep=Eq(t0, t1); t0=int[kv_idx]; t1=int[q_idx]"
BOOL_MASK = "score=qk*scale; keep=t0; t0=bool[b, 0, q_idx, kv_idx]"


def test_right_padding_summary_skips_padded_keys():
    """HF padding (finite fill, per-batch lengths): tiles past each sequence's length are empty,
    the table of each batch stops at its length; the result is eager's."""
    q, k, v = _qkv(260, 260, b=2, seed=3)
    lengths = [100, 260]
    mask = (torch.arange(260)[None, :] < torch.tensor(lengths)[:, None]).float()
    spec_call_against_reference(PADDING, q, k, v, [mask])
    spec = spec_from_text(PADDING)
    tables = skipping.table_keywords(spec, [mask], launch._operand_args(spec, [mask]), q, k, "q")(
        {"BLOCK_M": 32, "BLOCK_N": 32})
    ranges = tables["Ranges"]
    assert ranges.shape[:2] == (2, 1)  # one table per batch, heads broadcast
    assert ranges[0, 0, :, 3].max().item() == 128 and ranges[1, 0, :, 3].max().item() == 260


def test_left_padding_rows_with_no_key_keep_eager_semantics():
    """Left padding under a causal mask with a finite fill: the first rows keep no key and
    average every key uniformly, as eager does; their query tiles must not skip."""
    q, k, v = _qkv(200, 200, b=2, seed=4)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0, :70] = False
    spec_call_against_reference(CAUSAL_PADDING, q, k, v, [mask])


@pytest.mark.parametrize("dq", ["separate", "atomic"])
def test_finite_fill_ragged_tiles_in_both_dq_paths(dq, monkeypatch):
    """The dK/dV kernel writes no -inf outside the tensors for finite fills: ragged key and
    query tiles (N = 77 × 150) with wholly filled rows must still give eager's gradients, with
    dQ from its own pass or summed by the dK/dV kernel's atomics."""
    monkeypatch.setenv("FX_FLASH_DQ", dq)
    q, k, v = _qkv(77, 150, b=2, seed=6)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[0, :90] = False  # query rows < 90 of batch 0 keep no key under the causal part
    spec_call_against_reference(CAUSAL_PADDING, q, k, v, [mask])


def test_document_ids_summary():
    """Packed documents compared as tensors (t0[kv] == t1[q]): blocks off the diagonal skipped."""
    q, k, v = _qkv(300, 300, seed=5)
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([40, 100, 60, 100]))
    spec_call_against_reference(DOCUMENTS, q, k, v, [doc, doc])
    spec = spec_from_text(DOCUMENTS)
    tables = skipping.table_keywords(spec, [doc, doc], launch._operand_args(spec, [doc, doc]), q, k, "kv")(
        {"BLOCK_M": 32, "BLOCK_N": 32})
    lo, hi = tables["Ranges"][..., 0], tables["Ranges"][..., 3]
    assert ((hi - lo) < 300).all()


def test_bool_mask_with_empty_full_and_partial_tiles():
    """A user's (B, 1, Nq, Nk) bool mask with whole empty and full blocks, random ones, and rows
    that keep nothing (-inf fill: output 0 there)."""
    torch.manual_seed(6)
    q, k, v = _qkv(180, 230, b=2, seed=6)
    mask = torch.rand(2, 1, 180, 230) > 0.5
    mask[:, :, :64, :96] = False
    mask[:, :, 64:128, :] = True
    mask[1, :, 150:160, :] = False
    out = spec_call_against_reference(BOOL_MASK, q, k, v, [mask])
    assert torch.equal(out[1, :, 150:160], torch.zeros_like(out[1, :, 150:160]))


def test_mask_changed_in_place_is_summarized_again():
    """The summary is cached for a tensor; an in-place change (its version counter) recomputes it.
    A stale summary would skip the tiles the second call keeps."""
    q, k, v = _qkv(200, 200, b=1, seed=7)
    mask = torch.zeros(1, 200, dtype=torch.bool)
    mask[:, :50] = True
    text = "score=qk*scale; keep=t0; t0=bool[b, kv_idx]"
    spec_call_against_reference(text, q, k, v, [mask])
    mask[:, :] = True  # in place: same storage, new version
    spec_call_against_reference(text, q, k, v, [mask])


def test_summary_cache_hits_for_the_same_tensor_and_dies_with_it():
    """A second call with the same, unchanged mask reuses its summary; the entry holds only a weak
    reference, so it cannot outlive the mask's storage."""
    spec = spec_from_text("score=qk*scale; keep=t0; t0=bool[b, kv_idx]")
    q, k, _ = _qkv(64, 64, seed=8)
    mask = torch.ones(1, 64, dtype=torch.bool)
    args = launch._operand_args(spec, [mask])
    first = skipping._tensor_classes(spec, [mask], args, 1, 2, 64, 64, 16, 16, q.device)
    again = skipping._tensor_classes(spec, [mask], args, 1, 2, 64, 64, 16, 16, q.device)
    assert again is first
    mask.logical_not_()
    assert skipping._tensor_classes(spec, [mask], args, 1, 2, 64, 64, 16, 16, q.device) is not first
    del mask, args
    gc.collect()
    assert all(r() is None for r in first.refs)


def test_dropout_draws_the_same_mask_when_tiles_are_skipped():
    """Dropout with a window: the kernels' output equals the oracle given the kernels' keep-mask
    for the whole matrix (skipping changes no element's bit)."""
    q, k, v = (t.detach() for t in _qkv(300, 300, seed=9))
    spec = spec_from_text(f"score=qk*scale; keep={FAMILIES['window']}; dropout")
    seed = torch.tensor([11], dtype=torch.int64)
    out, _ = launch.attention_forward(q, k, v, [], seed, 0.3, 0.25, spec)
    keep = dropout_keep_mask(seed, (1, 2, 300, 300), 0.3)
    exact = spec_attention(q.double(), k.double(), v.double(), [], spec, 0.25, 0.3, dropout_keep=keep)
    torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=1e-4)


def test_split_kv_decoding_merges_rows_filled_with_finfo_min():
    """Decoding (one query, keys split across programs) where a batch's every key is padded with
    finfo.min: the splits' maxima and sums merge exactly into the uniform average eager gives."""
    q, k, v = _qkv(1, 600, b=1, h=1, seed=10)
    assert launch.decode_plan(q, k)[0] > 1  # the split-KV path runs
    mask = torch.zeros(1, 600)
    out = spec_call_against_reference(PADDING, q, k, v, [mask])
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0), atol=1e-5, rtol=1e-5)


def test_capture_makes_tables_on_the_device_and_caches_nothing(monkeypatch):
    """While a CUDA graph is captured (reported here by a patched check), even a position mask's
    table comes from the device summary kernel, equals the host classification's, and no cache
    gains an entry (a cached table could be freed while the graph replays)."""
    spec = spec_from_text(f"score=qk*scale; keep={FAMILIES['window']}")
    q, k, _ = _qkv(300, 300, seed=12)
    meta = {"BLOCK_M": 16, "BLOCK_N": 32}
    host = skipping.table_keywords(spec, [], [], q, k, "kv")(meta)
    sizes = len(skipping._POSITIONAL), len(skipping._SUMMARIES)
    monkeypatch.setattr(skipping, "capturing", lambda: True)
    captured = skipping.table_keywords(spec, [], [], q, k, "kv")(meta)
    assert (len(skipping._POSITIONAL), len(skipping._SUMMARIES)) == sizes
    assert captured["Ranges"] is not host["Ranges"]
    assert torch.equal(captured["Ranges"], host["Ranges"]) and torch.equal(captured["Order"], host["Order"])


_RELATION = st.tuples(st.sampled_from([-1, 0, 1]), st.sampled_from([-1, 1]), st.integers(-150, 150))


@settings(max_examples=int(os.environ.get("FX_FLASH_EXAMPLES", "30")), deadline=None)
@given(relations=st.lists(_RELATION, min_size=1, max_size=3), any_of=st.booleans(),
       n_q=st.integers(1, 160), n_kv=st.integers(1, 200))
def test_random_affine_predicates_through_the_kernels(relations, any_of, n_q, n_kv):
    """And/Or of up to three relations a·q_idx + b·kv_idx + c <= 0, random lengths: the ranged
    kernels (forward and gradients, rows that keep nothing included) agree with the oracle."""
    def term(a, b, c):
        q = {-1: " - q_idx", 0: "", 1: " + q_idx"}[a]
        return f"({'kv_idx' if b == 1 else '-kv_idx'}{q} {'+' if c >= 0 else '-'} {abs(c)} <= 0)"

    keep = (" | " if any_of else " & ").join(term(*r) for r in relations)
    text = f"score=qk*scale; keep={keep}"
    spec = spec_from_text(text)
    if spec.tile_mode != "ranged":  # the relations simplified to true, false or exactly causal
        return
    q, k, v = _qkv(n_q, n_kv, seed=n_q * 1000 + n_kv)
    spec_call_against_reference(spec.text, q, k, v, [])


@settings(max_examples=int(os.environ.get("FX_FLASH_EXAMPLES", "15")), deadline=None)
@given(data=st.data(), n_q=st.integers(1, 150), n_kv=st.integers(1, 170),
       fill=st.sampled_from(["", "; fill=-3.4028234663852886e+38", "; fill=-10000.0", "; fill=0.0"]),
       causal=st.booleans())
def test_random_block_masks_with_every_fill(data, n_q, n_kv, fill, causal):
    """A (B, 1, Nq, Nk) bool mask made of random blocks (whole tiles empty or full, some random,
    rows keeping nothing), optionally with causal, under each kind of fill: the summary-driven
    skipping agrees with the oracle, gradients included."""
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    block = data.draw(st.sampled_from([8, 16, 32]))
    tiles = torch.randint(0, 3, (2, 1, -(-n_q // block), -(-n_kv // block)), generator=gen)
    dense = tiles.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :n_q, :n_kv]
    mask = torch.where(dense == 2, torch.rand(2, 1, n_q, n_kv, generator=gen) > 0.5, dense == 1)
    keep = "t0 & (kv_idx <= q_idx)" if causal else "t0"
    text = f"score=qk*scale; keep={keep}{fill}; t0=bool[b, 0, q_idx, kv_idx]"
    q, k, v = _qkv(n_q, n_kv, b=2, seed=seed)
    spec_call_against_reference(spec_from_text(text).text, q, k, v, [mask])


def test_gqa_with_a_per_head_mask_reads_each_query_heads_table():
    """GQA (4 query heads on 2 K/V heads) with a (H, Nq, Nk) mask that differs per query head: the
    summary keeps the head axis, and the dK/dV kernel, which loops over the query heads of one K/V
    head, reads each one's ranges."""
    torch.manual_seed(13)
    q = torch.randn(1, 4, 150, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 170, 16, requires_grad=True) for _ in range(2))
    i, j = torch.arange(150)[:, None], torch.arange(170)[None, :]
    mask = torch.stack([(j <= i) & (i - j < 20 + 40 * h) for h in range(4)])  # per-head windows
    spec = spec_from_text("score=qk*scale; keep=t0; t0=bool[h, q_idx, kv_idx]")
    assert skipping.lead_extent(spec, 1, 4) == (1, 4)
    spec_call_against_reference(spec.text, q, k, v, [mask], gqa=True)


@pytest.mark.parametrize("case", ["window", "causal_padding"])
def test_dropout_backward_with_skipped_tiles(case):
    """Dropout with a window, and with transformers' causal padding mask (positional key tiles
    beside classified ones), forward and backward through the launch layer with one seed: the
    gradients equal the oracle's given the kernels' keep-mask (the backward's kernels skip the
    same tiles and draw the same bits)."""
    q, k, v = (t.detach() for t in _qkv(200, 200, b=2, seed=14))
    if case == "window":
        spec, operands = spec_from_text(f"score=qk*scale; keep={FAMILIES['window']}; dropout"), []
    else:
        spec, operands = spec_from_text(CAUSAL_PADDING + "; dropout"), [torch.arange(200) < torch.tensor([[130], [200]])]
    seed = torch.tensor([5], dtype=torch.int64)
    out, lse = launch.attention_forward(q, k, v, operands, seed, 0.2, 0.25, spec)
    dout = torch.randn_like(out)
    dq, dk, dv, _ = launch.attention_backward(dout, q, k, v, out, lse, operands, seed, 0.2, 0.25, spec)
    keep = dropout_keep_mask(seed, (2, 2, 200, 200), 0.2)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact = spec_attention(*leaves, operands, spec, 0.25, 0.2, dropout_keep=keep)
    grads = torch.autograd.grad(exact, leaves, dout.double())
    for got, want in zip((dq, dk, dv), grads):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4)


def test_atomic_dq_with_skipped_tiles(monkeypatch):
    """FX_FLASH_DQ=atomic: dQ summed by the dK/dV kernel, which visits only its table's query
    tiles; a prefix-LM mask's gradients still equal the oracle's."""
    monkeypatch.setenv("FX_FLASH_DQ", "atomic")
    q, k, v = _qkv(220, 260, seed=15)
    spec_call_against_reference(f"score=qk*scale; keep={FAMILIES['prefix_lm']}", q, k, v, [])


# ---- positional key tiles (the template's note on the dK/dV loop) -----------------------------

CAUSAL_DOCUMENTS = "score=qk*scale; keep=Eq(t0, t1) & (kv_idx <= q_idx); t0=int[kv_idx]; t1=int[q_idx]"


def _dkdv_flags(text, operands, q, k, block_m=32, block_n=32):
    """The positional flags of the dK/dV kernel's table, (Zr, Hr, key tiles)."""
    spec = spec_from_text(text)
    tables = skipping.table_keywords(spec, operands, launch._operand_args(spec, operands), q, k, "kv")(
        {"BLOCK_M": block_m, "BLOCK_N": block_n})
    return tables["Ranges"][..., 4]


def test_positional_part_of_a_keep_predicate():
    """The positional conjuncts, only beside conjuncts that read tensors."""
    def part(text):
        found = spec_from_text(text).positional_keep
        return None if found is None else str(found)

    assert part(CAUSAL_PADDING) == "kv_idx <= q_idx"
    assert part(CAUSAL_DOCUMENTS) == "kv_idx <= q_idx"
    assert part(DOCUMENTS) is None  # tensors only
    assert part(f"score=qk*scale; keep={FAMILIES['window']}") is None  # positions only
    assert part("score=qk*scale; keep=t0 | (kv_idx <= q_idx); t0=bool[b, kv_idx]") is None  # not a conjunct


def test_positional_flags_follow_the_padding():
    """Right padding in batch 0 (keys from 100 on), none in batch 1: every key tile of batch 1 is
    positional, and in batch 0 those wholly before the padding; the tile holding key 100 is not
    (the mask drops keys the causal part keeps)."""
    q, k, v = _qkv(192, 192, b=2, seed=16)
    mask = torch.arange(192) < torch.tensor([[100], [192]])
    flags = _dkdv_flags(CAUSAL_PADDING, [mask], q, k)
    assert flags.shape == (2, 1, 6)
    assert flags[1, 0].tolist() == [1] * 6
    assert flags[0, 0, :3].tolist() == [1, 1, 1] and flags[0, 0, 3] == 0
    spec_call_against_reference(CAUSAL_PADDING, q, k, v, [mask])


def test_one_dropped_element_in_a_diagonal_tile_is_not_positional():
    """A mask equal to causal but for one element inside a diagonal tile: that key tile's flag is
    0 and the gradients are eager's (read as positional, the element would count)."""
    q, k, v = _qkv(96, 96, seed=17)
    mask = torch.ones(1, 1, 96, 96, dtype=torch.bool)
    mask[0, 0, 40, 35] = False  # below the diagonal, in key tile 1 (keys 32..63)
    text = "score=qk*scale; keep=t0 & (kv_idx <= q_idx); t0=bool[b, 0, q_idx, kv_idx]"
    assert _dkdv_flags(text, [mask], q, k)[0, 0].tolist() == [1, 0, 1]
    spec_call_against_reference(text, q, k, v, [mask])


def test_rows_that_keep_no_key_are_not_positional():
    """Left padding with a finite fill: query rows before the first real key average their fills,
    so no key tile whose query tiles hold such rows may drop the fill; -inf fills may."""
    q, k, v = _qkv(128, 128, b=1, seed=18)
    mask = (torch.arange(128) >= 40)[None]
    assert _dkdv_flags(CAUSAL_PADDING, [mask], q, k)[0, 0].tolist() == [0, 0, 0, 0]
    minus_inf = CAUSAL_PADDING.replace("; fill=-3.4028234663852886e+38", "")
    # Key tile 0 is all padding (no query tile to walk); tile 1 holds keys 32..39, padded.
    assert _dkdv_flags(minus_inf, [mask], q, k)[0, 0].tolist() == [1, 0, 1, 1]
    spec_call_against_reference(CAUSAL_PADDING, q, k, v, [mask])
    spec_call_against_reference(minus_inf, q, k, v, [mask])


def test_the_dkdv_kernel_reads_the_positional_flag(monkeypatch):
    """Flags forced on where the padding drops keys: dK/dV read the mask as causal alone and
    differ from eager (the kernel takes the positional walk from the flag), while the forward,
    whose table carries no flags, still matches it."""
    real = skipping.ranges_from_classes

    def all_positional(classes, block, n, positional=None):
        ranges, order = real(classes, block, n, positional)
        if positional is not None:
            ranges[..., 4] = 1
        return ranges, order

    monkeypatch.setattr(skipping, "ranges_from_classes", all_positional)
    q, k, v = _qkv(256, 256, seed=19)  # whole key tiles: a ragged one reads the whole predicate anyway
    mask = (torch.arange(256) < 50)[None]
    spec = spec_from_text(CAUSAL_PADDING)
    out, lse = launch.attention_forward(q.detach(), k.detach(), v.detach(), [mask], None, 0.0, 0.3, spec)
    dout = torch.randn_like(out)
    _, dk, _, _ = launch.attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, [mask], None, 0.0,
                                            0.3, spec)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = spec_attention(*leaves, [mask], spec, 0.3, 0.0)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    want_dk = torch.autograd.grad(exact, leaves[1], dout.double())[0]
    assert (dk.double() - want_dk)[..., 50:, :].abs().max() > 1e-3  # padded keys got gradients


@pytest.mark.parametrize("case", ["causal_padding", "causal_documents", "minus_inf", "ragged", "gqa"])
def test_positional_key_tiles_match_eager(case):
    """Positional key tiles beside classified ones, through every kernel against the float64
    oracle: transformers' padding mask with one batch padded, causal documents, a -inf fill,
    ragged tails (N = 77 x 150), GQA with a per-head mask."""
    if case == "causal_padding":
        q, k, v = _qkv(150, 150, b=2, seed=20)
        spec_call_against_reference(CAUSAL_PADDING, q, k, v, [torch.arange(150) < torch.tensor([[110], [150]])])
    elif case == "causal_documents":
        q, k, v = _qkv(200, 200, seed=21)
        doc = torch.repeat_interleave(torch.arange(3), torch.tensor([64, 70, 66]))
        # Documents [0, 64), [64, 134), [134, 200): key tiles 2-4 reach query tile 4, where a
        # document starts at row 134 (the causal part keeps keys of the one before).
        assert _dkdv_flags(CAUSAL_DOCUMENTS, [doc, doc], q, k)[0, 0].tolist() == [1, 1, 0, 0, 0, 1, 1]
        spec_call_against_reference(CAUSAL_DOCUMENTS, q, k, v, [doc, doc])
    elif case == "minus_inf":
        q, k, v = _qkv(150, 150, b=2, seed=22)
        text = CAUSAL_PADDING.replace("; fill=-3.4028234663852886e+38", "")
        spec_call_against_reference(text, q, k, v, [torch.arange(150) < torch.tensor([[90], [150]])])
    elif case == "ragged":
        q, k, v = _qkv(77, 150, b=2, seed=23)
        spec_call_against_reference(CAUSAL_PADDING, q, k, v, [torch.arange(150) < torch.tensor([[150], [120]])])
    else:
        torch.manual_seed(24)
        q = torch.randn(1, 4, 150, 16, requires_grad=True)
        k, v = (torch.randn(1, 2, 150, 16, requires_grad=True) for _ in range(2))
        mask = torch.ones(4, 150, dtype=torch.bool)
        mask[1, 100:] = False  # one query head's keys padded: its K/V head's other head is positional
        text = "score=qk*scale; keep=t0 & (kv_idx <= q_idx); t0=bool[h, kv_idx]"
        spec_call_against_reference(text, q, k, v, [mask], gqa=True)
