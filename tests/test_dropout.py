"""Dropout inside the kernels: exact against the oracle given the kernels' own mask, the keep
rate is right, torch.manual_seed reproduces a run, and the backward regenerates the forward's mask."""

from __future__ import annotations

import math

import pytest
import torch

import fx_flash
from fx_flash import testing
from fx_flash.ops import sdpa_forward
from tests.numerics import assert_against_reference, poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    poison_outputs(monkeypatch)
    torch.manual_seed(0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 2, 2, 19, 33, 16), (1, 4, 2, 24, 24, 32)], ids=["mha", "gqa"])
def test_exact_with_kernel_mask(shape, causal):
    """Given the kernels' keep-mask, forward and all gradients match the oracle with that mask."""
    b, hq, hkv, nq, nk, d = shape
    p = 0.25
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, requires_grad=True) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    bias = torch.randn(1, hq, nq, nk, device=DEVICE, requires_grad=True)
    seed = torch.tensor([2024], dtype=torch.int64, device=DEVICE)
    out, _ = sdpa_forward(q, k, v, bias, seed, p, causal, 1 / math.sqrt(d))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    keep = testing.dropout_keep_mask(seed, (b, hq, nq, nk), p)
    assert_against_reference(out, grads, q, k, v, bias, dout, dtype=torch.float32, same_dtype=torch.float32,
                             dropout_p=p, dropout_keep=keep, is_causal=causal, enable_gqa=hq != hkv, bias_grad=True)


def test_keep_rate():
    """The fraction of kept weights is 1 − p within 5 standard deviations (~200k draws)."""
    p, shape = 0.3, (2, 4, 160, 160)
    keep = testing.dropout_keep_mask(torch.tensor([7], device=DEVICE), shape, p).float().mean().item()
    n = math.prod(shape)
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_masks_differ_by_seed_and_head():
    """Different seeds and different heads draw different masks (the counter includes the head)."""
    a = testing.dropout_keep_mask(torch.tensor([1], device=DEVICE), (1, 2, 32, 32), 0.5)
    b = testing.dropout_keep_mask(torch.tensor([2], device=DEVICE), (1, 2, 32, 32), 0.5)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0, 0], a[0, 1])


def test_manual_seed_reproduces():
    """torch.manual_seed before a call reproduces its output exactly; another seed changes it."""
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(fx_flash.flash_attention(q, k, v, dropout_p=0.5))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_dropout_zero_is_deterministic_attention():
    """dropout_p=0 draws no seed and equals attention without dropout."""
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(fx_flash.flash_attention(q, k, v, dropout_p=0.0), fx_flash.flash_attention(q, k, v))


def test_seed_is_a_graph_op_so_graph_replays_draw_fresh_masks():
    """Traced, the dropout seed is an ``aten.randint`` node of the graph that feeds the kernel (as
    SDPA's dropout draws from the generator inside the graph), never a value baked in when the
    graph was built: replays of a captured CUDA graph advance the generator's graph-safe Philox
    offset, so each replay runs the kernel with a fresh seed, hence a fresh mask."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm = make_fx(lambda q, k, v: fx_flash.flash_attention(q, k, v, dropout_p=0.1))(q, k, v)
    (draw,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.randint.low]
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.fx_flash.attn_fwd.default]
    assert call.args[4] is draw
    no_dropout = make_fx(lambda q, k, v: fx_flash.flash_attention(q, k, v))(q, k, v)
    assert not [n for n in no_dropout.graph.nodes if n.target is torch.ops.aten.randint.low]
