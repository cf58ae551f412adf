"""Block sizes from the device's shared memory M, as the FlashAttention paper derives them.

Algorithm 1 of FlashAttention (Dao et al., 2022) sets B_c = ⌈M / 4d⌉ and B_r = min(B_c, d),
with M counted in elements. Those are the paper's sizes for an abstract SRAM; a Triton kernel
holds specific tiles in shared memory, so each kernel here has a footprint model (bytes, as a
sympy expression of the tile sizes, head dim, element size and pipeline stages), and every
candidate configuration is fitted so that its footprint is at most M. Without tuning (the
default) each launch runs ``default_config``: the rule below, from M and the launch's occupancy;
the tuner (``autotune.choose``, on request) times it against the other candidates.

Footprints (e = element bytes, d = head dim padded to a power of two, s = pipeline stages):
    forward   Q tile resident, K and V tiles per stage:                 e(B_r d + 2 s B_c d) + 4 t B_r B_c
    dK/dV     K and V resident, Q and dO per stage, P and dS staged:    e(2 B_c d + 2 s B_r d + 2 B_r B_c)
    dQ        Q and dO resident, K and V per stage, dS staged:          e(2 B_r d + 2 s B_c d + B_r B_c)
The forward's P stays in registers (the compiled sm_90 and sm_80 kernels hold exactly Q and the
K/V stages: tests/portable_sm90.py); t = 1 when the spec reads an operand tile along both q_idx and
kv_idx (a bias or mask tensor), which the compiler converts to the scores' layout through one
fp32 (B_r, B_c) buffer of shared memory, t = 0 otherwise.
Register pressure is the other limit: the fp32 accumulators (B_r·d in the forward, 2·B_c·d in
dK/dV) live in registers, spread over 32·warps threads; each thread may give them at most
ACCUMULATOR_REGISTERS of its 255 registers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy

from fx_flash.device import DeviceProfile

B_R, B_C, D, E = sympy.symbols("B_r B_c d e", positive=True, integer=True)
S = sympy.Symbol("s")  # unrestricted, so solving for it also reports "no stage fits" (s < 1)
T = sympy.Symbol("t", nonnegative=True, integer=True)  # 1: the forward stages an operand's score tile

FOOTPRINT = {
    "fwd": E * (B_R * D + 2 * S * B_C * D) + 4 * T * B_R * B_C,
    "bwd_dkdv": E * (2 * B_C * D + 2 * S * B_R * D + 2 * B_R * B_C),
    "bwd_dq": E * (2 * B_R * D + 2 * S * B_C * D + B_R * B_C),
}
FOOTPRINT["fwd_split"] = FOOTPRINT["fwd"]  # split-KV decoding holds the forward's tiles
# The tile dimension each kernel keeps resident (its "rows") and the one it streams.
RESIDENT_AXIS = {"fwd": "m", "fwd_split": "m", "bwd_dkdv": "n", "bwd_dq": "m"}

MIN_BLOCK = 16  # tl.dot needs every dimension ≥ 16
ACCUMULATOR_REGISTERS = 128  # fp32 accumulator registers per thread, of the 255 a thread may use
STAGES = (1, 2, 3, 4)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_CANDIDATES = 8


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: BLOCK_M rows of queries, BLOCK_N keys, warps and stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"BLOCK_M={self.BLOCK_M} BLOCK_N={self.BLOCK_N} warps={self.num_warps} stages={self.num_stages}"


def _pow2_floor(x: float) -> int:
    return 1 << int(math.floor(math.log2(max(x, 1))))


def pad_head_dim(head_dim: int) -> int:
    """The head dim the kernel computes with: the next power of two, at least MIN_BLOCK."""
    return max(MIN_BLOCK, 1 << (head_dim - 1).bit_length())


def paper_blocks(shared_memory: int, head_dim: int, elem_bytes: int) -> tuple[int, int]:
    """(B_r, B_c) of FlashAttention's Algorithm 1, with M = shared_memory / elem_bytes elements."""
    m_elems = shared_memory // elem_bytes
    b_c = math.ceil(m_elems / (4 * head_dim))
    return min(b_c, head_dim), b_c


def footprint(kernel: str, block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int,
              scratch: bool = False) -> int:
    """Shared-memory bytes the footprint model assigns to one program of ``kernel``; ``scratch``:
    the spec reads an operand tile along both query and key axes (t = 1)."""
    expr = FOOTPRINT[kernel].subs({B_R: block_m, B_C: block_n, D: pad_head_dim(head_dim), E: elem_bytes, S: stages,
                                   T: int(scratch)})
    return int(expr)


def max_stages(kernel: str, block_m: int, block_n: int, head_dim: int, elem_bytes: int, shared_memory: int,
               scratch: bool = False) -> int:
    """The deepest pipeline (0 if none) whose footprint fits in ``shared_memory``: solved for s."""
    fp = FOOTPRINT[kernel].subs({B_R: block_m, B_C: block_n, D: pad_head_dim(head_dim), E: elem_bytes,
                                 T: int(scratch)})
    (bound,) = sympy.solve(sympy.Eq(fp, shared_memory), S)
    return max(0, min(STAGES[-1], int(sympy.floor(bound))))


def _register_fits(kernel: str, block_m: int, block_n: int, head_dim: int, warps: int) -> bool:
    """The fp32 accumulators of the resident tile take at most half of a thread's 255 registers."""
    resident = block_n if RESIDENT_AXIS[kernel] == "n" else block_m
    accumulators = 2 if kernel == "bwd_dkdv" else 1  # dK and dV
    return accumulators * resident * pad_head_dim(head_dim) <= ACCUMULATOR_REGISTERS * 32 * warps


@functools.lru_cache(maxsize=None)
def candidates(kernel: str, device: DeviceProfile, head_dim: int, elem_bytes: int, rows: int = 0,
               first: TileConfig | None = None, scratch: bool = False) -> list[TileConfig]:
    """The configurations the autotuner may try for ``kernel``, each fitting M by construction.

    The first is ``first`` when given (launches pass their untuned default, so tuning can only
    replace it by a faster tile), else the paper's (B_r, B_c), rounded down to powers of two and
    fitted to the footprint; the others are the largest neighbouring power-of-two tiles that also
    fit, each at 2 and 3 pipeline stages where those fit. At most MAX_CANDIDATES, to bound
    autotuning. ``rows``, when given, fixes BLOCK_M (split-KV decoding sizes its row tile to the
    rows it packs); ``scratch`` as for ``footprint``.
    """
    m = device.shared_memory
    found: list[TileConfig] = []
    for block_m in (rows,) if rows else BLOCK_SIZES:
        for block_n in BLOCK_SIZES:
            warps = 8 if block_m * block_n >= 128 * 64 else 4
            if not _register_fits(kernel, block_m, block_n, head_dim, warps):
                continue
            deepest = max_stages(kernel, block_m, block_n, head_dim, elem_bytes, m, scratch)
            for stages in sorted({min(deepest, 2), min(deepest, 3)} - {0}, reverse=True):
                found.append(TileConfig(block_m, block_n, warps, stages))
    if not found:
        raise ValueError(f"no tile of {kernel} fits {m} bytes of shared memory at head dim {head_dim}")
    b_r, b_c = paper_blocks(m, pad_head_dim(head_dim), elem_bytes)
    paper_m, paper_n = _pow2_floor(max(b_r, MIN_BLOCK)), _pow2_floor(max(b_c, MIN_BLOCK))
    if RESIDENT_AXIS[kernel] == "n":  # dK/dV keeps key tiles resident: the roles swap
        paper_m, paper_n = paper_n, paper_m
    found.sort(key=lambda c: (c.BLOCK_M * c.BLOCK_N, c.BLOCK_M, c.num_stages), reverse=True)
    if first is None:
        first = next((c for c in found if c.BLOCK_M <= paper_m and c.BLOCK_N <= paper_n), found[0])
    # Cached (sympy's solve takes milliseconds), so callers must not mutate the list.
    return ([first] + [c for c in found if c != first])[:MAX_CANDIDATES]


# The untuned rule's tile sizes, largest first. The resident tile (query rows in the forward and
# dQ, key rows in dK/dV) stops at 128 and at 32 rows: each warp owns 16 rows of it (wgmma and mma
# tiles), so 128 rows keep 8 warps busy, and below 32 rows four warps would split the key axis,
# whose row reductions (max, sum) then cross warps. The streamed tile starts at 64: it bounds the
# fp32 score tile a thread holds (BLOCK_M·BLOCK_N / (32·warps)), next to the accumulators.
RESIDENT_TILES = (128, 64, 32)
STREAMED_TILES = (64, 32, 16)
DEFAULT_STAGES = 3  # deepest pipeline the rule asks for; deeper only adds shared memory


def _warps(resident: int) -> int:
    return 8 if resident >= 128 else 4


def programs_per_sm(kernel: str, tile_mode: str) -> int:
    """How many programs of ``kernel`` the untuned rule fits on one SM (each gets M / that).

    Two for the dK/dV kernel of a dense spec: its programs all walk the same number of query
    tiles with two fp32 accumulators resident, and two of them side by side hide each other's
    latencies better than one deeper pipeline: on the H200 at d = 128, 64x64 tiles at two stages
    (two programs per SM) against 64x128 at three (one) measured 8-10% faster fwd+bwd at N = 1k,
    4k and 16k (benchmarks/RESULTS.md). With a causal band or a table the programs differ in
    length and the one-program tile measured 3-5% faster at 4k and 16k, so one there.

    Two for the forward, in every tile mode, at the full pipeline (SHARED_STAGES): one program's
    softmax then runs beside the other's products. On the H200 at d = 128 that is 64x64 at four
    warps and three stages against 128x64 at eight (one program per SM), measured 1-13% faster
    at N = 1k, 4k and 16k, causal or not (fifth session); at d = 64 the one-program tile already
    fits M / 2, and the smaller tile measured 5-10% slower there, so the rule leaves it.
    """
    if kernel == "fwd":
        return 2
    return 2 if kernel == "bwd_dkdv" and tile_mode == "dense" else 1


# The fewest stages a tile shared with another program of its kernel must keep (each gets M / 2):
# the dK/dV kernel trades its third stage for the second program (measured faster); the forward
# does not (its two-program tile at two stages was not measured better than one program).
SHARED_STAGES = {"fwd": DEFAULT_STAGES, "bwd_dkdv": 2}
# A forward whose two-program tile had to halve its rows, walking at least LONG_WALK key tiles of
# WIDE_STREAM, takes one program of the full resident tile and WIDE_STREAM keys instead, at the
# full pipeline: on the H200 at d = 128 (128, 128, 8, 3) measured 5-9% faster than (64, 64, 4, 3)
# dense and 0-5% causal at N = 4k and 16k, and 6% slower at 1k (8 tiles), where two programs per
# SM hide each one's prologue and epilogue (benchmarks/RESULTS.md, fifth session).
LONG_WALK = 32
WIDE_STREAM = 128


def widens_long_walks(kernel: str, tile_mode: str) -> bool:
    """Whether the LONG_WALK rule applies: the forward of a dense or causal spec, whose programs
    walk the keys the length says. A ranged spec's programs walk what its tile tables keep (a
    1k window of 16k keys: 8 tiles of 128), which the rule does not see; it keeps the shared tile
    (measured on the H200 with the window and documents masks of benchmarks/bench_skipping.py)."""
    return kernel == "fwd" and tile_mode in ("dense", "causal")


def spec_options(kernel: str, spec) -> dict:
    """The keywords of ``default_config`` that ``spec`` (an AttentionSpec) decides for ``kernel``:
    ``programs`` (programs_per_sm), ``scratch`` (it reads an operand's score tile) and ``widen``
    (widens_long_walks). Launches and ``explain`` both ask here."""
    return dict(programs=programs_per_sm(kernel, spec.tile_mode), scratch=spec.reads_score_tiles,
                widen=widens_long_walks(kernel, spec.tile_mode))


@functools.lru_cache(maxsize=None)
def default_config(kernel: str, device: DeviceProfile, head_dim: int, elem_bytes: int, rows: int = 0,
                   waves: int = 0, n_resident: int = 0, n_streamed: int = 0, programs: int = 1,
                   scratch: bool = False, widen: bool = False) -> TileConfig:
    """The configuration a launch runs without tuning: derived from M and the launch's occupancy.

    The resident tile is the largest of RESIDENT_TILES that (1) keeps at least about one wave of
    programs on the device: a launch of ``waves`` waves at MIN_BLOCK tiles (the tuning key's
    ``waves_bucket``) has waves·MIN_BLOCK/R of them at R rows, so R ≤ MIN_BLOCK·waves; (2) is no
    longer than the sequence it tiles (``n_resident``, a power-of-two bucket); (3) holds its fp32
    accumulators in registers. Warps follow the rows (8 at 128, else 4; 8 where 4 cannot hold the
    accumulators). The streamed tile is the largest of STREAMED_TILES (and ≤ ``n_streamed``) at
    which some such resident tile fits M at two stages or more: a smaller M shrinks the resident
    tile before the streamed one. The stages are the deepest that fit M, at most DEFAULT_STAGES;
    only when no pair fits two stages is one stage taken. On an H200 this is (128, 64, 8, 3) for
    the forward and dQ, the tuner's measured pick for the d = 64 forward and for dQ at d = 64 and
    128 (benchmarks/RESULTS.md, tiles against M; at d = 128 it took (128, 128, 8, 2) forward).
    With ``programs`` > 1 (programs_per_sm) the rule first looks for a tile that fits M / programs
    at SHARED_STAGES or more with the largest streamed tile and at least 64 resident rows (the
    dense dK/dV at d = 128: (64, 64, 4, 2) on the H200; the forward at d = 128: (64, 64, 4, 3)),
    and otherwise takes the one-program tile; with ``widen``, a forward whose shared tile lost rows and
    that walks LONG_WALK key tiles of WIDE_STREAM or more takes one full tile of WIDE_STREAM keys at
    DEFAULT_STAGES if that fits M (d = 128 on the H200 from N = 4k: (128, 128, 8, 3)).

    Args:
        kernel: a FOOTPRINT key ("fwd", "fwd_split", "bwd_dq", "bwd_dkdv").
        device: the profile giving M and the number of SMs.
        head_dim, elem_bytes: the inputs' head dim and element size.
        rows: when given, the resident tile (split-KV decoding packs its rows): only the
            streamed tile is chosen.
        waves: the launch's waves bucket; 0 means "fills the device at any tile".
        n_resident, n_streamed: the lengths (buckets) the two tiles run along; 0 means long.
        programs: the programs per SM to leave room for (programs_per_sm).
        scratch: the spec reads an operand tile along both axes (``footprint``).
        widen: the LONG_WALK rule applies (``widens_long_walks``).
    """
    resident_axis_n = RESIDENT_AXIS[kernel] == "n"

    def config(resident: int, streamed: int, warps: int, stages: int) -> TileConfig:
        if resident_axis_n:
            return TileConfig(streamed, resident, warps, stages)
        return TileConfig(resident, streamed, warps, stages)

    if rows:
        residents = (rows,)
    else:
        cap = min(MIN_BLOCK * waves if waves else RESIDENT_TILES[0], max(n_resident or RESIDENT_TILES[0], 1))
        residents = tuple(r for r in RESIDENT_TILES if r <= cap) or RESIDENT_TILES[-1:]
    streams = tuple(s for s in STREAMED_TILES if s <= max(n_streamed or STREAMED_TILES[0], MIN_BLOCK))

    def first_fit(residents, streams, memory, stage_floors):
        for fewest_stages in stage_floors:
            for streamed in streams:
                for resident in residents:
                    for warps in dict.fromkeys((_warps(resident), 8)):
                        c = config(resident, streamed, warps, 1)
                        if not _register_fits(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, warps):
                            continue
                        deepest = max_stages(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, elem_bytes, memory, scratch)
                        if deepest >= fewest_stages:
                            return config(resident, streamed, warps, min(deepest, DEFAULT_STAGES))
        return None

    found = None
    if programs > 1:
        found = first_fit(tuple(r for r in residents if r >= 64), streams[:1], device.shared_memory // programs,
                          (SHARED_STAGES.get(kernel, 2),))
        long_walk = (n_streamed or LONG_WALK * WIDE_STREAM) >= LONG_WALK * WIDE_STREAM
        if widen and found is not None and found.BLOCK_M < residents[0] == RESIDENT_TILES[0] and long_walk:
            found = first_fit(residents[:1], (WIDE_STREAM,), device.shared_memory, (DEFAULT_STAGES,)) or found
    found = found or first_fit(residents, streams, device.shared_memory, (2, 1))
    return found or candidates(kernel, device, head_dim, elem_bytes, rows, scratch=scratch)[0]  # smaller than the rule's
