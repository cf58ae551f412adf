"""Launching the Gluon sm90 forward (``gluon.py``): when it applies, its tile from shared memory M,
the TMA descriptors, the cached module.

Off unless ``FX_FLASH_GLUON=1``; then ``launch.attention_forward`` offers each forward here first,
and every call this kernel cannot compute exactly (another GPU, the interpreter, fp32, head dims
other than 64 and 128, tensor operands, dropout, layouts a row-matrix descriptor cannot address,
key lengths that are not a multiple of the key tile), or that it was not measured faster on
(``not_routed``: head dim 64), runs the portable kernels instead. The reason is logged on
the ``fx_flash`` logger at debug level. What is routed runs ``routed_kind``: the warp-specialized
kernel (a TMA producer and two consumer warpgroups), persistent for causal specs, the fastest of
the kinds timed on the H200 (benchmarks/RESULTS.md, Hopper); the others (one partition;
ping-pong, hold, early rescale) are reached through ``launch`` with their ``GluonConfig``
(benchmarks/gluon_check.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
import triton

from fx_flash.codegen.gluon import mask_kind, render_gluon, unsupported
from fx_flash.codegen.loader import cache_dir, write_atomically
from fx_flash.codegen.spec import AttentionSpec
from fx_flash.device import DeviceProfile, device_profile, interpreting

log = logging.getLogger("fx_flash")

HEAD_DIMS = (64, 128)  # one wgmma instruction's N covers the head dim; larger ones need splitting
# What FX_FLASH_GLUON=1 routes here: the head dims and dtypes where the kernel was checked on the
# H200 and measured at least as fast as the tuned portable forward (benchmarks/RESULTS.md).
ROUTED_HEAD_DIMS = (128,)
ROUTED_DTYPES = (torch.bfloat16, torch.float16)
ROUTED_KIND = dict(ws=True)  # GluonConfig flags of the routed kernel (routed_kind adds persistence)
BLOCK_M = 128  # two warpgroups of 64 query rows each
NUM_WARPS = 8
MAX_STAGES = 4
BARRIER_BYTES = 8
# Shared memory Triton uses to hand a warp-specialized region's captured values (pointers,
# strides, offsets) to its partitions: 216 bytes compiled for this kernel (triton 3.6 and 3.9),
# reserved with room to spare.
WS_CAPTURE_BYTES = 512
# K/V bytes of the heads in one section of the persistent kernel's causal order (FlashAttention-3's
# tile scheduler sizes its sections to 32 MiB of K and V, in the H100's and H200's 50 MB of L2):
# without sections, at N = 2k its programs in flight read 128 heads' K/V, each once.
L2_SECTION_BYTES = 32 * 1024 * 1024


def enabled() -> bool:
    """FX_FLASH_GLUON=1 routes the forwards this kernel supports to it (off by default)."""
    return os.environ.get("FX_FLASH_GLUON", "0") == "1"


@dataclass(frozen=True)
class GluonConfig:
    """A tile of the Gluon forward: BLOCK_M query rows per program, BLOCK_N keys per tile, STAGES
    K/V buffers; ``ws``: the warp-specialized kernel (a producer and two consumer warpgroups of
    BLOCK_M / 2 rows each) instead of one partition of two warpgroups that loads for itself."""

    BLOCK_M: int
    BLOCK_N: int
    STAGES: int
    ws: bool = False
    pingpong: bool = False  # ws only: the consumers take turns issuing their products
    early: bool = False  # rescale the accumulator while q·kᵀ runs, not after p·v
    hold: bool = False  # ws only: keep each consumer's softmax between its q·kᵀ and p·v waits (gluon._hold)
    # ws only: one program per SM walking output tiles, the next tile's loads under this one's epilogue
    persistent: bool = False
    # persistent causal only: longest tiles first across all heads, not within sections of heads
    # whose K/V fit L2_SECTION_BYTES (gluon._output_tile)
    one_section: bool = False

    def __post_init__(self):
        if self.persistent and (not self.ws or self.pingpong):
            raise ValueError("the persistent kernel is warp-specialized, without ping-pong")
        if self.one_section and not self.persistent:
            raise ValueError("one_section orders the persistent kernel's tiles")

    @property
    def num_warps(self) -> int:
        """Warps of the kernel's default partition (the producer when ``ws``)."""
        return 4 if self.ws else NUM_WARPS

    @property
    def rows_per_consumer(self) -> int:
        return self.BLOCK_M // 2 if self.ws else self.BLOCK_M

    def __str__(self) -> str:
        flags = [name for name, on in (("ws", self.ws), ("pingpong", self.pingpong), ("early", self.early),
                                       ("hold", self.hold), ("persistent", self.persistent),
                                       ("one_section", self.one_section)) if on]
        return " ".join([f"BLOCK_M={self.BLOCK_M} BLOCK_N={self.BLOCK_N} stages={self.STAGES}"] + flags)


def footprint(block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int, ws: bool = False) -> int:
    """Shared-memory bytes of one program: the Q tile(s) of its block_m rows, ``stages`` K and V
    tiles, and the mbarriers (Triton aligns each array of them to 16 bytes): Q's, and a ready one
    per K and V buffer, plus an empty one per buffer and WS_CAPTURE_BYTES for the values handed to
    the partitions when ``ws`` (with two more barriers: the ping-pong's turns, allocated whether or
    not it is on, or the persistent kernel's Q empty barriers in their place). P and the softmax
    stay in registers, so this is the whole of it: tests compare it with the compiled kernels'
    own counts."""
    ring = -(-BARRIER_BYTES * stages // 16) * 16
    tiles = elem_bytes * (block_m * head_dim + 2 * stages * block_n * head_dim)
    if ws:
        return tiles + 2 * 2 * BARRIER_BYTES + 4 * ring + WS_CAPTURE_BYTES
    return tiles + BARRIER_BYTES + 2 * ring


def default_config(device: DeviceProfile, head_dim: int, elem_bytes: int, ws: bool = False,
                   **flags) -> Optional[GluonConfig]:
    """The tile for ``head_dim``: BLOCK_M = 128 rows, key tiles of 128 (64 when 128 does not fit
    two stages), and the deepest ring (at most MAX_STAGES) whose footprint fits M. None if none
    fits. ``flags``: the other GluonConfig fields (pingpong, early, hold, persistent, one_section)."""
    for block_n in (128, 64):
        fitting = [s for s in range(2, MAX_STAGES + 1)
                   if footprint(BLOCK_M, block_n, head_dim, elem_bytes, s, ws) <= device.shared_memory]
        if fitting:
            return GluonConfig(BLOCK_M, block_n, max(fitting), ws, **flags)
    return None


def row_matrix(t: torch.Tensor) -> bool:
    """Whether (Z, H, N, d) ``t`` is one (Z·H·N, d) matrix of 16-byte aligned rows, the layout the
    kernel's descriptors address (contiguous tensors, and views with padded rows)."""
    z, h, n, d = t.shape
    sz, sh, sn, sd = t.stride()
    e = t.element_size()
    return (sd == 1 and sn >= d and (h == 1 or sh == n * sn) and (z == 1 or sz == h * n * sn)
            and (sn * e) % 16 == 0 and t.data_ptr() % 16 == 0)


def unsupported_call(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     config: Optional[GluonConfig]) -> Optional[str]:
    """Why this forward call cannot run the Gluon kernel, or None when it can."""
    if interpreting() or q.device.type != "cuda":
        return "not on a CUDA device"
    if device_profile(q.device).capability != (9, 0):
        return f"capability {device_profile(q.device).capability} is not sm_90 (wgmma)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if config is None:
        return "no tile fits the device's shared memory"
    if k.shape[2] % config.BLOCK_N:
        return f"N_KV = {k.shape[2]} is not a multiple of BLOCK_N = {config.BLOCK_N}"
    if not all(row_matrix(t) for t in (q, k, v)):
        return "q, k or v is not a (Z·H·N, d) row matrix"
    return unsupported(spec)


_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def load(spec: AttentionSpec) -> ModuleType:
    """The imported Gluon module of ``spec`` (written next to the portable kernels' sources)."""
    with _lock:
        module = _modules.get(spec.key)
        if module is None:
            source = render_gluon(spec)
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            path = cache_dir() / f"fx_flash_gluon_{spec.key}_{digest}.py"
            if not path.exists():
                write_atomically(path, source)
            found = importlib.util.spec_from_file_location(f"fx_flash_gluon_{spec.key}", path)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
            _modules[spec.key] = module
        return module


def _descriptor(t: torch.Tensor, block_rows: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    z, h, n, d = t.shape
    block = [block_rows, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(t, [z * h * n, d], [t.stride(2), 1], block, layout)


def heads_per_section(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, config: GluonConfig) -> int:
    """Query heads per section of the persistent kernel's order (gluon._output_tile): causal, as
    many as share L2_SECTION_BYTES of K/V (a K/V head serves the H_Q / H_KV query heads next to
    it); otherwise, or with ``one_section``, all of them (the other orders keep a head's query
    tiles together)."""
    z, h = q.shape[:2]
    if mask_kind(spec) != 1 or config.one_section:
        return z * h
    kv_head_bytes = 2 * k.shape[2] * k.shape[3] * k.element_size()
    return min(z * h, max(1, L2_SECTION_BYTES // kv_head_bytes) * (h // k.shape[1]))


def launch(spec: AttentionSpec, q, k, v, out, lse, scale: float, config: GluonConfig,
           programs: Optional[int] = None, section: Optional[int] = None) -> None:
    """Run the kernel into ``out`` (Z, H, N_Q, d) and ``lse`` (Z, H, N_Q) fp32 with tile ``config``
    (the caller has checked ``unsupported_call``). ``programs``, ``section``: the persistent
    kernel's grid and heads per section of its causal order, by default one program per SM and
    heads_per_section; checks set fewer of both, so that each program walks many output tiles and
    the order has several sections."""
    z, h, n_q, d = q.shape
    module = load(spec)
    rows = config.rows_per_consumer
    descriptors = (_descriptor(q, rows), _descriptor(k, config.BLOCK_N), _descriptor(v, config.BLOCK_N))
    constexprs = dict(GROUP=h // k.shape[1], HEAD_DIM=d, BLOCK_M=rows, BLOCK_N=config.BLOCK_N, STAGES=config.STAGES,
                      NUM_WARPS=config.num_warps, PINGPONG=config.pingpong, EARLY=config.early,
                      HOLD=config.hold, num_warps=config.num_warps)
    if config.persistent:
        q_tiles = triton.cdiv(n_q, config.BLOCK_M)  # of a head
        programs = min(q_tiles * z * h, programs or device_profile(q.device).multiprocessors)
        section = section or heads_per_section(spec, q, k, config)
        section_rounds = triton.cdiv(section * q_tiles, programs)
        module._attn_fwd_sm90_wsp[(programs, )](*descriptors, out, lse, scale, *out.stride(), z, h, n_q, k.shape[2],
                                                q_tiles, section, section_rounds,
                                                triton.cdiv(z * h, section) * section_rounds, **constexprs)
        return
    fn = module._attn_fwd_sm90_ws if config.ws else module._attn_fwd_sm90
    grid = (triton.cdiv(n_q, config.BLOCK_M), z * h)
    fn[grid](*descriptors, out, lse, scale, *out.stride(), h, n_q, k.shape[2], **constexprs)


def not_routed(q: torch.Tensor) -> Optional[str]:
    """Why a call the kernel could compute still runs the portable forward: where the H200 runs
    measured it slower (head dim 64). ROUTED_DTYPES keeps the door for a dtype the kernel takes
    but that was never run on a GPU (both it takes were)."""
    if q.shape[-1] not in ROUTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the portable forward measured faster on the H200 (benchmarks/RESULTS.md)"
    if q.dtype not in ROUTED_DTYPES:
        return f"{q.dtype}: not yet checked on a GPU"
    return None


def routed_kind(spec: AttentionSpec) -> dict:
    """GluonConfig flags of the kernel ``spec`` is routed to: ROUTED_KIND, persistent for causal
    specs (measured on the H200 at d = 128: 406 against 359 TFLOP/s at N = 2k, 515 against 497 at
    8k; without a mask the persistent kernel was 1% slower at 8k at the same tile, so not there)."""
    return {**ROUTED_KIND, "persistent": spec.tile_mode == "causal"}


def forward(spec: AttentionSpec, q, k, v, out, lse, scale: float) -> bool:
    """Compute the forward into ``out``/``lse`` with the routed Gluon kernel (``routed_kind``) if it
    applies; False (nothing written) when the portable kernels must run instead."""
    config = None
    if q.is_cuda:
        config = default_config(device_profile(q.device), q.shape[-1], q.element_size(), **routed_kind(spec))
    reason = unsupported_call(spec, q, k, v, config) or not_routed(q)
    if reason:
        log.debug("gluon forward not used for %s: %s", spec.describe(), reason)
        return False
    launch(spec, q, k, v, out, lse, scale, config)
    return True
