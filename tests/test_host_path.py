"""The host path of a call: launch.py's plans and the op's once-per-key argument checks.

A call whose key (spec, tensor layouts, floats, switches) was seen allocates its outputs and calls
each kernel's bound launcher; these tests check that what it skips changes no answer and no
error: a changed shape, stride, dtype, alignment or flag builds a new plan, an environment switch
set between calls takes effect, bad arguments raise on every call. The direct launches are
driven on the CPU through a stand-in launcher that runs the interpreter on exactly the values a
direct launch passes.
"""

from __future__ import annotations

import inspect
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fx_flash
from fx_flash import validate
from fx_flash.codegen import autotune, launch
from fx_flash.device import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="runs kernels through Triton's CPU interpreter")


def _qkv(b=1, h=2, n=40, d=16, dtype=torch.float32, grad=True):
    return [torch.randn(b, h, n, d, device=DEVICE, dtype=dtype, requires_grad=grad) for _ in range(3)]


def _kernel_names(monkeypatch) -> list:
    """Record the name of every kernel launched from now on."""
    names = []
    real = launch._launch

    def spy(chosen, *args, **kwargs):
        names.append(chosen.fn.__name__)
        return real(chosen, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", spy)
    return names


# ------------------------------------------------------------------------------- direct launches


class _Launcher:
    """A compiled kernel's launch surface (what ``_run_bound`` calls): runs the kernel in the
    interpreter on the values a direct launch passes, every parameter in order, so a value out of
    place or stale shows in the result."""

    function, packed_metadata = "function", "packed metadata"

    def __init__(self, fn):
        self.fn, self.launches = fn, 0

    def launch_metadata(self, grid, stream, *values):
        return {"name": self.fn.__name__, "grid": grid}

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter_hook, exit_hook, *values):
        assert (stream, function, packed) == (1234, "function", "packed metadata")
        self.launches += 1
        for hook in (enter_hook, exit_hook):  # as Triton's launcher calls them: None is skipped
            if hook is not None:
                hook(metadata)
        self.fn[(gx, gy, gz)](*values)


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def direct(monkeypatch):
    """Plans launch "directly" on the CPU: a kernel's first launch runs through the interpreter's
    JIT function and binds a _Launcher with the argument tail Triton's binder would fill in
    (launch._bind); returns the launchers, by kernel name."""
    launchers = {}
    real = launch._launch

    def first_launch(chosen, grid, args, kwargs, direct=True):
        real(chosen, grid, args, kwargs, direct=False)
        if not direct:
            return None
        fn = types.SimpleNamespace(signature=inspect.signature(chosen.fn.fn), pre_run_hooks=[])
        runner = launchers.setdefault(chosen.fn.__name__, _Launcher(chosen.fn))
        return launch._bind(fn, runner, len(args), {**kwargs, **chosen.meta})

    monkeypatch.setattr(launch, "_launch", first_launch)
    monkeypatch.setattr(launch, "_direct", lambda q: True)
    monkeypatch.setattr(launch, "_driver", lambda: _Driver())
    return launchers


def _sdpa_step(q, k, v, dout, attention=fx_flash.flash_attention, **kwargs):
    """``attention``'s output and (dq, dk, dv[, d mask]) for SDPA-style arguments."""
    out = attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    inputs = (q, k, v) + ((mask,) if mask is not None and mask.requires_grad else ())
    return (out, *torch.autograd.grad(out, inputs, dout))


# (name, shape (B, Hq, Hkv, Nq, Nk, d), call keywords, environment, kernels launched directly from
# the second call on)
CASES = [
    ("causal", (1, 2, 2, 40, 40, 16), {"is_causal": True}, {}, {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}),
    # a float mask that requires grad: operand and operand-gradient arguments
    ("bias_grad", (2, 2, 2, 24, 33, 16), {"attn_mask": "bias"}, {}, {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}),
    ("gqa_dropout", (1, 4, 2, 24, 24, 16), {"enable_gqa": True, "dropout_p": 0.25, "is_causal": True}, {},
     {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}),
    # the Delta kernel and dQ accumulated by the dK/dV kernel
    ("atomic_dq", (1, 2, 2, 40, 40, 16), {}, {"FX_FLASH_DQ": "atomic"}, {"_attn_fwd", "_attn_bwd_delta",
                                                                          "_attn_bwd_dkdv"}),
    # split-KV decoding: the split kernel and its merge
    ("decode", (1, 4, 2, 1, 300, 16), {"enable_gqa": True}, {}, {"_attn_fwd_split", "_attn_fwd_combine",
                                                                 "_attn_bwd_dq", "_attn_bwd_dkdv"}),
    # a bool mask is ranged: its tile tables are new per call, so those kernels keep _launch's check
    ("ranged", (1, 2, 2, 40, 40, 16), {"attn_mask": "bool"}, {}, set()),
]


@needs_interpreter
@pytest.mark.parametrize("name, shape, kwargs, env, expected", CASES, ids=[c[0] for c in CASES])
def test_direct_launches_repeat_the_first_call(direct, monkeypatch, name, shape, kwargs, env, expected):
    """From the second call of a key on, each kernel is launched through its bound launcher, and
    the answers equal the first call's bitwise (the first went through the JIT function) and
    SDPA's in float64."""
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(launch, "SPLIT_MIN_KEYS", 48)  # several splits on the interpreter's one "SM"
    monkeypatch.setattr(launch, "SPLIT_WAVES", 64)
    b, hq, hkv, nq, nk, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, hq, nq, d, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    if kwargs.get("attn_mask") == "bias":
        kwargs = {**kwargs, "attn_mask": torch.randn(b, 1, nq, nk, device=DEVICE, requires_grad=True)}
    elif kwargs.get("attn_mask") == "bool":
        kwargs = {**kwargs, "attn_mask": torch.rand(b, 1, nq, nk, device=DEVICE) > 0.3}
    torch.manual_seed(1)  # the same dropout seed for every call
    first = _sdpa_step(q, k, v, dout, **kwargs)
    assert not any(r.launches for r in direct.values()), "a first call binds; it does not launch directly"
    for _ in range(2):
        torch.manual_seed(1)
        again = _sdpa_step(q, k, v, dout, **kwargs)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)
    assert {n for n, r in direct.items() if r.launches} == expected
    assert all(r.launches == 2 for n, r in direct.items() if n in expected)
    if kwargs.get("dropout_p"):
        return  # the masks are the kernels' own; test_dropout checks them against the oracle
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        ref_kwargs["attn_mask"] = mask.detach().double().requires_grad_()
    ref = _sdpa_step(*ref_inputs, dout.double(), F.scaled_dot_product_attention, **ref_kwargs)
    for a, r in zip(first, ref):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_launch_hooks_see_direct_launches(direct, monkeypatch):
    """A direct launch passes Triton's launch hooks as JITFunction.run does when one is set (the
    hook gets the launch metadata), and None for an empty chain, which the launcher skips."""
    import triton

    seen = []
    real_run = _Launcher.run

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter_hook, exit_hook, *values):
        seen.append((metadata, enter_hook, exit_hook))
        return real_run(self, gx, gy, gz, stream, function, packed, metadata, enter_hook, exit_hook, *values)

    monkeypatch.setattr(_Launcher, "run", run)
    q, k, v = _qkv(grad=False)
    for _ in range(2):
        fx_flash.flash_attention(q, k, v, is_causal=True)
    assert seen == [(None, None, None)]  # empty chains: no metadata, no hooks
    calls = []
    hook = calls.append
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        fx_flash.flash_attention(q, k, v, is_causal=True)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert [c["name"] for c in calls] == ["_attn_fwd"]
    assert seen[-1][1] is triton.knobs.runtime.launch_enter_hook and seen[-1][2] is None


@triton.jit
def _stand_in_forward(Q, K, V, Out, Lse, scale, N, D: tl.constexpr, BLOCK: tl.constexpr):
    """A stand-in for the Gluon kernel (which cannot run in the interpreter), with its argument
    order: out = scale·(q + k + v) row by row, lse = the program's row index."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    ok = rows[:, None] < N
    at = rows[:, None] * D + cols[None, :]
    x = tl.load(Q + at, mask=ok) + tl.load(K + at, mask=ok) + tl.load(V + at, mask=ok)
    tl.store(Out + at, x * scale, mask=ok)
    tl.store(Lse + rows, rows.to(tl.float32), mask=rows < N)


@needs_interpreter
def test_the_gluon_forward_plan_decides_once_and_launches_bound(direct, monkeypatch):
    """A call the Gluon forward takes gets a plan (launch._GluonForward): the route is decided once
    per key (gluon_launch.routed_forward), the first call launches through the JIT function and
    binds, later calls launch the bound kernel with that call's own tensors (here descriptors
    stand in as the tensors themselves), and FX_FLASH_GLUON=0 is another key, on the portable
    forward. Stand-in kernel: the Gluon kernels do not run in the interpreter."""
    from fx_flash.codegen import gluon_launch

    class StandIn(gluon_launch.ForwardLaunch):
        def descriptors(self, q, k, v):
            return q, k, v

    decided = []

    def routed(spec, q, k, v, scale):
        decided.append(spec.text)
        n = q.shape[0] * q.shape[1] * q.shape[2]
        return StandIn(_stand_in_forward, (triton.cdiv(n, 16), ), (scale, n), dict(D=q.shape[3], BLOCK=16),
                       (16, 16, 16))

    monkeypatch.setattr(gluon_launch, "routed_forward", routed)
    monkeypatch.setattr(gluon_launch, "enabled", lambda: os.environ.get("FX_FLASH_GLUON", "1") != "0")
    launches = []
    real_bind = launch._bind

    def bind(fn, kernel, n_positional, keywords):  # the stand-in launcher runs the interpreter
        runner = direct.setdefault("_stand_in_forward", _Launcher(_stand_in_forward))
        launches.append("bound")
        return real_bind(types.SimpleNamespace(signature=inspect.signature(_stand_in_forward.fn), pre_run_hooks=[]),
                         runner, n_positional, keywords)

    monkeypatch.setattr(launch, "_bind", bind)
    q, k, v = _qkv(grad=False)
    outs = [fx_flash.flash_attention(q, k, v, is_causal=True) for _ in range(3)]
    assert decided == ["score=qk*scale; keep=kv_idx <= q_idx"]  # once per key
    assert launches == ["bound"] and direct["_stand_in_forward"].launches == 2
    for out in outs:
        torch.testing.assert_close(out, (q + k + v) * (1 / math.sqrt(16)))
    q2, k2, v2 = _qkv(grad=False)  # other tensors, the same key: the bound launch reads them
    torch.testing.assert_close(fx_flash.flash_attention(q2, k2, v2, is_causal=True), (q2 + k2 + v2) / 4)
    assert len(decided) == 1 and direct["_stand_in_forward"].launches == 3
    monkeypatch.setenv("FX_FLASH_GLUON", "0")
    torch.testing.assert_close(fx_flash.flash_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- keys


@needs_interpreter
def test_each_changed_layout_dtype_or_flag_builds_a_new_plan():
    """A repeated call reuses its plan; another shape, stride, dtype, alignment, spec, scale or
    dropout builds one more; the backward's plans follow its own key."""
    q, k, v = _qkv()
    fx_flash.flash_attention(q, k, v, is_causal=True)
    fx_flash.flash_attention(q, k, v, is_causal=True)
    assert len(launch._FORWARDS) == 1
    storage = torch.randn(2 * 40 * 16 + 1)
    variants = [
        lambda: fx_flash.flash_attention(q, k, v),  # another spec (not causal)
        lambda: fx_flash.flash_attention(q, k, v, is_causal=True, scale=0.3),
        lambda: fx_flash.flash_attention(q[:, :, :33], k, v, is_causal=True),  # another length, a view
        lambda: fx_flash.flash_attention(q.detach().transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                         is_causal=True),  # (B, N, H, d) storage: other strides
        lambda: fx_flash.flash_attention(storage[1:].view(1, 2, 40, 16), k, v, is_causal=True),  # 4-byte offset
        lambda: fx_flash.flash_attention(*(t.detach().half() for t in (q, k, v)), is_causal=True),
        lambda: fx_flash.flash_attention(q, k, v, is_causal=True, dropout_p=0.1),
        lambda: fx_flash.flash_attention(q, k, v, is_causal=True, dropout_p=0.2),
    ]
    for i, call in enumerate(variants):
        call()
        call()
        assert len(launch._FORWARDS) == i + 2
    for _ in range(2):
        out = fx_flash.flash_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert len(launch._BACKWARDS) == 1
    out = fx_flash.flash_attention(q, k, v, is_causal=True)
    torch.autograd.grad(out, (q, k, v), torch.ones(1, 40, 2, 16).transpose(1, 2))  # dO with other strides
    assert len(launch._BACKWARDS) == 2


@needs_interpreter
def test_the_forward_plan_finds_the_backward_plan(monkeypatch):
    """An eager fwd+bwd of a seen key computes one plan key, the forward's: its plan finds the
    backward's from dO's layout and the settings (launch._Plan.backward). dO with other strides,
    or a switch set between the forward and its backward, gets its own backward plan, and the
    gradients stay equal to the general path's (through the op)."""
    names = _kernel_names(monkeypatch)
    keys = []
    real_key = launch._plan_key
    monkeypatch.setattr(launch, "_plan_key", lambda *a: keys.append(1) or real_key(*a))
    q, k, v = _qkv()
    bias = torch.randn(1, 1, 40, 40, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(q)

    def step(dout=dout, between=lambda: None):
        out = fx_flash.flash_attention(q, k, v, attn_mask=bias, is_causal=True)
        between()
        keys.clear()
        names.clear()
        return torch.autograd.grad(out, (q, k, v, bias), dout)

    first = step()
    again = step()
    assert keys == []  # the backward keyed nothing: the forward's plan held its backward
    (plan,) = launch._FORWARDS.values()
    assert len(plan.backwards) == 1
    for a, b in zip(first, again):
        assert torch.equal(a, b)

    def general(dout):  # through the op: the backward takes the full key
        out = torch.ops.fx_flash.flash_attention(q, k, v, bias, is_causal=True)
        return torch.autograd.grad(out, (q, k, v, bias), dout)

    for a, b in zip(first, general(dout)):
        assert torch.equal(a, b)
    strided_dout = torch.randn(1, 40, 2, 16, device=DEVICE).transpose(1, 2)
    strided = step(strided_dout)
    assert len(plan.backwards) == 2 and keys == [1]  # a new dO layout: one full key, then kept
    for a, b in zip(strided, general(strided_dout)):
        assert torch.equal(a, b)

    atomic = step(between=lambda: monkeypatch.setenv("FX_FLASH_DQ", "atomic"))
    assert set(names) == {"_attn_bwd_delta", "_attn_bwd_dkdv"}  # the switch, read at the backward
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_environment_switches_take_effect_between_calls(monkeypatch):
    """FX_FLASH_DQ and FX_FLASH_SPLIT_KV set (and unset) between calls of one key change the
    kernels the next call launches."""
    names = _kernel_names(monkeypatch)
    q, k, v = _qkv()

    def step():
        names.clear()
        out = fx_flash.flash_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return set(names)

    assert step() == {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}
    monkeypatch.setenv("FX_FLASH_DQ", "atomic")
    assert step() == {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv"}
    monkeypatch.delenv("FX_FLASH_DQ")
    assert step() == {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}

    q1 = torch.randn(1, 4, 1, 16, device=DEVICE)
    k1, v1 = (torch.randn(1, 1, 300, 16, device=DEVICE) for _ in range(2))
    names.clear()
    fx_flash.flash_attention(q1, k1, v1, enable_gqa=True)
    assert names == ["_attn_fwd_split", "_attn_fwd_combine"]
    monkeypatch.setenv("FX_FLASH_SPLIT_KV", "0")
    names.clear()
    fx_flash.flash_attention(q1, k1, v1, enable_gqa=True)
    assert names == ["_attn_fwd"]


def test_switches_read_what_os_environ_holds(monkeypatch):
    """launch.switches() changes with every way of setting a variable and returns to its value
    when the environment does."""
    monkeypatch.delenv("FX_FLASH_TMA", raising=False)
    before = launch.switches()
    assert len(before) == len(launch.SWITCHES)
    monkeypatch.setenv("FX_FLASH_TMA", "1")
    on = launch.switches()
    assert on != before
    monkeypatch.setenv("FX_FLASH_TMA", "0")
    assert launch.switches() not in (before, on)
    monkeypatch.delenv("FX_FLASH_TMA")
    assert launch.switches() == before
    import os

    os.environ.update({"FX_FLASH_TMA": "1"})
    try:
        assert launch.switches() == on
    finally:
        del os.environ["FX_FLASH_TMA"]
    assert launch.switches() == before


@needs_interpreter
def test_set_autotune_is_part_of_the_key():
    """Turning tuning on or off in the process builds new plans (the tile may change)."""
    q, k, v = _qkv(grad=False)
    fx_flash.flash_attention(q, k, v)
    previous = fx_flash.set_autotune(False)
    try:
        fx_flash.flash_attention(q, k, v)
        assert len(launch._FORWARDS) == 2
    finally:
        fx_flash.set_autotune(previous)


@needs_interpreter
def test_clearing_the_choices_forgets_the_plans():
    """CHOSEN.clear() ("as in a new process", in tests and benchmarks) drops the plans holding its
    Launch objects, so the next call chooses again."""
    q, k, v = _qkv(grad=False)
    fx_flash.flash_attention(q, k, v)
    assert launch._FORWARDS and launch.CHOSEN
    launch.CHOSEN.clear()
    assert not launch._FORWARDS and not launch._BACKWARDS
    fx_flash.flash_attention(q, k, v)
    assert len(launch._FORWARDS) == 1 and launch.CHOSEN


@needs_interpreter
def test_a_choice_made_inside_a_capture_is_not_planned(monkeypatch):
    """With tuning on, a launch during a CUDA graph capture runs the default without recording
    it: no plan is kept, so the first call outside the capture still tunes."""
    monkeypatch.setattr(launch, "_tunes", lambda q: True)
    capturing = [True]
    monkeypatch.setattr(launch, "capturing", lambda: capturing[0])
    monkeypatch.setattr(launch, "_time_ms", lambda call: 1.0)
    monkeypatch.setattr(autotune, "disk_cache_enabled", lambda: False)
    launch.CHOSEN.clear()
    autotune.clear_memory()
    q, k, v = _qkv(grad=False)
    fx_flash.flash_attention(q, k, v)
    assert not launch._FORWARDS and not launch.CHOSEN
    capturing[0] = False
    fx_flash.flash_attention(q, k, v)
    assert len(launch._FORWARDS) == 1
    autotune.clear_memory()


# --------------------------------------------------------------------------------------- errors


BAD_CALLS = {
    "gqa_without_flag": (lambda q, k, v: ((q, k[:, :1], v[:, :1]), {}), ValueError, "enable_gqa"),
    "nan_scale": (lambda q, k, v: ((q, k, v), {"scale": math.nan}), ValueError, "NaN"),
    "dropout_one": (lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), ValueError, "dropout_p"),
    "mask_shape": (lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(3, 40, 40, device=DEVICE)}), ValueError,
                   "broadcast"),
    "three_dims": (lambda q, k, v: ((q[0], k[0], v[0]), {}), ValueError, "4-D"),
    "mixed_dtypes": (lambda q, k, v: ((q, k.half(), v), {}), TypeError, "share a dtype"),
    "not_a_tensor": (lambda q, k, v: ((None, k, v), {}), TypeError, "must be a Tensor"),
}


@pytest.mark.parametrize("make", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_on_every_call(make):
    """An argument the op cannot compute with raises its error on each call, after good calls of
    the same shapes too (a key whose check passed never covers one that fails)."""
    q, k, v = _qkv(grad=False)
    if make is not BAD_CALLS["gqa_without_flag"][0]:
        fx_flash.flash_attention(q, k, v)
    else:
        fx_flash.flash_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
    make, error, words = make
    args, kwargs = make(q, k, v)
    scale = kwargs.get("scale")
    for _ in range(3):
        with pytest.raises(error, match=words):
            fx_flash.flash_attention(*args, **kwargs)
        assert kwargs.get("scale") is scale  # the very same NaN object each time


def test_argument_key_covers_what_the_checks_read():
    """Keys differ wherever check_arguments could answer differently, and there is none for
    arguments of another kind than the schema's."""
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    base = validate.argument_key(q, k, v, None, 0.0, False, None, False)
    changed = [
        validate.argument_key(q, k[:, :1], v[:, :1], None, 0.0, False, None, False),
        validate.argument_key(q, k, v, None, 0.0, False, None, True),
        validate.argument_key(q, k, v, torch.zeros(8, 8), 0.0, False, None, False),
        validate.argument_key(q, k, v, torch.zeros(8, 8, dtype=torch.bool), 0.0, False, None, False),
        validate.argument_key(q, k, v, None, 0.5, False, None, False),
        validate.argument_key(q, k, v, None, 0.0, False, 0.5, False),
        validate.argument_key(q, k.double(), v, None, 0.0, False, None, False),
        validate.argument_key(q, k, v.to("meta"), None, 0.0, False, None, False),
    ]
    assert base is not None and base not in changed and len(set(changed)) == len(changed)
    assert validate.argument_key(q, [1.0], v, None, 0.0, False, None, False) is None
    assert validate.argument_key(q, k, v, [[True]], 0.0, False, None, False) is None
    assert validate.argument_key(q, k, v, None, torch.tensor(0.1), False, None, False) is None


@needs_interpreter
def test_wrong_operands_raise_on_every_call():
    """The launch layer's operand checks run when a plan is built, and a failing call builds none."""
    from fx_flash.codegen.spec import sdpa_spec

    q, k, v = _qkv(grad=False)
    spec = sdpa_spec(bias=(False, True, False, False))
    for _ in range(2):
        with pytest.raises(ValueError, match="reads 1 operands, got 0"):
            launch.attention_forward(q, k, v, [], None, 0.0, 0.25, spec)
        with pytest.raises(ValueError, match="dimensions"):
            launch.attention_forward(q, k, v, [torch.zeros(40, 40)], None, 0.0, 0.25, spec)
    assert not launch._FORWARDS


@needs_interpreter
def test_plans_hit_after_a_check_error_still_compute():
    """A good call after bad ones of the same shapes computes SDPA's answer."""
    q, k, v = _qkv(grad=False)
    with pytest.raises(ValueError):
        fx_flash.flash_attention(q, k, v, dropout_p=1.0)
    out = fx_flash.flash_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
