"""Property: any equivalent spelling of attention is either fused with eager's numerics or left
alone with a named reason — never a wrong answer.

hypothesis draws a spelling: where the scale is written (scores, q, k, split, baddbmm-free
none), the mask kind and fill (bool -inf, where, additive float, HF's 0/finfo.min, a causal or
windowed predicate from aranges), soft-capping, casts, the transpose's spelling (including a
permute that is *not* a transpose), (B·H) views around the mask, operand order and shape-only
uses. The drawn function is traced, rewritten, and compared with itself (forward and gradients).
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from fx_flash.passes import run_pass

B, H, N, D = 2, 2, 8, 16
MIN = torch.finfo(torch.float32).min

SPELLING = st.fixed_dictionaries({
    "scale": st.sampled_from(["scores_mul", "scores_div", "q", "k", "split", "none"]),
    "key": st.sampled_from(["transpose", "mT", "permute_last_two", "permute_bnhd"]),
    "mask": st.sampled_from(["none", "bool_fill", "where", "additive", "hf_min", "causal_arange", "window_arange",
                             "causal_tril_fill_min"]),
    "softcap": st.sampled_from([None, 4.0, 30.0]),
    "mask_first": st.booleans(),
    "cast": st.booleans(),
    "bh_view": st.booleans(),
    "expand_as": st.booleans(),
    "grads": st.booleans(),
    "unreadable": st.sampled_from([None, None, None, "mean", "long"]),  # steps that must be refused
})


def build(sp):  # noqa: C901 (one branch per drawn choice)
    """The drawn spelling as a function of (q, k, v, keep, bias) and its inputs."""
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D)
    k = torch.randn(B, H, N, D)
    v = torch.randn(B, H, N, D)
    if sp["key"] == "permute_bnhd":
        k = k.transpose(1, 2).contiguous()  # stored (B, N, H, d): permute(0, 2, 3, 1) is Kᵀ, not a swap
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] = True  # every row keeps a key, so eager has no NaN row to compare
    bias = torch.randn(1, H, N, N)
    s = D ** -0.5

    def key_t(k):
        return {"transpose": lambda: k.transpose(-2, -1), "mT": lambda: k.mT,
                "permute_last_two": lambda: k.permute(0, 1, 3, 2), "permute_bnhd": lambda: k.permute(0, 2, 3, 1)}[sp["key"]]()

    def masked(x, keep, bias):
        m = sp["mask"]
        i = torch.arange(x.size(-1))
        if m == "bool_fill":
            mm = ~keep
            if sp["expand_as"]:
                mm = mm.expand_as(x)
            return x.masked_fill(mm, float("-inf"))
        if m == "where":
            return torch.where(keep, x, float("-inf"))
        if m == "additive":
            return bias + x if sp["mask_first"] else x + bias
        if m == "hf_min":
            add = torch.where(keep, 0.0, MIN)
            return add + x if sp["mask_first"] else x + add
        if m == "causal_arange":
            return x.masked_fill(i[None, :] > i[:, None], float("-inf"))
        if m == "window_arange":
            ok = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
            return torch.where(ok, x, float("-inf"))
        if m == "causal_tril_fill_min":
            return x.masked_fill(x.new_ones(x.size(-2), x.size(-1)).tril() == 0, MIN)
        return x

    def attention(q, k, v, keep, bias):
        scale = sp["scale"]
        if scale == "q":
            q = q * s
        if scale == "k":
            k = k * s
        if scale == "split":
            q, k = q * math.sqrt(s), k * math.sqrt(s)
        x = q @ key_t(k)
        if scale == "scores_mul":
            x = x * s
        if scale == "scores_div":
            x = x / (1 / s)
        if sp["softcap"] and not sp["mask_first"]:
            x = torch.tanh(x / sp["softcap"]) * sp["softcap"]
        if sp["bh_view"]:
            x = x.reshape(B * H, N, N).view(B, H, N, N)
        x = masked(x, keep, bias)
        if sp["softcap"] and sp["mask_first"] and sp["mask"] in ("none", "additive"):
            x = torch.tanh(x / sp["softcap"]) * sp["softcap"]
        if sp["unreadable"] == "mean":
            x = x - x.mean(-1, keepdim=True)
        if sp["unreadable"] == "long":
            x = x.long().float()
        if sp["cast"]:
            x = x.float()
        return torch.softmax(x, dim=-1).type_as(q) @ v

    return attention, [q, k, v, keep, bias]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPELLING)
def test_every_spelling_is_fused_exactly_or_refused_with_a_reason(sp):
    """Fused: equal to eager, forward and gradients. Not fused: a named check and a reason."""
    fn, inputs = build(sp)
    if sp["grads"]:
        for t in (inputs[0], inputs[1], inputs[2], inputs[4]):
            t.requires_grad_()
    gm = torch.fx.symbolic_trace(fn)
    result = run_pass(gm, inputs)
    expected, got = fn(*inputs), gm(*inputs)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4, equal_nan=True)
    if sp["unreadable"]:
        assert result.count == 0
    if result.count == 0:
        assert result.missed and all(m.check and m.reason for m in result.missed), result.missed
        return
    assert result.count == 1
    if sp["grads"]:
        leaves = [t for t in inputs if t.requires_grad]
        for a, b in zip(torch.autograd.grad(got.square().sum(), leaves, allow_unused=True),
                        torch.autograd.grad(expected.square().sum(), leaves, allow_unused=True)):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
