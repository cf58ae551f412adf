"""The torch.library contract: opcheck, torch.compile with dynamic shapes, dispatch, and the
clear errors every unsupported input must raise before any kernel is generated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fx_flash
from fx_flash.codegen.spec import spec_from_text
from fx_flash.ops import sdpa_call

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b=2, h=2, nq=9, nk=11, d=16, hkv=None, dtype=torch.float32, grad=False):
    hkv = hkv or h
    return [torch.randn(b, hh, n, d, device=DEVICE, dtype=dtype, requires_grad=grad)
            for hh, n in ((h, nq), (hkv, nk), (hkv, nk))]


@pytest.mark.parametrize("case", ["plain", "bias_grad_causal", "mask_dropout_gqa"])
def test_opcheck(case):
    """torch.library.opcheck passes for the forward op (schema, fake kernel, autograd, AOT)."""
    q, k, v = _qkv(grad=True, hkv=1 if case == "mask_dropout_gqa" else None)
    bias = torch.randn(1, 2, 9, 11, device=DEVICE, requires_grad=True) if case == "bias_grad_causal" else None
    mask = (torch.rand(2, 1, 9, 11, device=DEVICE) > 0.3) if case == "mask_dropout_gqa" else None
    seed = torch.tensor([3], device=DEVICE) if case == "mask_dropout_gqa" else None
    p = 0.2 if seed is not None else 0.0
    spec, operands = sdpa_call(bias if bias is not None else mask, case == "bias_grad_causal", p)
    torch.library.opcheck(torch.ops.fx_flash.attn_fwd.default, (q, k, v, operands, seed, p, 0.3, spec))


def test_opcheck_backward():
    """The backward op passes opcheck too (it is called directly by compiled backward graphs)."""
    q, k, v = _qkv()
    bias = torch.randn(1, 2, 9, 11, device=DEVICE)
    spec, operands = sdpa_call(bias, True, 0.0)
    out, lse = torch.ops.fx_flash.attn_fwd(q, k, v, operands, None, 0.0, 0.3, spec)
    spec = spec_from_text(spec).with_grads([True]).text
    torch.library.opcheck(torch.ops.fx_flash.attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, operands, None, 0.0, 0.3, spec))


def test_compile_fullgraph_dynamic_no_recompile():
    """Under torch.compile(fullgraph, dynamic) a new sequence length reuses the compiled graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def attn(q, k, v):
        return fx_flash.flash_attention(q, k, v, is_causal=True)

    for n in (17, 29, 40):
        q, k, v = _qkv(nq=n, nk=n, grad=True)
        out = attn(q, k, v)
        out.sum().backward()
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_graph_shows_one_op_call():
    """A traced call is one fx_flash.flash_attention node (what the graph pass emits)."""
    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.fx_flash.flash_attention.default(q, k, v, None, 0.0, True))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fx_flash.flash_attention.default]


def test_autograd_only_where_needed():
    """Inputs that need no gradient (or no_grad mode) give an output without a graph; a bias
    that alone requires grad still gets its gradient through the autograd path."""
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    out = fx_flash.flash_attention(q, k, v, is_causal=True)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not fx_flash.flash_attention(q.requires_grad_(), k, v).requires_grad
    q.requires_grad_(False)
    bias = torch.randn(1, 2, 20, 20, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(fx_flash.flash_attention(q, k, v, attn_mask=bias).sum(), bias)
    (ref,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum(), bias)
    torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    """On CPU with TRITON_INTERPRET unset, the op computes with the eager oracle, same answers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from fx_flash import ops

    assert not ops.runs_kernels(torch.device("cpu"))
    q, k, v = (t.cpu() for t in _qkv(grad=True, hkv=1))
    bias = torch.randn(2, 1, 1, 11, requires_grad=True)
    out = fx_flash.flash_attention(q, k, v, bias, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, bias.masked_fill(~torch.ones(9, 11, dtype=torch.bool).tril(),
                                                                   float("-inf")), enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v, bias), torch.ones_like(ref))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def _err(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fx_flash.flash_attention(*args, **kwargs)


def test_rejects_float64():
    """float64 is refused with a TypeError naming q."""
    q, k, v = _qkv(dtype=torch.float64)
    _err(TypeError, "q has dtype torch.float64", q, k, v)


def test_rejects_mixed_dtypes():
    """q, k, v of different dtypes are refused."""
    q, k, v = _qkv()
    _err(TypeError, "share a dtype", q, k.half(), v)


def test_rejects_head_dim_over_256():
    """Head dims above 256 are refused (the kernels' tiles are sized up to 256)."""
    q, k, v = _qkv(d=320)
    _err(ValueError, "head_dim 320", q, k, v)


def test_rejects_wrong_rank():
    """3-D inputs are refused with the expected layout in the message."""
    q, k, v = _qkv()
    _err(ValueError, "k must be 4-D", q, k[0], v)


def test_rejects_mismatched_devices():
    """A mask on another device is refused before any kernel runs."""
    q, k, v = _qkv()
    mask = torch.ones(9, 11, dtype=torch.bool, device="meta")
    _err(ValueError, "one device", q, k, v, mask)


def test_rejects_mask_that_does_not_broadcast():
    """A mask whose shape does not broadcast to (B, H, Nq, Nk) is refused, naming both shapes."""
    q, k, v = _qkv()
    _err(ValueError, r"attn_mask of shape \(9, 10\) does not broadcast", q, k, v, torch.ones(9, 10, dtype=torch.bool))


def test_rejects_integer_mask():
    """An integer mask is ambiguous (keep or add?) and refused."""
    q, k, v = _qkv()
    _err(TypeError, "attn_mask must be bool", q, k, v, torch.ones(9, 11, dtype=torch.int64, device=DEVICE))


def test_rejects_heads_without_gqa():
    """Different head counts need enable_gqa=True, and a whole group ratio."""
    q, k, v = _qkv(h=4, hkv=2)
    _err(ValueError, "enable_gqa=True", q, k, v)
    q, k, v = _qkv(h=4, hkv=3)
    _err(ValueError, "multiple", q, k, v, enable_gqa=True)


def test_rejects_bad_dropout():
    """dropout_p outside [0, 1) is refused."""
    q, k, v = _qkv()
    _err(ValueError, "dropout_p", q, k, v, dropout_p=1.0)


def test_rejects_mismatched_lengths_and_dims():
    """k/v disagreeing in length or head dim are refused."""
    q, k, v = _qkv()
    _err(ValueError, "same sequence length", q, k, v[:, :, :5])
    _err(ValueError, "head_dim must agree", q, k, v[..., :8])


def test_opcheck_captured_spec_with_operands():
    """The ops graphs call pass opcheck with a captured spec: a learned per-head bias row (float,
    with a gradient), an integer document-id vector read at q and at kv, and an index map."""
    from fx_flash.codegen.spec import spec_from_text

    spec = ("score=30.0*tanh(qk*scale) + t0; keep=Eq(t1, t2) & (kv_idx <= q_idx + 2); "
            "t0=float[h, 0, kv_idx]; t1=int[q_idx]; t2=int[kv_idx]")
    q, k, v = _qkv(grad=True)
    bias = torch.randn(2, 1, 11, device=DEVICE, requires_grad=True)
    docs_q = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2], device=DEVICE)
    docs_k = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], device=DEVICE)
    operands = [bias, docs_q, docs_k]
    torch.library.opcheck(torch.ops.fx_flash.attn_fwd.default, (q, k, v, operands, None, 0.0, 0.25, spec))
    torch.library.opcheck(torch.ops.fx_flash.attention.default, (q, k, v, operands, 0.0, 0.25, False, spec))
    with torch.no_grad():  # the backward op is called by compiled graphs on saved, detached tensors
        out, lse = torch.ops.fx_flash.attn_fwd(q, k, v, operands, None, 0.0, 0.25, spec)
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))
    operands = [bias, docs_q, docs_k]
    grad_spec = spec_from_text(spec).with_grads([True, False, False]).text
    torch.library.opcheck(torch.ops.fx_flash.attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, operands, None, 0.0, 0.25, grad_spec))


def test_operands_that_do_not_match_the_spec_are_clear_errors():
    """The wrong number, kind or length of operands raises before any kernel is generated."""
    spec = "score=qk*scale + t0; t0=float[0, 0, q_idx, kv_idx]"
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="reads 1 operand"):
        torch.ops.fx_flash.attention(q, k, v, [], 0.0, None, False, spec)
    with pytest.raises(TypeError, match="read as float"):
        torch.ops.fx_flash.attention(q, k, v, [torch.ones(1, 1, 9, 11, dtype=torch.bool)], 0.0, None, False, spec)
    with pytest.raises(ValueError, match="indexed by kv_idx"):
        torch.ops.fx_flash.attention(q, k, v, [torch.randn(1, 1, 9, 5)], 0.0, None, False, spec)


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that reach torch_dispatch (fx_flash's own included)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_eager_path_gives_the_ops_results():
    """The direct Python path of an eager call (ops.eager) gives bitwise the op path's output and
    gradients; under a torch_dispatch mode the call goes through the registered ops, so modes
    (fake tensors, functionalization, tracing, counters) still see fx_flash's ops."""
    from fx_flash import ops

    q, k, v = _qkv(grad=True)
    mask = torch.randn(1, 2, 9, 11, device=DEVICE, requires_grad=True)
    dout = torch.randn(2, 2, 9, 16, device=DEVICE)
    assert ops.eager(q, k, v, mask)
    direct = fx_flash.flash_attention(q, k, v, mask, is_causal=True)
    direct_grads = torch.autograd.grad(direct, (q, k, v, mask), dout)
    seen = _SeenOps()
    with seen:
        assert not ops.eager(q, k, v, mask)
        via_ops = fx_flash.flash_attention(q, k, v, mask, is_causal=True)
        op_grads = torch.autograd.grad(via_ops, (q, k, v, mask), dout)
    assert torch.ops.fx_flash.attn_fwd.default in seen.ops and torch.ops.fx_flash.attn_bwd.default in seen.ops
    assert torch.equal(direct, via_ops) and all(torch.equal(a, b) for a, b in zip(direct_grads, op_grads))


def test_traced_and_transformed_calls_take_the_ops():
    """make_fx, fake tensors, vmap and torch.jit.trace never take the direct path (their tensors
    or modes would reach the kernels' Python): the call is recorded as the op, or handled by the
    transform."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fx_flash import ops

    q, k, v = _qkv()
    gm = make_fx(lambda q, k, v: fx_flash.flash_attention(q, k, v))(q, k, v)
    assert torch.ops.fx_flash.attn_fwd.default in [n.target for n in gm.graph.nodes]
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert not ops.eager(fq, fk, fv)
        assert fx_flash.flash_attention(fq, fk, fv).shape == q.shape
    seen = []
    torch.vmap(lambda x: seen.append(ops.eager(x)) or x)(q)
    assert seen == [False]
    traced = torch.jit.trace(lambda q, k, v: fx_flash.flash_attention(q, k, v), (q, k, v))
    assert "fx_flash::flash_attention" in [n.kind() for n in traced.graph.nodes()]
