"""Attention-like graphs the pass must leave alone, each with the named check that refuses it.

Each test asserts zero rewrites, the check name in the PassResult (what ``explain().missed``
shows), and that the graph still computes what the code does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from test_pass_spellings import B, D, H, N, RefusalTest, fuse, qkv



def scores(q, k):
    return q @ k.transpose(-2, -1) * 0.25


class TestMustNotRewrite(RefusalTest):
    def test_attention_weights_returned(self):
        """Weights that are also returned (output_attentions=True) are needed: no rewrite."""
        def attention(q, k, v):
            w = scores(q, k).softmax(-1)
            return w @ v, w

        miss = self.refused(attention, *qkv(), check="weights_used_once")
        self.assertIn("2 nodes", miss.reason)

    def test_attention_weights_logged(self):
        """Weights also reduced for logging (an entropy) are needed: no rewrite."""
        def attention(q, k, v):
            w = scores(q, k).softmax(-1)
            entropy = -(w * w.clamp_min(1e-9).log()).sum(-1).mean()
            return w @ v, entropy

        self.refused(attention, *qkv(), check="weights_used_once")

    def test_scores_used_elsewhere(self):
        """Raw scores also returned (a z-loss on logits) keep the chain: no rewrite."""
        def attention(q, k, v):
            s = scores(q, k)
            return s.softmax(-1) @ v, s.logsumexp(-1)

        self.refused(attention, *qkv(), check="scores_only_in_chain")

    def test_softmax_over_query_axis(self):
        """Softmax over dim=-2 normalizes over queries, not keys: no rewrite."""
        self.refused(lambda q, k, v: scores(q, k).softmax(-2) @ v, *qkv(), check="softmax_over_keys")

    def test_softmax_over_heads_axis(self):
        """Softmax over dim=1 (heads): no rewrite."""
        self.refused(lambda q, k, v: F.softmax(scores(q, k), dim=1) @ v, *qkv(), check="softmax_over_keys")

    def test_second_product_with_a_weight_matrix(self):
        """``softmax(q·kᵀ) @ W`` with a 2-D weight is not P·V: no rewrite."""
        w = torch.randn(N, D)
        self.refused(lambda q, k, w: scores(q, k).softmax(-1) @ w, *qkv()[:2], w, check="value_shaped")

    def test_weights_as_right_operand(self):
        """``v @ softmax(...)`` (weights on the right) is not attention's P·V: no rewrite."""
        q, k, _ = qkv()
        vt = torch.randn(B, H, D, N)
        self.refused(lambda q, k, vt: vt @ scores(q, k).softmax(-1), q, k, vt, check="softmax_feeds_value_product")

    def test_softmax_classifier_head(self):
        """A classifier's ``softmax(linear(x))`` is no attention: no rewrite."""
        class Classifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(D, 5)

            def forward(self, x):
                return F.softmax(self.head(x), dim=-1)

        self.refused(Classifier(), torch.randn(B, D), check="softmax_feeds_value_product")

    def test_softmax_of_a_single_product_then_not_multiplied(self):
        """``softmax(q·kᵀ)`` returned as is (an attention map, no V): no rewrite."""
        self.refused(lambda q, k: scores(q, k).softmax(-1), *qkv()[:2], check="softmax_feeds_value_product")

    def test_float64_mask_that_promotes_the_scores(self):
        """A float64 additive mask promotes fp32 scores to fp64: a dtype the op cannot honour."""
        mask = torch.zeros(1, 1, N, N, dtype=torch.float64)
        fn = lambda q, k, v, m: (scores(q, k) + m).softmax(-1).float() @ v  # noqa: E731
        miss = self.refused(fn, *qkv(), mask, check="scores_keep_their_shape")
        self.assertIn("promotes the scores to float64", miss.reason)

    def test_mask_that_broadcasts_the_scores_larger(self):
        """A rank-5 mask broadcasts the scores to rank 5: a shape the op cannot honour."""
        mask = torch.zeros(3, 1, 1, N, N)
        fn = lambda q, k, v, m: ((scores(q, k) + m).softmax(-1) @ v).sum(0)  # noqa: E731
        miss = self.refused(fn, *qkv(), mask, check="value_shaped")
        self.assertIn("rank-5", miss.reason)

    def test_float64_attention(self):
        """float64 q/k/v: the kernels support fp16/bf16/fp32 only."""
        q, k, v = (t.double() for t in qkv())
        self.refused(lambda q, k, v: scores(q, k).softmax(-1) @ v, q, k, v, check="dtypes_supported")

    def test_log_softmax_is_not_softmax(self):
        """log_softmax followed by a product is not attention: never matched (nothing missed)."""
        fn = lambda q, k, v: scores(q, k).log_softmax(-1) @ v  # noqa: E731
        gm, result = fuse(fn, *qkv())
        self.assertEqual((result.count, result.missed), (0, []))
