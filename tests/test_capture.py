"""Capture: whatever the graph does to the scores becomes the kernel's score and predicate.

Each test traces a small function the way real code writes it, asserts one rewrite and the
captured spec in its printed form (what a reviewer reads), and compares the rewritten graph with
the function itself, forward and gradients (of q, k, v and of every operand that requires grad).
Shapes are tiny: the op runs the generated kernels in Triton's interpreter.
"""

from __future__ import annotations

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_pass_spellings import B, D, H, N, RefusalTest, assert_same, call_of, fuse, fused_once, qkv
from tests.numerics import spec_call_against_reference

MIN = torch.finfo(torch.float32).min
INF = float("-inf")


def scores(q, k, scale=0.25):
    return q @ k.transpose(-2, -1) * scale


def spec_text(gm) -> str:
    return call_of(gm)["spec"].text


def positions(q):
    """Query positions down the rows, key positions along the columns. The length is read from
    q, as models do: symbolic_trace would fold an ``arange`` of a literal into a constant."""
    i = torch.arange(q.size(-2))
    return i[:, None], i[None, :]


def no_quadratic_tensor(gm, nq=N, nk=N) -> bool:
    """No node of the rewritten graph but the op's inputs and outputs holds an (…, Nq, Nk) tensor."""
    for node in gm.graph.nodes:
        t = node.meta.get("val")
        if node.op in ("placeholder", "output") or not isinstance(t, torch.Tensor):
            continue
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (nq, nk):
            return False
    return True


class TestScoreModifications(expecttest.TestCase):
    def test_gemma2_softcap_before_the_causal_mask(self):
        """Gemma 2: ``tanh(s / c) * c`` then HF's additive causal mask: one score, one predicate."""
        def attention(q, k, v):
            s = scores(q, k) / 5.0
            s = torch.tanh(s) * 5.0
            qi, ki = positions(q)
            mask = torch.where(ki <= qi, torch.zeros(()), MIN)
            return F.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), grads=True)
        self.assertExpectedInline(spec_text(gm), """score=5.0*tanh(qk*scale); keep=kv_idx <= q_idx""")
        self.assertTrue(call_of(gm)["spec"].causal)
        self.assertTrue(no_quadratic_tensor(gm))

    def test_per_head_learned_scale_gets_its_gradient(self):
        """Swin v2's learned (H, 1, 1) logit scale is an operand read at h, and gets its gradient."""
        logit_scale = torch.randn(H, 1, 1).mul(0.3).requires_grad_()
        fn = lambda q, k, v, t: ((q @ k.transpose(-2, -1)) * t.exp()).softmax(-1) @ v  # noqa: E731
        gm = fused_once(self, fn, *qkv(requires_grad=True), logit_scale, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale*exp(t0); t0=float[h, 0, 0]""")

    def test_alibi_slopes_from_arange_are_an_expression_of_h(self):
        """ALiBi with slopes ``2 ** (-8 (h + 1) / H)`` built from ``arange``: no tensor at all."""
        def attention(q, k, v):
            slopes = 2.0 ** (-8.0 * torch.arange(1, q.size(1) + 1) / H)
            qi, ki = positions(q)
            bias = slopes[:, None, None] * (ki - qi)[None]
            return (scores(q, k) + bias).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), grads=True)
        self.assertEqual(call_of(gm)["operands"], [])
        self.assertExpectedInline(spec_text(gm), """score=qk*scale + (kv_idx - q_idx)/2.0**(4.0*(h + 1))""")

    def test_learned_alibi_slopes_get_their_gradient(self):
        """Slopes held in a (H,) parameter: read at h, gradient summed over every element."""
        slopes = torch.rand(H).requires_grad_()

        def attention(q, k, v, m):
            qi, ki = positions(q)
            return (scores(q, k) - m[:, None, None] * (qi - ki).abs()).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), slopes, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale - t0*Abs(-kv_idx + q_idx); t0=float[h]""")

    def test_batch_heads_views_around_the_mask(self):
        """BART/Bloom: (B·H, N, N) scores viewed to (B, H, N, N) for the mask and back: index maps."""
        mask = torch.randn(B, 1, N, N)

        def attention(q, k, v, m):
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            w = torch.bmm(q, k.transpose(1, 2)) * 0.25
            w = (w.view(B, H, N, N) + m).view(B * H, N, N)
            return torch.bmm(w.softmax(-1), v).view(B, H, N, D)

        gm = fused_once(self, attention, *qkv(requires_grad=True), mask, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale + t0; t0=float[floor(h/2), 0, q_idx, kv_idx]""")

    def test_expand_as_reads_only_the_shape(self):
        """DistilBERT: ``masked_fill((mask == 0).view(…).expand_as(scores), min)``."""
        padding = torch.ones(B, N)
        padding[1, 5:] = 0

        def attention(q, k, v, mask):
            s = scores(q, k)
            m = (mask == 0).view(B, 1, 1, N).expand_as(s)
            return s.masked_fill(m, MIN).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), padding, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=Ne(t0, 0); fill=-3.4028234663852886e+38; t0=float[b, kv_idx]""")

    def test_scores_read_again_only_for_their_dtype(self):
        """T5: ``softmax(scores.float()).type_as(scores)`` reads the scores twice, once for the dtype."""
        bias = torch.randn(1, H, N, N, requires_grad=True)

        def attention(q, k, v, b):
            s = q @ k.transpose(3, 2)
            s += b
            return F.softmax(s.float(), dim=-1).type_as(s) @ v

        fused_once(self, attention, *qkv(requires_grad=True), bias, grads=True)

    def test_gpt2_legacy_multiply_and_subtract(self):
        """GPT-2 of transformers 2.x: ``w * b - 1e4 * (1 - b)`` with a tril buffer → causal, fill -1e4."""
        class Legacy(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("bias", torch.tril(torch.ones(N, N)).view(1, 1, N, N))

            def forward(self, q, k, v):
                w = scores(q, k)
                b = self.bias[:, :, :N, :N]
                return (w * b - 1e4 * (1 - b)).softmax(-1) @ v

        module = Legacy()
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1, [str(m) for m in result.missed])
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=kv_idx <= q_idx""")
        self.assertTrue(call_of(gm)["spec"].causal)
        assert_same(module, gm, *qkv())

    def test_in_place_masked_fill(self):
        """``scores.masked_fill_(~keep, -inf)`` whose result is not used: the mutation is read."""
        keep = torch.rand(B, 1, N, N) > 0.3
        keep[..., 0] = True

        def attention(q, k, v, m):
            s = scores(q, k)
            s.masked_fill_(~m, INF)
            return s.softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(), keep)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=t0; t0=bool[b, 0, q_idx, kv_idx]""")

    def test_clone_after_softmax(self):
        """A ``.clone()`` between softmax and P·V passes the weights through."""
        fused_once(self, lambda q, k, v: scores(q, k).softmax(-1).clone() @ v, *qkv())

    def test_einsum_with_channels_first_value(self):
        """``einsum('bhqk,bhdk->bhqd', p, vT)``: V given as (B, H, d, N) is transposed for the op."""
        q, k, v = qkv(requires_grad=True)
        vt = v.detach().transpose(-2, -1).contiguous().requires_grad_()
        fn = lambda q, k, vt: torch.einsum("bhqk,bhdk->bhqd", scores(q, k).softmax(-1), vt)  # noqa: E731
        fused_once(self, fn, q, k, vt, grads=True)

    def test_fill_with_zero_is_a_score_not_a_mask(self):
        """``masked_fill(m, 0.0)`` sets those scores to 0 (weight e⁰): computed, not dropped."""
        keep = torch.rand(B, 1, N, N) > 0.5
        gm = fused_once(self, lambda q, k, v, m: scores(q, k).masked_fill(m, 0.0).softmax(-1) @ v, *qkv(requires_grad=True),
                        keep, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=~t0; fill=0.0; t0=bool[b, 0, q_idx, kv_idx]""")

    def test_runtime_temperature_tensor(self):
        """A 0-d temperature that is a graph input (and learned): an operand read once per tile."""
        temperature = torch.tensor(0.7, requires_grad=True)
        fn = lambda q, k, v, t: (q @ k.transpose(-2, -1) / t).softmax(-1) @ v  # noqa: E731
        gm = fused_once(self, fn, *qkv(requires_grad=True), temperature, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale/t0; t0=float[]""")

    def test_pointwise_ops_of_the_table(self):
        """clamp, sigmoid, exp/log, abs, pow, maximum and where with a float branch, with gradients."""
        bias = torch.randn(1, H, N, N, requires_grad=True)

        def attention(q, k, v, b):
            s = scores(q, k).clamp(-3.0, 3.0)
            s = s + torch.log1p(b.exp()) * 0 + torch.sigmoid(b) - b.abs() ** 1.5 / 4
            s = torch.maximum(s, torch.full_like(s, -2.5))
            s = torch.where(b > 1.0, s * 0.5, s)
            return s.softmax(-1) @ v

        gm, result = fuse(attention, *qkv(requires_grad=True), bias)
        # log1p has no rule: b.exp() feeds an op the table lacks, so that branch is an operand.
        self.assertEqual(result.count, 1, [str(m) for m in result.missed])
        assert_same(attention, gm, *qkv(requires_grad=True), bias, grads=True)

    def test_relative_positions_read_through_a_computed_index(self):
        """``table[q - kv + N - 1]``: a computed gather index is not read in the kernel; the gathered
        tensor is the operand (correct, and the only case that reads an (Nq, Nk) tensor)."""
        table = torch.randn(2 * N - 1, H)

        def attention(q, k, v, t):
            qi, ki = positions(q)
            bias = t[qi - ki + N - 1].permute(2, 0, 1)
            return (scores(q, k) + bias).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(), table)
        self.assertEqual(len(call_of(gm)["operands"]), 1)


class TestPositionMasks(expecttest.TestCase):
    def _masked(self, keep_fn, n_q=N, n_kv=N):
        def attention(q, k, v):
            i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None, :]
            return scores(q, k).masked_fill(~keep_fn(i, j), INF).softmax(-1) @ v

        q, k, v = qkv(requires_grad=True)
        if n_q != N or n_kv != N:
            q = torch.randn(B, H, n_q, D, requires_grad=True)
            k, v = (torch.randn(B, H, n_kv, D, requires_grad=True) for _ in range(2))
        gm = fused_once(self, attention, q, k, v, grads=True)
        self.assertEqual(call_of(gm)["operands"], [])
        self.assertTrue(no_quadratic_tensor(gm, n_q, n_kv))
        return spec_text(gm)

    def test_sliding_window(self):
        """Mistral's window: causal and at most w keys back, from two aranges."""
        self.assertExpectedInline(self._masked(lambda i, j: (j <= i) & (i - j < 3)),
                                  """score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx <= kv_idx + 2)""")

    def test_lower_bound_on_keys(self):
        """A bound with no positive index term on its small side (``kv_idx >= 2``) keeps its meaning
        (printed as ``kv_idx >= 2``; a sign slip once made it ``False``)."""
        self.assertExpectedInline(self._masked(lambda i, j: j >= 2), """score=qk*scale; keep=kv_idx >= 2""")

    def test_prefix_lm(self):
        """Prefix-LM: causal, except that every query sees the first P keys."""
        self.assertExpectedInline(self._masked(lambda i, j: (j <= i) | (j < 3)),
                                  """score=qk*scale; keep=(kv_idx <= 2) | (kv_idx <= q_idx)""")

    def test_chunked_attention(self):
        """Chunked (block-local) causal attention: same chunk of 4 and not in the future."""
        self.assertExpectedInline(self._masked(lambda i, j: (i // 4 == j // 4) & (j <= i)),
                                  """score=qk*scale; keep=(kv_idx <= q_idx) & Eq(floor(kv_idx/4), floor(q_idx/4))""")

    def test_causal_bottom_right_with_offset(self):
        """``tril(ones(Nq, Nk), diagonal=Nk - Nq)``: the last query sees every key (decoding)."""
        def keep(i, j):
            return (i + j).new_ones(5, N, dtype=torch.bool).tril(diagonal=N - 5)

        self.assertExpectedInline(self._masked(keep, n_q=5), """score=qk*scale; keep=kv_idx <= q_idx + 3""")

    def test_document_mask_from_a_doc_id_vector(self):
        """Packed documents: ``doc[q] == doc[kv]`` reads the (N,) id vector twice, never (N, N)."""
        docs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])

        def attention(q, k, v, d):
            same = d[:, None] == d[None, :]
            return scores(q, k).masked_fill(~same, INF).softmax(-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), docs, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=Eq(t0, t1); t0=int[kv_idx]; t1=int[q_idx]""")
        self.assertTrue(no_quadratic_tensor(gm))

    def test_hf_causal_and_padding_mask(self):
        """transformers' sdpa_mask without vmap: arange indices, ``padding[b, kv]`` gathered,
        expanded to (B, 1, Nq, Nk) and turned into 0 / finfo.min: one predicate, one (B, N) operand."""
        padding = torch.ones(B, N, dtype=torch.bool)
        padding[1, 6:] = False

        def attention(q, k, v, pad):
            b = torch.arange(B)[:, None, None, None]  # transformers also builds a head arange, unused here
            qi, ki = torch.arange(N)[None, None, :, None], torch.arange(N)[None, None, None, :]
            mask = q.new_ones((), dtype=torch.bool) & (ki <= qi) & pad[b, ki]
            mask = mask.expand(B, -1, N, N)
            additive = torch.where(mask, torch.zeros((), dtype=q.dtype), MIN)
            return F.softmax(scores(q, k) + additive, dim=-1) @ v

        gm = fused_once(self, attention, *qkv(requires_grad=True), padding, grads=True)
        self.assertExpectedInline(spec_text(gm), """score=qk*scale; keep=t0 & (kv_idx <= q_idx); fill=-3.4028234663852886e+38; t0=bool[b, kv_idx]""")
        self.assertEqual(call_of(gm)["spec"].tile_mode, "ranged")  # tiles skipped from a summary of the padding
        self.assertTrue(no_quadratic_tensor(gm))


class TestRefusals(RefusalTest):
    def test_reduction_along_keys(self):
        """``s / s.norm(-1)``: the norm reduces the scores along the keys, no per-element op."""
        def attention(q, k, v):
            s = scores(q, k)
            return (s / s.norm(dim=-1, keepdim=True)).softmax(-1) @ v

        miss = self.refused(attention, *qkv(), check="score_is_pointwise")
        self.assertIn("a reduction", miss.reason)

    def test_two_products_feeding_the_scores(self):
        """Two Q·Kᵀ products reach the softmax through pointwise ops: which is the score is unclear."""
        miss = self.refused(lambda q, k, v: (scores(q, k) * scores(q, k)).softmax(-1) @ v, *qkv(),
                            check="scores_from_qk_product")
        self.assertIn("more than one matrix product", miss.reason)

    def test_reduction_of_the_same_scores(self):
        """``s - s.mean(-1)`` on one product: the reduction is not pointwise."""
        def attention(q, k, v):
            s = scores(q, k)
            return (s - s.mean(-1, keepdim=True)).softmax(-1) @ v

        self.refused(attention, *qkv(), check="score_is_pointwise")

    def test_scores_permuted(self):
        """Transposing the scores swaps queries and keys: not attention's score."""
        self.refused(lambda q, k, v: scores(q, k).transpose(-2, -1).softmax(-1) @ v, *qkv(), check="score_is_pointwise")

    def test_floor_of_scores_has_no_usable_derivative(self):
        """``floor`` of the scores, with gradients needed: no derivative the kernel can apply."""
        self.refused(lambda q, k, v: torch.floor(scores(q, k)).softmax(-1) @ v, *qkv(requires_grad=True),
                     check="score_is_differentiable")

    def test_integer_cast_of_the_scores(self):
        """``scores.long()`` truncates: refused rather than guessed."""
        self.refused(lambda q, k, v: scores(q, k).long().float().softmax(-1) @ v, *qkv(), check="score_is_pointwise")


def test_explain_prints_the_captured_score_and_predicate():
    """explain() shows the score and the predicate as expressions, not as graph nodes."""
    from fx_flash.explain import explain

    def attention(q, k, v):
        s = torch.tanh(scores(q, k) / 30.0) * 30.0
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)
        return s.masked_fill(~keep, INF).softmax(-1) @ v

    report = explain(attention, *qkv())
    (site,) = report.sites
    assert site.score == "30.0*tanh(qk*scale)" and site.keep == "(kv_idx <= q_idx) & (q_idx <= kv_idx + 3)"
    assert "score 30.0*tanh(qk*scale)" in str(report)


def test_explain_names_the_positional_part_of_a_padding_mask():
    """explain() says how a transformers-style padding & causal mask skips tiles: from the mask's
    summary, with the causal part alone where the padding changes nothing."""
    from fx_flash.explain import explain

    def attention(q, k, v, pad):
        n = q.shape[-2]
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None]) & pad[:, None, None, :]
        return (scores(q, k) + torch.where(keep, 0.0, torch.finfo(q.dtype).min)).softmax(-1) @ v

    q, k, v = qkv()
    (site,) = explain(attention, q, k, v, torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool)).sites
    assert site.tiles == ("ranged (empty tiles skipped from a per-tile summary of the mask tensors; dK/dV key "
                          "tiles where they keep all that kv_idx <= q_idx keeps walk its loop alone)")


def test_data_dependent_control_flow_is_not_fused():
    """A branch on the scores' values splits Dynamo's graph: the softmax is left, with a reason."""
    from fx_flash.explain import explain

    def attention(q, k, v):
        s = scores(q, k)
        if s.max() > 100:
            s = s / 2
        return s.softmax(-1) @ v

    report = explain(attention, *qkv())
    assert report.fused == 0
    assert [m.check for m in report.missed] == ["scores_from_qk_product"]



def test_finite_fill_on_interior_and_ragged_tiles():
    """A finite fill (here 0.0, which keeps a weight) over lengths that span interior tiles and
    ragged tails: the fill is written where the predicate drops an element, and dS is 0 there."""
    torch.manual_seed(5)
    q = torch.randn(1, 2, 150, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 290, 16, requires_grad=True) for _ in range(2))
    keep = torch.rand(1, 1, 150, 290) > 0.3
    spec_call_against_reference("score=qk*scale; keep=t0; fill=0.0; t0=bool[0, 0, q_idx, kv_idx]", q, k, v, [keep])


def test_causal_finite_fill_skips_tiles_and_keeps_the_bias_gradient():
    """Exactly causal with a fill of -1e4 skips the tiles above the diagonal (every row keeps key
    0); a learned (H, 1, Nk) bias beside it gets its gradient summed over the queries."""
    from fx_flash.codegen.spec import spec_from_text

    text = "score=qk*scale + t0; keep=kv_idx <= q_idx; fill=-10000.0; t0=float[h, 0, kv_idx]"
    assert spec_from_text(text).causal
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 200, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 200, requires_grad=True)
    spec_call_against_reference(text, q, k, v, [bias])
