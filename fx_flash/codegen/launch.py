"""Launching the generated kernels: outputs, strides, grids, and each launch's tile configuration.

Each kernel runs ``tiling.default_config``: a tile derived from the device's shared memory M and
the launch's occupancy (its programs per SM), with no timing. Tuning is opt-in, like Inductor's
max-autotune (FX_FLASH_AUTOTUNE=1, ``set_autotune(True)`` or ``fx_flash.backend(autotune=True)``):
then ``autotune.choose`` times the candidates ``tiling.candidates`` derives from M (the default
first) once per key, which buckets the sequence lengths and the grid's programs per SM to powers
of two, and later processes read the on-disk record. Inside a CUDA graph capture nothing is timed:
a recorded choice or the default runs.

After the first launch of a kernel for one argument signature (the non-tensor arguments, the
tensors' dtypes and 16-byte alignment), later launches skip Triton's argument binder and call the
compiled kernel's launcher directly (``_launch``), as ``JITFunction.run`` itself does once bound.

Host time: a call is keyed by what its launches derive from (the spec, each tensor's shape,
strides, dtype and alignment, the floats, the switches in the environment); the first call of a
key builds its plan (``_Forward``, ``_Backward``: argument checks, tile configuration, grid,
constexprs, output shapes, the kernels bound) and later calls allocate their outputs and call
each kernel's launcher. ``clear_plans`` (also run by ``CHOSEN.clear()``) forgets them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import triton

from fx_flash.codegen import autotune, loader, skipping, tiling
from fx_flash.codegen.generate import raw_max_applies
from fx_flash.codegen.spec import AttentionSpec, sdpa_spec, spec_from_text
from fx_flash.device import capturing, device_profile, interpreting

DELTA_BLOCK_M = 64


def _strides4(t: Optional[torch.Tensor], shape) -> tuple[int, int, int, int]:
    """Strides of ``t`` broadcast to ``shape`` (0 on broadcast axes); zeros when absent."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(t.expand(shape).stride())


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # fp32 stays fp32: tf32 only when the user enabled it
    return "tf32"  # fp32 with tf32 enabled; ignored by fp16/bf16 dots


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the per-call grids: plain integers (``triton.cdiv`` costs ~3 µs a call, as it
    also accepts constexprs)."""
    return -(-a // b)


def _bucket(n: int) -> int:
    """The power of two at or above ``n``: autotuning shares one result per bucket."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def atomic_dq() -> bool:
    """dQ by atomics inside the dK/dV kernel (FX_FLASH_DQ=atomic) instead of a separate pass.

    The separate pass (default) is deterministic: the same inputs give bitwise the same dQ.
    """
    return os.environ.get("FX_FLASH_DQ", "separate") == "atomic"


def autotuning() -> bool:
    """Whether GPU launches tune their tile (autotune.requested): off unless
    ``fx_flash.set_autotune(True)``, ``backend(autotune=True)`` or FX_FLASH_AUTOTUNE=1.

    Off, each launch runs the default derived from M and occupancy (tiling.default_config) and
    compiles one binary per kernel; on, the first call of each key times every candidate.
    """
    return autotune.requested()


def direct_launch() -> bool:
    """Launch bound kernels through their compiled launcher (default), or every time through
    Triton's ``JITFunction.run`` with FX_FLASH_DIRECT_LAUNCH=0 (for A/B timing)."""
    return os.environ.get("FX_FLASH_DIRECT_LAUNCH", "1") != "0"


# Keyword arguments that give exact sizes: the key holds their power-of-two buckets instead.
EXACT_SIZES = frozenset({"H", "N_Q", "N_KV"})


@dataclass(frozen=True)
class Launch:
    """A kernel with its chosen configuration, ready to launch."""

    fn: object  # the generated module's JITFunction
    config: tiling.TileConfig
    meta: dict  # BLOCK_M, BLOCK_N, num_warps, num_stages: launch keywords (and the grid's meta)
    # argument signature → (compiled kernel, the constexpr tail of its arguments), or None where
    # the kernel cannot be launched directly (see _launch)
    bound: dict = field(default_factory=dict, compare=False, repr=False)


class _Choices(dict):
    """CHOSEN's type: a dict whose ``clear()`` ("as in a new process", as tests and benchmarks use
    it) also forgets the plans, which hold the Launch objects it chose."""

    def clear(self) -> None:
        super().clear()
        clear_plans()


# (spec, kernel name, device, dtype, the tuning keywords as (name, value) pairs, waves bucket,
# tuned) → Launch.
CHOSEN: dict[tuple, Launch] = _Choices()


def _meta(config: tiling.TileConfig) -> dict:
    return {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


def _tunes(q: torch.Tensor) -> bool:
    """Whether launches on ``q``'s device pick their configuration by benchmarking."""
    return q.device.type == "cuda" and not interpreting() and autotuning()


def _time_ms(call) -> float:
    """Milliseconds of ``call`` (each call launches the kernel once) on the GPU alone.

    Replayed from a CUDA graph: timed launch by launch, a small kernel (decoding, short
    sequences) measures the host's launch time, the same for every candidate, and the choice
    becomes noise (seen on the H200: a split-KV decode tuned that way ran 2.3x slower). Falls
    back to per-launch timing if the call cannot be captured.
    """
    import triton.testing

    call()  # compile (or load) this candidate before any capture
    try:
        return triton.testing.do_bench_cudagraph(call, rep=20, return_mode="median")
    except Exception:  # noqa: BLE001 - capture is an optimization of the measurement only
        torch.cuda.synchronize()
        return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")


@functools.lru_cache(maxsize=None)
def _source_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _waves(grid, q: torch.Tensor) -> int:
    """The occupancy field of the tuning key: ``grid``'s programs at MIN_BLOCK tiles, as a bucket
    of waves over ``q``'s device (autotune.waves_bucket).

    Read from the launch's own grid, so one rule serves every kernel: batch·heads times query
    tiles for the forward and dQ, batch·K/V heads times key tiles for dK/dV, and the splits of
    split-KV decoding, whose grid is fixed.
    """
    return autotune.waves_bucket(grid(_SMALLEST), device_profile(q.device).multiprocessors)


_SMALLEST = {"BLOCK_M": tiling.MIN_BLOCK, "BLOCK_N": tiling.MIN_BLOCK}


def _tuning_key(module, q: torch.Tensor, consts: tuple, waves: int) -> dict:
    """Everything that changes which configuration is fastest (see autotune.choose)."""
    profile = device_profile(q.device)
    return {
        "module": Path(module.__file__).stem,  # the spec's key and the generated source's hash
        "source_sha256": _source_hash(module.__file__),
        "device": profile.name, "shared_memory": profile.shared_memory,
        "multiprocessors": profile.multiprocessors, "capability": list(profile.capability),
        "triton": triton.__version__, "torch": torch.__version__,
        "dtype": str(q.dtype), "elem_bytes": q.element_size(),
        "constexprs": dict(consts),  # HEAD_DIM, GROUP, N_Q_BUCKET, N_KV_BUCKET, CAUSAL, DQ_ATOMIC, ...
        "waves_bucket": waves,  # how many programs per SM: the batch (and heads) enter only here
    }


def _choose(spec: AttentionSpec, name: str, kernel: str, grid, q: torch.Tensor, args, kwargs, reset,
            consts: tuple, waves: int, rows: int, tune: bool, tables=None) -> tuple[Launch, bool]:
    """``name``'s configuration for this key, and whether it is final (may be remembered).

    Untuned: the default from M and occupancy. Tuned: from memory or disk, else benchmarked on
    these arguments, with the default as the first candidate. While a CUDA graph is captured,
    a tuned key that nothing has recorded runs the default and is not remembered, so that the
    first call outside a capture still tunes it.
    """
    module = loader.load(spec)
    fn = getattr(module, name)
    profile = device_profile(q.device)
    n_q, n_kv = kwargs["N_Q_BUCKET"], kwargs["N_KV_BUCKET"]
    n_resident, n_streamed = (n_kv, n_q) if tiling.RESIDENT_AXIS[kernel] == "n" else (n_q, n_kv)
    options = tiling.spec_options(kernel, spec)
    default = tiling.default_config(kernel, profile, q.shape[-1], q.element_size(), rows, waves,
                                    n_resident, n_streamed, **options)
    if not tune:
        return Launch(fn, default, _meta(default)), True
    candidates = tiling.candidates(kernel, profile, q.shape[-1], q.element_size(), rows, first=default,
                                   scratch=options["scratch"])
    key = _tuning_key(module, q, consts, waves)
    if capturing():
        config = autotune.lookup(name, key, candidates)
        return Launch(fn, config or default, _meta(config or default)), config is not None

    def bench(config: tiling.TileConfig) -> float:
        meta = _meta(config)

        def call():
            for t in reset:  # atomics accumulate into these: each trial starts from zero
                t.zero_()
            fn[grid(meta)](*args, *_tables(tables, meta), **kwargs, **meta)

        return _time_ms(call)

    config = autotune.choose(name, key, candidates, bench)
    for t in reset:  # the trials dirtied them
        t.zero_()
    return Launch(fn, config, _meta(config)), True


def tuning_consts(kwargs: dict) -> tuple:
    """The kernel keywords that take part in the tuning key, as (name, value) pairs: all but the
    exact sizes, whose buckets (N_Q_BUCKET, N_KV_BUCKET) are keywords of their own."""
    return tuple(item for item in kwargs.items() if item[0] not in EXACT_SIZES)


def _tables(tables, meta: dict) -> tuple:
    """The tile-table arguments (Ranges, Order, stride_rz, stride_rh) of a launch at ``meta``:
    positional, after the strides, since the tables differ per call."""
    return () if tables is None else tuple(tables(meta).values())


def _chosen(spec: AttentionSpec, name: str, kernel: str, grid, q: torch.Tensor, args, kwargs: dict, reset=(),
            rows: int = 0, tables=None) -> tuple[Launch, bool]:
    """``name``'s configuration for these arguments, default or tuned, and whether it is final
    (see _choose); BLOCK_M = ``rows`` when given (split-KV decoding sizes its row tile to the rows
    it packs).

    ``reset`` lists the tensors the kernel accumulates into with atomics, zero on entry: tuning
    trials dirty them, so they are zeroed before each trial and again before the real launch.
    ``tables`` maps a configuration's meta to the tile-range keywords it reads (skipping.py).
    """
    tune = _tunes(q)
    consts, waves = tuning_consts(kwargs), _waves(grid, q)
    key = (spec, name, q.device, q.dtype, consts, waves, tune)
    chosen = CHOSEN.get(key)
    if chosen is not None:
        return chosen, True
    chosen, final = _choose(spec, name, kernel, grid, q, args, kwargs, reset, consts, waves, rows, tune, tables)
    if final:
        CHOSEN[key] = chosen
    return chosen, final


def _launch(chosen: Launch, grid, args: tuple, kwargs: dict, direct: bool = True):
    """Launch ``chosen`` on these arguments; returns the bound form (compiled kernel, argument
    tail) that later launches of this signature call directly, None where there is none.

    The first launch of an argument signature goes through Triton's ``JITFunction.run``, which
    binds and specializes the arguments (types; 16-byte alignment of pointers; integers equal
    to 1 or divisible by 16), compiles or loads the binary and launches it. The signature here
    holds everything that specialization reads — every non-tensor argument's value, and each
    tensor's dtype and alignment — so a later launch with an equal signature would reach the
    same binary: it calls the binary's launcher with the same arguments ``JITFunction.run``
    passes (the positional arguments, then the rest of the kernel's parameters in order),
    skipping the binder, the cache-key computation and the option parsing of every call.
    """
    meta = chosen.meta
    if not direct:  # the interpreter, or FX_FLASH_DIRECT_LAUNCH=0
        chosen.fn[grid(meta)](*args, **kwargs, **meta)
        return None
    driver = _driver()
    device = driver.get_current_device()
    signature = (device, *kwargs.values(), *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                                             else a for a in args])
    bound = chosen.bound.get(signature, False)
    size = grid(meta)
    if bound is False:
        kernel = chosen.fn[size](*args, **kwargs, **meta)
        if len(chosen.bound) >= MAX_BOUND:  # one entry per shape: bound the memory of a dynamic workload
            chosen.bound.clear()
        bound = chosen.bound[signature] = _bind(chosen.fn, kernel, len(args), {**kwargs, **meta})
        return bound
    if bound is None:  # this Triton's kernels cannot be launched directly
        chosen.fn[size](*args, **kwargs, **meta)
        return None
    kernel, tail = bound
    _run_bound(kernel, size, _grid3(size), driver.get_current_stream(device), (*args, *tail))
    return bound


def _grid3(size: tuple) -> tuple[int, int, int]:
    return size[0], size[1] if len(size) > 1 else 1, size[2] if len(size) > 2 else 1


def _hook(chain):
    """A launch hook as the launcher takes it: None for an empty chain (triton's knobs hold
    HookChain objects, empty unless a profiler or the user adds a hook), which the launcher
    then does not call."""
    return None if getattr(chain, "calls", True) == [] else chain


def _run_bound(kernel, size: tuple, grid3: tuple, stream, values: tuple) -> None:
    """Call a compiled kernel's launcher as ``JITFunction.run`` does, hooks included. Note (host
    time): JITFunction.run builds the launch metadata and passes both hook chains on every
    launch, and the launcher calls them, even empty: three Python calls per launch. Here an empty
    chain is passed as None and the metadata, which only the hooks read, is built only when one
    of them holds a hook."""
    runtime = triton.knobs.runtime
    enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
    metadata = None if enter is None and leave is None else kernel.launch_metadata(size, stream, *values)
    kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *values)


def _run_if_bound(bound, size: tuple, grid3: tuple, args: tuple) -> bool:
    """Launch on ``args`` through ``bound`` (compiled kernel, argument tail, device), a plan's
    kernel bound at its first launch, when the current device is the one it was bound on; False
    (nothing launched) otherwise."""
    if bound is None:
        return False
    kernel, tail, device = bound
    driver = _driver()
    if driver.get_current_device() != device:
        return False
    _run_bound(kernel, size, grid3, driver.get_current_stream(device), (*args, *tail))
    return True


MAX_BOUND = 4096  # argument signatures remembered per kernel configuration


def _driver():
    """Triton's active GPU driver (current device and stream, as JITFunction.run reads them)."""
    return triton.runtime.driver.active


def _bind(fn, kernel, n_positional: int, keywords: dict):
    """(compiled kernel, the arguments after the positional ones in parameter order), as
    ``JITFunction.run`` passes them to the launcher; None where that form is not available
    (another Triton's launch API, pre-run hooks)."""
    if hasattr(kernel, "result"):  # an asynchronous compile
        kernel = kernel.result()
    needed = ("run", "function", "packed_metadata", "launch_metadata")
    if kernel is None or getattr(fn, "pre_run_hooks", None) or not all(hasattr(kernel, a) for a in needed) \
            or not hasattr(triton, "knobs"):
        return None
    import inspect

    tail = []
    for param in list(fn.signature.parameters.values())[n_positional:]:
        value = keywords.get(param.name, param.default)
        if value is inspect.Parameter.empty:
            return None
        tail.append(value)
    return kernel, tuple(tail)


def _operand_layout(spec: AttentionSpec, tensors, grads: bool = False) -> tuple:
    """Per operand (or gradient buffer), what its kernel arguments take from the tensor's layout:
    (read as bytes, the element offset its pointer starts at, its integer arguments). Raises
    ValueError for a wrong number of operands or dimensions."""
    ops = spec.grad_operands if grads else spec.operands
    if len(tensors) != len(ops):
        raise ValueError(f"spec {spec.text!r} reads {len(ops)} operands, got {len(tensors)}")
    layout = []
    for op, t in zip(ops, tensors):
        if t.dim() != len(op.index):
            raise ValueError(f"operand {op.name} of spec {spec.text!r} has {len(op.index)} dimensions, "
                             f"got a tensor of shape {tuple(t.shape)}")
        strides = t.stride()
        # A dimension read at q_idx + c starts c elements in: fold that into the pointer.
        start = sum(strides[d] * c for d, c in op.q_dims + op.kv_dims)
        ints = (*[strides[d] for d, _ in op.lead], sum(strides[d] for d, _ in op.q_dims),
                sum(strides[d] for d, _ in op.kv_dims))
        layout.append((t.dtype == torch.bool, start, ints))
    return tuple(layout)


def _operand_values(layout: tuple, tensors) -> tuple:
    """The kernel arguments of ``tensors`` laid out as ``layout`` says: pointer, the stride of each
    dimension a program's batch/head selects, then the summed strides of the dimensions indexed
    by q_idx and kv_idx."""
    if not layout:
        return ()
    args = []
    for (as_bytes, start, ints), t in zip(layout, tensors):
        if as_bytes:
            t = t.view(torch.uint8)  # Triton reads bool as bytes
        if start:
            t = t.as_strided((1,), (1,), t.storage_offset() + start)
        args.append(t)
        args += ints
    return tuple(args)


def _operand_args(spec: AttentionSpec, tensors, grads: bool = False) -> list:
    """Kernel arguments of the operands (or of their gradient buffers); see _operand_values."""
    return list(_operand_values(_operand_layout(spec, tensors, grads), tensors))


def _tma_allowed(device: torch.device) -> bool:
    """TMA tensor descriptors for the streamed tiles: FX_FLASH_TMA=1 turns them on (on Hopper and
    newer GPUs, and in the interpreter, where tests check that branch), anything else leaves them
    off. Off by default: on the H200 they measured 5% slower at d=64 and level at d=128
    (benchmarks/RESULTS.md)."""
    if os.environ.get("FX_FLASH_TMA", "0") != "1":
        return False
    return interpreting() or (device.type == "cuda" and device_profile(device).capability >= (9, 0))


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """A descriptor over each head's (rows, head dim) needs unit stride along the head dim and
    16-byte aligned heads and rows."""
    for t in tensors:
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * e) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _descriptor_scratch() -> None:
    """Descriptors built inside a kernel need global-memory scratch from Triton's allocator, a
    per-thread setting (autograd runs the backward on its own thread): install one where none is."""
    if interpreting():
        return
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return  # the user's (or Inductor's) allocator serves as well
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


def _with_tma(consts: dict, *streamed: torch.Tensor) -> dict:
    """``consts`` for a kernel that loads ``streamed`` tile by tile (K/V in the forward and dQ
    kernels, Q/dO in dK/dV): through TMA descriptors when allowed and the tensors permit."""
    use_tma = _tma_allowed(streamed[0].device) and _tma_compatible(*streamed)
    if use_tma:
        _descriptor_scratch()
    return {**consts, "USE_TMA": use_tma}


def _common(spec, q, k):
    z, h, n_q, d = q.shape
    n_kv = k.shape[2]
    d_pad = tiling.pad_head_dim(d)
    return dict(
        H=h, N_Q=n_q, N_KV=n_kv, N_Q_BUCKET=_bucket(n_q), N_KV_BUCKET=_bucket(n_kv),
        GROUP=h // k.shape[1], HEAD_DIM=d, HEAD_DIM_PAD=d_pad,
        CHECK_D=d != d_pad, CAUSAL=spec.tile_mode == "causal", DROPOUT=spec.dropout,
        SCORE_IN_LOG2=spec.score_in_log2, DQ_ATOMIC=atomic_dq(),
        INPUT_PRECISION=_input_precision(q.dtype), USE_TMA=False, RANGED=spec.tile_mode == "ranged",
    ), (z, h, n_q, n_kv)


def _forward_common(spec, q, k, scale: float):
    """_common's constants with the forward kernels' own: RAW_MAX, whether this call takes each
    tile's row max before the score's factor (the template's note on the row max)."""
    consts, sizes = _common(spec, q, k)
    return {**consts, "RAW_MAX": raw_max_applies(spec, scale)}, sizes


def _tile_tables(spec, operands, operand_args, q, k, axis: str):
    """The ``tables`` argument of a kernel of ``axis`` for a ranged spec
    (skipping.table_keywords), None for specs whose kernels read no table."""
    if spec.tile_mode == "ranged":
        return skipping.table_keywords(spec, operands, operand_args, q, k, axis)
    return None


def new_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Allocate a contiguous kernel output, by default of ``like``'s shape and dtype (every
    element is written by a kernel; tests poison these)."""
    if shape is None and dtype is None:  # empty_like parses no shape, device or dtype: ~1 µs less
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return torch.empty(like.shape if shape is None else shape, device=like.device, dtype=dtype or like.dtype)


def _contiguous_strides(shape) -> tuple:
    """The strides of ``torch.empty(shape)`` (what new_output returns), without allocating."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ---------------------------------------------------------------------------------------------
# Plans: what every call of one key repeats, derived once.

# The environment variables launches read (through the functions named after them above and in
# gluon_launch, tiling and device); a plan's key holds their values.
SWITCHES = ("TRITON_INTERPRET", "FX_FLASH_AUTOTUNE", "FX_FLASH_DQ", "FX_FLASH_TMA", "FX_FLASH_SPLIT_KV",
            "FX_FLASH_GLUON", "FX_FLASH_GLUON_BWD", "FX_FLASH_DIRECT_LAUNCH", "FX_FLASH_RAW_MAX")


def _switch_reader():
    """A function returning the values of SWITCHES now (None where unset), as os.environ.get would.

    Note (host time): os.environ.get costs ~1 µs per name (it encodes the name and decodes the
    value), nine of them a call. os.environ keeps its contents in the dict ``_data``, under
    ``encodekey(name)``, and every assignment, deletion and ``monkeypatch.setenv`` goes through
    it; reading that dict with the names encoded once sees the same values at a tenth of the
    cost (raw, not decoded: they only need to compare equal). Without that layout (another
    Python), the public path."""
    data, encodekey = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encodekey):
        keys = tuple(encodekey(name) for name in SWITCHES)
        return lambda: tuple(map(data.get, keys))
    return lambda: tuple(map(os.environ.get, SWITCHES))


switches = _switch_reader()


def _layout(t: Optional[torch.Tensor]):
    """What a launch specializes on in a tensor argument: shape, strides, dtype, alignment."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


def _settings() -> tuple:
    """The settings every plan key holds: the switches (environment), set_autotune, and
    torch.use_deterministic_algorithms (which keeps the Gluon backward off)."""
    return switches(), autotune.setting(), torch.are_deterministic_algorithms_enabled()


def _plan_key(spec: AttentionSpec, q: torch.Tensor, dropout_p: float, scale: float, tensors) -> tuple:
    """Everything a plan derives from, beyond what stays fixed in a process: the spec; each
    tensor's layout; q's device; the floats; the switches (environment, set_autotune, TF32 for
    fp32 inputs, torch.use_deterministic_algorithms). Module constants (SPLIT_MIN_KEYS, ...) and
    monkeypatched functions are not in it: change those, then ``clear_plans()``."""
    return (spec.text, *_settings(), q.get_device(),
            q.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32, dropout_p, scale,
            *map(_layout, tensors))


_FORWARDS: dict = {}  # plan key → _Forward
_BACKWARDS: dict = {}  # plan key → _Backward or _GluonBackward
MAX_PLANS = 4096  # per direction: one per shape, so a dynamic workload's memory stays bounded


def clear_plans() -> None:
    """Forget every plan (the next call of each key builds it again)."""
    _FORWARDS.clear()
    _BACKWARDS.clear()


def _remember(plans: dict, key: tuple, plan) -> None:
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = plan


def _direct(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and not interpreting() and direct_launch()


class _Kernel:
    """One launch of a plan: kernel ``name`` of the spec's module, its constexpr keywords and its
    grid as a function of the tile. The first launch takes the configuration (``_chosen``, or
    ``chosen`` when fixed); once that is final and the compiled kernel bound, later launches call
    its launcher directly, with the argument tail bound once.

    ``tables``: whether the kernel reads tile tables after its positional arguments (a ranged
    spec's, given per call; the never-read placeholders of skipping.unranged otherwise).
    """

    def __init__(self, spec: AttentionSpec, name: str, kernel: Optional[str], grid, kwargs: dict, *,
                 direct: bool, tables: bool = False, rows: int = 0, chosen: Optional[Launch] = None):
        self.spec, self.name, self.kernel, self.grid, self.kwargs = spec, name, kernel, grid, kwargs
        self.direct, self.reads_tables, self.rows = direct, tables, rows
        self.tma = bool(kwargs.get("USE_TMA"))
        self.chosen, self.final = chosen, chosen is not None
        self.size = self.grid3 = None
        if chosen is not None:
            self.size = grid(chosen.meta)
            self.grid3 = _grid3(self.size)
        self.bound = None  # (compiled kernel, argument tail, device)

    def __call__(self, q: torch.Tensor, args: tuple, tables=None, reset=()) -> None:
        """Launch on the positional arguments ``args``; ``tables`` is a ranged spec's function of
        the meta giving its tile tables (None otherwise); ``reset`` as for _chosen."""
        if self.tma:
            _descriptor_scratch()  # a per-thread setting: the backward runs on autograd's thread
        if tables is None and self.bound is not None and _run_if_bound(
                self.bound, self.size, self.grid3, (*args, *skipping.unranged(q).values()) if self.reads_tables else args):
            return
        if self.chosen is None:
            options = tables
            if options is None and self.reads_tables:
                options = lambda meta: skipping.unranged(q)  # noqa: E731
            self.chosen, self.final = _chosen(self.spec, self.name, self.kernel, self.grid, q, args, self.kwargs,
                                              reset, self.rows, options)
            self.size = self.grid(self.chosen.meta)
            self.grid3 = _grid3(self.size)
        if self.reads_tables:
            args = (*args, *(skipping.unranged(q) if tables is None else tables(self.chosen.meta)).values())
        found = _launch(self.chosen, self.grid, args, self.kwargs, self.direct)
        # A ranged spec's tables are new tensors per call: those launches keep _launch's check.
        if found is not None and tables is None and self.final:
            self.bound = (*found, _driver().get_current_device())


def _fixed(spec: AttentionSpec, name: str, block_m: int) -> Launch:
    """The Launch of a helper kernel that runs one tile (the split merge, Delta)."""
    return Launch(getattr(loader.load(spec), name), None, {"BLOCK_M": block_m})


def attention_forward(q, k, v, operands, seed, dropout_p: float, scale: float, spec: AttentionSpec):
    """Run the forward kernel. Returns (out (Z, H, N_Q, d) in q's dtype, lse (Z, H, N_Q) fp32).

    ``operands`` are the tensors ``spec`` reads, in its order; ``seed`` an int64 tensor of one
    element when the spec drops out.
    """
    return planned_forward(q, k, v, operands, seed, dropout_p, scale, spec)[:2]


def planned_forward(q, k, v, operands, seed, dropout_p: float, scale: float, spec: AttentionSpec):
    """attention_forward's (out, lse) and the call's plan, through which its backward may be run
    (``_Plan.backward``); None where no plan is kept (empty sizes, a configuration not
    final yet)."""
    key = _plan_key(spec, q, dropout_p, scale, (q, k, v, seed, *operands))
    plan = _FORWARDS.get(key)
    if plan is not None:
        return (*plan(q, k, v, operands, seed), plan)
    consts, (z, h, n_q, n_kv) = _forward_common(spec, q, k, scale)
    consts = _with_tma(consts, k, v)
    out = new_output(q)
    lse = new_output(q, (z, h, n_q), torch.float32)
    _operand_layout(spec, operands)  # raises for operands the spec does not read
    if out.numel() == 0:
        return out, lse.fill_(float("-inf")), None
    if n_kv == 0:
        return out.zero_(), lse.fill_(float("-inf")), None
    splits, rows = decode_plan(q, k)
    plan = None
    if not splits:
        from fx_flash.codegen import gluon_launch  # the sm90 Gluon forward (on unless FX_FLASH_GLUON=0)
        routed = gluon_launch.routed_forward(spec, q, k, v, scale) if gluon_launch.enabled() else None
        if routed is not None:
            plan = _GluonForward(routed, q, dropout_p, scale, _direct(q))
    if plan is None:
        plan = _Forward(spec, q, k, v, operands, dropout_p, scale, consts, splits, rows, _direct(q))
    plan.run(q, k, v, out, lse, operands, seed)
    if not plan.final:
        return out, lse, None
    _remember(_FORWARDS, key, plan)
    return out, lse, plan


class _Plan:
    """What every forward plan does with its key: allocate the outputs, run, and find the backward
    plans of the calls it ran (``backward``). Subclasses define ``run`` and ``final``."""

    def __init__(self, q, dropout_p, scale):
        self.lse_shape = q.shape[:3]
        self.dropout_p, self.scale = dropout_p, scale
        self.tf32 = q.dtype is torch.float32  # the key reads allow_tf32 for fp32 inputs
        self.backwards = {}  # backward key → _Backward or _GluonBackward, for the backwards of this plan's calls

    def __call__(self, q, k, v, operands, seed):
        out = new_output(q)
        lse = new_output(q, self.lse_shape, torch.float32)
        self.run(q, k, v, out, lse, operands, seed)
        return out, lse

    def backward(self, spec_text: str, dout, q, k, v, out, lse, operands, seed):
        """attention_backward of a call this plan ran forward, on its saved tensors. Only dO and the
        settings can differ from what this plan's key fixed (q, k, v, operands and seed are the
        forward's tensors; out and lse its outputs), so the backward plan is found by those alone,
        without the full key's layouts of eight tensors."""
        key = (spec_text, *_settings(), self.tf32 and torch.backends.cuda.matmul.allow_tf32, _layout(dout))
        plan = self.backwards.get(key)
        if plan is not None:
            return plan(dout, q, k, v, out, lse, operands, seed)
        grads, plan = planned_backward(dout, q, k, v, out, lse, operands, seed, self.dropout_p, self.scale,
                                       spec_from_text(spec_text))
        if plan is not None:
            _remember(self.backwards, key, plan)
        return grads


class _GluonKernel:
    """One kernel of a Gluon plan, its grid fixed by the key: launched through ``JITFunction.run``
    the first time, then (direct launches) through the launcher bound then, as _Kernel does."""

    def __init__(self, fn, grid: tuple, constexprs: dict, direct: bool):
        self.fn, self.grid, self.constexprs, self.direct = fn, grid, constexprs, direct
        self.grid3 = _grid3(grid)
        self.bound = None  # (compiled kernel, argument tail, device)

    def __call__(self, args: tuple) -> None:
        if _run_if_bound(self.bound, self.grid, self.grid3, args):
            return
        kernel = self.fn[self.grid](*args, **self.constexprs)
        if self.direct and self.bound is None:
            found = _bind(self.fn, kernel, len(args), self.constexprs)
            if found is not None:
                self.bound = (*found, _driver().get_current_device())


class _GluonForward(_Plan):
    """The plan of a forward key the Gluon sm90 kernel takes (gluon_launch.routed_forward, decided
    once per key): per call, the three TMA descriptors (they hold the data pointers) and a launch."""

    final = True

    def __init__(self, routed, q, dropout_p, scale, direct):
        super().__init__(q, dropout_p, scale)
        self.routed = routed
        self.kernel = _GluonKernel(routed.fn, routed.grid, routed.constexprs, direct)

    def run(self, q, k, v, out, lse, operands, seed) -> None:
        self.kernel((*self.routed.descriptors(q, k, v), self.routed.output(out), lse, *self.routed.post))


class _GluonBackward:
    """The plan of a backward key the Gluon sm90 backward takes (gluon_launch.routed_backward,
    decided once per key): per call, its buffers, the Delta kernel, the main kernel's five TMA
    descriptors and its launch, then dQ finished."""

    final = True

    def __init__(self, routed, scale: float, direct: bool):
        self.routed, self.scale = routed, scale
        self.prep = _GluonKernel(routed.prep, routed.prep_grid, routed.prep_constexprs, direct)
        self.main = _GluonKernel(routed.fn, routed.grid, routed.constexprs, direct)

    def __call__(self, dout, q, k, v, out, lse, operands, seed):
        routed = self.routed
        delta, dq_acc, dk, dv = routed.buffers(q, k, v)
        self.prep(routed.prep_args(out, dout, delta, dq_acc))
        self.main(routed.args(dout, q, k, v, lse, self.scale, delta, dq_acc, dk, dv))
        return routed.finish(dq_acc, q), dk, dv, []


class _Forward(_Plan):
    """The plan of a forward key: output shapes, the operands' argument layout, and its kernels
    with the arguments the key fixes (the floats and every stride)."""

    def __init__(self, spec, q, k, v, operands, dropout_p, scale, consts, splits, rows, direct):
        super().__init__(q, dropout_p, scale)
        z, h, n_q, d = q.shape
        self.spec, self.splits = spec, splits
        self.ranged = spec.tile_mode == "ranged"
        self.operands = _operand_layout(spec, operands)
        out_strides = _contiguous_strides(q.shape)
        if not splits:
            self.kernels = (_Kernel(spec, "_attn_fwd", "fwd", lambda meta: (_cdiv(n_q, meta["BLOCK_M"]), z * h),
                                    consts, direct=direct, tables=True),)
            self.post = (scale, dropout_p, *q.stride(), *k.stride(), *v.stride(), *out_strides)
            return
        # Split-KV: fp32 partials in the (split, z·h, query) order, every element written by a
        # split; the split kernel reads no tile table: it checks the predicate on every tile unless
        # the spec is causal, whose keys past the last query it skips. Then their merge.
        d_pad = consts["HEAD_DIM_PAD"]
        self.part_shapes = ((splits, z * h, n_q, d_pad), (splits, z * h, n_q), (splits, z * h, n_q))
        grid = (_cdiv(consts["GROUP"] * n_q, rows), z * k.shape[1], splits)
        merge_grid = (_cdiv(n_q, COMBINE_BLOCK_M), z * h)
        self.kernels = (
            _Kernel(spec, "_attn_fwd_split", "fwd_split", lambda meta: grid,
                    {"NUM_SPLITS": splits, **consts, "CAUSAL": spec.causal}, direct=direct, rows=rows),
            _Kernel(spec, "_attn_fwd_combine", None, lambda meta: merge_grid,
                    {"HEAD_DIM": d, "HEAD_DIM_PAD": d_pad, "SPLITS_PAD": _bucket(splits)}, direct=direct,
                    chosen=_fixed(spec, "_attn_fwd_combine", COMBINE_BLOCK_M)))
        self.post = (scale, dropout_p, *q.stride(), *k.stride(), *v.stride())
        self.merge_post = (*out_strides, h, n_q, splits, z * h)

    @property
    def final(self) -> bool:
        """Whether every kernel's configuration may be kept (see _choose)."""
        return all(kernel.final for kernel in self.kernels)

    def run(self, q, k, v, out, lse, operands, seed) -> None:
        operand_args = _operand_values(self.operands, operands)
        seed_arg = q if seed is None else seed  # never read unless the spec drops out
        if not self.splits:
            tables = _tile_tables(self.spec, operands, operand_args, q, k, "q") if self.ranged else None
            self.kernels[0](q, (q, k, v, out, lse, *operand_args, seed_arg, *self.post), tables)
            return
        parts = [new_output(q, shape, torch.float32) for shape in self.part_shapes]
        split, merge = self.kernels
        split(q, (q, k, v, *parts, *operand_args, seed_arg, *self.post))
        merge(q, (*parts, out, lse, *self.merge_post))


# Split-KV decoding (FlashDecoding): with few query rows the forward's grid of
# cdiv(N_Q, BLOCK_M)·Z·H programs leaves most SMs idle while each program streams all N_KV keys.
# The split kernel packs the GROUP query heads of one K/V head into its rows and splits the keys
# across programs; a second kernel merges the partial outputs by their logsumexps.
DECODE_MAX_QUERIES = 16  # query rows per head up to which the split-KV path is considered
SPLIT_MIN_KEYS = 256  # fewest keys a split streams: below that the merge costs more than it saves
MAX_SPLITS = 128
SPLIT_WAVES = 2  # aim for this many programs per SM
COMBINE_BLOCK_M = 16  # query rows per program of the merge


def decode_plan(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    """(number of key splits, rows per tile) for the split-KV forward; (0, 0) for the plain one.

    Used when there are at most DECODE_MAX_QUERIES queries and either the keys can be split
    across more programs or GQA rows can be packed (K/V read once per group); FX_FLASH_SPLIT_KV=0
    turns it off.
    """
    z, h, n_q, _ = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    if n_q > DECODE_MAX_QUERIES or n_kv == 0 or os.environ.get("FX_FLASH_SPLIT_KV", "1") == "0":
        return 0, 0
    group = h // h_kv
    rows = min(64, max(tiling.MIN_BLOCK, _bucket(group * n_q)))
    programs = triton.cdiv(group * n_q, rows) * z * h_kv
    sms = device_profile(q.device).multiprocessors
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n_kv, SPLIT_MIN_KEYS), triton.cdiv(SPLIT_WAVES * sms, programs)))
    if splits == 1 and group == 1:
        return 0, 0
    return splits, rows


def attention_backward(dout, q, k, v, out, lse, operands, seed, dropout_p: float, scale: float,
                       spec: AttentionSpec):
    """Run the backward kernels. Returns (dq, dk, dv, operand grads): the grads are one per
    operand the spec marks ``grad``, in its order, each in its operand's shape and dtype."""
    return planned_backward(dout, q, k, v, out, lse, operands, seed, dropout_p, scale, spec)[0]


def planned_backward(dout, q, k, v, out, lse, operands, seed, dropout_p: float, scale: float, spec: AttentionSpec):
    """attention_backward's gradients and the call's plan (None where none is kept)."""
    key = _plan_key(spec, q, dropout_p, scale, (dout, q, k, v, out, lse, seed, *operands))
    plan = _BACKWARDS.get(key)
    if plan is not None:
        return plan(dout, q, k, v, out, lse, operands, seed), plan
    grad_of = [t for op, t in zip(spec.operands, operands) if op.grad]
    if q.numel() == 0 or k.numel() == 0:
        dq, dk, dv = new_output(q), new_output(k), new_output(v)
        return (dq.zero_(), dk.zero_(), dv.zero_(), [torch.zeros(t.shape, device=q.device, dtype=t.dtype)
                                                     for t in grad_of]), None
    from fx_flash.codegen import gluon_launch  # the sm90 Gluon backward (FX_FLASH_GLUON_BWD=0 turns it off)
    routed = gluon_launch.routed_backward(spec, dout, q, k, v, lse)
    if routed is not None:
        plan = _GluonBackward(routed, scale, _direct(q))
        _remember(_BACKWARDS, key, plan)
        return plan(dout, q, k, v, out, lse, operands, seed), plan
    consts, _ = _common(spec, q, k)
    plan = _Backward(spec, dout, q, k, v, out, operands, grad_of, dropout_p, scale, consts, _direct(q))
    grads = plan(dout, q, k, v, out, lse, operands, seed)
    if not plan.final:
        return grads, None
    _remember(_BACKWARDS, key, plan)
    return grads, plan


class _Backward:
    """The plan of a backward key.

    Separate dQ (default): a dQ kernel, run first, recomputes the scores, sums deterministically
    and writes Delta for the dK/dV kernel. Atomic dQ (FX_FLASH_DQ=atomic): a small kernel writes
    Delta, then the dK/dV kernel adds each key tile's share of dQ into an fp32 buffer (one pass).
    Operand gradients are fp32 buffers summed into by atomics (several programs add into one
    element), cast to the operand's dtype at the end.
    """

    def __init__(self, spec, dout, q, k, v, out, operands, grad_of, dropout_p, scale, consts, direct):
        z, h, n_q, _ = q.shape
        n_kv = k.shape[2]
        self.spec, self.lse_shape = spec, (z, h, n_q)
        self.ranged = spec.tile_mode == "ranged"
        self.atomic = consts["DQ_ATOMIC"]
        self.operands = _operand_layout(spec, operands)
        self.grad_shapes = [t.shape for t in grad_of]
        self.grad_dtypes = [t.dtype for t in grad_of]
        self.grads = _operand_layout(spec, [torch.empty(s, device="meta") for s in self.grad_shapes], grads=True)
        dq, dk, dv = (_contiguous_strides(t.shape) for t in (q, k, v))
        if self.atomic:
            self.first = _Kernel(spec, "_attn_bwd_delta", None, lambda meta: (_cdiv(n_q, DELTA_BLOCK_M), z * h),
                                 {"HEAD_DIM": consts["HEAD_DIM"], "HEAD_DIM_PAD": consts["HEAD_DIM_PAD"]},
                                 direct=direct, chosen=_fixed(spec, "_attn_bwd_delta", DELTA_BLOCK_M))
            self.first_post = (*out.stride(), *dout.stride(), h, n_q)
        else:
            self.first = _Kernel(spec, "_attn_bwd_dq", "bwd_dq", lambda meta: (_cdiv(n_q, meta["BLOCK_M"]), z * h),
                                 _with_tma(consts, k, v), direct=direct, tables=True)
            self.first_post = (scale, dropout_p, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(),
                               *dq)
        self.dkdv = _Kernel(spec, "_attn_bwd_dkdv", "bwd_dkdv", lambda meta: (_cdiv(n_kv, meta["BLOCK_N"]), z * k.shape[1]),
                            _with_tma(consts, q, dout),
                            direct=direct, tables=True)
        self.dkdv_post = (scale, dropout_p, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk, *dv,
                          *(dq if self.atomic else (0, 0, 0, 0)))

    @property
    def final(self) -> bool:
        return self.first.final and self.dkdv.final

    def __call__(self, dout, q, k, v, out, lse, operands, seed):
        dq, dk, dv = new_output(q), new_output(k), new_output(v)
        dgrads = [torch.zeros(shape, device=q.device, dtype=torch.float32) for shape in self.grad_shapes]
        delta = new_output(q, self.lse_shape, torch.float32)
        operand_args = _operand_values(self.operands, operands)
        grad_args = _operand_values(self.grads, dgrads)
        seed_arg = q if seed is None else seed
        tables_q = tables_kv = None
        if self.ranged:
            tables_q = _tile_tables(self.spec, operands, operand_args, q, k, "q")
            tables_kv = _tile_tables(self.spec, operands, operand_args, q, k, "kv")
        dq_acc = None
        if self.atomic:
            dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            self.first(q, (out, dout, delta, *self.first_post))
        else:
            self.first(q, (q, k, v, out, dout, dq, lse, delta, *operand_args, seed_arg, *self.first_post), tables_q)
        self.dkdv(q, (q, k, v, dout, dk, dv, q if dq_acc is None else dq_acc, lse, delta, *operand_args, *grad_args,
                      seed_arg, *self.dkdv_post),
                  tables_kv, reset=[*dgrads, *([] if dq_acc is None else [dq_acc])])
        if dq_acc is not None:
            dq = dq_acc.to(q.dtype)
        return dq, dk, dv, [g.to(dtype) for g, dtype in zip(dgrads, self.grad_dtypes)]


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """Test-only: the (Z, H, N_Q, N_KV) bool mask of kept weights the kernels draw for ``seed``."""
    z, h, n_q, n_kv = shape
    keep = torch.empty(shape, dtype=torch.bool, device=seed.device)
    if keep.numel() == 0:
        return keep
    fn = loader.load(sdpa_spec(dropout=True))._dropout_mask
    fn[(triton.cdiv(n_q, 32), z * h)](seed, keep.view(torch.uint8), dropout_p, *keep.stride(), h, n_q, n_kv,
                                      BLOCK_M=32, BLOCK_N=32)
    return keep
