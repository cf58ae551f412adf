"""The pass on symbolic_trace graphs: each way real code writes attention becomes one op call.

Every test traces a small module, runs ``run_pass`` with example inputs (symbolic_trace graphs
record no shapes), asserts the exact rewrite count, and compares the rewritten graph's output
(and, where it matters, gradients) with the unmodified module. Shapes are tiny: under
``TRITON_INTERPRET=1`` the op runs the generated kernels in Triton's interpreter.
"""

from __future__ import annotations

import math

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fx_flash.codegen.spec import spec_from_text
from fx_flash.passes import run_pass

ATTENTION = torch.ops.fx_flash.attention.default
B, H, N, D = 2, 2, 8, 16


def qkv(*, n=N, d=D, heads=H, kv_heads=None, requires_grad=False):
    torch.manual_seed(0)
    kv_heads = kv_heads or heads
    q = torch.randn(B, heads, n, d)
    k, v = torch.randn(B, kv_heads, n, d), torch.randn(B, kv_heads, n, d)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def fuse(module, *inputs):
    """symbolic_trace ``module`` (a module or function), run the pass; return (graph module, PassResult)."""
    gm = torch.fx.symbolic_trace(module)
    return gm, run_pass(gm, inputs)


def ops_in(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is ATTENTION]


def call_of(gm) -> dict:
    """The one attention call's arguments by name, its spec parsed."""
    (node,) = ops_in(gm)
    q, k, v, operands, dropout_p, scale, gqa, spec = node.args
    return dict(operands=operands, dropout_p=dropout_p, scale=scale, gqa=gqa, spec=spec_from_text(spec))


def code(gm) -> str:
    return "\n".join(line.rstrip() for line in gm.code.strip().splitlines() if line.strip())


def assert_same(module, gm, *inputs, grads=False):
    """The rewritten graph computes what the module computes (and the same input gradients)."""
    expected, got = module(*inputs), gm(*inputs)
    atol = 2e-5 if expected.dtype == torch.float32 else 1e-2  # half: eager rounds q·kᵀ, the op does not
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4 if atol < 1e-3 else 1e-2)
    if grads:
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        g_expected = torch.autograd.grad(expected.square().sum(), leaves)
        g_got = torch.autograd.grad(got.square().sum(), leaves)
        for a, b in zip(g_got, g_expected):
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def fused_once(test, fn, *inputs, grads=False):
    """Trace ``fn``, expect exactly one rewrite, and the same results as ``fn`` itself."""
    gm, result = fuse(fn, *inputs)
    test.assertEqual(result.count, 1, [str(m) for m in result.missed])
    test.assertEqual(len(ops_in(gm)), 1)
    assert_same(fn, gm, *inputs, grads=grads)
    return gm


class RefusalTest(expecttest.TestCase):
    """Base of the must-not-rewrite tests: ``refused`` asserts no rewrite, exactly one miss by
    the named check, and that the graph still computes what the code does."""

    def refused(self, fn, *inputs, check: str):
        gm, result = fuse(fn, *inputs)
        self.assertEqual(result.count, 0)
        self.assertEqual(ops_in(gm), [])
        self.assertEqual([m.check for m in result.missed], [check], [str(m) for m in result.missed])
        torch.testing.assert_close(gm(*inputs), fn(*inputs))
        return result.missed[0]


class TestProductSpellings(expecttest.TestCase):
    def test_matmul_operator_transpose_div_sqrt(self):
        """The textbook spelling becomes one op call with the scale captured, nothing else left."""
        gm = fused_once(self, lambda q, k, v: F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v, *qkv(requires_grad=True), grads=True)
        self.assertExpectedInline(code(gm), """\
def forward(self, q, k, v):
    attention_default = torch.ops.fx_flash.attention.default(q, k, v, [], 0.0, 0.25, False, 'score=qk*scale');  q = k = v = None
    return attention_default""")

    def test_torch_matmul_transpose_2_3_pow_scale(self):
        """torch.matmul, transpose(2, 3) and ``d ** -0.5`` on the scores."""
        fused_once(self, lambda q, k, v: torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5, -1), v), *qkv())

    def test_tensor_matmul_mT_torch_mul(self):
        """Tensor.matmul with ``.mT`` and torch.mul by a literal."""
        fused_once(self, lambda q, k, v: torch.mul(q.matmul(k.mT), 0.3).softmax(dim=-1).matmul(v), *qkv())

    def test_bmm_on_batch_heads_views(self):
        """torch.bmm on (B·H, N, d) views: the op gets a leading axis, the result loses it."""
        def attention(q, k, v):
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            w = torch.bmm(q, k.transpose(1, 2)) * 0.25
            return torch.bmm(w.softmax(-1), v).view(B, H, N, D)

        gm = fused_once(self, attention, *qkv(requires_grad=True), grads=True)
        self.assertExpectedInline(code(gm), """\
def forward(self, q, k, v):
    reshape = q.reshape(4, 8, 16);  q = None
    reshape_1 = k.reshape(4, 8, 16);  k = None
    reshape_2 = v.reshape(4, 8, 16);  v = None
    unsqueeze = reshape.unsqueeze(0);  reshape = None
    unsqueeze_1 = reshape_1.unsqueeze(0);  reshape_1 = None
    unsqueeze_2 = reshape_2.unsqueeze(0);  reshape_2 = None
    attention_default = torch.ops.fx_flash.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, [], 0.0, 0.25, False, 'score=qk*scale');  unsqueeze = unsqueeze_1 = unsqueeze_2 = None
    squeeze = attention_default.squeeze(0);  attention_default = None
    view = squeeze.view(2, 2, 8, 16);  squeeze = None
    return view""")

    def test_einsum_both_products(self):
        """einsum ``bhqd,bhkd->bhqk`` and ``bhqk,bhkd->bhqd``: K is read as written (no transpose)."""
        fused_once(self, lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.2).softmax(-1), v), *qkv())

    def test_baddbmm_alpha_is_the_scale_and_input_the_bias(self):
        """baddbmm(bias, q, kᵀ, alpha=s): alpha becomes the scale and bias the additive mask."""
        def attention(q, k, v, bias):
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            w = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.125)
            return torch.bmm(F.softmax(w, dim=-1), v)

        bias = torch.randn(B * H, 1, N)
        fused_once(self, attention, *qkv(), bias)

    def test_baddbmm_with_beta_zero_ignores_its_input(self):
        """baddbmm(empty, q, kᵀ, beta=0, alpha=s) (GPT-NeoX): no mask, scale s."""
        def attention(q, k, v):
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            scores = torch.empty(B * H, N, N)
            w = torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=0.125)
            return torch.bmm(F.softmax(w, dim=-1), v)

        gm = fused_once(self, attention, *qkv())
        self.assertEqual(call_of(gm)["operands"], [])

    def test_scale_on_query_before_the_product(self):
        """``(q * s) @ kᵀ`` puts s in the op's scale and hands it the unscaled q."""
        gm = fused_once(self, lambda q, k, v: ((q * 0.25) @ k.transpose(-1, -2)).softmax(-1) @ v, *qkv())
        self.assertEqual(call_of(gm)["scale"], 0.25)

    def test_square_root_of_scale_on_both_q_and_k(self):
        """``(q·√s) @ (k·√s)ᵀ``: both factors are proved and multiplied."""
        s = D ** -0.25
        gm = fused_once(self, lambda q, k, v: ((q * s) @ (k * s).transpose(-2, -1)).softmax(-1) @ v, *qkv())
        self.assertAlmostEqual(call_of(gm)["scale"], D ** -0.5)

    def test_no_scale_at_all_is_scale_one(self):
        """T5 scales nothing: the op must get scale=1.0, never its 1/sqrt(d) default."""
        gm = fused_once(self, lambda q, k, v: torch.matmul(torch.matmul(q, k.transpose(3, 2)).softmax(-1), v), *qkv())
        self.assertEqual(call_of(gm)["scale"], 1.0)

    def test_zero_dim_tensor_constant_scale(self):
        """A 0-d tensor constant (GPT-2's ``torch.full([], sqrt(d))``) is evaluated, not assumed."""
        fused_once(self, lambda q, k, v: ((q @ k.transpose(-1, -2)) / torch.full([], 3.0)).softmax(-1) @ v, *qkv())

    def test_key_stored_transposed_gets_one_transpose(self):
        """A Kᵀ with no transpose to peel (stored that way) is transposed back for the op."""
        q, k, v = qkv()
        gm = fused_once(self, lambda q, kt, v: ((q @ kt) * 0.25).softmax(-1) @ v, q, k.transpose(-2, -1).contiguous(), v)
        self.assertIn("transpose = kt.transpose(-2, -1)", gm.code)

    def test_permute_of_last_two_axes_is_a_transpose(self):
        """``permute(0, 1, 3, 2)`` is the transpose of the last two axes: peeled."""
        gm = fused_once(self, lambda q, k, v: ((q @ k.permute(0, 1, 3, 2)) * 0.25).softmax(-1) @ v, *qkv())
        self.assertNotIn("permute", gm.code)

    def test_permute_that_is_not_a_transpose_is_not_peeled(self):
        """``permute(0, 2, 3, 1)`` of (B, N, H, d) is not K: it stays, and K is its transpose."""
        q, k, v = qkv()
        k_bnhd = k.transpose(1, 2).contiguous()
        gm = fused_once(self, lambda q, k, v: ((q @ k.permute(0, 2, 3, 1)) * 0.25).softmax(-1) @ v, q, k_bnhd, v)
        self.assertIn("permute = k.permute(0, 2, 3, 1)", gm.code)
        self.assertIn("transpose = permute.transpose(-2, -1)", gm.code)


class TestSoftmaxAndCasts(expecttest.TestCase):
    def test_nn_softmax_with_positive_dim(self):
        """nn.Softmax(dim=3) on rank-4 scores is the key axis."""
        class Attention(nn.Module):
            def __init__(self):
                super().__init__()
                self.softmax = nn.Softmax(dim=3)

            def forward(self, q, k, v):
                return self.softmax(q @ k.transpose(-2, -1) * 0.25) @ v

        module = Attention()
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1)
        assert_same(module, gm, *qkv())

    def test_softmax_in_float32_then_back_to_query_dtype(self):
        """HF: ``softmax(x, dim=-1, dtype=torch.float32).to(q.dtype)`` in half precision."""
        q, k, v = (t.half() for t in qkv())
        gm = fused_once(self, lambda q, k, v: F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1, dtype=torch.float32).to(q.dtype) @ v, q, k, v)
        self.assertEqual(len(ops_in(gm)), 1)

    def test_float_then_type_as(self):
        """``softmax(scores.float()).type_as(q)``: the casts go, the op computes softmax in fp32."""
        fused_once(self, lambda q, k, v: F.softmax((q @ k.transpose(-2, -1) * 0.25).float(), dim=-1).type_as(q) @ v, *qkv())


class TestDropout(expecttest.TestCase):
    def _module(self, make):
        class Attention(nn.Module):
            def __init__(self):
                super().__init__()
                self.dropout = nn.Dropout(0.25)

            def forward(self, q, k, v):
                return make(self, F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)) @ v

        return Attention()

    def test_functional_dropout_follows_training_flag(self):
        """``F.dropout(w, p, training=self.training)``: p in training, 0.0 when traced in eval."""
        for training, p in ((True, 0.25), (False, 0.0)):
            module = self._module(lambda self, w: F.dropout(w, 0.25, training=self.training)).train(training)
            gm, result = fuse(module, *qkv())
            self.assertEqual(result.count, 1)
            self.assertEqual(call_of(gm)["dropout_p"], p)

    def test_torch_dropout_train_argument(self):
        """``torch.dropout(w, p, train)`` respects its train argument."""
        module = self._module(lambda self, w: torch.dropout(w, 0.25, False))
        gm, result = fuse(module, *qkv())
        self.assertEqual(call_of(gm)["dropout_p"], 0.0)
        assert_same(module, gm, *qkv())

    def test_nn_dropout_module_follows_train_and_eval_at_run_time(self):
        """nn.Dropout: the op's p is read from the module each call, so gm.eval() turns it off."""
        module = self._module(lambda self, w: self.dropout(w)).train()
        gm, result = fuse(module, *qkv())
        self.assertEqual(result.count, 1)
        self.assertIn("fx_flash_passes_rewrite_module_dropout_p(dropout_1)", gm.code)
        gm.eval(), module.eval()
        assert_same(module, gm, *qkv())
        gm.train()
        torch.manual_seed(1)
        out = gm(*qkv())
        self.assertFalse(torch.allclose(out, module(*qkv())))  # dropout is on again


class TestGroupedQueryAttention(expecttest.TestCase):
    def test_hf_repeat_kv_is_read_as_gqa(self):
        """HF repeat_kv (expand + reshape): the op gets Hkv heads and enable_gqa=True."""
        def repeat_kv(x, n_rep):
            b, h, n, d = x.shape
            return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)

        def attention(q, k, v):
            k, v = repeat_kv(k, 2), repeat_kv(v, 2)
            return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1), v)

        gm = fused_once(self, attention, *qkv(heads=4, kv_heads=2, requires_grad=True), grads=True)
        self.assertExpectedInline(code(gm), """\
def forward(self, q, k, v):
    attention_default = torch.ops.fx_flash.attention.default(q, k, v, [], 0.0, 0.25, True, 'score=qk*scale');  q = k = v = None
    return attention_default""")

    def test_repeat_interleave_is_read_as_gqa(self):
        """``repeat_interleave(r, dim=1)`` groups heads the same way."""
        gm = fused_once(self, lambda q, k, v: (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) * 0.25).softmax(-1) @ v.repeat_interleave(2, dim=1), *qkv(heads=4, kv_heads=2))
        self.assertTrue(call_of(gm)["gqa"])

    def test_expand_of_one_head_is_mqa(self):
        """``k.expand(B, H, N, d)`` of a single K/V head is multi-query attention."""
        gm = fused_once(self, lambda q, k, v: (q @ k.expand(B, 4, N, D).transpose(-2, -1) * 0.25).softmax(-1) @ v.expand(B, 4, N, D), *qkv(heads=4, kv_heads=1))
        self.assertTrue(call_of(gm)["gqa"])

    def test_repeat_tiles_heads_and_is_not_read_as_gqa(self):
        """``repeat(1, r, 1, 1)`` tiles heads (h % Hkv), so the repeated K/V are passed as they are."""
        gm = fused_once(self, lambda q, k, v: (q @ k.repeat(1, 2, 1, 1).transpose(-2, -1) * 0.25).softmax(-1) @ v.repeat(1, 2, 1, 1), *qkv(heads=4, kv_heads=2))
        self.assertFalse(call_of(gm)["gqa"])
