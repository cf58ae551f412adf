"""Split-KV decoding (few queries, long keys): the split kernel and its merge against the float64
oracle, with GQA rows packed, masks, causal, dropout and the backward through its logsumexp.

The interpreter's stand-in device has one SM, so ``decode_plan`` would rarely split there; the
``forced_splits`` fixture lowers the thresholds so small shapes split into several programs,
including ragged and empty splits.
"""

from __future__ import annotations

import math

import pytest
import torch

import fx_flash
from fx_flash import testing
from fx_flash.codegen import launch
from fx_flash.device import DeviceProfile
from fx_flash.ops import sdpa_forward
from tests.numerics import assert_against_reference, poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def forced_splits(monkeypatch):
    poison_outputs(monkeypatch)
    monkeypatch.setattr(launch, "SPLIT_MIN_KEYS", 48)  # 48 keys per split: several splits at Nk ≈ 300
    monkeypatch.setattr(launch, "SPLIT_WAVES", 64)
    torch.manual_seed(0)


# (B, Hq, Hkv, Nq, Nk, d)
SHAPES = {
    "decode_one_token": (2, 4, 4, 1, 300, 32),  # MHA: splits only, no packing
    "gqa_packed": (1, 8, 2, 1, 257, 64),  # 4 query heads share each K/V tile; 1-key tail split
    "mqa_packed_many_rows": (1, 8, 1, 9, 200, 16),  # 72 packed rows: two row tiles of 64
    "speculative_head_dim_80": (2, 4, 2, 4, 190, 80),  # padded head dim, several queries per head
    "short_kv": (1, 2, 1, 3, 20, 16),  # fewer keys than one tile: a single split, packed
}


def _plan_splits(q, k) -> int:
    splits, _ = launch.decode_plan(q, k)
    assert splits, "the split-KV path must be taken for this shape"
    return splits


def check(shape, dtype=torch.float32, *, causal=False, attn_mask=None, bias_grad=False):
    b, hq, hkv, nq, nk, d = shape
    q = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    _plan_splits(q, k)
    mask = attn_mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        mask = attn_mask.to(dtype).requires_grad_(bias_grad)
    out = fx_flash.flash_attention(q, k, v, mask, 0.0, causal, None, enable_gqa=hq != hkv)
    dout = torch.randn_like(out)
    inputs = [q, k, v] + ([mask] if bias_grad else [])
    grads = torch.autograd.grad(out, inputs, dout)
    same = dtype if dtype != torch.bfloat16 else torch.float32
    assert_against_reference(out, grads, q, k, v, mask, dout, dtype=dtype, same_dtype=same, is_causal=causal,
                             enable_gqa=hq != hkv, bias_grad=bias_grad)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shapes(shape, causal):
    check(shape, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes(dtype):
    check(SHAPES["gqa_packed"], dtype)


MASKS = {
    # per query head: packed rows must read their own head's row of the mask
    "bool_per_head": lambda b, h, nq, nk: torch.rand(b, h, nq, nk, device=DEVICE) > 0.4,
    "bool_padding": lambda b, h, nq, nk: torch.arange(nk, device=DEVICE).expand(b, 1, 1, nk) < nk - 37,
    "bias_per_head": lambda b, h, nq, nk: torch.randn(1, h, nq, nk, device=DEVICE),
    "alibi_like_bias": lambda b, h, nq, nk: -torch.arange(1, h + 1, device=DEVICE).view(1, h, 1, 1)
    * torch.arange(nk, device=DEVICE).view(1, 1, 1, nk) / nk,
}


@pytest.mark.parametrize("make_mask", MASKS.values(), ids=MASKS.keys())
def test_masks(make_mask):
    b, hq, hkv, nq, nk, d = SHAPES["speculative_head_dim_80"]
    check(SHAPES["speculative_head_dim_80"], attn_mask=make_mask(b, hq, nq, nk))


def test_bias_gradient():
    b, hq, hkv, nq, nk, d = SHAPES["gqa_packed"]
    check(SHAPES["gqa_packed"], attn_mask=torch.randn(b, hq, nq, nk, device=DEVICE), bias_grad=True)


def test_rows_with_every_key_masked():
    """A row whose keys are all masked gives 0 and lse −inf even though each split is merged."""
    b, hq, hkv, nq, nk, d = 1, 4, 2, 2, 150, 16
    q = torch.randn(b, hq, nq, d, device=DEVICE)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE) for _ in range(2))
    mask = torch.rand(b, hq, nq, nk, device=DEVICE) > 0.5
    mask[0, 1, 0] = False
    assert _plan_splits(q, k) > 1
    out, lse = sdpa_forward(q, k, v, mask, None, 0.0, False, 0.25)
    assert torch.equal(out[0, 1, 0], torch.zeros(d, device=DEVICE))
    assert lse[0, 1, 0] == float("-inf")
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(out).all()


def test_logsumexp_matches_oracle():
    from fx_flash.reference import attention_logsumexp

    b, hq, hkv, nq, nk, d = SHAPES["gqa_packed"]
    q = torch.randn(b, hq, nq, d, device=DEVICE)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE) for _ in range(2))
    _, lse = sdpa_forward(q, k, v, None, None, 0.0, False, 0.125)
    exact = attention_logsumexp(q.double(), k.double(), None, False, 0.125, enable_gqa=True)
    torch.testing.assert_close(lse.double(), exact, atol=1e-5, rtol=1e-5)


def test_dropout_uses_the_same_mask():
    """Dropout draws the same bits in the split kernel as everywhere else (a function of the
    element's coordinates), so the oracle with the kernels' mask matches, gradients too."""
    b, hq, hkv, nq, nk, d = SHAPES["gqa_packed"]
    p = 0.2
    q = torch.randn(b, hq, nq, d, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE, requires_grad=True) for _ in range(2))
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    out, _ = sdpa_forward(q, k, v, None, seed, p, False, 1 / math.sqrt(d))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = testing.dropout_keep_mask(seed, (b, hq, nq, nk), p)
    assert_against_reference(out, grads, q, k, v, None, dout, dtype=torch.float32, same_dtype=torch.float32,
                             dropout_p=p, dropout_keep=keep, enable_gqa=True)


def test_split_and_plain_forward_agree():
    """The split path and the plain kernel compute the same function (to fp32 rounding)."""
    b, hq, hkv, nq, nk, d = 1, 4, 4, 2, 333, 32
    q = torch.randn(b, hq, nq, d, device=DEVICE)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE) for _ in range(2))
    split_out, split_lse = sdpa_forward(q, k, v, None, None, 0.0, False, 0.2)
    launch.SPLIT_MIN_KEYS = 10**9  # the fixture restores it: now one split and no packing → plain
    launch.clear_plans()  # the first call's plan chose the split path
    assert launch.decode_plan(q, k) == (0, 0)
    plain_out, plain_lse = sdpa_forward(q, k, v, None, None, 0.0, False, 0.2)
    torch.testing.assert_close(split_out, plain_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(split_lse, plain_lse, atol=2e-6, rtol=2e-6)


def test_plan_on_an_h100(monkeypatch):
    """On a 132-SM device: one long decode row splits to fill the GPU, a batch of 64 with 32
    heads already fills it, prefill never splits, and GQA always packs."""
    monkeypatch.undo()  # the real thresholds
    h100 = DeviceProfile(name="H100", shared_memory=232448, multiprocessors=132, capability=(9, 0))
    monkeypatch.setattr(launch, "device_profile", lambda device: h100)

    def plan(b, hq, hkv, nq, nk):
        return launch.decode_plan(torch.empty(b, hq, nq, 128, device="meta"), torch.empty(b, hkv, nk, 128, device="meta"))

    splits, rows = plan(1, 32, 32, 1, 131072)
    assert splits * 32 >= 2 * 132 and rows == 16
    assert plan(64, 32, 32, 1, 131072) == (0, 0)  # 2048 programs: no split, no packing needed
    assert plan(1, 32, 32, 512, 131072) == (0, 0)  # prefill: the plain kernel
    assert plan(1, 32, 32, 1, 256) == (0, 0)  # too few keys to split
    splits, rows = plan(64, 32, 8, 1, 4096)  # GQA 4: packed even when not split
    assert splits == 1 and rows == 16
