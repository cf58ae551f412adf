"""Every generated kernel (forward, dK/dV, dQ) against the float64 oracle, Liger-Kernel style:
parametrized over shapes, dtypes, masks, GQA and strides, with the flash-attn error rule."""

from __future__ import annotations

import pytest
import torch

import fx_flash
from fx_flash.codegen.spec import spec_from_text
from fx_flash.ops import sdpa_call, sdpa_forward
from tests.numerics import assert_against_reference, assert_rule, poison_outputs, reference_with_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, Nq, Nk, d) — each odd shape is there for a reason:
SHAPES = {
    "single_token": (1, 1, 1, 1, 1, 16),  # length 1: one row, one column, all tiles ragged
    "ragged_cross": (2, 3, 3, 33, 17, 32),  # Nq > Nk, neither a multiple of any block
    "ragged_long_kv": (1, 2, 2, 5, 257, 16),  # Nk spans several key tiles with a 1-element tail
    "head_dim_80": (1, 2, 2, 24, 40, 80),  # not a power of two: padded columns must load as 0
    "head_dim_96": (1, 1, 1, 19, 19, 96),
    "head_dim_8": (2, 1, 1, 9, 12, 8),  # below tl.dot's minimum of 16: padded
    "head_dim_256": (1, 1, 1, 16, 16, 256),  # the largest supported head dim
    "gqa_4_to_2": (2, 4, 2, 20, 28, 16),  # dK/dV summed over the 2 query heads of each group
    "mqa_4_to_1": (1, 4, 1, 18, 18, 32),
}


def _inputs(b, hq, hkv, nq, nk, d, dtype, layout="contiguous"):
    if layout == "packed":  # q/k/v as views of one (B, N, 3, H, d) tensor, as fused QKV layers make
        qkv = torch.randn(b, nq, 3, hq, d, device=DEVICE, dtype=dtype)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    if layout == "bnhd":  # (B, N, H, d) storage seen through a transpose
        return [torch.randn(b, n, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)
                for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]
    return [torch.randn(b, h, n, d, device=DEVICE, dtype=dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]


def check(shape, dtype, *, causal=False, attn_mask=None, bias_grad=False, layout="contiguous", scale=None):
    """fx_flash forward and gradients vs float64, against PyTorch's own error in ``dtype``."""
    b, hq, hkv, nq, nk, d = shape
    q, k, v = (t.requires_grad_() for t in _inputs(b, hq, hkv, nq, nk, d, dtype, layout))
    mask = attn_mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        mask = attn_mask.to(dtype).requires_grad_(bias_grad)
    out = fx_flash.flash_attention(q, k, v, mask, 0.0, causal, scale, enable_gqa=hq != hkv)
    dout = torch.randn_like(out)
    inputs = [q, k, v] + ([mask] if bias_grad else [])
    grads = torch.autograd.grad(out, inputs, dout)
    assert out.dtype == dtype and out.shape == (b, hq, nq, d)
    assert all(g.dtype == dtype for g in grads)
    # PyTorch's own same-dtype error; bf16 matmuls on CPU are emulated, so measure bf16 via fp32 there.
    same = dtype if not (dtype == torch.bfloat16 and DEVICE == "cpu") else torch.float32
    assert_against_reference(out, grads, q, k, v, mask, dout, dtype=dtype, same_dtype=same, is_causal=causal,
                             scale=scale, enable_gqa=hq != hkv, bias_grad=bias_grad)


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    poison_outputs(monkeypatch)
    torch.manual_seed(0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shapes_fp32(shape, causal):
    """Forward and backward match float64 on odd lengths, head dims and GQA groupings."""
    check(shape, torch.float32, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dtypes(dtype, causal):
    """Each supported dtype keeps its output dtype and the error rule (bf16 on CPU via fp32 copies)."""
    check((2, 2, 2, 37, 45, 32), dtype, causal=causal)


@pytest.mark.parametrize("layout", ["packed", "bnhd"])
def test_strided_views(layout):
    """q/k/v given as strided views (packed QKV, transposed storage) are read in place, correctly."""
    check((2, 3, 3, 21, 21, 16), torch.float32, layout=layout, causal=True)


def test_causal_more_queries_than_keys():
    """Causal is top-left aligned like tril(ones(Nq, Nk)), also when Nq > Nk."""
    check((1, 2, 2, 40, 13, 16), torch.float32, causal=True)


def test_custom_scale():
    """A non-default scale is honoured (an ignored scale is a silent wrong answer)."""
    check((1, 2, 2, 17, 17, 16), torch.float32, scale=0.7)


@pytest.mark.parametrize("shape", [(1, 2, 2, 40, 75, 16), (2, 4, 2, 1, 300, 16)], ids=["rows", "decode"])
@pytest.mark.parametrize("scale", [0.7, -0.7, 0.0], ids=["positive", "negative", "zero"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_row_max_before_the_scale(scale, causal, shape):
    """Where the score is qk times the scale, the portable forward (and the split-KV one) takes
    each tile's row max of qk before the scale (RAW_MAX, the template's note on the row max); a
    scale ≤ 0 takes it after, where max(qk)·scale is not the max and -inf·0 is NaN. Forward and
    gradients against float64; then the forward on scores of ±100s in log2 units, where without
    that fallback a negative scale's exponents overflow to inf."""
    from fx_flash.codegen import launch

    b, hq, hkv, nq, nk, d = shape
    for spread in (1.0, 8.0):
        launch.clear_plans()
        q, k, v = (t.requires_grad_() for t in _inputs(b, hq, hkv, nq, nk, d, torch.float32))
        with torch.no_grad():
            q.mul_(spread)
        out = fx_flash.flash_attention(q, k, v, None, 0.0, causal, scale, enable_gqa=hq != hkv)
        (plan, ) = launch._FORWARDS.values()
        assert plan.kernels[0].kwargs["RAW_MAX"] is (scale > 0)
        if spread == 1.0:
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            assert_against_reference(out, grads, q, k, v, None, dout, dtype=torch.float32, same_dtype=torch.float32,
                                     is_causal=causal, scale=scale, enable_gqa=hq != hkv)
        else:
            kw = dict(is_causal=causal, scale=scale, enable_gqa=hq != hkv)
            exact, _ = reference_with_grads(q, k, v, None, out, dtype=torch.float64, **kw)
            same, _ = reference_with_grads(q, k, v, None, out, dtype=torch.float32, **kw)
            assert_rule("out", out.detach(), same.detach(), exact.detach(), torch.float32)


def test_row_max_switch(monkeypatch):
    """FX_FLASH_RAW_MAX=0 takes the row max after the scale everywhere (a control for benchmarks);
    the switch is in the plan key, so both kinds of plan live side by side."""
    from fx_flash.codegen import launch

    launch.clear_plans()
    q, k, v = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    on = fx_flash.flash_attention(q, k, v, None, 0.0, True)
    monkeypatch.setenv("FX_FLASH_RAW_MAX", "0")
    off = fx_flash.flash_attention(q, k, v, None, 0.0, True)
    assert sorted(plan.kernels[0].kwargs["RAW_MAX"] for plan in launch._FORWARDS.values()) == [False, True]
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


MASKS = {
    # Padding mask broadcast over heads and rows; stride-0 reads. Row 0 of batch 0 keeps one key.
    "bool_padding_b11n": lambda b, h, nq, nk: torch.rand(b, 1, 1, nk, device=DEVICE) > 0.4,
    "bool_full_bhnn": lambda b, h, nq, nk: torch.rand(b, h, nq, nk, device=DEVICE) > 0.5,
    "bool_2d_nn": lambda b, h, nq, nk: torch.rand(nq, nk, device=DEVICE) > 0.3,
    "float_1hnn": lambda b, h, nq, nk: torch.randn(1, h, nq, nk, device=DEVICE),
    "float_b11n": lambda b, h, nq, nk: torch.randn(b, 1, 1, nk, device=DEVICE),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("make_mask", MASKS.values(), ids=MASKS.keys())
def test_masks(make_mask, causal):
    """Bool and additive masks of broadcast shapes, alone and with causal, match the oracle."""
    b, h, nq, nk = 2, 2, 19, 35
    mask = make_mask(b, h, nq, nk)
    if mask.dtype == torch.bool:
        mask[..., 0] = True  # keep every row non-empty here; empty rows have their own test
    check((b, h, h, nq, nk, 16), torch.float32, causal=causal, attn_mask=mask)


BIASES = {  # (bias shape, batch, heads); n = 16
    "per_head_1hnn": ((1, 2, 16, 16), 1, 2),
    "per_batch_b11n": ((2, 1, 1, 16), 2, 3),  # broadcast over heads and rows: atomics sum them
    "full_bhnn": ((2, 2, 16, 16), 2, 2),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias_shape,b,h", BIASES.values(), ids=BIASES.keys())
def test_bias_gradient(bias_shape, b, h, causal):
    """A learned additive bias (T5-style) gets dS summed over its broadcast axes."""
    bias = torch.randn(bias_shape, device=DEVICE)
    check((b, h, h, 16, 16, 16), torch.float32, attn_mask=bias, bias_grad=True, causal=causal)


def test_bias_gradient_gqa():
    """The bias gradient is per query head, also when query heads share K/V heads."""
    check((2, 4, 2, 13, 21, 16), torch.float32, attn_mask=torch.randn(1, 4, 13, 21, device=DEVICE), bias_grad=True)


def test_fully_masked_rows_are_zero():
    """Rows with every key masked out give 0 output and finite, correct gradients (as SDPA)."""
    mask = torch.rand(2, 1, 11, 23, device=DEVICE) > 0.5
    mask[0, 0, 3] = False
    mask[1, 0, :4] = False
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE, requires_grad=True) for n in (11, 23, 23))
    out = fx_flash.flash_attention(q, k, v, mask)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert torch.equal(out[1, :, :4], torch.zeros_like(out[1, :, :4]))
    check((2, 2, 2, 11, 23, 16), torch.float32, attn_mask=mask)


def test_finite_fill_rows_average_uniformly():
    """A row masked by a finite fill (HF's finfo.min) averages V uniformly, as eager softmax does."""
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for n in (4, 9, 9))
    bias = torch.zeros(1, 1, 4, 9, device=DEVICE)
    bias[0, 0, 2] = torch.finfo(torch.float32).min
    out = fx_flash.flash_attention(q, k, v, bias)
    eager = torch.softmax(q @ k.transpose(-2, -1) / 4.0 + bias, -1) @ v
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0, 2], v[0, 0].mean(0), atol=1e-5, rtol=1e-5)


def test_logsumexp_output():
    """The forward op's second output is the natural-log logsumexp of each row's scaled scores."""
    from fx_flash.reference import attention_logsumexp

    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (7, 30, 30))
    _, lse = sdpa_forward(q, k, v, None, None, 0.0, True, 0.25)
    torch.testing.assert_close(lse, attention_logsumexp(q, k, None, True, 0.25), atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 7)


class LargestTensor:
    """A dispatch mode recording the largest storage (in bytes) any aten op returns while active.

    Storage, not numel: a broadcast view such as ``bias.expand(B, H, Nq, Nk)`` allocates nothing.
    """

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                for t in result if isinstance(result, (tuple, list)) else [result]:
                    if isinstance(t, torch.Tensor):
                        record.nbytes = max(record.nbytes, t.untyped_storage().nbytes())
                return result

        self.nbytes, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_no_quadratic_allocation():
    """The kernels' launch path creates no tensor of Nq·Nk elements, forward or backward."""
    from fx_flash.codegen import launch

    n, d = 64, 16
    q, k, v = (torch.randn(1, 1, n, d, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 1, 1, n, device=DEVICE)
    with LargestTensor() as largest:
        spec, operands = sdpa_call(bias, True, 0.0)
        spec = spec_from_text(spec).with_grads([True])
        out, lse = launch.attention_forward(q, k, v, operands, None, 0.0, 0.25, spec)
        launch.attention_backward(torch.randn_like(out), q, k, v, out, lse, operands, None, 0.0, 0.25, spec)
    # fp32 q/k/v are n·d·4 bytes; an (Nq, Nk) fp32 tensor would be 4x that.
    assert 0 < largest.nbytes <= n * d * 4, f"a {largest.nbytes}-byte tensor for N={n}, d={d}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [SHAPES["ragged_cross"], SHAPES["gqa_4_to_2"], SHAPES["head_dim_80"]],
                         ids=["ragged_cross", "gqa_4_to_2", "head_dim_80"])
def test_atomic_dq(shape, causal, monkeypatch):
    """FX_FLASH_DQ=atomic (dQ summed by atomics in the dK/dV kernel) gives the same gradients."""
    monkeypatch.setenv("FX_FLASH_DQ", "atomic")
    b, hq, _, nq, nk, _ = shape
    check(shape, torch.float32, causal=causal, attn_mask=torch.randn(1, hq, nq, nk, device=DEVICE), bias_grad=True)


def test_separate_dq_is_deterministic():
    """The default backward (separate dQ pass, no atomics on dQ/dK/dV) is bitwise repeatable."""
    q, k, v = (torch.randn(1, 4, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 4, 40, 16, device=DEVICE)
    runs = [torch.autograd.grad(fx_flash.flash_attention(q, k, v, is_causal=True), (q, k, v), dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("mask", ["none", "bool", "float_grad"])
@pytest.mark.parametrize("nk", [192, 200], ids=["square", "ragged_keys"])
def test_causal_dkdv_one_range(nk, mask):
    """The causal dK/dV kernel runs the diagonal band and the interior as one range of query
    tiles with the predicate on every tile: at d = 64 (64-row tiles under the interpreter)
    192 queries make three full query tiles, so each key tile's range starts on the band and
    runs on through the interior; 200 keys add a ragged key tile, bounded by that predicate."""
    b, h, nq, d = 1, 2, 192, 64
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(b, h, nq, nk, device=DEVICE) > 0.3
    elif mask == "float_grad":
        attn_mask = torch.randn(b, 1, nq, nk, device=DEVICE)
    check((b, h, h, nq, nk, d), torch.float32, causal=True, attn_mask=attn_mask, bias_grad=mask == "float_grad")
