"""The Gluon sm90 backward (fx_flash/codegen/gluon_bwd.py, gluon_launch's backward section) without a
GPU: what it renders, which specs and calls it refuses, its tile from shared memory M, its launch
arguments, that it compiles for sm_90 to wgmma, TMA and atomics in exactly the modelled shared
memory, and a float64 emulation of its algorithm (the rendered walk over query tiles, the exp2/LSE
weights, dQ summed by atomics) against autograd."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import expecttest
import pytest
import sympy
import torch

from fx_flash.codegen import gluon_launch, launch
from fx_flash.codegen.gluon import _beyond_causal
from fx_flash.codegen.gluon_bwd import chain_rule, render_gluon_bwd, unsupported
from fx_flash.codegen.spec import KV_IDX, N_KV, N_Q, Q_IDX, QK, SCALE, H_IDX, sdpa_spec, spec_from_text
from fx_flash.device import DeviceProfile
from fx_flash.reference import safe_softmax, spec_scores
from tests import test_kernels
from tests.numerics import poison_outputs
from tests.test_gluon import RecordingKernel, _gluon_hopper_available

ROOT = Path(__file__).resolve().parents[1]
H200 = DeviceProfile("NVIDIA H200", shared_memory=232448, multiprocessors=132, capability=(9, 0))
CAUSAL = "score=qk*scale; keep=kv_idx <= q_idx"
SOFTCAP = "score=50*tanh(qk*scale/50); keep=kv_idx <= q_idx"
PREFIX_LM = "score=qk*scale; keep=(kv_idx <= q_idx) | (kv_idx < 64)"
STRICT = "score=qk*scale; keep=kv_idx < q_idx"  # row 0 keeps no key: LSE = -inf there
HEAD_AND_LENGTH = "score=qk*scale + h; keep=kv_idx < n_kv - 3"
ALIBI_CAUSAL = "score=qk*scale + (kv_idx - q_idx)*h; keep=kv_idx <= q_idx"  # a slope per head, as ALiBi's
BM, BN = gluon_launch.BWD_BLOCK_M, gluon_launch.BWD_BLOCK_N


class TestRendered(expecttest.TestCase):
    def test_constant_chain_rule_is_one_factor(self):
        """Plain attention: d(score)/d(qk) = scale, applied once to dK and to each dQ share."""
        self.assertEqual(chain_rule(sdpa_spec()), ("p", "(sm_scale)"))

    def test_softcap_chain_rule_is_per_element(self):
        """Soft-capping: the derivative of 50·tanh(qk·scale/50) per element, in the forward's
        spelling of tanh, multiplying the weights; no factor at the end."""
        pg, factor = chain_rule(spec_from_text(SOFTCAP))
        self.assertExpectedInline(pg, """p * (sm_scale*(1 - ((1.0 - 2.0 / (gl.exp2(2.8853900817779268 * (qk*sm_scale/50)) + 1.0)) * (1.0 - 2.0 / (gl.exp2(2.8853900817779268 * (qk*sm_scale/50)) + 1.0)))))""")
        self.assertEqual(factor, "1.0")

    def test_mask_kinds(self):
        """The forward's MASK: 0 no predicate, 1 causal band, 2 every tile."""
        for text, kind in (("score=qk*scale", 0), (CAUSAL, 1), (SOFTCAP, 1), (PREFIX_LM, 2)):
            self.assertIn(f"MASK = gl.constexpr({kind})", render_gluon_bwd(spec_from_text(text)))

    def test_header_names_the_spec(self):
        """Generated files say they are generated and name their spec and key."""
        spec = spec_from_text(SOFTCAP)
        head = render_gluon_bwd(spec).splitlines()[:3]
        self.assertEqual(head[1], f"# spec: {spec.describe()}")
        self.assertEqual(head[2], f"# spec key: {spec.key}")

    def test_keys_on_rows_prints_the_score_transposed(self):
        """KEYS_ON_ROWS's copy of the score and chain rule reads the positions with keys on rows
        (offs_n[:, None], offs_m[None, :]: the portable dK/dV kernel's binding), the other copy
        with queries on rows; each weighs its LSE along its own query axis."""
        src = render_gluon_bwd(spec_from_text(PREFIX_LM))
        body = re.search(r"    if KEYS_ON_ROWS:\n(.*?)    else:\n(.*?)    return p, pg", src, re.S)
        transposed, upright = body.group(1), body.group(2)
        self.assertIn("((offs_n[:, None] <= offs_m[None, :]) | (offs_n[:, None] < 64))", transposed)
        self.assertIn("p = gl.exp2(s - base[None, :])", transposed)
        self.assertNotIn("p_smem", transposed)  # P stays in registers
        self.assertIn("((offs_n[None, :] <= offs_m[:, None]) | (offs_n[None, :] < 64))", upright)
        self.assertIn("p = gl.exp2(s - base[:, None])", upright)
        self.assertEqual(chain_rule(spec_from_text("score=qk*scale + h; keep=kv_idx < n_kv - 3"), "nm"),
                         chain_rule(spec_from_text("score=qk*scale + h; keep=kv_idx < n_kv - 3")))

    def test_no_triton_spelling_is_left(self):
        for text in (CAUSAL, SOFTCAP, PREFIX_LM, HEAD_AND_LENGTH, "score=sigmoid(qk*scale)"):
            assert "tl." not in render_gluon_bwd(spec_from_text(text)), text


@pytest.mark.parametrize("text, reason", [
    ("score=qk*scale + t0; t0=float[h, q_idx, kv_idx] grad", "operands"),
    ("score=qk*scale; dropout", "dropout"),
    ("score=qk*scale; keep=kv_idx <= q_idx; fill=-10000.0", "finite fill"),
    ("score=sin(qk)*scale", "sin"),
])
def test_unsupported_specs_are_refused(text, reason):
    """What the forward refuses, the backward refuses (the portable backward runs them)."""
    assert reason in (unsupported(spec_from_text(text)) or "")


@pytest.mark.parametrize("text", ["score=qk*scale", CAUSAL, SOFTCAP, PREFIX_LM, STRICT, HEAD_AND_LENGTH])
def test_supported_specs(text):
    assert unsupported(spec_from_text(text)) is None


def test_backward_tile_fits_shared_memory_by_construction():
    """The ring is the deepest of at most BWD_MAX_STAGES that fits M; no tile when two stages do
    not fit, and every tile default gives fits."""
    assert gluon_launch.backward_config(H200, 128, 2) == gluon_launch.GluonBwdConfig(64, 128, 3, KEYS_ON_ROWS=True,
                                                                                      ROWS_SHARED=True,
                                                                                      TMA_EPILOGUE=True, LPT=True)
    assert gluon_launch.backward_config(H200, 64, 2) == gluon_launch.GluonBwdConfig(64, 128, 3, ROWS_AHEAD=True,
                                                                                     TMA_EPILOGUE=True)
    ada = DeviceProfile("ada", 101376, 1, (8, 9))
    assert gluon_launch.backward_config(ada, 128, 2) is None  # 196,648 B at two stages
    assert gluon_launch.backward_config(ada, 64, 2) is None  # 114,728 B: the dQ staging tile does not fit
    small = DeviceProfile("small", 120 * 1024, 1, (9, 0))
    assert gluon_launch.backward_config(small, 64, 2) == gluon_launch.GluonBwdConfig(64, 128, 2, ROWS_AHEAD=True,
                                                                                      TMA_EPILOGUE=True)
    for device in (H200, ada, small, DeviceProfile("m", 180 * 1024, 1, (9, 0))):
        for d in gluon_launch.HEAD_DIMS:
            for rows in (64, 128):
                cfg = gluon_launch.backward_config(device, d, 2, rows)
                if cfg is not None:
                    assert gluon_launch.footprint_bwd(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES, cfg.KEYS_ON_ROWS,
                                                      cfg.ROWS_SHARED) <= device.shared_memory


def test_query_rows_a_step_by_head_dim_and_score():
    """At d = 64 a step takes 128 query rows (call 39: 1.05-1.11x the 64-row step) when the score
    is qk·scale, whatever the predicate (plain, causal, prefix-LM); soft-capping's per-element
    derivative and an ALiBi-like positional term keep 64 (they spill at 128), as does d = 128
    (128 rows do not fit M there). 128 rows at three stages fill the H200's M to 229,448 B of its
    232,448; a device that cannot hold two stages of them gets 64 rows, not nothing. At 128 rows
    each warpgroup takes its own 64 (SPLIT_M, call 45); at 64 rows it cannot, and the flag is off."""
    alibi = ALIBI_CAUSAL
    assert [gluon_launch.backward_rows(spec_from_text(t), 64) for t in ("score=qk*scale", CAUSAL, PREFIX_LM)] == [
        128, 128, 128]
    assert gluon_launch.backward_rows(spec_from_text("score=qk*0.5*scale"), 64) == 128
    assert gluon_launch.backward_rows(spec_from_text(alibi), 64) == 64
    assert gluon_launch.backward_rows(spec_from_text(SOFTCAP), 64) == 64
    assert gluon_launch.backward_rows(spec_from_text(CAUSAL), 128) == 64
    assert gluon_launch.backward_config(H200, 64, 2, 128) == gluon_launch.GluonBwdConfig(128, 128, 3, ROWS_AHEAD=True,
                                                                                          SPLIT_M=True,
                                                                                          TMA_EPILOGUE=True)
    assert gluon_launch.backward_config(H200, 64, 2) == gluon_launch.GluonBwdConfig(64, 128, 3, ROWS_AHEAD=True,
                                                                                     TMA_EPILOGUE=True)
    assert gluon_launch.footprint_bwd(128, 128, 64, 2, 3) == 229448
    assert gluon_launch.backward_config(H200, 128, 2, 128) == gluon_launch.backward_config(H200, 128, 2)
    m = DeviceProfile("m", 180 * 1024, 1, (9, 0))  # 128 rows need 196,648 B at two stages
    assert gluon_launch.backward_config(m, 64, 2, 128) == gluon_launch.GluonBwdConfig(64, 128, 3, ROWS_AHEAD=True,
                                                                                       TMA_EPILOGUE=True)


def test_backward_footprint_counts_each_buffer():
    """K, V, two stages of Q and dO, P and dS at d = 128 in bf16, the fp32 dQ staging tile, and five
    mbarriers; with keys on rows dS alone (P is a register operand)."""
    tiles = 2 * (2 * 128 * 128 + 2 * 2 * 64 * 128 + 2 * 64 * 128)
    assert gluon_launch.footprint_bwd(64, 128, 128, 2, 2) == tiles + 4 * 64 * 128 + 8 + 2 * 16
    assert gluon_launch.footprint_bwd(64, 128, 128, 2, 2, keys_on_rows=True) == (
        tiles - 2 * 64 * 128 + 4 * 64 * 128 + 8 + 2 * 16)


def test_the_ring_is_sized_by_the_default_schedules_buffers(monkeypatch):
    """The ring is the deepest that fits with the buffers of the head dim's default schedule: on a
    device where P's 16 KB decides between two stages and three, a schedule that stores P gets
    two, keys on rows (no P tile) three; the rows' shared tiles (1 KB) count too."""
    three_without_p = gluon_launch.footprint_bwd(64, 128, 128, 2, 3, keys_on_rows=True, rows_shared=True)
    assert three_without_p == gluon_launch.footprint_bwd(64, 128, 128, 2, 3, keys_on_rows=True) + 2 * 2 * 4 * 64
    device = DeviceProfile("between", three_without_p, 1, (9, 0))
    monkeypatch.setitem(gluon_launch.BWD_SCHEDULES, 128, dict(DV_EARLY=True))
    assert gluon_launch.backward_config(device, 128, 2).STAGES == 2
    monkeypatch.setitem(gluon_launch.BWD_SCHEDULES, 128, dict(KEYS_ON_ROWS=True, ROWS_SHARED=True))
    assert gluon_launch.backward_config(device, 128, 2) == gluon_launch.GluonBwdConfig(
        64, 128, 3, KEYS_ON_ROWS=True, ROWS_SHARED=True)
    smaller = DeviceProfile("smaller", three_without_p - 16, 1, (9, 0))
    assert gluon_launch.backward_config(smaller, 128, 2).STAGES == 2


def test_on_by_default(monkeypatch):
    """The backward is on unless FX_FLASH_GLUON_BWD=0, and plans key on the switch (a plan built
    with one value is not reused with another)."""
    monkeypatch.delenv("FX_FLASH_GLUON_BWD", raising=False)
    assert gluon_launch.backward_enabled()
    assert "FX_FLASH_GLUON_BWD" in launch.SWITCHES
    default = launch.switches()
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "0")
    assert not gluon_launch.backward_enabled()
    assert launch.switches() != default
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "1")
    assert gluon_launch.backward_enabled()


def test_routing_rules(monkeypatch):
    """What the kernel could compute but the portable backward still runs by default: ranged specs
    (the portable backward skips their tiles), calls with
    fewer than BWD_MIN_PAIRS_PER_SM (query head, key tile) pairs per SM (host-bound or few long
    programs on the H200); fp32 never gets this far (unsupported). FX_FLASH_GLUON_BWD=1 routes
    them all."""
    monkeypatch.delenv("FX_FLASH_GLUON_BWD", raising=False)
    monkeypatch.setattr(gluon_launch, "device_profile", lambda device: H200)
    cfg = gluon_launch.backward_config(H200, 128, 2)

    def reason(spec, z, h, n, d=128, dtype=torch.bfloat16):
        q = torch.empty(z, h, n, d, dtype=dtype, device="meta")
        return gluon_launch.not_routed_backward(spec, q, q, cfg)

    window = spec_from_text("score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx - kv_idx < 128)")
    assert window.tile_mode == "ranged"
    assert H200.multiprocessors * gluon_launch.BWD_MIN_PAIRS_PER_SM == 528
    assert reason(sdpa_spec(), 2, 16, 4096) is None  # 1024 pairs
    assert reason(spec_from_text(CAUSAL), 8, 16, 1024, dtype=torch.float16) is None  # the grid's 1k rows: 1024
    assert "512 (query head, key tile) pairs" in reason(sdpa_spec(), 1, 16, 4096)
    assert reason(sdpa_spec(), 2, 16, 4096, d=64) is None  # d = 64 too since call 18 (its own schedule)
    assert "ranged" in reason(window, 2, 16, 4096)
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "1")
    assert reason(sdpa_spec(), 1, 1, 128, d=64) is None and reason(window, 2, 16, 4096) is None


def _as_if_sm90(monkeypatch):
    """Calls pass the forward's device, dtype and layout rules (tested in test_gluon.py)."""
    monkeypatch.setattr(gluon_launch, "unsupported_call", lambda spec, q, k, v, config: gluon_launch.unsupported(spec))


def test_backward_refusals(monkeypatch):
    """What falls back to the portable backward, and why: CPU tensors (the interpreter too); then,
    past the forward's rules, a dO not laid out as q (q, k, v, dO as (B, N, H, d) storage pass), a
    non-contiguous LSE, and the spec."""
    q = torch.randn(1, 2, 128, 64, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 128)
    cfg = gluon_launch.backward_config(H200, 64, 2)
    assert gluon_launch.unsupported_backward_call(sdpa_spec(), q, q, q, q, lse, cfg) == "not on a CUDA device"
    _as_if_sm90(monkeypatch)
    assert gluon_launch.unsupported_backward_call(sdpa_spec(), q, q, q, q, lse, cfg) is None
    do_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert "dout" in gluon_launch.unsupported_backward_call(sdpa_spec(), do_t, q, q, q, lse, cfg)
    bnhd = torch.randn(1, 128, 2, 64, dtype=torch.bfloat16).transpose(1, 2)  # (B, N, H, d) storage, as HF passes
    assert gluon_launch.unsupported_backward_call(sdpa_spec(), bnhd, bnhd, bnhd, bnhd, lse, cfg) is None
    assert "dout" in gluon_launch.unsupported_backward_call(sdpa_spec(), q, bnhd, bnhd, bnhd, lse, cfg)
    lse_view = torch.zeros(1, 128, 2).transpose(1, 2)
    assert "lse" in gluon_launch.unsupported_backward_call(sdpa_spec(), q, q, q, q, lse_view, cfg)
    assert "dropout" in gluon_launch.unsupported_backward_call(sdpa_spec(dropout=True), q, q, q, q, lse, cfg)


def test_spec_is_decided_once_per_direction(monkeypatch):
    """Deciding whether a spec renders for Gluon costs milliseconds of sympy printing; a call
    decides each (direction, spec) once per process, not on every launch (done per call, it made
    the Gluon forward and backward host-bound on the H200: GLUON_NOTES call 6)."""
    monkeypatch.setattr(gluon_launch, "_reasons", {})
    counted = {"fwd": 0, "bwd": 0}

    def counting(direction, real):
        def decide(spec):
            counted[direction] += 1
            return real(spec)
        return decide

    monkeypatch.setattr(gluon_launch, "unsupported", counting("fwd", gluon_launch.unsupported))
    monkeypatch.setattr(gluon_launch, "unsupported_backward", counting("bwd", gluon_launch.unsupported_backward))
    causal = spec_from_text("score=qk*scale; keep=kv_idx <= q_idx")
    for _ in range(3):
        for spec in (sdpa_spec(), causal, sdpa_spec(dropout=True)):
            gluon_launch.spec_reason(spec)
            gluon_launch.spec_reason(spec, backward=True)
    assert counted == {"fwd": 3, "bwd": 3}
    assert gluon_launch.spec_reason(sdpa_spec(dropout=True), backward=True) == "dropout"
    assert gluon_launch.spec_reason(causal) is None and gluon_launch.spec_reason(causal, backward=True) is None


def test_refusals_are_logged_and_build_nothing(monkeypatch, caplog):
    """routed_backward returns None and logs the reason at debug level when the portable backward
    must run: not on a GPU; switched off; under torch.use_deterministic_algorithms (even with
    FX_FLASH_GLUON_BWD=1: this kernel's dQ sum has no fixed order). Where it applies it returns
    the BackwardLaunch (the routing rules: test_routing_rules)."""
    built = []
    monkeypatch.setattr(gluon_launch, "backward_launch", lambda *a: built.append(a) or "launch")
    monkeypatch.delenv("FX_FLASH_GLUON_BWD", raising=False)
    q = torch.randn(1, 2, 128, 128, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 128)
    with caplog.at_level("DEBUG", logger="fx_flash"):
        assert gluon_launch.routed_backward(sdpa_spec(), q, q, q, q, lse) is None
    assert "gluon backward not used" in caplog.text and "not on a CUDA device" in caplog.text
    _as_if_sm90(monkeypatch)
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "1")  # past not_routed_backward (a CPU tensor has no SMs)
    assert gluon_launch.routed_backward(sdpa_spec(), q, q, q, q, lse) == "launch"
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "0")
    with caplog.at_level("DEBUG", logger="fx_flash"):
        assert gluon_launch.routed_backward(sdpa_spec(), q, q, q, q, lse) is None
    assert "FX_FLASH_GLUON_BWD=0" in caplog.text
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "1")
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level("DEBUG", logger="fx_flash"):
            assert gluon_launch.routed_backward(sdpa_spec(), q, q, q, q, lse) is None
    finally:
        torch.use_deterministic_algorithms(False)
    assert "use_deterministic_algorithms" in caplog.text
    assert len(built) == 1


def test_routed_backward_orders_only_causal_walks_longest_first():
    """d = 128's schedule has LPT (call 52: 1.01-1.05x on causal and soft-capping rows); the routed
    tile keeps it for causal specs only, where it changes the order (gluon_bwd._key_tile), so that
    a plain call's tile does not name an order it does not have. d = 64's schedule has none. The
    interleaved dQ staging is routed where it was measured ahead (gluon_launch.interleaves_dq); the
    persistent walk nowhere (call 111: the interleaved staging without it ran ahead of it)."""
    causal, softcap = sdpa_spec(causal=True), spec_from_text(SOFTCAP)
    tiles = {name: gluon_launch.routed_backward_config(H200, spec, 128, 2)
             for name, spec in (("plain", sdpa_spec()), ("causal", causal), ("softcap", softcap))}
    assert {name: cfg.LPT for name, cfg in tiles.items()} == {"plain": False, "causal": True, "softcap": True}
    assert "lpt" not in str(tiles["plain"])
    assert str(tiles["causal"]).endswith("rows_shared lpt tma_epilogue dq_interleave")
    assert tiles["plain"] == gluon_launch.GluonBwdConfig(64, 128, 3, KEYS_ON_ROWS=True, ROWS_SHARED=True,
                                                         TMA_EPILOGUE=True)
    assert not gluon_launch.routed_backward_config(H200, causal, 64, 2).LPT
    # the persistent walk: no route (call 111)
    assert not any(cfg.PERSISTENT for cfg in tiles.values())
    assert not gluon_launch.routed_backward_config(H200, spec_from_text(ALIBI_CAUSAL), 128, 2).PERSISTENT
    assert not gluon_launch.routed_backward_config(H200, causal, 64, 2).PERSISTENT
    # the interleaved dQ staging (calls 108b-108c, 111): d = 128's causal band, d = 64 without a
    # predicate on its 128-row tile
    assert {name: cfg.DQ_INTERLEAVE for name, cfg in tiles.items()} == {"plain": False, "causal": True,
                                                                       "softcap": True}
    assert gluon_launch.routed_backward_config(H200, spec_from_text(ALIBI_CAUSAL), 128, 2).DQ_INTERLEAVE
    d64 = {name: gluon_launch.routed_backward_config(H200, spec, 64, 2)
           for name, spec in (("plain", sdpa_spec()), ("causal", causal), ("softcap", softcap))}
    assert {name: (cfg.BLOCK_M, cfg.DQ_INTERLEAVE) for name, cfg in d64.items()} == {
        "plain": (128, True), "causal": (128, False), "softcap": (64, False)}
    q = torch.empty(1, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    # Q, dO and the fp32 dQ rows of a head at 8k: 8 MiB, four of them in the 32 MiB section
    assert gluon_launch.bwd_heads_per_section(causal, q, q, tiles["causal"]) == 4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_enabled_path_falls_back_to_the_portable_backward(monkeypatch, causal):
    """With FX_FLASH_GLUON_BWD=1 a call the Gluon backward cannot take (here: not on a GPU) runs the
    portable backward and stays exact; the Gluon launcher is never called."""
    poison_outputs(monkeypatch)
    monkeypatch.setenv("FX_FLASH_GLUON_BWD", "1")
    launched = []
    monkeypatch.setattr(gluon_launch, "launch_backward", lambda *a, **kw: launched.append(a))
    torch.manual_seed(0)
    test_kernels.check(test_kernels.SHAPES["ragged_cross"], torch.float32, causal=causal)
    assert not launched


def _fake_module(monkeypatch):
    calls = []
    module = type("Module", (), {n: RecordingKernel(n, calls) for n in ("_attn_bwd_sm90_prep", "_attn_bwd_sm90")})
    monkeypatch.setattr(gluon_launch, "load_backward", lambda spec: module)
    monkeypatch.setattr(gluon_launch, "_descriptor", lambda t, rows, interleaved=False: (
        "descriptor", tuple(t.shape), rows, *(("interleaved", ) if interleaved else ())))
    return calls


def test_routed_path_is_a_plan(monkeypatch):
    """Where the Gluon backward applies, attention_backward returns its (dq, dk, dv) and no operand
    gradients through a _GluonBackward plan, decided once per key: the next call of the key
    launches the same two kernels without deciding again; use_deterministic_algorithms is in the
    key, so switching it decides again."""
    calls = _fake_module(monkeypatch)
    q = torch.randn(1, 2, 100, 128, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 100)
    routed = gluon_launch.backward_launch(sdpa_spec(), q, q, gluon_launch.GluonBwdConfig(64, 128, 3))
    decided = []
    monkeypatch.setattr(gluon_launch, "routed_backward", lambda *a: decided.append(a) or routed)
    monkeypatch.setattr(launch, "_Backward", None)  # would raise if called
    launch.clear_plans()
    for _ in range(2):
        dq, dk, dv, grads = launch.attention_backward(q, q, q, q, q, lse, [], None, 0.0, 0.125, sdpa_spec())
        assert (dq.shape, dq.dtype, dk.shape, dv.shape, grads) == (q.shape, q.dtype, q.shape, q.shape, [])
    assert len(decided) == 1
    assert [name for name, *_ in calls] == ["_attn_bwd_sm90_prep", "_attn_bwd_sm90"] * 2
    fixed = [[a for a in args if not isinstance(a, torch.Tensor)] for _, _, args, _ in calls]
    assert fixed[1] == fixed[3] and calls[1][3] == calls[3][3]  # the same sizes, descriptors and constexprs
    torch.use_deterministic_algorithms(True)
    try:
        launch.attention_backward(q, q, q, q, q, lse, [], None, 0.0, 0.125, sdpa_spec())
    finally:
        torch.use_deterministic_algorithms(False)
        launch.clear_plans()
    assert len(decided) == 2


def test_launch_arguments(monkeypatch):
    """launch_backward: the Delta kernel over (query tiles of 64, Z·H) zeroing an fp32 dQ of N_Q
    rows per head rounded up to 64, then one program per (key tile, Z·H_KV) with the descriptors of
    q, k, v, dO and that dQ, dk/dv strides, the sizes and the tile; dq comes back cut to N_Q rows in
    q's dtype, dk and dv contiguous in k's and v's."""
    calls = _fake_module(monkeypatch)
    z, h, h_kv, n_q, n_kv, d = 2, 8, 2, 200, 256, 128
    q = torch.empty(z, h, n_q, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(z, h_kv, n_kv, d, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(z, h, n_q, device="meta")
    cfg = gluon_launch.GluonBwdConfig(64, 128, 3, DV_EARLY=True)
    dq, dk, dv = gluon_launch.launch_backward(sdpa_spec(), q, q, k, k, q, lse, 0.1, cfg)
    (prep, prep_grid, prep_args, prep_kw), (main, grid, args, kw) = calls
    assert (prep, prep_grid) == ("_attn_bwd_sm90_prep", (4, z * h))
    dq_acc = prep_args[3]
    assert prep_args[2].shape == (z, h, n_q) and dq_acc.dtype == torch.float32  # Delta, the dQ accumulator
    assert dq_acc.shape == (z, h, 256, d) and dq_acc.is_contiguous()  # 200 rows per head rounded up to 256
    assert prep_args[-3:] == (h, n_q, 256) and prep_kw["HEAD_DIM"] == d
    assert (main, grid) == ("_attn_bwd_sm90", (n_kv // 128, z * h_kv))
    assert args[:5] == (("descriptor", q.shape, 64), ("descriptor", k.shape, 128), ("descriptor", k.shape, 128),
                        ("descriptor", q.shape, 64), ("descriptor", dq_acc.shape, 64))
    assert args[7] is lse and args[8] is prep_args[2] and args[10] == 0.1
    assert args[9].dtype == torch.int32  # the persistent walk's table, unread without PERSISTENT
    assert args[11:19] == dk.stride() + dv.stride() and args[19:23] == (h, n_q, n_kv, 256)
    assert args[23:29] == (h * n_q, n_q, 0, h_kv * n_kv, n_kv, 0)  # heads as rows (tma_view)
    assert args[29:] == (z * h_kv, )  # not causal: one section of every K/V head (the grid's own order)
    assert {key: kw[key] for key in ("GROUP", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "STAGES", "num_warps")} == dict(
        GROUP=4, HEAD_DIM=d, BLOCK_M=64, BLOCK_N=128, STAGES=3, num_warps=8)
    assert (kw["DV_EARLY"], kw["ROWS_AHEAD"], kw["KEYS_ON_ROWS"], kw["ROWS_SHARED"], kw["LPT"], kw["PERSISTENT"]) == (
        True, False, False, False, False, False)
    assert (dq.dtype, dq.shape, dk.shape, dk.is_contiguous()) == (torch.bfloat16, q.shape, k.shape, True)


def test_launch_arguments_with_the_tma_epilogue(monkeypatch):
    """With TMA_EPILOGUE the kernel takes dK and dV as TMA descriptors over the contiguous outputs in
    tiles of BLOCK_N rows (K's shape and tile, so that K's and V's shared memory holds them), and the
    flag as a constexpr; the strides still follow."""
    calls = _fake_module(monkeypatch)
    z, h, n, d = 2, 4, 256, 64
    q = torch.empty(z, h, n, d, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(z, h, n, device="meta")
    cfg = gluon_launch.GluonBwdConfig(128, 128, 3, ROWS_AHEAD=True, SPLIT_M=True, TMA_EPILOGUE=True)
    _, dk, dv = gluon_launch.launch_backward(sdpa_spec(), q, q, q, q, q, lse, 0.1, cfg)
    _, (main, grid, args, kw) = calls
    assert args[5:7] == (("descriptor", dk.shape, 128), ("descriptor", dv.shape, 128))
    assert args[11:19] == dk.stride() + dv.stride()
    assert (kw["TMA_EPILOGUE"], kw["SPLIT_M"], kw["BLOCK_M"]) == (True, True, 128)
    assert args[4] == ("descriptor", (z, h, n, d), 128) and not kw["DQ_INTERLEAVE"]  # dQ's tiles in order
    # DQ_INTERLEAVE: dQ's descriptor is the interleaved one (gluon_launch.interleaved_rows), the flag a constexpr
    gluon_launch.launch_backward(sdpa_spec(), q, q, q, q, q, lse, 0.1, replace(cfg, DQ_INTERLEAVE=True))
    (_, _, args, kw) = calls[-1]
    assert args[4] == ("descriptor", (z, h, n, d), 128, "interleaved") and kw["DQ_INTERLEAVE"]


@pytest.mark.parametrize("text", ["score=qk*scale", CAUSAL])
def test_persistent_launch_reads_its_table(monkeypatch, text):
    """With PERSISTENT the kernel runs on ``programs`` programs (one per SM by default) and takes
    backward_order's table of this call: row 0 each program's rounds, then its key tiles."""
    calls = _fake_module(monkeypatch)
    z, h, h_kv, n, d = 2, 8, 2, 1024, 128
    q = torch.empty(z, h, n, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(z, h_kv, n, d, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(z, h, n, device="meta")
    cfg = gluon_launch.GluonBwdConfig(64, 128, 3, KEYS_ON_ROWS=True, ROWS_SHARED=True, LPT=True, TMA_EPILOGUE=True,
                                      PERSISTENT=True)
    monkeypatch.setattr(gluon_launch, "_table_on", lambda device, build, *args: build(*args))
    gluon_launch.launch_backward(spec_from_text(text), q, q, k, k, q, lse, 0.1, cfg, programs=7)
    _, (main, grid, args, kw) = calls
    causal = text == CAUSAL
    section = gluon_launch.bwd_heads_per_section(spec_from_text(text), q, k, cfg)
    steps = gluon_launch.backward_steps(n, n, cfg, h // h_kv, causal)
    assert grid == (7, ) and kw["PERSISTENT"]
    assert torch.equal(args[9], gluon_launch.backward_order(n // 128, z * h_kv, section, causal, True, steps, 7))
    # a key tile's steps: its query tiles of 64 rows from its diagonal on (causal), of its 4 query heads
    assert steps == (tuple(4 * (16 - 2 * n) for n in range(8)) if causal else (4 * 16, ) * 8)


@pytest.mark.parametrize("n_tiles, heads, section, causal, group, programs", [
    (8, 256, 32, True, 1, 132), (8, 256, 256, False, 1, 132), (16, 64, 64, True, 4, 132), (3, 5, 2, True, 1, 4),
    (4, 3, 3, False, 2, 12), (2, 1, 1, True, 1, 2)])
def test_backward_order(n_tiles, heads, section, causal, group, programs):
    """backward_order: every (key tile, K/V head) exactly once; every program at least one round,
    row 0 its count and -1 after; each program's tiles in launch order (bwd_launch_order), so
    longest first where LPT orders causal walks; and the greedy bound: no program's modelled work
    exceeds the mean by more than the longest tile's."""
    cfg = gluon_launch.GluonBwdConfig(64, 128, 2)
    steps = gluon_launch.backward_steps(n_tiles * 128, n_tiles * 128, cfg, group, causal)
    table = gluon_launch.backward_order(n_tiles, heads, section, causal, True, steps, programs).tolist()
    counts, rounds = table[0], table[1:]
    assert min(counts) >= 1 and len(rounds) == max(counts)
    walks = [[rounds[r][p] for r in range(len(rounds)) if rounds[r][p] >= 0] for p in range(programs)]
    assert [len(w) for w in walks] == counts
    assert all(rounds[r][p] == -1 for p in range(programs) for r in range(counts[p], len(rounds)))
    launch_order = gluon_launch.bwd_launch_order(n_tiles, heads, section, causal)
    position = {n + n_tiles * hz: i for i, (n, hz) in enumerate(launch_order)}
    assert sorted(e for w in walks for e in w) == sorted(position)
    assert all(w == sorted(w, key=position.get) for w in walks)
    cost = [sum(steps[e % n_tiles] + gluon_launch.BWD_TILE_COST_STEPS for e in w) for w in walks]
    longest = max(steps) + gluon_launch.BWD_TILE_COST_STEPS
    assert max(cost) <= sum(cost) / programs + longest
    with pytest.raises(ValueError):
        gluon_launch.backward_order(n_tiles, heads, section, causal, True, steps, n_tiles * heads + 1)


def test_sections_of_the_longest_first_order():
    """bwd_heads_per_section: with LPT on a causal spec, the K/V heads whose query heads' Q and dO
    (in the dtype) and fp32 dQ rows fit L2_SECTION_BYTES (32 MiB), at least one and at most all;
    otherwise all of them."""
    lpt = gluon_launch.GluonBwdConfig(64, 128, 2, LPT=True)

    def section(text, z, h, h_kv, n, d=128, config=lpt, dtype=torch.bfloat16):
        q = torch.empty(z, h, n, d, dtype=dtype, device="meta")
        k = torch.empty(z, h_kv, n, d, dtype=dtype, device="meta")
        return gluon_launch.bwd_heads_per_section(spec_from_text(text), q, k, config)

    assert section(CAUSAL, 2, 16, 16, 8192) == 4  # 8192 · 128 · (2 + 2 + 4) B = 8 MiB a head
    assert section(CAUSAL, 16, 16, 16, 1024) == 32
    assert section(CAUSAL, 16, 16, 16, 1024, d=64) == 64
    assert section(CAUSAL, 2, 16, 4, 8192) == 1  # GQA: a K/V head's four query heads, 32 MiB
    assert section(CAUSAL, 1, 32, 1, 8192) == 1  # more than L2_SECTION_BYTES: still one head
    assert section(CAUSAL, 1, 2, 2, 1024) == 2  # fewer heads than fit: all of them
    assert section("score=qk*scale", 2, 16, 16, 8192) == 32
    assert section(PREFIX_LM, 2, 16, 16, 8192) == 32
    assert section(CAUSAL, 2, 16, 16, 8192, config=gluon_launch.GluonBwdConfig(64, 128, 2)) == 32


# ---------------------------------------------------------------------------------------------
# The algorithm, emulated in float64 on the CPU


class _Shim:
    """Stands in for ``gl`` in the rendered scalar helpers: integer arithmetic, and loads of a
    _Pointer; ``pid`` and ``grid`` are the program's position in the grid and the grid's shape."""
    minimum = staticmethod(min)
    reshape, permute = staticmethod(torch.reshape), staticmethod(torch.permute)  # of tiles: _interleave_rows
    pid, grid = (0, 0), (1, 1)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def load(pointer):
        return pointer.values[pointer.offset]

    @classmethod
    def program_id(cls, axis):
        return cls.pid[axis]

    @classmethod
    def num_programs(cls, axis):
        return cls.grid[axis]


class _Pointer:
    """A pointer into a list, for _Shim.load."""

    def __init__(self, values, offset=0):
        self.values, self.offset = values, offset

    def __add__(self, offset):
        return _Pointer(self.values, self.offset + offset)


def _walk_helpers(text, names):
    """The rendered kernel's helpers ``names`` (_query_tiles, _advance, _key_tile, _interleave_rows),
    as Python functions (on integers; _interleave_rows on torch tensors)."""
    src = render_gluon_bwd(spec_from_text(text))
    namespace = {"gl": _Shim, "MASK": int(re.search(r"MASK = gl.constexpr\((\d)\)", src).group(1))}
    for name in names:
        body = re.search(rf"^def {name}\(.*?(?=^@gluon)", src, re.S | re.M).group(0)
        exec(re.sub(r": gl\.constexpr", "", body), namespace)
    return tuple(namespace[name] for name in names)


@pytest.mark.parametrize("text", ["score=qk*scale", CAUSAL, PREFIX_LM])
@pytest.mark.parametrize("n_tiles, n_heads, section", [(8, 256, 32), (8, 10, 3), (5, 7, 7), (4, 3, 1), (3, 2, 5)])
@pytest.mark.parametrize("lpt", [False, True])
def test_program_order(text, n_tiles, n_heads, section, lpt):
    """The rendered _key_tile maps the grid one to one onto (key tile, K/V head); it is the grid's
    own position unless LPT is on and the spec causal, when the programs in launch order (key tile
    fastest) walk longest first within each section of ``section`` heads (the last one smaller
    where they do not divide) and never leave it: every head of a section starts its key tile k
    before any starts k + 1, and the walk lengths never rise within a section. The persistent
    walk's table (gluon_launch.bwd_launch_order) deals the key tiles out in the same order."""
    key_tile, query_tiles = _walk_helpers(text, ("_key_tile", "_query_tiles"))
    causal = text == CAUSAL
    order = [key_tile(pid_n, pid_h, n_tiles, n_heads, section, lpt)
             for pid_h in range(n_heads) for pid_n in range(n_tiles)]
    assert sorted(order) == [(n, h) for n in range(n_tiles) for h in range(n_heads)]
    assert order == gluon_launch.bwd_launch_order(n_tiles, n_heads, section, lpt and causal)  # the table's order
    if not (lpt and causal):
        assert order == [(n, h) for h in range(n_heads) for n in range(n_tiles)]
        return
    n_q = n_tiles * BN
    for first in range(0, n_heads, section):
        heads = min(section, n_heads - first)
        part = order[first * n_tiles:(first + heads) * n_tiles]
        assert part == [(n, first + h) for n in range(n_tiles) for h in range(heads)]
        lengths = [n_m - lo for lo, n_m, _ in (query_tiles(n, n_q, BM, BN) for n, _ in part)]
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def _numpy_fn(expr, names):
    return sympy.lambdify(names, expr, modules="numpy")


def _emulate(text, q, k, v, out, lse, do, scale, stages=3, bm=BM, section=None, lpt=False, programs=None,
             interleave=False):
    """(dq, dk, dv) by the kernel's algorithm in float64: per program of the grid, its key tile and
    K/V head by _key_tile (LPT's order with sections of ``section`` heads if ``lpt``); or, with
    ``programs`` (PERSISTENT), that many programs each walking its rounds' key tiles from
    gluon_launch.backward_order's table (_round_walk); the walk of _query_tiles/_advance with a
    ring of ``stages`` buffers filled STAGES steps ahead within a walk, and with PERSISTENT the next
    round's first STAGES steps loaded at a round's end, as _next_round does (asserting that each
    load finds its buffer free, that each step finds its own round's tile and rows in its buffer,
    and, as ROWS_AHEAD loads them, the LSE and Delta of its own head and tile, addressed the step
    before), Q/dO tiles read from the flat (Z·H·N_Q, d) matrices (past a head's end: the next
    head's rows; past the tensor: zeros), the weights
    exp2(s − LSE·log2 e) with -inf LSE and rows past N_Q read as +inf, dS = P·d(score)/d(qk) ∘
    (dP − Delta) (a constant derivative applied once to dK and to each dQ share instead),
    dV += Pᵀ·dO, dK += dSᵀ·Q, and each tile's dQ share added whole into one accumulator of N_Q
    rows per head rounded up to BLOCK_M (the TMA reduce-add: rows past N_Q land in the padding),
    with ``interleave`` (DQ_INTERLEAVE) staged by the rendered _interleave_rows and added through the
    descriptor's shape and strides (gluon_launch.interleaved_rows); cut to N_Q rows at the end."""
    spec = spec_from_text(text)
    helpers = _walk_helpers(text, ("_query_tiles", "_advance", "_key_tile", "_round_tile", "_round_walk",
                                   "_interleave_rows"))
    advance, round_walk, interleave_rows = helpers[1], helpers[4], helpers[5]
    mask = int(re.search(r"MASK = gl.constexpr\((\d)\)", render_gluon_bwd(spec)).group(1))
    z, h, n_q, d = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    log2e = 1 / math.log(2)
    syms = (QK, SCALE, Q_IDX, KV_IDX, H_IDX, N_Q, N_KV)
    score = _numpy_fn(spec.score, syms)
    d_qk = sympy.diff(spec.score, QK)
    constant = chain_rule(spec)[1] != "1.0"  # applied once at the end, as the kernel does
    factor = float(d_qk.subs(SCALE, scale)) if constant else 1.0
    grad = _numpy_fn(sympy.Integer(1) if constant else d_qk, syms)
    keep = _numpy_fn(spec.keep, syms)
    rest = _numpy_fn(_beyond_causal(spec.keep), syms)
    pad = torch.zeros(bm, d, dtype=torch.float64)
    q_rows = torch.cat([q.reshape(-1, d), pad])
    do_rows = torch.cat([do.reshape(-1, d), pad])
    delta = (out * do).sum(-1)
    dq_rows = -(-n_q // bm) * bm
    dq_acc = torch.zeros(z * h * dq_rows, d, dtype=torch.float64)
    shape, strides = gluon_launch.interleaved_rows(z * h * dq_rows, d)
    dq_tiles = dq_acc.as_strided([*shape, d], [*strides, 1])  # what DQ_INTERLEAVE's descriptor addresses
    dk, dv = torch.full_like(k, math.nan), torch.full_like(v, math.nan)  # poisoned: a tile no program wrote stays NaN
    n_tiles, n_heads = n_kv // BN, z * h_kv
    section, persistent = section or n_heads, programs is not None
    if persistent:
        steps = gluon_launch.backward_steps(n_q, n_kv, gluon_launch.GluonBwdConfig(bm, BN, stages), group, mask == 1)
        programs = min(programs, n_tiles * n_heads)  # as backward_launch: every program has a round
        table = gluon_launch.backward_order(n_tiles, n_heads, section, mask == 1, lpt, steps, programs)
        order, grid = _Pointer(table.flatten().tolist()), (programs, 1)
        launched = [((p, 0), table[0, p].item()) for p in range(programs)]
    else:
        order, grid = None, (n_tiles, n_heads)
        launched = [((pid_n, pid_h), 1) for pid_h in range(n_heads) for pid_n in range(n_tiles)]
    walk_args = (n_tiles, n_q, h, h * n_q, n_q, 0, section, bm, BN, group, lpt, persistent)
    for pid, rounds in launched:  # in launch order
        _Shim.pid, _Shim.grid = pid, grid
        ring, t = {}, 0

        def load(step, r, g, m, lo, n_m, q_row):
            """_load_query_tile: step's Q/dO rows into its ring buffer (None past the walk's end),
            the buffer free (every earlier load into it consumed); the loader's position after it."""
            assert ring.get(step % stages) is None, (step, ring)
            ring[step % stages] = (r, g, m, q_row + g * n_q + m * bm) if g < group and m < n_m else None
            return advance(g, m, lo, n_m)

        # the prologue: round 0's first STAGES steps (_load_query_tile, _advance)
        _, _, lo, n_m, _, q_row, _ = round_walk(order, 0, *walk_args)
        load_g, load_m = 0, lo
        for i in range(stages):
            load_g, load_m = load(i, 0, load_g, load_m, lo, n_m, q_row)
        for r in range(rounds):
            start_n, zk, lo, n_m, band, q_row, _ = round_walk(order, r, *walk_args)
            off_z, off_hkv = divmod(zk, h_kv)
            keys = slice(start_n * BN, (start_n + 1) * BN)
            kt, vt = k[off_z, off_hkv, keys], v[off_z, off_hkv, keys]
            offs_n = (start_n * BN + torch.arange(BN))[None, :].numpy()
            dk_t, dv_t = torch.zeros(BN, d, dtype=torch.float64), torch.zeros(BN, d, dtype=torch.float64)
            ahead = (off_z * h + off_hkv * group, lo)  # ROWS_AHEAD: the flat head and tile of the rows loaded
            for g in range(group):
                off_h = off_hkv * group + g
                off_hz = off_z * h + off_h
                for m in range(lo, n_m):
                    row = off_hz * n_q + m * bm
                    assert ring.pop(t % stages) == (r, g, m, row), (t, ring)  # its own Q/dO rows, loaded ahead
                    assert ahead == (off_z * h + off_hkv * group + g, m), (t, ahead)  # the rows this step uses
                    next_g, next_m = advance(g, m, lo, n_m)
                    ahead = (off_z * h + off_hkv * group + next_g, next_m) if next_g < group else None
                    qt, dot = q_rows[row:row + bm], do_rows[row:row + bm]
                    offs_m = (m * bm + torch.arange(bm))[:, None]
                    ok = offs_m[:, 0] < n_q
                    flat = (off_hz * n_q + offs_m[:, 0]).clamp(max=z * h * n_q - 1)
                    lse_t = torch.where(ok, lse.reshape(-1)[flat], math.inf)  # rows past N_Q: +inf
                    base = torch.where(lse_t == -math.inf, math.inf, lse_t) * log2e
                    delta_t = torch.where(ok, delta.reshape(-1)[flat], 0.0)
                    qk = (qt @ kt.T).numpy()
                    rows, cols = torch.broadcast_tensors(offs_m, torch.as_tensor(offs_n))
                    args = (qk, scale, rows.numpy(), cols.numpy(), off_h, n_q, n_kv)
                    s = torch.as_tensor(score(*args) * log2e * torch.ones(bm, BN, dtype=torch.float64).numpy())
                    if mask == 2 or (mask == 1 and m < band):
                        s = torch.where(torch.as_tensor(keep(*args) & torch.ones(bm, BN, dtype=torch.bool).numpy()), s,
                                        -math.inf)
                    elif mask == 1:
                        s = torch.where(torch.as_tensor(rest(*args) | torch.zeros(bm, BN, dtype=torch.bool).numpy()),
                                        s, -math.inf)
                    p = torch.exp2(s - base[:, None])
                    pg = p * torch.as_tensor(grad(*args) * torch.ones(bm, BN, dtype=torch.float64).numpy())
                    dp = dot @ vt.T
                    ds = pg * (dp - delta_t[:, None])
                    dv_t += p.T @ dot
                    dk_t += ds.T @ qt
                    dq_part = ds @ kt * factor
                    if interleave:  # the staged tile, added at its descriptor's coordinates
                        dq_tiles[(off_hz * dq_rows + m * bm) // 8:][:bm // 8] += interleave_rows(dq_part)
                    else:
                        dq_acc[off_hz * dq_rows + m * bm:][:bm] += dq_part
                    load_g, load_m = load(t + stages, r, load_g, load_m, lo, n_m, q_row)  # within this walk
                    t += 1
            assert ahead is None or lo == n_m  # no rows past the walk (the kernel masks the load)
            assert dk[off_z, off_hkv, keys].isnan().all()  # not written before: each key tile has one program
            dk[off_z, off_hkv, keys] = dk_t * factor
            dv[off_z, off_hkv, keys] = dv_t
            assert all(slot is None for slot in ring.values())  # nothing of this walk left, nothing past it
            ring.clear()
            if persistent and r + 1 < rounds:  # _next_round: the next round's first STAGES steps, at this round's end
                _, _, next_lo, next_nm, _, next_row, _ = round_walk(order, r + 1, *walk_args)
                load_g, load_m = 0, next_lo
                for i in range(stages):
                    load_g, load_m = load(t + i, r + 1, load_g, load_m, next_lo, next_nm, next_row)
    return dq_acc.reshape(z, h, dq_rows, d)[:, :, :n_q], dk, dv


def _eager(text, q, k, v, scale):
    """The oracle's attention of ``text`` (fx_flash.reference) in float64, and its logsumexp."""
    spec = spec_from_text(text)
    scores = spec_scores(q, k, [], spec, scale)
    vv = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return safe_softmax(scores) @ vv, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("text, z, h, h_kv, n_q, n_kv", [
    ("score=qk*scale", 1, 2, 2, 128, 256),
    (CAUSAL, 1, 2, 2, 256, 256),
    (SOFTCAP, 1, 2, 2, 192, 256),
    (CAUSAL, 2, 2, 2, 100, 128),  # ragged N_Q: the last tile reads the next head's rows (and zeros)
    (CAUSAL, 1, 4, 2, 256, 256),  # GQA: a program walks two query heads from lo > 0, its ring running on across them
    (CAUSAL, 1, 2, 2, 320, 128),  # N_Q > N_KV
    (CAUSAL, 1, 2, 2, 128, 384),  # N_Q < N_KV: key tiles 1 and 2 see no query, their walks empty
    (STRICT, 1, 2, 2, 128, 128),  # row 0 keeps no key: its LSE is -inf
    (PREFIX_LM, 1, 2, 2, 192, 256),  # a predicate on every tile
    (HEAD_AND_LENGTH, 1, 2, 2, 64, 256),  # the score reads h, the predicate n_kv
], ids=["plain", "causal", "softcap", "ragged", "gqa", "nq_gt_nkv", "nq_lt_nkv", "empty_row", "prefix_lm",
        "h_and_n_kv"])
@pytest.mark.parametrize("bm, lpt, programs, interleave", [
    (BM, False, None, False), (128, False, None, False), (BM, True, None, False), (BM, False, 3, False),
    (128, False, 2, False), (BM, True, 3, False), (128, False, None, True), (BM, True, None, True),
    (BM, True, 3, True)],
    ids=["rows64", "rows128", "lpt", "persistent", "persistent_rows128", "persistent_lpt", "rows128_dq_interleave",
         "lpt_dq_interleave", "persistent_lpt_dq_interleave"])
def test_emulated_algorithm_matches_autograd(text, z, h, h_kv, n_q, n_kv, bm, lpt, programs, interleave):
    """The kernel's algorithm, run in float64 with its own rendered walk, gives autograd's
    gradients of eager attention (to 1e-9): a wrong tile range, band, ring position, LSE or Delta
    convention, or chain rule would not. At 64 query rows a step and at 128 (d = 64's tile, where
    one query tile is the whole causal band of a key tile); and with LPT's program order in
    sections of three heads (two of the cases have four heads, so a section of one follows), where
    a program given no key tile, or one given a tile another program also took, would leave dK/dV
    NaN or fail the emulation's assertion. PERSISTENT: two or three programs walk every key tile
    from backward_order's table, their rings running on from one key tile's walk into the next
    (empty walks included: N_Q > N_KV and ragged cases). DQ_INTERLEAVE: each share staged as the
    kernel stages it and added where its descriptor's strides put it."""
    torch.manual_seed(0)
    d, scale = 16, 0.3
    q = torch.randn(z, h, n_q, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(z, h_kv, n_kv, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = _eager(text, q, k, v, scale)
    do = torch.randn_like(out)
    ref = torch.autograd.grad(out, (q, k, v), do)
    got = _emulate(text, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), do, scale, bm=bm,
                   section=3, lpt=lpt, programs=programs, interleave=interleave)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max().item() < 1e-9, (name, (a - b).abs().max().item())


def _staging_wavefronts(staged_row):
    """Shared-memory wavefronts of one warp's 64-bit stores of its 16 rows of a dQ share (128 fp32
    columns) into the staging tile, as gluon_bwd's note on dQ describes them: the TMA's 128-byte
    swizzle (four pieces of 32 columns, 128-byte rows whose 16-byte chunks are XORed with the row's
    index mod 8), lane l holding columns 2 (l % 4) and the next of every group of 8 in rows l // 4 and
    l // 4 + 8 (the wgmma accumulator's layout), each store served a half-warp at a time, its
    wavefronts the most distinct words any bank is asked for. ``staged_row``: where each row goes."""
    total = 0
    for upper in range(2):  # rows l // 4, then l // 4 + 8
        for group in range(16):  # columns 8·group ...
            for half in range(2):
                words = set()
                for lane in range(16 * half, 16 * half + 16):
                    row, col = staged_row[lane // 4 + 8 * upper], 8 * group + 2 * (lane % 4)
                    chunk = (col % 32) // 4 ^ row % 8
                    first = (col // 32 * 64 + row) * 128 + chunk * 16 + col % 4 * 4
                    words |= {first, first + 4}
                banks = [word // 4 % 32 for word in words]
                total += max(banks.count(b) for b in set(banks))
    return total


def test_interleaved_dq_rows_store_without_bank_conflicts():
    """The rendered _interleave_rows stages row 4j + i of each group of 8 at row 2i + j, the launcher's
    interleaved_rows addresses each staged row back at the row it holds, and staged so a warp's
    64-bit stores of its dQ share take one wavefront a half-warp, 64 in all, where the rows in order
    take two (the 4.7 M conflicted wavefronts ncu counted in call 91)."""
    (interleave_rows, ) = _walk_helpers("score=qk*scale", ("_interleave_rows", ))
    rows = torch.arange(64)[:, None].repeat(1, 3)
    staged = interleave_rows(rows).reshape(64, 3)  # staged[s]: the row the staging tile holds at row s
    assert staged[:16, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    shape, strides = gluon_launch.interleaved_rows(64, 3)
    assert torch.equal(rows.as_strided([*shape, 3], [*strides, 1]).reshape(64, 3), staged)  # the reduce-add's rows
    assert _staging_wavefronts(list(range(16))) == 128
    assert _staging_wavefronts(torch.argsort(staged[:16, 0]).tolist()) == 64


# ---------------------------------------------------------------------------------------------
# sm_90 compiles

KERNELS = {  # name: (spec, head dim, kind: see tests/gluon_sm90.py), at the H200's backward tile
    "plain-d128": ("score=qk*scale", 128, "bwd"), "causal-d128": (CAUSAL, 128, "bwd"),
    "softcap-d128": (SOFTCAP, 128, "bwd"), "causal-d64": (CAUSAL, 64, "bwd"),
    "prefix_lm-d64": (PREFIX_LM, 64, "bwd"), "prep-d128": ("score=qk*scale", 128, "bwd-prep"),
    # d = 64 takes 128 query rows a step where the score is qk·scale, 64 with soft-capping or ALiBi
    "plain-d64": ("score=qk*scale", 64, "bwd"), "softcap-d64": (SOFTCAP, 64, "bwd"),
    "alibi-d64": (ALIBI_CAUSAL, 64, "bwd"),
    # the step schedules the defaults do not use (bwd: the default's, see gluon_launch.BWD_SCHEDULES)
    "causal-d128-plain-schedule": (CAUSAL, 128, "bwd:"), "causal-d128-rows-ahead": (CAUSAL, 128, "bwd:ROWS_AHEAD"),
    "causal-d64-dv-early": (CAUSAL, 64, "bwd:DV_EARLY,ROWS_AHEAD"),
    # keys on rows (GLUON_NOTES, calls 21, 24 and 27; with ROWS_SHARED, d = 128's default): P and dS as
    # register operands; and the queries-on-rows step d = 128 had before
    "causal-d128-keys-on-rows": (CAUSAL, 128, "bwd:KEYS_ON_ROWS,ROWS_AHEAD"),
    "causal-d128-dv-early": (CAUSAL, 128, "bwd:DV_EARLY"), "causal-d128-rows-shared": (CAUSAL, 128, "bwd:ROWS_SHARED"),
    "prefix_lm-d64-keys-on-rows": (PREFIX_LM, 64, "bwd:KEYS_ON_ROWS"),
    # the causal longest-first program order (gluon_bwd's note on the order)
    "causal-d128-lpt": (CAUSAL, 128, "bwd:KEYS_ON_ROWS,ROWS_SHARED,LPT"),
    # d = 64's 128-row step with the warpgroups splitting the keys, as before SPLIT_M (call 45)
    "causal-d64-keys-split": (CAUSAL, 64, "bwd@128:ROWS_AHEAD"),
    # the persistent walk (gluon_bwd's note on it) on the defaults' schedules
    "causal-d128-persistent": (CAUSAL, 128, "bwd:KEYS_ON_ROWS,ROWS_SHARED,LPT,TMA_EPILOGUE,PERSISTENT"),
    "plain-d128-persistent": ("score=qk*scale", 128, "bwd:KEYS_ON_ROWS,ROWS_SHARED,TMA_EPILOGUE,PERSISTENT"),
    "causal-d64-persistent": (CAUSAL, 64, "bwd@128:ROWS_AHEAD,SPLIT_M,TMA_EPILOGUE,PERSISTENT"),
    "plain-d64-persistent": ("score=qk*scale", 64, "bwd@128:ROWS_AHEAD,SPLIT_M,TMA_EPILOGUE,PERSISTENT"),
    # the dQ share's rows interleaved in its staging tile (gluon_bwd's note on dQ): routed on d = 128's causal
    # band and without a predicate at d = 64 (gluon_launch.interleaves_dq); not on the persistent walk
    "causal-d128-dq-interleave": (CAUSAL, 128, "bwd:KEYS_ON_ROWS,ROWS_SHARED,LPT,TMA_EPILOGUE,DQ_INTERLEAVE"),
    "softcap-d128-dq-interleave": (SOFTCAP, 128, "bwd:KEYS_ON_ROWS,ROWS_SHARED,LPT,TMA_EPILOGUE,DQ_INTERLEAVE"),
    "plain-d64-dq-interleave": ("score=qk*scale", 64, "bwd@128:ROWS_AHEAD,SPLIT_M,TMA_EPILOGUE,DQ_INTERLEAVE"),
    "causal-d128-persistent-dq-interleave": (CAUSAL, 128,
                                             "bwd:KEYS_ON_ROWS,ROWS_SHARED,LPT,TMA_EPILOGUE,PERSISTENT,DQ_INTERLEAVE"),
}
# Known spills, (spill bytes by ptxas -v, STL in the binary) at most, as measured, for (triton 3.6 —
# the H200's, ptxas 12.9 —, newer — ptxas 13 with --regAllocOptLevel=2). The defaults' kernels (bwd)
# run at or near the 255-register limit, and what spills there is a few values per program or per
# head, reloaded a few times a step:
# - soft-capping at d = 128: the dQ staging tile's addressing (GLUON_NOTES, call 14) and the
#   per-head placement of (Z, N, H, d) views, 40 B (10 STL) under 3.6, 68 B (17) with the TMA
#   epilogue (call 48 timed it 0.96-1.06x without); under ptxas 13 132-140 B.
# - d = 64's 128-row step: with the warpgroups splitting the keys, causal, 28 B (7 STL) under 3.6,
#   92 B under ptxas 13 (call 39 timed it 1.07-1.11x the 64-row step); with each warpgroup on its
#   own rows (SPLIT_M, call 45) and the TMA epilogue (call 48), the defaults since: plain none under
#   3.6, causal 16 B (4 STL), prefix-LM 32 B (8 STL, not timed); under ptxas 13 40-168 B.
# - causal d = 128 under ptxas 13 only: 16-36 B (15-20 STL) by schedule, 32 B with LPT.
# - the persistent walk (gluon_bwd's note on it): a few values a program kept across its rounds,
#   reloaded once a round (none in the step's loop): triton 3.6 causal d = 128 12 B (3 STL), plain
#   28 B (7), d = 64 plain 32 B (8); ptxas 13 4-72 B.
# - the dQ share's rows interleaved (DQ_INTERLEAVE): within the bounds of the same kernels without it
#   (triton 3.6: soft-capping d = 128 64 B, 16 STL; plain d = 64 none; causal d = 128 none, persistent 8 B).
# Every other kernel here stays in registers under both.
KNOWN_SPILLS = {"softcap-d128": ((68, 17), (140, 60)), "plain-d128": ((0, 0), (0, 4)),
                "causal-d128": ((0, 0), (28, 16)), "causal-d64": ((16, 4), (68, 57)),
                "causal-d128-persistent": ((12, 3), (12, 10)), "plain-d128-persistent": ((28, 7), (4, 5)),
                "causal-d64-persistent": ((0, 0), (4, 35)), "plain-d64-persistent": ((32, 8), (72, 28)),
                "prefix_lm-d64": ((32, 8), (168, 78)), "plain-d64": ((0, 0), (152, 38)),
                "causal-d128-plain-schedule": ((0, 0), (28, 15)), "causal-d128-rows-ahead": ((0, 0), (36, 20)),
                "causal-d128-dv-early": ((0, 0), (28, 15)), "causal-d128-lpt": ((0, 0), (32, 16)),
                "causal-d64-keys-split": ((28, 7), (92, 33)), "causal-d128-rows-shared": ((0, 0), (24, 15)),
                "causal-d128-persistent-dq-interleave": ((8, 2), (0, 10)),
                "causal-d128-dq-interleave": ((0, 0), (28, 16)),
                "softcap-d128-dq-interleave": ((68, 17), (140, 60)), "plain-d64-dq-interleave": ((0, 0), (152, 38))}


def _tile(text, d, kind):
    """The H200's backward tile of KERNELS' entry: the routed one for "bwd" (its rows by
    backward_rows), BWD_BLOCK_M rows for the named schedules and the Delta kernel."""
    if kind == "bwd":
        rows = gluon_launch.backward_rows(spec_from_text(text), d)
    else:  # "bwd@M:FLAGS" takes M rows
        rows = int(kind.split(":")[0].partition("@")[2] or gluon_launch.BWD_BLOCK_M)
    return gluon_launch.backward_config(H200, d, 2, rows)


@pytest.fixture(scope="module")
def compiled():
    """One process compiles every kernel of KERNELS for sm_90 (see tests/gluon_sm90.py)."""
    args = []
    for text, d, kind in KERNELS.values():
        cfg = _tile(text, d, kind)
        flags = [name for name, on in cfg.schedule.items() if on]
        if kind == "bwd":  # compiled with the default's rows and step schedule
            kind += (f"@{cfg.BLOCK_M}" if cfg.BLOCK_M != gluon_launch.BWD_BLOCK_M else "") + ":" + ",".join(flags)
        args += [text, str(d), str(cfg.BLOCK_N), str(cfg.STAGES), kind]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-m", "tests.gluon_sm90", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return dict(zip(KERNELS, reports))


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", [n for n in KERNELS if not n.startswith("prep")])
def test_compiles_for_sm90_with_wgmma_tma_and_dq_reduce(compiled, name):
    """The backward compiles for sm_90 to asynchronous wgmma, TMA bulk-tensor loads and its dQ adds
    as TMA bulk reduce-adds (no atomics), dK and dV as TMA stores where TMA_EPILOGUE is on (no
    global store instruction) and 32-bit stores where it is off, and its shared memory is exactly
    the footprint model's (the epilogue reuses K's and V's tiles), within the H200's M."""
    text, d, kind = KERNELS[name]
    report = compiled[name]
    cfg = _tile(text, d, kind)
    assert (report["spec"], report["head_dim"]) == (text, d)
    assert report["wgmma"] > 0 and report["tma"] > 0
    assert report["tma_reduce"] > 0 and report["atomics"] == 0
    flags = kind.split(":")[1].split(",") if ":" in kind else [n for n, on in cfg.schedule.items() if on]
    # dK and dV leave by TMA stores (TMA_EPILOGUE, the defaults' since call 48), else 32-bit stores
    if "TMA_EPILOGUE" in flags:
        assert report["stores"] == {}
    else:
        assert set(report["stores"]) == {"b32"} and report["stores"]["b32"] > 0
    assert report["shared"] == gluon_launch.footprint_bwd(cfg.BLOCK_M, cfg.BLOCK_N, d, 2, cfg.STAGES,
                                                          "KEYS_ON_ROWS" in flags, "ROWS_SHARED" in flags)
    assert report["shared"] <= H200.shared_memory


@pytest.mark.skipif(not _gluon_hopper_available(), reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("name", KERNELS)
def test_no_register_spills(compiled, name):
    """ptxas keeps the kernels in registers (no spill stores by ptxas -v, no STL in the binary),
    but for the measured bounds of KNOWN_SPILLS. None: ptxas could not run."""
    import triton

    report = compiled[name]
    if name in KNOWN_SPILLS:
        newer = tuple(map(int, triton.__version__.split(".")[:2])) > (3, 6)
        spill_bytes, stores = KNOWN_SPILLS[name][newer]
        assert (report["spill_bytes"] or 0) <= spill_bytes and report["local_stores"] <= stores, report
        return
    assert report["spill_bytes"] in (0, None), report
    assert report["local_stores"] == 0, report
