"""The numerics rule of the kernel tests, from flash-attn's suite.

Against a float64 reference, fx_flash's max error must be at most twice PyTorch's own error
computing the same thing in the same dtype, plus a small absolute term; gradients alike.
"""

from __future__ import annotations

import torch

from fx_flash.codegen import launch
from fx_flash.reference import attention_reference

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_rule(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype) -> None:
    """|ours − exact| ≤ 2·|same_dtype − exact| + ATOL[dtype], elementwise maximum; no NaN."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN (an element left unwritten or a 0/0)"
    err = (ours.double() - exact).abs().max().item()
    torch_err = (same_dtype.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + ATOL[dtype], f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {ATOL[dtype]}"


def reference_with_grads(q, k, v, attn_mask, dout, *, dtype, bias_grad=False, **kwargs):
    """attention_reference and its gradients (q, k, v[, mask]) computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    mask = attn_mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        mask = attn_mask.detach().to(dtype).requires_grad_(bias_grad)
    out = attention_reference(*leaves, mask, **kwargs)
    inputs = leaves + ([mask] if bias_grad else [])
    return out, torch.autograd.grad(out, inputs, dout.to(dtype))


def assert_against_reference(out, grads, q, k, v, attn_mask, dout, *, dtype, same_dtype, **kwargs) -> None:
    """The rule for ``out`` and ``grads`` (dq, dk, dv[, dbias]): errors against the float64
    reference, bounded by PyTorch's own error computing the reference in ``same_dtype``."""
    exact, exact_grads = reference_with_grads(q, k, v, attn_mask, dout, dtype=torch.float64, **kwargs)
    torch_out, torch_grads = reference_with_grads(q, k, v, attn_mask, dout, dtype=same_dtype, **kwargs)
    assert_rule("out", out, torch_out, exact, dtype)
    for name, g, tg, eg in zip(["dq", "dk", "dv", "dbias"], grads, torch_grads, exact_grads):
        assert_rule(name, g, tg, eg, dtype)


def poison_outputs(monkeypatch) -> None:
    """Make every kernel output start as NaN, so an element no kernel writes fails the test."""
    real = launch.new_output

    def poisoned(like, shape=None, dtype=None):
        t = real(like, shape, dtype)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(launch, "new_output", poisoned)


def spec_call_against_reference(spec_text, q, k, v, operands, scale=0.3, dout=None, gqa=False):
    """torch.ops.fx_flash.attention with ``spec_text`` against the spec's eager oracle in float64,
    forward and gradients (operands that require grad included), by the rule above: the bound is
    the oracle's own error in q's dtype. Returns the output."""
    from fx_flash.codegen.spec import spec_from_text
    from fx_flash.reference import spec_attention

    spec = spec_from_text(spec_text)
    out = torch.ops.fx_flash.attention(q, k, v, operands, 0.0, scale, gqa, spec_text)
    dout = torch.randn_like(out) if dout is None else dout
    leaves = [q, k, v] + [t for t in operands if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout)

    def oracle(dtype):
        mine = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in leaves]
        it = iter(mine[3:])
        ops = [next(it) if t.requires_grad else (t.to(dtype) if t.dtype.is_floating_point else t) for t in operands]
        o = spec_attention(*mine[:3], ops, spec, scale)
        return o, torch.autograd.grad(o, mine, dout.to(dtype))

    exact, exact_grads = oracle(torch.float64)
    same, same_grads = oracle(q.dtype)
    assert_rule("out", out, same, exact, q.dtype)
    for i, (g, sg, eg) in enumerate(zip(grads, same_grads, exact_grads)):
        assert_rule(["dq", "dk", "dv"][i] if i < 3 else f"d(operand {i - 3})", g, sg, eg, q.dtype)
    return out
