"""The Gluon sm90 forward (fx_flash/codegen/gluon.py, gluon_launch.py) without a GPU: what it renders
for each spec kind, which specs and calls it refuses, the tile it picks from shared memory M, that
every call it cannot take still runs the portable kernels, and that the rendered kernels compile for
sm_90 with wgmma and TMA and use exactly the shared memory the footprint model says."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import expecttest
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fx_flash.codegen import gluon_launch
from fx_flash.codegen.generate import BINDINGS, raw_factor
from fx_flash.codegen.gluon import GluonPrinter, _keep_sign, _score_lines, render_gluon, unsupported
from fx_flash.codegen.spec import sdpa_spec, spec_from_text
from fx_flash.device import DeviceProfile
from tests import test_kernels
from tests.gluon_kinds import KINDS
from tests.numerics import poison_outputs

ROOT = Path(__file__).resolve().parents[1]
H200 = DeviceProfile("NVIDIA H200", shared_memory=232448, multiprocessors=132, capability=(9, 0))
CAUSAL = "score=qk*scale; keep=kv_idx <= q_idx"
SOFTCAP = "score=50*tanh(qk*scale/50); keep=kv_idx <= q_idx"
WINDOW = "score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx <= kv_idx + 1023)"
PREFIX_LM = "score=qk*scale; keep=(kv_idx <= q_idx) | (kv_idx < 64)"
# Reads the head and the key length: the printer's bindings of b, h, n_kv reach the kernel.
HEAD_AND_LENGTH = "score=qk*scale + h; keep=kv_idx < n_kv - 3"


class TestRendered(expecttest.TestCase):
    def test_plain_score_is_one_multiply_and_no_predicate(self):
        """Plain attention: s = qk·(scale·log2 e), and no keep-predicate anywhere (MASK 0)."""
        src = render_gluon(sdpa_spec())
        self.assertIn("MASK = gl.constexpr(0)", src)
        self.assertExpectedInline(_score_lines(sdpa_spec()), """s = qk*qk_scale""")

    def test_causal_masks_only_band_tiles(self):
        """Causal: the predicate on the band tiles only (MASK 1; interior tiles hold it)."""
        spec = spec_from_text(CAUSAL)
        self.assertIn("MASK = gl.constexpr(1)", render_gluon(spec))
        self.assertExpectedInline(_score_lines(spec), """\
s = qk*qk_scale
if PREDICATE:
    s = gl.where((offs_n[None, :] <= offs_m[:, None]), s, float("-inf"))""")

    def test_softcap_has_a_gluon_tanh(self):
        """Soft-capping: tanh through exp2 (Gluon has no tanh or sigmoid), log2 e outside it."""
        self.assertExpectedInline(_score_lines(spec_from_text(SOFTCAP)), """\
s = 50*LOG2E*(1.0 - 2.0 / (gl.exp2(2.8853900817779268 * (qk*sm_scale/50)) + 1.0))
if PREDICATE:
    s = gl.where((offs_n[None, :] <= offs_m[:, None]), s, float("-inf"))""")

    def test_row_max_before_the_factor_where_the_score_is_qk_times_it(self):
        """A score qk·f with f of the scale and positive constants: the tile's s is qk itself,
        masked; the row max is taken of it and multiplied by f, the exponent is one multiply-add
        (gluon's note on the row max). Other scores keep s scaled."""
        self.assertEqual(str(raw_factor(sdpa_spec())), "qk_scale")
        self.assertEqual(str(raw_factor(spec_from_text("score=qk*0.1; keep=kv_idx <= q_idx"))), "0.1*LOG2E")
        for text in (SOFTCAP, HEAD_AND_LENGTH, "score=-qk*scale", "score=qk*scale + 0.5*(kv_idx - q_idx)",
                     "score=qk*scale; keep=kv_idx <= q_idx; fill=-3.4028234663852886e+38"):  # a finite fill
            self.assertIsNone(raw_factor(spec_from_text(text)), text)
        self.assertExpectedInline(_score_lines(spec_from_text(CAUSAL), raw=True), """\
s = qk
if PREDICATE:
    s = gl.where((offs_n[None, :] <= offs_m[:, None]), s, float("-inf"))""")
        src = render_gluon(spec_from_text(CAUSAL))
        self.assertIn("m_new = gl.maximum(m_i, gl.max(s, 1) * (qk_scale))", src)
        self.assertIn("p = gl.exp2(s * (qk_scale) - m_safe[:, None])", src)
        scaled = render_gluon(spec_from_text(CAUSAL), raw_max=False)
        self.assertIn("s = qk*qk_scale", scaled)
        self.assertIn("p = gl.exp2(s - m_safe[:, None])", scaled)
        self.assertIn("p = gl.exp2(s - m_safe[:, None])", render_gluon(spec_from_text(SOFTCAP)))

    def test_window_keeps_its_lower_bound_on_interior_tiles(self):
        """A causal window: band tiles apply the whole predicate, interior ones its other half."""
        self.assertExpectedInline(_score_lines(spec_from_text(WINDOW)), """\
s = qk*qk_scale
if PREDICATE:
    s = gl.where(((offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] <= offs_n[None, :] + 1023)), s, float("-inf"))
else:
    s = gl.where((offs_m[:, None] <= offs_n[None, :] + 1023), s, float("-inf"))""")

    def test_non_causal_predicate_applies_on_every_tile(self):
        """A predicate that is not causal (prefix-LM) is applied on every tile (MASK 2)."""
        spec = spec_from_text(PREFIX_LM)
        self.assertFalse(spec.causal)
        self.assertIn("MASK = gl.constexpr(2)", render_gluon(spec))

    def test_header_names_the_spec(self):
        """Generated files say they are generated and name their spec and key."""
        spec = spec_from_text(SOFTCAP)
        head = render_gluon(spec).splitlines()[:3]
        self.assertEqual(head[1], f"# spec: {spec.describe()}")
        self.assertEqual(head[2], f"# spec key: {spec.key}")

    def test_no_triton_spelling_is_left(self):
        """Every function the printers emit has its Gluon name (gl.*, never tl.*)."""
        for text in (CAUSAL, SOFTCAP, WINDOW, PREFIX_LM, HEAD_AND_LENGTH, "score=sigmoid(qk*scale)",
                     "score=qk*scale*2**(-h/4)", "score=Abs(qk)*scale"):
            src = render_gluon(spec_from_text(text))
            assert "tl." not in src, text


@pytest.mark.parametrize("text, reason", [
    ("score=qk*scale + t0; t0=float[h, q_idx, kv_idx]", "operands"),
    ("score=qk*scale; keep=t0; t0=bool[b, 0, 0, kv_idx]", "operands"),
    ("score=qk*scale; dropout", "dropout"),
    ("score=qk*scale; keep=kv_idx <= q_idx; fill=-10000.0", "finite fill"),
    ("score=qk*scale*1e40", "log2"),  # a constant that log2 e would push past fp32
    ("score=sin(qk)*scale", "sin"),  # no printer has a form for it
])
def test_unsupported_specs_are_refused(text, reason):
    """Specs the Gluon kernel cannot compute exactly get a reason (they run the portable kernels)."""
    assert reason in (unsupported(spec_from_text(text)) or "")


@pytest.mark.parametrize("text", ["score=qk*scale", CAUSAL, SOFTCAP, WINDOW, PREFIX_LM, HEAD_AND_LENGTH])
def test_supported_specs(text):
    assert unsupported(spec_from_text(text)) is None


def test_tiles_fit_shared_memory_by_construction():
    """The tile is the deepest ring of 128-key tiles that fits M (64-key tiles when none does),
    and no tile at all when even that does not fit."""
    assert gluon_launch.default_config(H200, 128, 2) == gluon_launch.GluonConfig(128, 128, 3)
    assert gluon_launch.default_config(H200, 64, 2) == gluon_launch.GluonConfig(128, 128, 4)
    # The warp-specialized kernel at d = 128: three 128-key stages still fit the H200's M.
    assert gluon_launch.default_config(H200, 128, 2, ws=True) == gluon_launch.GluonConfig(128, 128, 3, ws=True)
    # The routed, persistent one too: its Q empty barriers take the place of the ping-pong's turn barriers.
    assert gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND) == gluon_launch.GluonConfig(
        128, 128, 3, ws=True, persistent=True)
    ada = DeviceProfile("ada", 101376, 1, (8, 9))  # M too small for two 128-key stages at d = 128
    assert gluon_launch.default_config(ada, 128, 2) == gluon_launch.GluonConfig(128, 64, 2)
    assert gluon_launch.default_config(DeviceProfile("small", 48 * 1024, 1, (9, 0)), 128, 2) is None
    for device in (H200, ada):
        for d in gluon_launch.HEAD_DIMS:
            for ws in (False, True):
                cfg = gluon_launch.default_config(device, d, 2, ws)
                assert gluon_launch.footprint(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES, cfg.ws) <= device.shared_memory


def test_footprint_counts_each_buffer():
    """Q tile, STAGES K and V tiles, and 16-byte aligned barrier arrays (one more stage adds two
    tiles and, past a 16-byte boundary, two barrier slots)."""
    assert gluon_launch.footprint(128, 128, 128, 2, 2) == 2 * (128 * 128 + 2 * 2 * 128 * 128) + 8 + 2 * 16
    assert gluon_launch.footprint(128, 128, 128, 2, 3) - gluon_launch.footprint(128, 128, 128, 2, 2) == (
        2 * 2 * 128 * 128 + 2 * 16)


def test_persistent_config_rules():
    """The persistent kernel is a warp-specialized one; its ping-pong (named barriers) takes two
    or three consumers, the one-tile kernel's (mbarriers) two; one_section orders only its tiles,
    and only it has three consumers, the epilogue by reciprocals, two Q buffers and the balanced
    order."""
    gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True, one_section=True)
    gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True, pingpong=True)
    gluon_launch.GluonConfig(192, 128, 3, ws=True, persistent=True, pingpong=True, consumers=3,
                             fast_epilogue=True, q_buffers=2, balanced=True)
    for bad in (dict(persistent=True), dict(ws=True, pingpong=True, consumers=3),
                dict(pingpong=True), dict(ws=True, one_section=True),
                dict(ws=True, consumers=3), dict(ws=True, persistent=True, consumers=4),
                dict(ws=True, fast_epilogue=True), dict(ws=True, q_buffers=2),
                dict(ws=True, persistent=True, q_buffers=3), dict(ws=True, balanced=True)):
        with pytest.raises(ValueError):
            gluon_launch.GluonConfig(128, 128, 3, **bad)


def test_a_scale_not_above_zero_takes_the_max_after_it(monkeypatch):
    """The row max before the factor needs f > 0 (gluon's note on the row max): a call whose scale
    is 0 or negative, a score without such a factor, or raw_max off loads the module with the max
    after the scale; a constant factor needs no scale."""
    loaded = []
    monkeypatch.setattr(gluon_launch, "load", lambda spec, raw_max=True, **options: loaded.append(raw_max) or type(
        "M", (), {"_attn_fwd_sm90_wsp": "kernel"}))
    monkeypatch.setattr(gluon_launch, "device_profile", lambda device: H200)
    q = torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16, device="meta")
    cfg = gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND)
    constant = spec_from_text("score=qk*0.1")
    for spec, scale, config, raw in ((sdpa_spec(), 0.1, cfg, True), (sdpa_spec(), -0.1, cfg, False),
                                     (sdpa_spec(), 0.0, cfg, False), (sdpa_spec(), float("nan"), cfg, False),
                                     (spec_from_text(SOFTCAP), 0.1, cfg, False),
                                     (sdpa_spec(), 0.1, replace(cfg, raw_max=False), False),
                                     (constant, -1.0, cfg, True)):
        loaded.clear()
        gluon_launch.forward_launch(spec, q, q, scale, config)
        assert loaded == [raw], (spec.text, scale, config)


SIGN_FORMS = [  # keep-predicates with a sign form (gluon's note on the mask as a sign)
    "kv_idx <= q_idx", "kv_idx < q_idx", "q_idx >= kv_idx + 3", "(kv_idx <= q_idx) | (kv_idx < 64)",
    "(kv_idx <= q_idx) & (q_idx - kv_idx < 256)", "kv_idx < n_kv - 3", "(q_idx > kv_idx) & (kv_idx >= h)",
    "~(kv_idx > q_idx)", "kv_idx - n_kv < q_idx - n_q", "kv_idx + q_idx < n_q", "kv_idx < 2**31"]
NO_SIGN_FORMS = ["Eq(kv_idx, q_idx)", "kv_idx*q_idx < 4096", "kv_idx < 2**32", "3*kv_idx <= q_idx",
                 "kv_idx + q_idx + n_q < n_kv", "n_kv > n_q"]


def _keep(text):
    """The keep-predicate ``text`` as the spec's parser reads it."""
    return spec_from_text(f"score=qk*scale; keep={text}").keep


def _evaluate(text, dtype, offs_m, offs_n):
    """A printed tile expression at these query and key indices (lengths and the head fixed)."""
    env = dict(offs_m=offs_m.to(dtype), offs_n=offs_n.to(dtype), off_z=3, off_h=5, size_q=2 ** 30 - 1,
               size_kv=2 ** 30 - 1)
    return eval(text, env)


@pytest.mark.parametrize("text", SIGN_FORMS)
def test_keep_sign_is_negative_exactly_where_the_predicate_fails(text):
    """The sign form of a keep-predicate (gluon._keep_sign), computed in int32 as the kernel does, is
    negative exactly where the predicate, printed as gl.where takes it and evaluated in int64, fails:
    near 0, around the diagonal, and near the largest index the launcher lets through."""
    printer = GluonPrinter(BINDINGS["mn"])
    d_text = _keep_sign(_keep(text), printer)
    assert d_text is not None, text
    top = gluon_launch.INDEX_LIMIT - 1
    for values in (torch.arange(0, 300), torch.arange(top - 299, top + 1),
                   torch.tensor([0, 1, 2, 63, 64, 255, 256, top - 1, top])):
        keep = _evaluate(printer.doprint(_keep(text)), torch.int64, values, values)
        d = _evaluate(d_text, torch.int32, values, values)
        assert d.dtype == torch.int32
        assert torch.equal(torch.broadcast_to(d < 0, keep.shape), ~keep), text


@pytest.mark.parametrize("text", NO_SIGN_FORMS)
def test_keep_sign_refuses_what_it_cannot_bound(text):
    """Equalities, products of indices, differences that could leave int32 (gluon._fits_int32) and
    predicates of lengths alone have no sign form: those keep gl.where."""
    assert _keep_sign(_keep(text), GluonPrinter(BINDINGS["mn"])) is None, text


def test_sign_mask_renders_the_sign_form_where_it_has_one():
    """With sign_mask the forward applies its predicate by _drop_negative (interior tiles' rest of
    it too); without it, and for a predicate without a sign form, by gl.where; the backward keeps
    gl.where."""
    window = spec_from_text("score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx - kv_idx < 256)")
    assert render_gluon(window, sign_mask=True).count("s = _drop_negative(s, ") == 2
    assert "s = _drop_negative(s, " not in render_gluon(window)
    assert "s = _drop_negative(s, " not in _score_lines(window)
    product = spec_from_text("score=qk*scale; keep=kv_idx*q_idx < 4096")
    assert "s = gl.where(" in render_gluon(product, sign_mask=True)


def _lop3(a, b, c, lut):
    """PTX lop3.b32 on int64 tensors of 32-bit words: each result bit is lut's bit at a·4 + b·2 + c."""
    out = torch.zeros_like(a)
    for index in range(8):
        if lut >> index & 1:
            bits = ((a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c))
            out |= bits & 0xFFFFFFFF
    return out


def test_drop_negative_ptx_selects_minus_infinity_where_d_is_negative():
    """_drop_negative's PTX, run op by op on the CPU from the template's own text (shr.s32 by 31,
    then lop3 with its constant and table): bit for bit s where d >= 0 and -inf where d < 0, for
    every kind of float (signed zeros, infinities, NaN, subnormals) and d around 0 and int32's ends."""
    from fx_flash.codegen.gluon import GLUON_TEMPLATE

    found = re.search(r"shr\.s32 m, \$\$2, 31; lop3\.b32 \$\$0, \$\$1, m, (0x[0-9A-F]+), (0x[0-9A-F]+);",
                      GLUON_TEMPLATE)
    assert found, "the template's _drop_negative changed: this emulation must follow it"
    constant, lut = (int(x, 16) for x in found.groups())
    floats = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 1e-40, -3e38])
    s = floats.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for d in (0, 1, -1, 5, -7, 2 ** 31 - 1, -2 ** 31):
        spread = torch.full_like(s, -1 if d < 0 else 0) & 0xFFFFFFFF  # shr.s32 m, d, 31
        out = _lop3(s, spread, torch.full_like(s, constant), lut)
        want = (torch.full_like(floats, float("-inf")) if d < 0 else floats).view(torch.int32).to(torch.int64)
        assert torch.equal(out, want & 0xFFFFFFFF), d


def test_lengths_past_the_index_limit_are_refused(monkeypatch):
    """The sign form's bound holds for indices below 2^30: a longer call is refused by a kernel with
    sign_mask (and not for that reason by one without it, nor by the backward, which has no sign
    form: its configs pass the same check, which must not fail on them)."""
    from types import SimpleNamespace

    monkeypatch.setattr(gluon_launch, "interpreting", lambda: False)
    monkeypatch.setattr(gluon_launch, "device_profile", lambda device: H200)
    cfg = gluon_launch.default_config(H200, 64, 2, **gluon_launch.ROUTED_KIND)
    q = SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=torch.bfloat16, shape=(1, 1, 2 ** 30, 64))
    signed = replace(cfg, sign_mask=True)
    assert "2^30" in gluon_launch.unsupported_call(sdpa_spec(causal=True), q, q, q, signed)
    monkeypatch.setattr(gluon_launch, "tma_view", lambda t: None)  # (the next check's, reached without it)
    assert "2^30" not in gluon_launch.unsupported_call(sdpa_spec(causal=True), q, q, q, cfg)
    # the backward's configs go through the same checks (its predicate is never by its sign)
    for d in gluon_launch.BWD_ROUTED_HEAD_DIMS:
        bwd = gluon_launch.routed_backward_config(H200, sdpa_spec(causal=True), d, 2)
        assert "2^30" not in gluon_launch.unsupported_backward_call(sdpa_spec(causal=True), q, q, q, q, q, bwd)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64),
       st.floats(0.0009765625, 16.0, width=32))
def test_row_max_of_qk_times_f_is_the_max_of_the_products(qk, f):
    """Why the row max may come before the factor: fp32 rounding is monotone, so for f > 0 the
    rounded max(qk)·f is the max of the rounded products, bit for bit, and -inf stays -inf."""
    x = torch.tensor(qk + [float("-inf")], dtype=torch.float32)
    factor = torch.tensor(f, dtype=torch.float32)
    assert torch.equal(x.max() * factor, (x * factor).max())
    assert (x * factor)[-1] == float("-inf")


def test_heads_per_section():
    """Causal, a section holds whole groups of query heads (those reading one K/V head) whose K/V
    fit L2_SECTION_BYTES (32 MiB), and with the balanced table no more than make one round of the
    grid's output tiles; at least one group. One section of every head for the other orders, or
    with one_section."""
    persistent = gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True)
    balanced = gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True, balanced=True)
    one = gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True, one_section=True)
    causal = spec_from_text(CAUSAL)
    q = torch.empty(2, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    gqa_kv = torch.empty(2, 2, 8192, 128, dtype=torch.bfloat16, device="meta")
    # the kernel's own order: 8 heads of 4 MiB of K/V, 8 times as many when 8 query heads share a
    # K/V head, never more than there are
    assert gluon_launch.heads_per_section(causal, q, q, persistent, 132) == 8
    assert gluon_launch.heads_per_section(causal, q, gqa_kv, persistent, 132) == 32
    # the balanced table: 64 output tiles a head, so two heads make a round of 132 programs
    assert gluon_launch.heads_per_section(causal, q, q, balanced, 132) == 2
    assert gluon_launch.heads_per_section(causal, q, q, balanced, 1000) == 8  # 8 · 4 MiB of K/V
    assert gluon_launch.heads_per_section(causal, q, q, balanced, 100) == 1  # a head is more than a round
    # a group of 8 query heads (512 tiles) is more than a round: one group
    assert gluon_launch.heads_per_section(causal, q, gqa_kv, balanced, 132) == 8
    assert gluon_launch.heads_per_section(causal, q, gqa_kv, balanced, 10000) == 32  # all of them
    q1k = torch.empty(16, 16, 1024, 128, dtype=torch.bfloat16, device="meta")
    assert gluon_launch.heads_per_section(causal, q1k, q1k, balanced, 132) == 16  # 128 tiles, not 64 heads
    three = gluon_launch.GluonConfig(192, 128, 4, ws=True, persistent=True, consumers=3, balanced=True)
    assert gluon_launch.heads_per_section(causal, q1k, q1k, three, 132) == 22  # 6 tiles of 192 rows a head
    assert gluon_launch.heads_per_section(causal, q, q, one, 132) == 32
    for text in ("score=qk*scale", PREFIX_LM):
        for config in (persistent, balanced):
            assert gluon_launch.heads_per_section(spec_from_text(text), q, q, config, 132) == 32


def test_sections_of_one_round_need_the_balanced_table():
    """Why heads_per_section gives sections of one round to the balanced table only (GLUON_NOTES
    call 118), in the launcher's model of a program's work (its tiles' key tiles plus
    TILE_COST_STEPS each): at d = 128 causal N = 12k (16 heads of 96 output tiles, 132 programs) a
    round holds one head, and the kernel's own order (odd rounds walk the programs backwards) gives
    the programs that take an even round's first, longest tiles nothing in the odd rounds: its
    busiest program has 1.3x the mean work (0.91x the speed on the H200), where the table deals the
    same sections within 1.07x and the own order's sections of 32 MiB within 1.14x. At the grid's
    N the table with sections of one round stays within 3% of the mean."""
    config = gluon_launch.GluonConfig(128, 128, 2, ws=True, persistent=True, split=True, balanced=True)
    causal = spec_from_text(CAUSAL)

    def busiest_over_mean(n: int, own: bool, balanced: bool = True) -> float:
        q = torch.empty(16384 // n, 16, n, 128, dtype=torch.bfloat16, device="meta")
        heads, walk = 16384 // n * 16, list(gluon_launch.tile_walks(n, n, config, True))
        section = gluon_launch.heads_per_section(causal, q, q, replace(config, balanced=balanced), 132)
        walks = (gluon_launch._kernel_order(heads, len(walk), 132, section) if own
                 else gluon_launch._greedy_order(heads, walk, 132, section))
        mean = heads * sum(w + gluon_launch.TILE_COST_STEPS for w in walk) / 132
        return gluon_launch._busiest(walks, walk) / mean

    assert busiest_over_mean(12288, own=True) > 1.25  # one round a section, the own order: the trap
    assert busiest_over_mean(12288, own=False) < 1.08  # the same sections, the table
    assert busiest_over_mean(12288, own=True, balanced=False) < 1.15  # the own order's 32 MiB
    assert all(busiest_over_mean(n, own=False) < 1.03 for n in (1024, 2048, 4096, 8192, 16384))


class _Shim:
    """Stands in for ``gl`` in the rendered schedule functions (scalar integer arithmetic only)."""
    minimum = staticmethod(min)
    pid = programs = 0

    @classmethod
    def program_id(cls, axis):
        return cls.pid

    @classmethod
    def num_programs(cls, axis):
        return cls.programs


def _schedule(text, n_m, zh, programs, section):
    """Each program's output tiles (flat head, query tile), in the order it walks them, from the
    rendered kernel's own _output_tile run as Python (non-negative integer arithmetic means the
    same in both) with the rounds launch() passes."""
    src = render_gluon(spec_from_text(text))
    namespace = {"gl": _Shim, "MASK": int(re.search(r"MASK = gl.constexpr\((\d)\)", src).group(1))}
    exec(re.search(r"^def _output_tile\(.*?(?=^@gluon)", src, re.S | re.M).group(0), namespace)
    section_rounds = -(-section * n_m // programs)
    _Shim.programs = programs
    walks = []
    for pid in range(programs):
        _Shim.pid = pid
        tiles = [namespace["_output_tile"](g, zh, n_m, section, section_rounds)
                 for g in range(-(-zh // section) * section_rounds)]
        walks.append([(hz, m) for taken, hz, m in tiles if taken])
    return walks


@pytest.mark.parametrize("text", ["score=qk*scale", CAUSAL, PREFIX_LM])
@pytest.mark.parametrize("n_m, zh, programs, section", [
    (16, 128, 132, 32),  # the H200 at N = 2k (B = 8, H = 16), causal: sections of 512 tiles, last rounds of 116
    (16, 128, 132, 128),  # N = 2k in one section (non-causal; causal with one_section): a last round of 68
    (64, 32, 132, 8),  # N = 8k (B = 2, H = 16), causal
    (8, 16, 5, 3),  # few programs, sections of 3 heads with a last one of 1
    (3, 5, 15, 5),  # as many programs as tiles: one round
    (1, 7, 4, 2),  # one query tile per head
])
def test_persistent_schedule_takes_every_tile_once(text, n_m, zh, programs, section):
    """The persistent kernel's programs together take every output tile exactly once, whatever the
    grid, the spec's order (causal: longest first) and the sections."""
    taken = Counter(tile for walk in _schedule(text, n_m, zh, programs, section) for tile in walk)
    assert set(taken.values()) == {1}
    assert set(taken) == {(hz, m) for hz in range(zh) for m in range(n_m)}


def test_non_causal_schedule_walks_a_heads_tiles_together():
    """Without a causal predicate all tiles cost the same: program p takes tile p of round 0, the
    query tiles of a head are neighbours, so the programs in flight share a few heads' K/V."""
    walks = _schedule("score=qk*scale", 64, 32, 132, 32)
    assert [walk[0] for walk in walks[:3]] == [(0, 0), (0, 1), (0, 2)]
    assert {walk[0][0] for walk in walks} == {0, 1, 2}  # round 0: two heads' 64 query tiles and 4 of a third


@pytest.mark.parametrize("n_m, zh, section", [(16, 128, 32), (16, 128, 128), (64, 32, 8), (64, 32, 32)],
                         ids=["2k", "2k-one-section", "8k", "8k-one-section"])
def test_causal_schedule_is_longest_first_and_balanced(n_m, zh, section):
    """Causal: within a section, a program never walks to a longer query tile than its last (query
    tile m reads m + 1 key tiles), and the snake order (odd rounds reversed) leaves the programs'
    total key tiles within half a longest tile's of each other at the H200's launches (round-robin
    without the reversal gives the first programs the longest tile of every round: at 8k the
    spread is a whole longest tile in one section, four in sections of 8 heads)."""
    walks = _schedule(CAUSAL, n_m, zh, 132, section)
    for walk in walks:
        for (hz0, m0), (hz1, m1) in zip(walk, walk[1:]):
            assert m1 <= m0 or hz1 // section > hz0 // section
    loads = [sum(m + 1 for _, m in walk) for walk in walks]
    assert max(loads) - min(loads) <= n_m // 2


@pytest.mark.parametrize("n_m, zh, programs, section", [(16, 128, 132, 32), (8, 512, 132, 128), (64, 32, 132, 8),
                                                       (8, 16, 5, 3), (3, 5, 15, 5), (1, 7, 4, 2)])
def test_launchers_order_is_the_kernels(n_m, zh, programs, section):
    """persistent_order's copy of _output_tile's orders (gluon_launch._kernel_order), causal and
    not, walks the same tiles in the same order as the rendered kernel's own, program by program."""
    assert gluon_launch._kernel_order(zh, n_m, programs, section) == _schedule(CAUSAL, n_m, zh, programs, section)
    plain = _schedule("score=qk*scale", n_m, zh, programs, section)
    assert gluon_launch._kernel_order(zh, n_m, programs, section, causal=False) == plain
    # a plain spec's table holds that order (every tile walks as far)
    table = gluon_launch.persistent_order(zh, [4] * n_m, zh, programs, section, causal=False)
    assert _table_walks(table, zh) == plain


def _table_walks(table, h):
    """Each program's (flat head, query tile) from a persistent_order table, checking that its
    entries past a program's last tile, and the whole last round, are -1s."""
    walks = []
    for p in range(table.shape[1]):
        entries = [tuple(e) for e in table[:, p].tolist()]
        taken = [e for e in entries if e[0] >= 0]
        assert entries[len(taken):] == [(-1, -1, -1, -1)] * (len(entries) - len(taken))
        walks.append([(z * h + hh, m) for z, hh, m, pad in taken])
    assert (table[-1] == -1).all()
    return walks


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 20), st.integers(1, 40), st.integers(1, 3),
       st.integers(1, 16))
def test_balanced_order_takes_every_tile_once_and_is_no_busier(z, h, n_m, programs, per_tile, section):
    """persistent_order's table (gluon's note on the balanced order) holds every output tile exactly
    once, each program's tiles first and then -1s, with one round of -1s past the last; its busiest
    program has no more modelled work than _output_tile's own order gives."""
    walk = [-(-(m + 1) * per_tile // 2) for m in range(n_m)]  # causal: query tile m reads up to its diagonal
    section = min(section, z * h)
    walks = _table_walks(gluon_launch.persistent_order(h, walk, z * h, programs, section), h)
    assert Counter(t for tiles in walks for t in tiles) == Counter((hz, m) for hz in range(z * h) for m in range(n_m))
    snake = gluon_launch._kernel_order(z * h, n_m, programs, section)
    assert gluon_launch._busiest(walks, walk) <= gluon_launch._busiest(snake, walk)


def test_balanced_order_at_the_short_causal_rows():
    """At the grid's d = 64 causal 1k and 2k (16 × 32 and 8 × 32 heads, 8 and 16 query tiles of 128
    rows, sections of 128 and 64 heads, the H200's 132 programs) _output_tile's order leaves the
    busiest program 1.031x the mean modelled work; the balanced order 1.006x and 1.004x."""
    for z, n_m, section, busiest in ((16, 8, 128, 1.0065), (8, 16, 64, 1.0045)):
        walk = [m + 1 for m in range(n_m)]
        mean = sum((m + 1 + gluon_launch.TILE_COST_STEPS) * z * 32 for m in range(n_m)) / 132
        snake = gluon_launch._kernel_order(z * 32, n_m, 132, section)
        assert gluon_launch._busiest(snake, walk) / mean == pytest.approx(1.031, abs=0.001)
        walks = _table_walks(gluon_launch.persistent_order(32, walk, z * 32, 132, section), 32)
        assert gluon_launch._busiest(walks, walk) / mean < busiest


class RecordingKernel:
    """Stands in for a Gluon kernel: records each launch's (name, grid, arguments, keywords) in ``calls``."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


def test_persistent_launch_runs_one_program_per_sm(monkeypatch):
    """launch gives the persistent kernel min(output tiles, SMs) programs (or ``programs``), the
    query tiles of a head and the heads per section; the other kernels keep their (tiles, heads)
    grid."""
    launched = []
    module = type("Module", (), {n: RecordingKernel(n, launched)
                                 for n in ("_attn_fwd_sm90", "_attn_fwd_sm90_ws", "_attn_fwd_sm90_wsp")})
    monkeypatch.setattr(gluon_launch, "load", lambda spec, raw_max=True, **options: module)
    monkeypatch.setattr(gluon_launch, "_descriptor", lambda t, rows: ("descriptor", rows))
    monkeypatch.setattr(gluon_launch, "device_profile", lambda device: H200)
    wsp = gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True)
    ws = gluon_launch.GluonConfig(128, 128, 3, ws=True)

    def run(z, h, n, config, q=None, **kw):
        q = torch.empty(z, h, n, 64, device="meta") if q is None else q
        gluon_launch.launch(sdpa_spec(), q, q, q, q, torch.empty(z, h, n, device="meta"), 0.125, config, **kw)
        return launched.pop()

    # 2048 output tiles of 128 rows, 16 per head: one section, 16 rounds of 132 (the last of 68);
    # then where heads start in the descriptor: row z·RZ + h·RH, column h·CH, for Q and for K/V
    name, grid, args, kwargs = run(8, 16, 2048, wsp)
    assert (name, grid, args[-10:-6], kwargs["BLOCK_M"]) == ("_attn_fwd_sm90_wsp", (132, ), (16, 128, 16, 16), 64)
    assert args[-6:] == (16 * 2048, 2048, 0) * 2  # heads as rows
    bnhd = torch.empty(8, 2048, 16, 64, device="meta").transpose(1, 2)  # (Z, N, H, d) storage
    assert run(8, 16, 2048, wsp, q=bnhd)[2][-6:] == (2048, 0, 64) * 2  # heads side by side in a row
    assert run(1, 2, 300, wsp)[1] == (6, )  # fewer tiles than SMs: one program each
    _, grid, args, _ = run(1, 2, 300, wsp, programs=4, section=1)  # 2 sections of 3 tiles: 1 round each
    assert (grid, args[-10:-6]) == ((4, ), (3, 1, 1, 2))
    with pytest.raises(ValueError, match="row matrices"):  # the other kernels address heads as rows only
        run(8, 16, 2048, ws, q=bnhd)
    assert run(1, 2, 300, ws)[:2] == ("_attn_fwd_sm90_ws", (3, 2))
    # the balanced order: the table of persistent_order and its rounds, causal (balanced) and plain
    # (the kernel's own order); none read without the flag, nor under another keep-predicate
    balanced = gluon_launch.GluonConfig(128, 128, 3, ws=True, persistent=True, balanced=True)
    assert not run(8, 16, 2048, wsp)[3]["ORDER"]
    q = torch.empty(8, 16, 2048, 64)  # the table is built on q's device: here the CPU, to read it
    # (causal: sections of one round, 8 heads of 16 tiles)
    for text, walk, section, causal in ((CAUSAL, [m + 1 for m in range(16)], 8, True),
                                        ("score=qk*scale", [16] * 16, 128, False)):
        gluon_launch.launch(spec_from_text(text), q, q, q, q, torch.empty(8, 16, 2048), 0.125, balanced)
        _, grid, args, kwargs = launched.pop()
        table = args[5]
        assert kwargs["ORDER"] and grid == (132, ) and args[-7] == table.shape[0] - 1  # ROUNDS
        assert torch.equal(table, gluon_launch.persistent_order(16, walk, 128, 132, section, causal))
    gluon_launch.launch(spec_from_text(PREFIX_LM), q, q, q, q, torch.empty(8, 16, 2048), 0.125, balanced)
    assert not launched.pop()[3]["ORDER"]


def test_row_matrix_rule():
    """Descriptors address (Z·H·N, d) row matrices: contiguous tensors and padded rows qualify;
    a (B, N, H, d) storage or a head dim that is not contiguous does not."""
    x = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    assert gluon_launch.row_matrix(x)
    assert gluon_launch.row_matrix(torch.randn(2, 3, 40, 72, dtype=torch.float16)[..., :64])  # padded rows
    assert not gluon_launch.row_matrix(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert not gluon_launch.row_matrix(x.transpose(-1, -2).contiguous().transpose(-1, -2))


def test_calls_off_sm90_are_refused():
    """CPU tensors (and the interpreter) never reach the Gluon kernel."""
    q = torch.randn(1, 2, 128, 64)
    reason = gluon_launch.unsupported_call(sdpa_spec(), q, q, q, gluon_launch.default_config(H200, 64, 2))
    assert reason == "not on a CUDA device"


def test_head_dim_64_routes_by_mask_kind(monkeypatch):
    """At head dim 64 the routed kernel depends on the spec's mask kind (ROUTES): without a
    keep-predicate, three consumer warpgroups (192 rows a program) from MIN_WALK_D64 key tiles an
    output tile on (call 36: 1.07x the portable forward at 64 tiles, 1.11x at 128), with their
    output stored by TMA from 16 (call 53: 1.07x at 16 and 32), and two consumers with it from 8
    (1.07x); causal, the causal walk split in two loops from MIN_WALK_D64_CAUSAL (call 39:
    1.05-1.06x from a walk of 16.5, N = 4k; 0.91-0.98x below), with three consumers in turn and
    the TMA store where the score reads only qk and the scale (call 60: 1.01-1.04x two
    consumers; taken with the Triton whose compile keeps it in registers, SPILL_FREE_TRITON), two
    consumers for other scores. Other predicates are ranged (not routed at any head dim); a mask kind without a route is
    refused by name. Head dim 128 splits the causal walk too (call 42), with two consumers; both
    its routes store the output by TMA (call 51: 1.025-1.03x, geometric means), which costs them a
    K/V stage; head dim 64's long walks do not (0.94-0.99x there). The consumers take turns (the
    persistent ping-pong, call 57) at head dim 128 without a predicate, causal on the shortest walks
    only, and on every head dim 64 route without a predicate (three consumers in turn, call 59)."""
    causal, prefix = sdpa_spec(causal=True), spec_from_text("score=qk*scale; keep=(kv_idx <= q_idx) | (kv_idx < 64)")
    monkeypatch.setattr(gluon_launch, "spill_free_triton", lambda: True)  # as with the H200's triton 3.6
    plain_cfg = gluon_launch.routed_config(H200, sdpa_spec(), 64, 2)
    assert (plain_cfg.BLOCK_M, plain_cfg.consumers, plain_cfg.rows_per_consumer, plain_cfg.split,
            plain_cfg.tma_store, plain_cfg.pingpong, plain_cfg.STAGES) == (192, 3, 64, False, False, True, 4)
    causal_cfg = gluon_launch.routed_config(H200, causal, 64, 2)
    assert (causal_cfg.BLOCK_M, causal_cfg.consumers, causal_cfg.split, causal_cfg.persistent,
            causal_cfg.tma_store, causal_cfg.pingpong, causal_cfg.STAGES) == (192, 3, True, True, True, True, 4)
    # causal scores that read more than qk and the scale keep two consumers (call 60: the
    # three-consumer kernel spills on them at 160 registers; soft-capping ran 0.72x)
    softcap = spec_from_text("score=50*tanh(qk*scale/50); keep=kv_idx <= q_idx")
    alibi = spec_from_text("score=qk*scale + 0.0625*(kv_idx - q_idx); keep=kv_idx <= q_idx")
    assert gluon_launch.qk_only(spec_from_text("score=qk*0.125; keep=kv_idx <= q_idx"))
    assert not gluon_launch.qk_only(softcap) and not gluon_launch.qk_only(alibi)
    for spec in (softcap, alibi):
        for n in (None, 4096, 8192):
            cfg = gluon_launch.routed_config(H200, spec, 64, 2, n, n)
            assert (cfg.BLOCK_M, cfg.consumers, cfg.split, cfg.tma_store, cfg.pingpong) == (128, 2, True, False, False)
    # and so do plain causal scores with a Triton whose compile spills the three-consumer kernel
    monkeypatch.setattr(gluon_launch, "spill_free_triton", lambda: False)
    assert gluon_launch.routed_config(H200, causal, 64, 2, 8192, 8192).consumers == 2
    monkeypatch.setattr(gluon_launch, "spill_free_triton", lambda: True)
    for spec, split in ((sdpa_spec(), False), (causal, True)):
        cfg = gluon_launch.routed_config(H200, spec, 128, 2)
        assert (cfg.BLOCK_M, cfg.consumers, cfg.split, cfg.tma_store, cfg.STAGES) == (128, 2, split, True, 2)
    # ping-pong: plain d = 128 at every walk, causal below 8 key tiles (N = 1k: 4.5), not from 2k (8.5)
    assert [gluon_launch.routed_config(H200, sdpa_spec(), 128, 2, n, n).pingpong for n in (1024, 2048, 8192)] == [
        True, True, True]
    assert [gluon_launch.routed_config(H200, causal, 128, 2, n, n).pingpong for n in (1024, 2048, 8192)] == [
        True, False, False]

    def reason(n, spec=sdpa_spec()):
        q = torch.empty(1, 1, n, 64, dtype=torch.bfloat16)
        return gluon_launch.not_routed(spec, q, q, gluon_launch.routed_config(H200, spec, 64, 2, n, n))

    assert reason(8192) is None and reason(16384) is None
    assert reason(8192, spec_from_text("score=50*tanh(qk*scale/50)")) is None  # a score without a predicate
    # shorter plain walks (call 53): three consumers with the TMA store from 16 key tiles, two from 8
    chosen = {n: gluon_launch.routed_config(H200, sdpa_spec(), 64, 2, n, n) for n in (512, 1024, 2048, 4096, 8192)}
    assert {n: (cfg.consumers, cfg.tma_store, cfg.pingpong, cfg.STAGES, cfg.q_buffers)
            for n, cfg in chosen.items()} == {
        512: (2, True, True, 4, 2), 1024: (2, True, True, 4, 2), 2048: (3, True, True, 4, 1),
        4096: (3, True, True, 4, 1), 8192: (3, False, True, 4, 1)}  # two Q buffers on two consumers: call 82
    assert reason(1024) is None and reason(2048) is None and reason(4096) is None
    assert "4.0 key tiles per output tile on average, fewer than 8" in reason(512)
    assert reason(4096, causal) is None and reason(16384, causal) is None
    assert reason(4096, softcap) is None and reason(16384, alibi) is None
    # from 4 key tiles (1k: 4.5; 8 until call 74) plain causal scores take two consumers in turn with
    # the TMA store (call 63, with the row max before the scale); other scores stay portable, and every
    # causal score at 512 (2.5)
    assert reason(1024, causal) is None and reason(2048, causal) is None and "8.5 key tiles" in reason(2048, softcap)
    short = gluon_launch.routed_config(H200, causal, 64, 2, 2048, 2048)
    assert (short.consumers, short.split, short.tma_store, short.pingpong) == (2, True, True, True)
    # with two Q buffers a consumer (call 76 at 1k; with the balanced order at 2k too, calls 79-80: the
    # next tile's Q and K/V load early), the same kernel at 1k and 2k; of the other routes only the
    # plain two-consumer one of d = 64 takes them (call 82, above), and head dim 128's causal route
    # of 1k, with the balanced order (calls 116-117)
    assert gluon_launch.routed_config(H200, causal, 64, 2, 1024, 1024) == short and short.q_buffers == 2
    assert not any(gluon_launch.routed_config(H200, spec, d, 2, n, n).q_buffers == 2
                   for d in (64, 128) for spec in (sdpa_spec(), causal) for n in (4096, 16384))
    assert [gluon_launch.routed_config(H200, spec, 128, 2, n, n).q_buffers
            for spec in (sdpa_spec(), causal) for n in (1024, 2048)] == [1, 1, 2, 1]
    causal_1k = gluon_launch.routed_config(H200, causal, 128, 2, 1024, 1024)
    assert (causal_1k.STAGES, causal_1k.balanced, causal_1k.pingpong) == (2, True, True)

    def routed(flag, spec, d, ns):
        """The routed config's ``flag`` at head dim d for each N in ns."""
        return [getattr(gluon_launch.routed_config(H200, spec, d, 2, n, n), flag) for n in ns]

    balanced, fast, packed, signed = (functools.partial(routed, flag)
                                      for flag in ("balanced", "fast_epilogue", "pack_p", "sign_mask"))
    # the balanced order (calls 79-80) on head dim 64's causal routes of qk and the scale, and head dim
    # 128's causal routes (at 1k with two Q buffers, calls 116-117; from 2k, where with sections of
    # one round the kernel's own order falls into a trap, call 118); not head dim 64's route of
    # other scores
    assert all(balanced(causal, 64, (1024, 2048, 4096, 16384)))
    assert all(balanced(causal, 128, (1024, 2048, 16384)) + balanced(softcap, 128, (1024, 2048, 16384)))
    assert not any(balanced(softcap, 64, (4096, 16384)))
    # plain specs read the table (the kernel's own order, call 84) on head dim 64's two-consumer route
    # (N = 1k) only
    assert balanced(sdpa_spec(), 64, (1024, 2048, 16384)) == [True, False, False]
    assert not any(balanced(sdpa_spec(), 128, (1024, 16384)))
    # the diagonal's half (call 70) on the two-consumer causal routes that were timed with it: head
    # dim 128's, and head dim 64's short one; not three consumers (0.82-0.94x), nor other scores' route
    assert short.half and causal_cfg.consumers == 3 and not causal_cfg.half
    assert not any(gluon_launch.routed_config(H200, softcap, 64, 2, n, n).half for n in (4096, 16384))
    assert all(gluon_launch.routed_config(H200, causal, 128, 2, n, n).half for n in (1024, 2048, 16384))
    assert not any(gluon_launch.routed_config(H200, sdpa_spec(), d, 2, 4096, 4096).half for d in (64, 128))
    assert "2.5 key tiles per output tile on average, fewer than 4" in reason(512, causal)
    # the epilogue by reciprocals (call 74) where it ran ahead: every causal route of head dim 128, at
    # head dim 64 the two-consumer plain route and the causal routes of qk and the scale; not head dim
    # 128 plain, head dim 64's three-consumer plain routes, nor other scores' causal route
    assert all(fast(causal, 128, (1024, 4096, 16384)) + fast(softcap, 128, (1024, 16384)))
    assert not any(fast(sdpa_spec(), 128, (1024, 4096, 16384)))
    assert fast(sdpa_spec(), 64, (1024, 4096, 16384)) == [True, False, False]
    assert all(fast(causal, 64, (1024, 2048, 4096, 16384))) and not any(fast(softcap, 64, (4096, 16384)))
    # p converted in PTX (calls 98, 103) where it ran ahead: every causal route of a score of qk and
    # the scale, head dim 128's routes for any score, head dim 64's plain routes; not head dim 64's
    # route of other causal scores
    assert all(packed(causal, 128, (1024, 4096, 16384)) + packed(softcap, 128, (1024, 16384)))
    assert all(packed(causal, 64, (1024, 2048, 4096, 16384)))
    assert all(packed(sdpa_spec(), 64, (1024, 2048, 4096, 16384)) + packed(sdpa_spec(), 128, (1024, 16384)))
    assert not any(packed(softcap, 64, (4096, 16384)))
    # the keep-predicate by its sign (call 106) on the route it ran ahead on: d = 64 causal 1k-2k
    assert signed(causal, 64, (1024, 2048, 4096, 16384)) == [True, True, False, False]
    assert not any(signed(causal, 128, (1024, 4096)) + signed(softcap, 64, (4096, 16384))
                   + signed(sdpa_spec(), 64, (1024, 4096)))
    assert "ranged" in reason(8192, prefix)
    monkeypatch.setitem(gluon_launch.ROUTES, 64, {0: gluon_launch.ROUTES[64][0]})
    assert "a causal keep-predicate were not measured faster" in reason(8192, causal)


def test_routing_is_limited_to_what_was_measured():
    """What is routed is what was checked and timed faster on the H200: head dim 128, bf16 and
    fp16, dense and causal specs whose output tiles walk at least MIN_WALK key tiles on average
    (causal N = 512: 2.5 tiles, slower than the portable forward; plain 512: 4, and causal 1k:
    4.5, faster), at least one full output tile of queries. Ranged specs stay on the portable
    forward, which skips tiles."""
    def reason(n_q, n_kv, d=128, dtype=torch.bfloat16, spec=sdpa_spec()):
        q = torch.empty(1, 1, n_q, d, dtype=dtype)
        cfg = gluon_launch.routed_config(H200, spec, d, 2, n_q, n_kv)
        return gluon_launch.not_routed(spec, q, torch.empty(1, 1, n_kv, d, dtype=dtype), cfg)

    assert reason(1024, 1024) is None and reason(1024, 1024, dtype=torch.float16) is None
    assert reason(2048, 2048, spec=sdpa_spec(causal=True)) is None
    assert reason(1024, 1024, spec=sdpa_spec(causal=True)) is None and reason(512, 512) is None
    assert "2.5 key tiles" in reason(512, 512, spec=sdpa_spec(causal=True))
    assert "key tiles" in reason(256, 256)
    assert "output tile" in reason(64, 4096)
    q = torch.empty(1, 1, 1024, 128, dtype=torch.bfloat16)  # a tile that is not the route's
    untimed = gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND)
    assert "none of the routes" in gluon_launch.not_routed(sdpa_spec(), q, q, untimed)
    window = spec_from_text("score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx - kv_idx < 256)")
    assert window.tile_mode == "ranged" and "ranged" in reason(4096, 4096, spec=window)


@pytest.mark.parametrize("n_q, n_kv, block_n", [(1024, 1024, 128), (2048, 2048, 128), (1000, 2048, 128),
                                                (2048, 1024, 128), (300, 4096, 128), (1000, 2048, 64)])
def test_mean_walk_counts_each_output_tile(n_q, n_kv, block_n):
    """mean_walk is the mean over output tiles of the key tiles each visits (causal: up to its
    last row's diagonal, top-left aligned), counted tile by tile here."""
    cfg = gluon_launch.GluonConfig(128, block_n, 2, True, persistent=True)
    tiles, q_tiles = -(-n_kv // block_n), -(-n_q // 128)
    counted = [min(tiles, -(-min(n_q, (i + 1) * 128) // block_n)) for i in range(q_tiles)]
    assert gluon_launch.mean_walk(sdpa_spec(causal=True), n_q, n_kv, cfg) == pytest.approx(sum(counted) / q_tiles)
    assert gluon_launch.mean_walk(sdpa_spec(), n_q, n_kv, cfg) == tiles


def test_on_by_default(monkeypatch):
    monkeypatch.delenv("FX_FLASH_GLUON", raising=False)
    assert gluon_launch.enabled()
    monkeypatch.setenv("FX_FLASH_GLUON", "0")
    assert not gluon_launch.enabled()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_enabled_path_falls_back_to_the_portable_kernels(monkeypatch, causal):
    """With FX_FLASH_GLUON=1 a call the Gluon kernel cannot take (here: not on a GPU) runs the
    portable kernels and stays exact, forward and backward; the Gluon launcher is never called."""
    poison_outputs(monkeypatch)
    monkeypatch.setenv("FX_FLASH_GLUON", "1")
    launched = []
    monkeypatch.setattr(gluon_launch, "launch", lambda *a, **kw: launched.append(a))
    torch.manual_seed(0)
    test_kernels.check(test_kernels.SHAPES["ragged_cross"], torch.float32, causal=causal)
    assert not launched


def _gluon_hopper_available() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None
    except ImportError:  # no triton.experimental at all
        return False


KERNELS = {  # name: (spec, head dim, kind: see tests/gluon_kinds.py), each at the H200's tile for its head dim
    "plain-d128": ("score=qk*scale", 128, "v1"), "causal-d128": (CAUSAL, 128, "v1"),
    "softcap-d128": (SOFTCAP, 128, "v1"), "prefix_lm-d64": (PREFIX_LM, 64, "v1"),
    "head_and_length-d64": (HEAD_AND_LENGTH, 64, "v1"), "causal-d64": (CAUSAL, 64, "v1"),
    "causal-d128-ws": (CAUSAL, 128, "ws"), "softcap-d64-ws": (SOFTCAP, 64, "ws"),
    "plain-d128-pp": ("score=qk*scale", 128, "pp"), "causal-d128-pph": (CAUSAL, 128, "pph"),
    "prefix_lm-d64-ppeh": (PREFIX_LM, 64, "ppeh"),
    "plain-d128-ws": ("score=qk*scale", 128, "ws"), "plain-d128-wsp": ("score=qk*scale", 128, "wsp"),
    "causal-d128-wsp": (CAUSAL, 128, "wsp"), "plain-d64-wsp3": ("score=qk*scale", 64, "wsp3"),
    "head_and_length-d64-wsph": (HEAD_AND_LENGTH, 64, "wsph"),
    # the causal routes (the causal walk split in two loops), and soft-capping through them
    "causal-d64-wsps": (CAUSAL, 64, "wsps"), "softcap-d64-wsps": (SOFTCAP, 64, "wsps"),
    "causal-d128-wsps": (CAUSAL, 128, "wsps"), "softcap-d128-wsps": (SOFTCAP, 128, "wsps"),
    # the output stored by TMA from each consumer's staging tile (gluon's note on the epilogue)
    "plain-d128-wspt": ("score=qk*scale", 128, "wspt"), "causal-d128-wspst": (CAUSAL, 128, "wspst"),
    "plain-d64-wsp3t": ("score=qk*scale", 64, "wsp3t"),
    # the persistent ping-pong through named barriers, with the hold (gluon's note on it), and
    # among three consumers as routed at d = 64
    "causal-d128-wspstph": (CAUSAL, 128, "wspstph"), "plain-d64-wsp3tp": ("score=qk*scale", 64, "wsp3tp"),
    # d = 64 causal with a score of qk and the scale: three consumers in turn, split, TMA store
    "causal-d64-wsp3stp": (CAUSAL, 64, "wsp3stp"),
    # the row max before the score's factor (the default) and after it (gluon's note on the row max)
    "plain-d64-wsptp": ("score=qk*scale", 64, "wsptp"), "plain-d64-wsptpx": ("score=qk*scale", 64, "wsptpx"),
    # the last key tile on its first half where the rest lies past the diagonal (gluon's note on the
    # diagonal's half), with soft-capping's score too, and among three consumers
    "causal-d128-wspstd": (CAUSAL, 128, "wspstd"), "softcap-d64-wspstpd": (SOFTCAP, 64, "wspstpd"),
    "causal-d64-wsp3stpd": (CAUSAL, 64, "wsp3stpd"),
    # the epilogue by each row's reciprocal (gluon's note on the epilogue's arithmetic), beside two of
    # the above
    "plain-d64-wsptpf": ("score=qk*scale", 64, "wsptpf"), "causal-d128-wspstdf": (CAUSAL, 128, "wspstdf"),
    # two Q buffers a consumer (gluon's note on Q buffers), on the two-consumer causal kernel with
    # turns at both head dims (at d = 128 beside the TMA store's staging tiles: two K/V stages)
    "causal-d64-wspstpdfq": (CAUSAL, 64, "wspstpdfq"), "causal-d128-wspstpdfq": (CAUSAL, 128, "wspstpdfq"),
    # the balanced order (gluon's note on it), on the same kernel at d = 64
    "causal-d64-wspstpdfqb": (CAUSAL, 64, "wspstpdfqb"),
    # the d = 64 plain route of short walks, with two Q buffers (call 82) and the plain table (call 84)
    "plain-d64-wsptpfqb": ("score=qk*scale", 64, "wsptpfqb"),
    # p converted for p·v in PTX (gluon's note on p's conversion), on both head dims' causal routes
    "causal-d64-wspstpdfqbk": (CAUSAL, 64, "wspstpdfqbk"), "causal-d128-wspstdfk": (CAUSAL, 128, "wspstdfk"),
    # the keep-predicate by its sign (gluon's note on the mask as a sign), on d = 64's causal route
    "causal-d64-wspstpdfqbkm": (CAUSAL, 64, "wspstpdfqbkm"),
}


def _tile(d, kind):
    """The H200's tile of kind (tests/gluon_kinds.py's names) at head dim d."""
    return gluon_launch.default_config(H200, d, 2, **KINDS[kind])


@pytest.fixture(scope="module")
def compiled():
    """One process compiles every kernel of KERNELS for sm_90 (see tests/gluon_sm90.py for why a
    process of its own), at the tile default_config gives the H200."""
    args = []
    for text, d, kind in KERNELS.values():
        cfg = _tile(d, kind)
        args += [text, str(d), str(cfg.BLOCK_N), str(cfg.STAGES), kind]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-m", "tests.gluon_sm90", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return dict(zip(KERNELS, reports))


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", KERNELS)
def test_compiles_for_sm90_with_wgmma_and_tma(compiled, name):
    """The rendered kernel compiles for sm_90 to asynchronous wgmma and TMA bulk-tensor loads, and
    its shared memory is the footprint model's (the warp-specialized kernel: within the reserve for
    the partitions' captures) and at most the H200's M."""
    text, d, kind = KERNELS[name]
    ws = kind != "v1"
    report = compiled[name]
    cfg = _tile(d, kind)
    assert (report["spec"], report["head_dim"], report["kind"]) == (text, d, kind)
    assert report["wgmma"] > 0 and report["tma"] > 0
    model = gluon_launch.footprint(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES, ws, cfg.consumers, cfg.tma_store,
                                   cfg.q_buffers)
    if ws:
        assert model - gluon_launch.WS_CAPTURE_BYTES < report["shared"] <= model
        assert ("160" if kind.startswith("wsp3") else "240") in report["setmaxnreg"]  # the consumers' registers are raised
    else:
        assert report["shared"] == model
    assert report["shared"] <= H200.shared_memory


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_pingpong_adds_the_turn_waits(compiled):
    """With the ping-pong on, each consumer waits for its turn before each group of products (the
    prologue's, each step's, the last p·v's and each drained tile's): the kernel holds more mbarrier
    waits than the same kernel without it, which waits only on the ring."""
    assert compiled["causal-d128-pph"]["turn_waits"] > compiled["causal-d128-ws"]["turn_waits"]


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("packed, twin", [("causal-d64-wspstpdfqbk", "causal-d64-wspstpdfqb"),
                                          ("causal-d128-wspstdfk", "causal-d128-wspstdf")])
def test_p_converted_in_ptx_takes_the_half_swaps_out(compiled, packed, twin):
    """Converted by Triton one element at a time, p reaches p·v through ptxas's F2FP with its halves
    the other way round and a PRMT swapping them back, one per register of p (32 a step at d = 64,
    in each body of the causal walk); converted two at a time by cvt.rn.bf16x2.f32 (PACK_P) it
    needs none (gluon's note on p's conversion). The kernels are otherwise the same."""
    assert compiled[twin]["permutes"] >= 128, compiled[twin]["permutes"]
    assert compiled[packed]["permutes"] <= 2, compiled[packed]["permutes"]
    assert compiled[packed]["instructions"] < compiled[twin]["instructions"] or not compiled[twin]["instructions"]
    assert compiled[packed]["wgmma_n"] == compiled[twin]["wgmma_n"]


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_keep_by_sign_takes_the_predicate_packing_out(compiled):
    """Applied by gl.where, the causal predicate's 64 comparisons a masked d = 64 step are packed
    into integers and unpacked for their selects (about 370 instructions besides the softmax); by
    its sign (SIGN_MASK) they are a subtraction and a lop3 an element: the kernel, whose every
    causal body has a masked step, is at least 200 instructions shorter (248 with triton 3.6), with
    the same products. So with triton 3.6, where it was measured and is routed; triton 3.9's compile
    of it is 136 instructions longer than its twin, and with a Triton outside SPILL_FREE_TRITON its
    route (one of qk and the scale) is not taken."""
    packed, sign = compiled["causal-d64-wspstpdfqbk"], compiled["causal-d64-wspstpdfqbkm"]
    assert sign["wgmma_n"] == packed["wgmma_n"]
    if not gluon_launch.spill_free_triton():
        assert not gluon_launch.routed_config(H200, sdpa_spec(causal=True), 64, 2, 1024, 1024).sign_mask
        return
    if packed["instructions"] and sign["instructions"]:
        assert sign["instructions"] <= packed["instructions"] - 200, (sign["instructions"], packed["instructions"])


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_persistent_pingpong_turns_at_named_barriers(compiled):
    """The persistent kernel's ping-pong: each consumer waits for its turn at its own hardware
    barrier and passes it at the other's (bar.sync / bar.arrive of 256 threads at barriers 8 and 9,
    past those Triton's partitions use), with no mbarrier turn waits beyond the same kernel's
    without turns (wspst), which has none of them. An empty dict on both sides: no nvdisasm beside
    ptxas."""
    pp, free = compiled["causal-d128-wspstph"], compiled["causal-d128-wspst"]
    if not free["instructions"]:
        pytest.skip("no nvdisasm beside ptxas")
    assert set(pp["named_barriers"]) == {"SYNC 8", "SYNC 9", "ARV 8", "ARV 9"}, pp["named_barriers"]
    assert free["named_barriers"] == {}
    assert pp["turn_waits"] == free["turn_waits"]
    # three consumers: each waits at its own barrier (8, 9, 10) and passes to the next, 2 to 0
    three = compiled["plain-d64-wsp3tp"]["named_barriers"]
    assert set(three) == {f"{op} {bar}" for op in ("SYNC", "ARV") for bar in (8, 9, 10)}, three


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", ["causal-d128", "causal-d128-pph", "prefix_lm-d64-ppeh", "causal-d128-wspstph"])
def test_softmax_runs_between_the_two_waits(compiled, name):
    """Each consumer's exponentials sit between the wait for q·kᵀ and the wait for p·v in the SASS
    (p·v runs under the softmax): in the single-partition kernel by itself, in the warp-specialized
    one through the hold (gluon._hold). An empty list: no nvdisasm beside ptxas."""
    counts = compiled[name]["exps_between_waits"]
    assert all(c > 0 for c in counts), counts


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_without_the_hold_ptxas_waits_before_the_softmax(compiled):
    """Why the hold exists: without it ptxas (triton 3.6 and 3.9) places the wait for p·v before
    every exponential of the warp-specialized consumers of plain attention (a causal kernel's
    branch on the band happens to keep the order). If this starts failing, a new ptxas keeps the
    order itself and the hold can go."""
    counts = compiled["plain-d128-pp"]["exps_between_waits"]
    assert counts and all(c == 0 for c in counts), counts


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", KERNELS)
def test_output_stores_hold_two_elements(compiled, name):
    """The epilogue stores the bf16 output two elements (32 bits) a store, as the wgmma accumulator
    holds them: the H200's profile of the persistent kernel (GLUON_NOTES call 31) found one element
    a store (st.global.b16) spending 18% of its consumers' samples, from a head-dim stride that
    warp_specialize's captures turned into a runtime value. Besides them only the LSE's fp32. With
    TMA_STORE the rows leave by TMA bulk stores instead, and the LSE's are the only global stores."""
    stores = compiled[name]["stores"]
    assert set(stores) == {"b32"}, stores
    if KINDS[KERNELS[name][2]].get("tma_store"):  # the LSE's alone: the rows leave by TMA, one store a consumer
        assert stores["b32"] < 8 and compiled[name]["tma_stores"] > 0, compiled[name]
    else:
        assert compiled[name]["tma_stores"] == 0


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_row_max_before_the_factor_saves_a_multiply_an_element(compiled):
    """With the row max taken of qk before the score's factor, each consumer's steps lose a
    multiply an element (gluon's note on the row max): at d = 64, BLOCK_N = 128, 64 a thread per
    step body, four bodies (tile 0 and the loop, in two consumers), and nothing else changes."""
    raw, scaled = compiled["plain-d64-wsptp"], compiled["plain-d64-wsptpx"]
    if raw["instructions"] and scaled["instructions"]:  # (None: no nvdisasm)
        assert scaled["instructions"] - raw["instructions"] >= 4 * 60, (raw["instructions"], scaled["instructions"])
    assert raw["wgmma"] == scaled["wgmma"] and raw["shared"] == scaled["shared"]


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_half_diagonal_takes_half_width_products(compiled):
    """With the diagonal's half (GluonConfig.half), each consumer holds a q·kᵀ of n = 64 (the first
    half of a 128-key tile) beside its n = 128 ones, and a p·v of k = 64: at d = 128 the kernel has
    m64n64 wgmmas where the same kernel without it has only m64n128 ones (there both products are
    n = 128 wide: the keys, and the head dim)."""
    half, full = compiled["causal-d128-wspstd"], compiled["causal-d128-wspst"]
    assert set(full["wgmma_n"]) == {"128"}, full["wgmma_n"]
    assert half["wgmma_n"].get("64", 0) > 0 and half["wgmma_n"]["128"] > full["wgmma_n"]["128"], half["wgmma_n"]
    assert half["shared"] == full["shared"]


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("fast, twin, elements", [("plain-d64-wsptpf", "plain-d64-wsptp", 32),
                                                  ("causal-d128-wspstdf", "causal-d128-wspstd", 64)])
def test_fast_epilogue_divides_once_a_row(compiled, fast, twin, elements):
    """The epilogue by reciprocals (GluonConfig.fast_epilogue): a consumer thread's ``elements``
    output values (BLOCK_M · HEAD_DIM / 128) are each multiplied by its row's reciprocal instead
    of divided (div.full.f32: a scale for large divisors, a select, the multiply, a scale for
    denormals), and the LSE's log2 is one MUFU.LG2, not the precise polynomial: each consumer's
    code is at least 3 instructions an element shorter, with the same products and loads. None: no
    nvdisasm beside ptxas."""
    on, off = compiled[fast], compiled[twin]
    if not off["instructions"]:
        pytest.skip("no nvdisasm beside ptxas")
    assert off["instructions"] - on["instructions"] >= 2 * 3 * elements, (on["instructions"], off["instructions"])
    assert (on["wgmma"], on["tma"], on["shared"], on["stores"]) == (off["wgmma"], off["tma"], off["shared"],
                                                                    off["stores"])


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
def test_balanced_order_starts_a_tile_without_divisions(compiled):
    """With the balanced order (GluonConfig.balanced) the partitions read each tile's batch, head and
    query tile from the launcher's table instead of computing them from the round (_output_tile's
    divisions by the section's rounds and heads, and _head's by H: about 30 instructions each, in
    the producer and in every consumer): the kernel is at least 100 instructions shorter, with the
    same products, loads, stores and registers. None: no nvdisasm beside ptxas."""
    on, off = compiled["causal-d64-wspstpdfqb"], compiled["causal-d64-wspstpdfq"]
    if not off["instructions"]:
        pytest.skip("no nvdisasm beside ptxas")
    assert off["instructions"] - on["instructions"] >= 100, (on["instructions"], off["instructions"])
    assert (on["wgmma"], on["tma"], on["stores"], on["registers"]) == (off["wgmma"], off["tma"], off["stores"],
                                                                      off["registers"])


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", KERNELS)
def test_no_register_spills(compiled, name):
    """ptxas keeps every kernel in registers (the consumers at setmaxnreg 240, or 160 with three,
    the producer at 24): no spill stores. None: ptxas could not run. The three-consumer causal
    kernel keeps within its 160 only with the Tritons of gluon_launch.SPILL_FREE_TRITON (triton
    3.6; 3.9 spills it): with another, its route must not be taken."""
    if name in ("causal-d64-wsp3stp", "causal-d64-wsp3stpd") and not gluon_launch.spill_free_triton():
        cfg = gluon_launch.routed_config(H200, sdpa_spec(causal=True), 64, 2, 8192, 8192)
        assert (cfg.consumers, cfg.split) == (2, True), cfg
        return
    assert compiled[name]["spill_bytes"] in (0, None), compiled[name]


def test_spill_free_triton_reads_major_and_minor(monkeypatch):
    """SPILL_FREE_TRITON names Triton releases by major.minor: 3.6.0 and a 3.6 build are in it,
    3.9.0 and 3.60 are not."""
    for version, fits in (("3.6.0", True), ("3.6.1+git0abc", True), ("3.9.0", False), ("3.60.0", False)):
        monkeypatch.setattr(gluon_launch.triton, "__version__", version)
        assert gluon_launch.spill_free_triton() is fits, version


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("spec", ["plain", "causal"])
def test_persistent_kernel_keeps_the_consumer_code(compiled, spec):
    """The persistent kernel's consumers are the warp-specialized kernel's inside a tile loop: the
    same wgmma and TMA issues, the same exponentials between the q·kᵀ and p·v waits (none in plain
    attention: the hold is off in both), and the same shared memory within the capture reserve."""
    ws, wsp = compiled[f"{spec}-d128-ws"], compiled[f"{spec}-d128-wsp"]
    assert (wsp["wgmma"], wsp["tma"]) == (ws["wgmma"], ws["tma"])
    assert wsp["exps_between_waits"] == ws["exps_between_waits"]
    assert abs(wsp["shared"] - ws["shared"]) < gluon_launch.WS_CAPTURE_BYTES


def test_output_head_dim_must_be_contiguous():
    """The kernels take no head-dim stride for the output (see gluon._epilogue): an output whose
    head dim is strided is refused, not written wrong."""
    cfg = gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND)
    q = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="head dim is contiguous"):
        gluon_launch.forward_launch(sdpa_spec(), q, q, 0.1, cfg, out_strides=(2 * 256 * 256, 256 * 256, 256, 2))


def test_tma_store_takes_whole_tiles_of_contiguous_outputs(monkeypatch):
    """With tma_store (an option of the persistent kernel) the output leaves by TMA only where a
    consumer's rows never cross into the next head: a contiguous output and N_Q a multiple of a
    consumer's 64 rows. Then the kernel takes a descriptor of 64-row tiles for it; otherwise it
    takes the tensor and stores by gl.store, TMA_STORE off. The staging tiles cost the footprint
    a consumer's rows per consumer (a K/V stage at d = 128: 3 stages fit without them, 2 with)."""
    monkeypatch.setattr(gluon_launch, "load",
                        lambda spec, raw_max=True, **options: type("M", (), {"_attn_fwd_sm90_wsp": "kernel"}))
    monkeypatch.setattr(gluon_launch, "_descriptor", lambda t, rows: ("descriptor", tuple(t.shape), rows))
    monkeypatch.setattr(gluon_launch, "device_profile", lambda device: H200)
    cfg = gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND, tma_store=True)
    assert (cfg.STAGES, gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND).STAGES) == (2, 3)
    assert gluon_launch.footprint(128, 128, 128, 2, 2, True, 2, True) - gluon_launch.footprint(
        128, 128, 128, 2, 2, True, 2) == 2 * 128 * 128
    for n_q, strides, taken in ((1024, None, True), (1000, None, False), (1088, None, True),
                                (1024, (2 * 1024 * 128, 128, 2 * 128, 1), False)):
        q = torch.empty(1, 2, n_q, 128, dtype=torch.bfloat16, device="meta")
        found = gluon_launch.forward_launch(sdpa_spec(), q, q, 0.1, cfg, out_strides=strides)
        assert found.constexprs["TMA_STORE"] is taken
        if taken:
            assert found.output(q) == ("descriptor", tuple(q.shape), 64)
        else:
            assert found.output(q) is q
    with pytest.raises(ValueError):
        gluon_launch.GluonConfig(128, 128, 2, ws=True, tma_store=True)  # the persistent kernel's option


def test_tma_view_of_each_layout():
    """The persistent kernel's descriptor view: heads as rows (contiguous, padded rows), heads side
    by side ((Z, N, H, d) storage transposed, and a packed qkv's slices), else None."""
    view = gluon_launch.tma_view
    assert view(torch.empty(2, 4, 100, 64)) == ((800, 64), 64, 400, 100, 0)
    assert view(torch.empty(2, 4, 100, 80)[..., :64]) == ((800, 64), 80, 400, 100, 0)  # padded rows
    assert view(torch.empty(2, 100, 4, 64).transpose(1, 2)) == ((200, 256), 256, 100, 0, 64)
    packed = torch.empty(2, 100, 3, 4, 64)  # (B, N, 3, H, d): q, k, v as slices
    assert view(packed[:, :, 1].transpose(1, 2)) == ((200, 256), 768, 100, 0, 64)
    assert view(torch.empty(2, 4, 64, 100).transpose(2, 3)) is None  # d not contiguous
    assert view(torch.empty(2, 4, 100, 64)[:, :, ::2]) is not None  # every other row: row stride 128
    assert view(torch.empty(1, 4, 100, 64).expand(1, 4, 100, 64)) is not None
    assert view(torch.empty(1, 1, 100, 64).expand(1, 4, 100, 64)) is None  # heads overlapping


def test_descriptors_are_copies_of_fields_checked_once(monkeypatch):
    """_descriptor checks a layout's fields once (TensorDescriptor's own checks, tma_view) and then
    copies them with each call's tensor as base: equal to a freshly built descriptor, its base the
    new tensor, and no tensor kept in the cache; a new layout is checked again."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    monkeypatch.setattr(gluon_launch, "_descriptor_fields", {})
    built = []
    real = gluon_launch.tma_view
    monkeypatch.setattr(gluon_launch, "tma_view", lambda t: built.append(t.shape) or real(t))
    first, second = (torch.empty(2, 100, 4, 64, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    a, b = gluon_launch._descriptor(first, 64), gluon_launch._descriptor(second, 64)
    assert type(b) is TensorDescriptor and b.base is second and a.base is first and len(built) == 1
    fresh = TensorDescriptor(second, a.shape, a.strides, a.block_shape, a.layout)
    assert vars(b) == vars(fresh)
    assert (b.shape, b.strides, b.block_shape) == ([200, 256], [256, 1], [64, 64])
    assert not any(isinstance(v, torch.Tensor) for fields in gluon_launch._descriptor_fields.values()
                   for v in fields.values())
    gluon_launch._descriptor(torch.empty(2, 4, 100, 64, dtype=torch.bfloat16), 64)  # heads as rows: checked
    gluon_launch._descriptor(second, 128)  # another block: checked
    assert len(built) == 3


def test_every_routed_spec_runs_the_persistent_kernel():
    """The routed kernel is the persistent warp-specialized one for every spec (call 9 on the H200:
    at or above the non-persistent kernel in every row from 1k to 16k, plain and causal)."""
    assert gluon_launch.ROUTED_KIND == dict(ws=True, persistent=True)
    assert gluon_launch.default_config(H200, 128, 2, **gluon_launch.ROUTED_KIND).persistent
