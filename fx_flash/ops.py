"""The torch.library contract of fx_flash: schemas, fake kernels, autograd, dispatch.

    fx_flash::flash_attention   SDPA's signature (the public op); CompositeImplicitAutograd:
                                checks arguments, turns attn_mask/is_causal into a spec and its
                                operands, draws the dropout seed and calls attn_fwd.
    fx_flash::attention         what the graph pass emits, one call per attention: q, k, v, the
                                tensors the captured score reads and the spec (its text form,
                                e.g. ``score=30*tanh(qk*scale/30); keep=kv_idx <= q_idx``).
    fx_flash::attn_fwd          (out, logsumexp) of any spec; registered autograd calls attn_bwd.
    fx_flash::attn_bwd          (dq, dk, dv, [a gradient per operand the spec marks ``grad``]).

CUDA tensors run the generated Triton kernels; CPU tensors run the same kernels under
``TRITON_INTERPRET=1`` and the eager oracle (``reference.py``) otherwise. Triton is imported
only when a kernel is launched.

Host time: every layer above is a Python kernel, and each pass through the dispatcher costs
~10 µs. An eager call on plain tensors (``eager``: nothing tracing, no mode, no transform)
runs the same Python functions directly; any other call goes through the ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import Tensor

from fx_flash import validate
from fx_flash.codegen.spec import sdpa_spec, spec_from_text
from fx_flash.device import interpreting

LIB = "fx_flash"


def runs_kernels(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the generated kernels (else the reference)."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _interpreter_dtype(t: Optional[Tensor]) -> Optional[Tensor]:
    # Note: Triton's CPU interpreter computes bf16 tl.dot wrongly (seen with triton 3.9: errors
    # of 1e10), so under the interpreter bf16 runs the kernels on fp32 copies. bf16 proper is
    # tested on the GPU (benchmarks/gpu_check.py).
    if t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return t.float()
    return t


def _reference_keep(seed: Tensor, shape, dropout_p: float) -> Tensor:
    """Dropout mask of the reference path: a torch Generator seeded by the op's seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]))
    return (torch.rand(shape, generator=gen) >= dropout_p).to(seed.device)


def _reference_dropout(q, k, seed, dropout_p, spec) -> Optional[Tensor]:
    """The reference path's keep-mask for this call, or None without dropout."""
    if not (spec.dropout and dropout_p > 0.0):
        return None
    return _reference_keep(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p)


def _reference_call(q, k, v, operands, seed, dropout_p, scale, spec):
    from fx_flash.reference import spec_attention

    return spec_attention(q, k, v, operands, spec, scale, dropout_p, dropout_keep=_reference_dropout(
        q, k, seed, dropout_p, spec), upcast=torch.float32, with_lse=True)


# The ops are defined with torch.library.define/impl rather than torch.library.custom_op, whose
# per-call wrapper (Dynamo guard, aliasing checks) cost ~80 µs of host time per forward+backward
# on the H200 (benchmarks/RESULTS.md, host overhead).
torch.library.define(
    f"{LIB}::attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor[] operands, Tensor? seed, float dropout_p, float scale, str spec) "
    "-> (Tensor, Tensor)",
)
torch.library.define(
    f"{LIB}::attn_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] operands, Tensor? seed, "
    "float dropout_p, float scale, str spec) -> (Tensor, Tensor, Tensor, Tensor[])",
)


def eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on ``tensors`` may run the op's Python implementations directly, without
    a round trip through the dispatcher per layer (each costs ~10 µs of host time): plain
    tensors (not subclasses, fake or functional tensors), nothing tracing (Dynamo, make_fx,
    AOTAutograd, torch.jit.trace), no torch_dispatch or torch_function mode, no functorch
    transform (vmap, grad).
    Anything else goes through the registered ops, which every such mechanism understands."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces no further
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state()):
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return True


@functools.cache
def _launch():
    """fx_flash.codegen.launch, imported on the first kernel launch (it imports Triton)."""
    from fx_flash.codegen import launch

    return launch


def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, operands: list[Tensor], seed: Optional[Tensor], dropout_p: float,
              scale: float, spec: str) -> tuple[Tensor, Tensor]:
    """Fused attention forward. Returns (out (B, Hq, Nq, d), logsumexp (B, Hq, Nq) fp32)."""
    return _planned_fwd(q, k, v, operands, seed, dropout_p, scale, spec)[:2]


def _planned_fwd(q, k, v, operands, seed, dropout_p, scale, spec):
    """_attn_fwd's outputs and the launch plan that ran them on the inputs' own tensors (its
    ``backward`` runs this call's backward), None where there is none: the reference path, and
    bf16 in the interpreter (which runs on fp32 copies)."""
    parsed = spec_from_text(spec)
    if q.is_cuda:  # the kernels, on the inputs' own dtype
        return _launch().planned_forward(q, k, v, operands, seed, dropout_p, scale, parsed)
    if not runs_kernels(q.device):
        out, lse = _reference_call(q, k, v, operands, seed, dropout_p, scale, parsed)
        return out.to(q.dtype), lse, None
    if q.dtype != torch.bfloat16 and not any(t.dtype == torch.bfloat16 for t in operands):
        return _launch().planned_forward(q, k, v, operands, seed, dropout_p, scale, parsed)
    dtype = q.dtype
    q, k, v = (_interpreter_dtype(t) for t in (q, k, v))
    operands = [_interpreter_dtype(t) for t in operands]
    out, lse = _launch().attention_forward(q, k, v, operands, seed, dropout_p, scale, parsed)
    return out.to(dtype), lse, None


torch.library.impl(f"{LIB}::attn_fwd", ("CPU", "CUDA"))(_attn_fwd)


@torch.library.register_fake(f"{LIB}::attn_fwd")
def _(q, k, v, operands, seed, dropout_p, scale, spec):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def _attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, operands: list[Tensor],
              seed: Optional[Tensor], dropout_p: float, scale: float, spec: str):
    """Fused attention backward. Returns (dq, dk, dv, [d operand for each ``grad`` operand])."""
    parsed = spec_from_text(spec)
    if q.is_cuda:  # gradients come back in their inputs' dtypes
        return _launch().attention_backward(dout, q, k, v, out, lse, operands, seed, dropout_p, scale, parsed)
    grad_of = [t for op, t in zip(parsed.operands, operands) if op.grad]
    if not runs_kernels(q.device):
        dq, dk, dv, dops = _reference_backward(dout, q, k, v, operands, seed, dropout_p, scale, parsed)
    else:
        dtypes = (q.dtype, k.dtype, v.dtype)
        args = [_interpreter_dtype(t) for t in (dout, q, k, v, out)]
        dq, dk, dv, dops = _launch().attention_backward(*args, lse, [_interpreter_dtype(t) for t in operands], seed,
                                                        dropout_p, scale, parsed)
        dq, dk, dv = (g.to(dt) for g, dt in zip((dq, dk, dv), dtypes))
    return dq, dk, dv, [g.to(t.dtype) for g, t in zip(dops, grad_of)]


torch.library.impl(f"{LIB}::attn_bwd", ("CPU", "CUDA"))(_attn_bwd)


def _reference_backward(dout, q, k, v, operands, seed, dropout_p, scale, spec):
    """Gradients of the eager oracle by autograd (custom-op kernels run below autograd, so the
    graph is built here on detached fp32 copies)."""
    from fx_flash.reference import spec_attention

    keep = _reference_dropout(q, k, seed, dropout_p, spec)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ops = [t.detach().float().requires_grad_(o.grad) if t.dtype.is_floating_point else t
           for o, t in zip(spec.operands, operands)]
    with torch.enable_grad():
        out = spec_attention(*leaves, ops, spec, scale, dropout_p, dropout_keep=keep)
        wanted = leaves + [t for o, t in zip(spec.operands, ops) if o.grad]
        grads = torch.autograd.grad(out, wanted, dout.float(), allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
    dq, dk, dv = (g.to(t.dtype).contiguous() for g, t in zip(grads[:3], (q, k, v)))
    return dq, dk, dv, [g.contiguous() for g in grads[3:]]


@torch.library.register_fake(f"{LIB}::attn_bwd")
def _(dout, q, k, v, out, lse, operands, seed, dropout_p, scale, spec):
    # Gradients come back contiguous whatever the inputs' strides (q/k/v are often transposed views).
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    parsed = spec_from_text(spec)
    dops = [torch.empty_like(t, memory_format=torch.contiguous_format)
            for op, t in zip(parsed.operands, operands) if op.grad]
    return (*grads, dops)


@functools.lru_cache(maxsize=1024)
def _backward_spec(spec: str, grads: tuple) -> str:
    """``spec`` with the gradient flags of its operands set from autograd's needs."""
    return spec_from_text(spec).with_grads(grads).text


class _AttnFunction(torch.autograd.Function):
    """The autograd of attn_fwd, registered at its Autograd key.

    Written as a plain autograd.Function rather than through torch.library.register_autograd,
    whose per-call wrapper (argument normalization with fill_defaults) cost ~20-45 us of host
    time per call on the H200 (benchmarks/RESULTS.md). Operands come last as separate
    arguments so that autograd tracks each one (it does not look inside a list). ``direct``:
    the caller found the call ``eager``, so the forward runs the implementation directly.
    """

    @staticmethod
    def forward(ctx, direct, q, k, v, seed, dropout_p, scale, spec, *operands):
        # ctx.plan: the launch plan of a direct call, which runs its backward (launch._Plan.backward)
        if direct:  # the implementation below the dispatcher, called directly
            out, lse, ctx.plan = _planned_fwd(q, k, v, operands, seed, dropout_p, scale, spec)
        else:
            ctx.plan = None
            with torch._C._AutoDispatchBelowAutograd():
                out, lse = torch.ops.fx_flash.attn_fwd.default(q, k, v, list(operands), seed, dropout_p, scale, spec)
        ctx.save_for_backward(q, k, v, out, lse, seed, *operands)
        ctx.dropout_p, ctx.scale = dropout_p, scale
        ctx.operand_grads, ctx.spec = (), spec
        if operands:
            ctx.operand_grads = tuple(bool(g) and t.dtype.is_floating_point
                                      for g, t in zip(ctx.needs_input_grad[8:], operands))
            ctx.spec = _backward_spec(spec, ctx.operand_grads)
        # The logsumexp is an auxiliary output (as in SDPA's kernels): it has no gradient, and
        # an unused output's gradient is passed as None rather than a materialized zero tensor.
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seed, *operands = ctx.saved_tensors
        if grad_out is None:  # only lse was used (AOTAutograd may still call the backward)
            return (None,) * (8 + len(operands))
        if not eager(grad_out, q, k, v, *operands):
            dq, dk, dv, dops = torch.ops.fx_flash.attn_bwd.default(grad_out, q, k, v, out, lse, operands, seed,
                                                                   ctx.dropout_p, ctx.scale, ctx.spec)
        elif ctx.plan is not None:  # the forward's plan finds the backward's from dO and the settings alone
            dq, dk, dv, dops = ctx.plan.backward(ctx.spec, grad_out, q, k, v, out, lse, operands, seed)
        else:
            dq, dk, dv, dops = _attn_bwd(grad_out, q, k, v, out, lse, operands, seed, ctx.dropout_p, ctx.scale,
                                         ctx.spec)
        found = iter(dops)
        return (None, dq, dk, dv, None, None, None, None, *[next(found) if g else None for g in ctx.operand_grads])


# autograd.Function.apply's own body, for eager calls: Function.apply (Python) first unwraps
# functorch's dead wrappers and checks for transforms and setup_context, ~4 µs a call; eager
# calls have no transform and this Function no setup_context, so they unwrap and enter the C
# implementation themselves.
_apply = super(torch.autograd.Function, _AttnFunction).apply
_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)  # None: Function.apply for all


def _fwd_autograd(direct: bool, q, k, v, operands, seed, dropout_p, scale, spec):
    """attn_fwd's Autograd kernel; ``direct`` when ``eager`` holds for the call's tensors."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (operands and any(t.requires_grad for t in operands))):
        if direct and _unwrap_if_dead is not None:
            return _apply(True, _unwrap_if_dead(q), _unwrap_if_dead(k), _unwrap_if_dead(v), seed, dropout_p, scale,
                          spec, *map(_unwrap_if_dead, operands))
        return _AttnFunction.apply(direct, q, k, v, seed, dropout_p, scale, spec, *operands)
    # Nothing to differentiate (inference, decoding): skip the autograd.Function's bookkeeping,
    # a third of the op's Python time per call.
    if direct:
        return _attn_fwd(q, k, v, operands, seed, dropout_p, scale, spec)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fx_flash.attn_fwd.default(q, k, v, operands, seed, dropout_p, scale, spec)


def _attn_fwd_autograd(q, k, v, operands, seed, dropout_p, scale, spec):
    return _fwd_autograd(eager(q, k, v, *operands), q, k, v, operands, seed, dropout_p, scale, spec)


torch.library.impl(f"{LIB}::attn_fwd", "Autograd")(_attn_fwd_autograd)


attn_fwd = torch.ops.fx_flash.attn_fwd.default
attn_bwd = torch.ops.fx_flash.attn_bwd.default


def _draw_seed(q: Tensor, dropout_p: float) -> Optional[Tensor]:
    # Drawn from torch's generator of q's device, so torch.manual_seed makes runs repeat.
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    return None


def _sizes_one(t: Tensor) -> tuple:
    return tuple(n == 1 for n in t.shape)


def sdpa_call(attn_mask: Optional[Tensor], is_causal: bool, dropout_p: float) -> tuple[str, list[Tensor]]:
    """(spec text, operands) of SDPA's arguments: a float attn_mask is added to the scores, a
    bool one keeps where True; each is read through its own broadcast strides."""
    bias = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    mask = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
    spec = sdpa_spec(bias=None if bias is None else _sizes_one(bias), mask=None if mask is None else _sizes_one(mask),
                     causal=bool(is_causal), dropout=dropout_p > 0.0)
    return spec.text, [t for t in (bias, mask) if t is not None]


def sdpa_forward(q, k, v, attn_mask=None, seed=None, dropout_p=0.0, is_causal=False, scale=None):
    """(out, logsumexp) of SDPA-style arguments through attn_fwd (tests and benchmarks use the
    logsumexp; ``flash_attention`` returns out)."""
    spec, operands = sdpa_call(attn_mask, is_causal, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if eager(q, k, v, attn_mask):  # attn_fwd's Autograd kernel, without entering the dispatcher
        return _fwd_autograd(True, q, k, v, operands, seed, float(dropout_p), scale, spec)
    return attn_fwd(q, k, v, operands, seed, float(dropout_p), scale, spec)


torch.library.define(
    f"{LIB}::flash_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, "
    "float? scale=None, bool enable_gqa=False) -> Tensor",
)

# validate.argument_key → (spec text, scale): the arguments' checks passed and what they become.
_SDPA_CALLS: dict = {}
MAX_CALLS = 4096  # one per shape: a dynamic workload's memory stays bounded


def _sdpa_plan(direct, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[str, float]:
    """(spec text, scale) of SDPA-style arguments, checked once per argument_key for ``direct``
    (eager) calls; traced calls (fake tensors, symbolic sizes) are checked every time."""
    key = validate.argument_key(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) if direct else None
    found = _SDPA_CALLS.get(key) if key is not None else None
    if found is None:
        validate.check_arguments(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        found = (sdpa_call(attn_mask, is_causal, dropout_p)[0],
                 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
        if key is not None:
            if len(_SDPA_CALLS) >= MAX_CALLS:
                _SDPA_CALLS.clear()
            _SDPA_CALLS[key] = found
    return found


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """fx_flash::flash_attention's implementation."""
    return _flash_attention(eager(q, k, v, attn_mask), q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _flash_attention(direct, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """flash_attention, ``direct`` when ``eager`` holds for the call (the public
    ``fx_flash.flash_attention`` has checked that, and calls this rather than the op)."""
    spec, scale = _sdpa_plan(direct, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    operands = [] if attn_mask is None else [attn_mask]
    seed, dropout_p = _draw_seed(q, dropout_p), float(dropout_p)
    if direct:  # attn_fwd's Autograd kernel, without entering the dispatcher
        return _fwd_autograd(True, q, k, v, operands, seed, dropout_p, scale, spec)[0]
    return attn_fwd(q, k, v, operands, seed, dropout_p, scale, spec)[0]


torch.library.impl(f"{LIB}::flash_attention", "CompositeImplicitAutograd")(flash_attention)


torch.library.define(
    f"{LIB}::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor[] operands, float dropout_p, float? scale, bool enable_gqa, str spec) "
    "-> Tensor",
)


@torch.library.impl(f"{LIB}::attention", "CompositeImplicitAutograd")
def _attention(q, k, v, operands, dropout_p, scale, enable_gqa, spec):
    """Attention whose score is ``spec``'s expression over q·kᵀ and ``operands``."""
    validate.check_arguments(q, k, v, None, dropout_p, False, scale, enable_gqa)
    validate.check_operands(q, k, operands, spec_from_text(spec))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # The graph's p may switch at run time (nn.Dropout under .train()/.eval()): the kernel's
    # dropout follows the value, not the text.
    spec = _with_dropout(spec, dropout_p > 0.0)
    out, _ = attn_fwd(q, k, v, list(operands), _draw_seed(q, dropout_p), float(dropout_p), scale, spec)
    return out


@functools.lru_cache(maxsize=1024)
def _with_dropout(spec: str, dropout: bool) -> str:
    parsed = spec_from_text(spec)
    return spec if parsed.dropout == dropout else dataclasses.replace(parsed, dropout=dropout).text
