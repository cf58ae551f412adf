"""The pass on masks: bool fills, where, additive and HF extended masks, causal proofs.

Fills with -inf become a bool ``attn_mask``; fills with a finite large negative (finfo.min)
become an additive mask so fully masked rows stay the uniform average eager computes; causal
masks proved lower-triangular become ``is_causal=True`` with no mask tensor at all.
"""

from __future__ import annotations

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_pass_spellings import B, H, N, assert_same, call_of, code, fuse, fused_once, ops_in, qkv

MIN = torch.finfo(torch.float32).min


def padding_mask(fully_masked_row: bool = False) -> torch.Tensor:
    """(B, 1, N, N) bool, True = attend; optionally one query row with no key at all."""
    torch.manual_seed(1)
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] = True
    if fully_masked_row:
        keep[0, 0, 3, :] = False
    return keep


def scores(q, k):
    return q @ k.transpose(-2, -1) * 0.25


class TestBoolMasks(expecttest.TestCase):
    def test_masked_fill_eq_zero_with_minus_inf_is_a_bool_mask(self):
        """``masked_fill(mask == 0, -inf)``: the op gets ``mask != 0`` as its keep-mask."""
        gm = fused_once(self, lambda q, k, v, m: scores(q, k).masked_fill(m == 0, float("-inf")).softmax(-1) @ v, *qkv(requires_grad=True), padding_mask(), grads=True)
        self.assertExpectedInline(code(gm), """\
def forward(self, q, k, v, m):
    attention_default = torch.ops.fx_flash.attention.default(q, k, v, [m], 0.0, 0.25, False, 'score=qk*scale; keep=t0; t0=bool[b, 0, q_idx, kv_idx]');  q = k = v = m = None
    return attention_default""")

    def test_masked_fill_of_inverted_mask_uses_the_mask_itself(self):
        """``masked_fill(~keep, -inf)`` and ``logical_not``: the op reads ``keep`` directly."""
        for invert in (lambda m: ~m, torch.logical_not):
            gm = fused_once(self, lambda q, k, v, m: scores(q, k).masked_fill(invert(m), float("-inf")).softmax(-1) @ v, *qkv(), padding_mask())
            self.assertEqual([n.name for n in call_of(gm)["operands"]], ["m"])

    def test_where_keep_scores_else_minus_inf(self):
        """``torch.where(keep, scores, -inf)`` is the same bool mask."""
        fused_once(self, lambda q, k, v, m: torch.where(m, scores(q, k), float("-inf")).softmax(-1) @ v, *qkv(), padding_mask())

    def test_fully_masked_row_gives_zero_where_eager_gives_nan(self):
        """Note: -inf fills leave eager NaN in a row with no key; the op returns 0 there (as SDPA)."""
        fn = lambda q, k, v, m: scores(q, k).masked_fill(~m, float("-inf")).softmax(-1) @ v  # noqa: E731
        inputs = (*qkv(), padding_mask(fully_masked_row=True))
        gm, result = fuse(fn, *inputs)
        self.assertEqual(result.count, 1)
        expected, got = fn(*inputs), gm(*inputs)
        self.assertTrue(expected[0, :, 3].isnan().all())
        self.assertTrue((got[0, :, 3] == 0).all())
        expected[0, :, 3] = 0
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


class TestAdditiveMasks(expecttest.TestCase):
    def test_masked_fill_with_finfo_min_becomes_additive(self):
        """``masked_fill(~keep, finfo.min)`` → additive ``where(~keep, min, 0)``: fully masked rows stay uniform."""
        gm = fused_once(self, lambda q, k, v, m: scores(q, k).masked_fill(~m, MIN).softmax(-1) @ v, *qkv(), padding_mask(fully_masked_row=True))
        self.assertEqual(call_of(gm)["spec"].fill, MIN)

    def test_where_with_finfo_min(self):
        """``torch.where(keep, scores, finfo.min)`` keeps eager's uniform rows too."""
        fused_once(self, lambda q, k, v, m: torch.where(m, scores(q, k), MIN).softmax(-1) @ v, *qkv(), padding_mask(fully_masked_row=True))

    def test_additive_mask_in_either_order(self):
        """``scores + mask`` and ``mask + scores`` both pass the mask through as is."""
        mask = torch.randn(B, 1, 1, N)
        for fn in (lambda q, k, v, m: (scores(q, k) + m).softmax(-1) @ v, lambda q, k, v, m: (m + scores(q, k)).softmax(-1) @ v):
            gm = fused_once(self, fn, *qkv(), mask)
            self.assertEqual([n.name for n in call_of(gm)["operands"]], ["m"])

    def test_in_place_add(self):
        """``scores += mask`` (symbolic_trace records it as an add)."""
        def attention(q, k, v, m):
            s = scores(q, k)
            s += m
            return s.softmax(-1) @ v

        fused_once(self, attention, *qkv(), torch.randn(1, 1, N, N))

    def test_hf_extended_mask(self):
        """HF's ``(1 - m) * finfo.min`` (B, 1, 1, N) built from an int padding mask."""
        attention_mask = torch.ones(B, N)
        attention_mask[1, 5:] = 0

        def attention(q, k, v, am):
            extended = (1.0 - am[:, None, None, :]) * MIN
            return F.softmax(scores(q, k) + extended, dim=-1) @ v

        fused_once(self, attention, *qkv(requires_grad=True), attention_mask, grads=True)

    def test_learned_bias_gets_its_gradient(self):
        """A T5-style learned position bias (requires grad) receives the same gradient as eager."""
        bias = torch.randn(1, H, N, N, requires_grad=True)
        fused_once(self, lambda q, k, v, b: (scores(q, k) + b).softmax(-1) @ v, *qkv(requires_grad=True), bias, grads=True)

    def test_bias_then_scale_scales_the_bias(self):
        """``(q·kᵀ + bias) / s``: the scale applies to the sum, computed in the kernel as written."""
        bias = torch.randn(1, 1, N, N)
        gm = fused_once(self, lambda q, k, v, b: ((q @ k.transpose(-2, -1) + b) / 4.0).softmax(-1) @ v, *qkv(), bias)
        self.assertEqual(call_of(gm)["spec"].text, "score=0.25*(qk*scale + t0); t0=float[0, 0, q_idx, kv_idx]")

    def test_bool_and_additive_together(self):
        """A -inf fill and an additive bias combine into one float mask with -inf where not kept."""
        bias = torch.randn(1, H, N, N)
        fused_once(self, lambda q, k, v, m, b: (scores(q, k) + b).masked_fill(~m, float("-inf")).softmax(-1) @ v, *qkv(), padding_mask(), bias)


class TestCausal(expecttest.TestCase):
    def test_tril_of_ones_is_causal(self):
        """``masked_fill(tril(ones(T, T)) == 0, -inf)`` becomes is_causal=True, no mask tensor."""
        def attention(q, k, v):
            t = q.size(-2)
            causal = torch.tril(q.new_ones(t, t))
            return scores(q, k).masked_fill(causal == 0, float("-inf")).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), grads=True)
        self.assertExpectedInline(code(gm), """\
def forward(self, q, k, v):
    attention_default = torch.ops.fx_flash.attention.default(q, k, v, [], 0.0, 0.25, False, 'score=qk*scale; keep=kv_idx <= q_idx');  q = k = v = None
    return attention_default""")

    def test_triu_diagonal_one_filled_is_causal(self):
        """``masked_fill(triu(ones, diagonal=1).bool(), -inf)`` is the same causal mask."""
        def attention(q, k, v):
            t = q.size(-2)
            upper = q.new_ones(t, t).triu(diagonal=1).bool()
            return scores(q, k).masked_fill(upper, float("-inf")).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv())
        self.assertTrue(call_of(gm)["spec"].causal)

    def test_tril_buffer_slice_is_causal(self):
        """nanoGPT's ``bias[:, :, :T, :T] == 0`` on a tril buffer, read through get_attr."""
        module = BufferMasked(torch.tril(torch.ones(N, N)), rows=N)
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1)
        self.assertTrue(call_of(gm)["spec"].causal)
        assert_same(module, gm, *qkv())

    def test_buffer_that_is_not_tril_is_read_as_what_it_holds(self):
        """A ``triu`` buffer is not causal: it is read as its own predicate, no tensor passed."""
        module = BufferMasked(torch.triu(torch.ones(N, N)), rows=N)
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1)
        self.assertFalse(call_of(gm)["spec"].causal)
        self.assertEqual(call_of(gm)["spec"].text, "score=qk*scale; keep=q_idx <= kv_idx")
        assert_same(module, gm, *qkv())

    def test_buffer_holding_no_pattern_is_an_operand(self):
        """A random 0/1 buffer is passed to the op as a tensor (still correct)."""
        torch.manual_seed(2)
        buffer = (torch.rand(N, N) > 0.4).float()
        buffer[:, 0] = 1
        module = BufferMasked(buffer, rows=N)
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1)
        self.assertEqual(len(call_of(gm)["operands"]), 1)
        assert_same(module, gm, *qkv())

    def test_causal_slice_shorter_than_queries_is_not_causal(self):
        """A one-row slice broadcast over all queries is not causal: kept as a mask."""
        module = BufferMasked(torch.tril(torch.ones(N, N)), rows=1)
        gm, result = fuse(module, *qkv())
        self.assertFalse(call_of(gm)["spec"].causal)
        assert_same(module, gm, *qkv())


class BufferMasked(nn.Module):
    """nanoGPT's spelling: ``masked_fill(bias[:, :, :rows, :N] == 0, -inf)`` on a registered
    (1, 1, N, N) buffer."""

    def __init__(self, buffer, rows):
        super().__init__()
        self.register_buffer("bias", buffer.view(1, 1, N, N))
        self.rows = rows

    def forward(self, q, k, v):
        return scores(q, k).masked_fill(self.bias[:, :, :self.rows, :N] == 0, float("-inf")).softmax(-1) @ v


def tensor_dtype(node):
    return node.meta["val"].dtype
