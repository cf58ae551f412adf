"""``torch.compile(backend="fx_flash")``: entry point, Inductor composition, training, dynamic
shapes without recompiling, and ``explain`` with its logger."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch._dynamo.testing
from torch._inductor.utils import run_and_get_code

from fx_flash.backend import backend
from fx_flash.explain import explain
from fx_flash.passes import run_pass

FLASH = torch.ops.fx_flash.attention.default


class SelfAttention(nn.Module):
    """A plain multi-head block: q, k, v are transposed views, as in every real model."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        w = F.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, c))


def inputs(n=8):
    torch.manual_seed(0)
    return torch.randn(2, n, 32)


class TestBackend(expecttest.TestCase):
    def test_entry_point_works_without_importing_fx_flash(self):
        """``backend="fx_flash"`` resolves in a fresh process through the installed entry point."""
        script = textwrap.dedent("""
            import sys, torch
            f = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
            q = torch.randn(1, 2, 8, 16)
            assert "fx_flash" not in sys.modules
            out = torch.compile(f, backend="fx_flash")(q, q, q)
            torch.testing.assert_close(out, f(q, q, q), atol=2e-5, rtol=1e-4)
            from fx_flash.passes import counters
            print("fused", counters["fused"])
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn("fused 1", done.stdout)

    def test_inductor_compiles_the_rest_and_keeps_one_fused_call(self):
        """Under Inductor the forward calls the fused kernel once per attention, with no bmm left."""
        model = SelfAttention().eval()
        compiled = torch.compile(model, backend="fx_flash")
        with torch.no_grad():
            out, (source, *_) = run_and_get_code(compiled, inputs())
            torch.testing.assert_close(out, model(inputs()), atol=2e-5, rtol=1e-4)
        self.assertEqual(source.count("torch.ops.fx_flash.attn_fwd.default("), 1)
        self.assertNotIn("bmm", source)

    def test_training_gradients_match_eager_under_inductor(self):
        """The rewritten op carries its autograd: parameter gradients equal eager's."""
        model = SelfAttention()
        compiled = torch.compile(model, backend="fx_flash")
        x = inputs()
        got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
        expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    def test_dynamic_sequence_length_does_not_recompile(self):
        """With dynamic=True a new sequence length reuses the graph (and the op) without recompiling."""
        graphs = []
        counter = torch._dynamo.testing.CompileCounterWithBackend(
            backend("eager", on_pass=lambda gm, r: graphs.append(r.count))
        )
        model = SelfAttention().eval()
        compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
        with torch.no_grad():
            compiled(inputs(8))
            with torch._dynamo.config.patch(error_on_recompile=True):
                for n in (16, 5):
                    torch.testing.assert_close(compiled(inputs(n)), model(inputs(n)), atol=2e-5, rtol=1e-4)
        self.assertEqual((counter.frame_count, graphs), (1, [1]))

    def test_inner_eager_option(self):
        """``fx_flash.backend(inner="eager")`` runs the rewritten graph without Inductor."""
        seen = []
        model = SelfAttention().eval()
        compiled = torch.compile(model, backend=backend("eager", on_pass=lambda gm, r: seen.append(gm)))
        torch.testing.assert_close(compiled(inputs()), model(inputs()), atol=2e-5, rtol=1e-4)
        self.assertEqual(sum(n.target is FLASH for n in seen[0].graph.nodes), 1)

    def test_dynamo_graph_keeps_fake_values_on_new_nodes(self):
        """Rewritten Dynamo graphs stay valid: every node has its example value and the graph lints."""
        graphs = []

        def capture(gm, example_inputs):
            run_pass(gm, example_inputs)
            graphs.append(gm)
            return gm.forward

        torch.compile(SelfAttention().eval(), backend=capture)(inputs())
        (gm,) = graphs
        gm.graph.lint()
        op = next(n for n in gm.graph.nodes if n.target is FLASH)
        self.assertEqual(tuple(op.meta["example_value"].shape), (2, 2, 8, 16))


class TestExplain(expecttest.TestCase):
    def test_explain_counts_fused_and_names_each_miss(self):
        """explain(): .fused, per-site details, and every missed softmax with the failed check."""
        def two_softmaxes(q, k, v):
            attn = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
            weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            return attn, weights

        q = torch.randn(1, 2, 8, 16)
        report = explain(two_softmaxes, q, q, q)
        self.assertEqual(report.fused, 1)
        self.assertEqual([m.check for m in report.missed], ["softmax_feeds_value_product"])
        site = report.sites[0]
        self.assertEqual((site.scale, site.score, site.keep, site.tiles, site.gqa_ratio),
                         ("0.25", "qk*scale", "all", "dense (every tile full)", 1))
        self.assertIn("BLOCK_M=", site.blocks)
        self.assertEqual(site.spec, "score=qk*scale")
        text = str(report)
        self.assertIn("before", text)
        self.assertIn("torch.ops.fx_flash.attention.default", text)

    def test_misses_go_to_the_fx_flash_logger(self):
        """The reason of each miss is logged on ``logging.getLogger("fx_flash")``."""
        q = torch.randn(1, 2, 8, 16)
        with self.assertLogs("fx_flash", level=logging.INFO) as logs:
            explain(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v, q, q, q)
        self.assertTrue(any("softmax_over_keys" in line for line in logs.output))


class DecodingWindow(nn.Module):
    """Soft-capped attention with a bottom-right aligned window of 4 keys, as a KV-cache decoder
    writes it: the offset is the difference of the two lengths."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        s = torch.tanh(s / 30.0) * 30.0
        offset = k.size(-2) - q.size(-2)
        i, j = torch.arange(q.size(-2), device=q.device), torch.arange(k.size(-2), device=q.device)
        keep = (j[None, :] <= i[:, None] + offset) & (i[:, None] + offset - j[None, :] < 4)
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_dynamic_lengths_in_a_captured_predicate_do_not_recompile():
    """Under dynamic=True the lengths in a position mask are the kernel's n_q/n_kv and the head
    dim's 1/sqrt(d) the op's default: new lengths run the same graph and the same spec."""
    graphs = []
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        backend("eager", on_pass=lambda gm, r: graphs.append([f.spec.text for f in r.fused])))
    model = DecodingWindow()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)

    def inputs(n, nk):
        torch.manual_seed(n)
        return torch.randn(1, 2, n, 16), torch.randn(1, 2, nk, 16), torch.randn(1, 2, nk, 16)

    torch.testing.assert_close(compiled(*inputs(8, 12)), model(*inputs(8, 12)), atol=2e-5, rtol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, nk in ((5, 9), (11, 20)):
            torch.testing.assert_close(compiled(*inputs(n, nk)), model(*inputs(n, nk)), atol=2e-5, rtol=1e-4)
    assert counter.frame_count == 1
    assert graphs == [["score=30.0*tanh(0.03333333333333333*qk*scale); "
                       "keep=(kv_idx + n_q <= n_kv + q_idx) & (n_kv + q_idx <= kv_idx + n_q + 3)"]]
