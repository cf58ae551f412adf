"""Launching the Gluon sm90 kernels: the forward (``gluon.py``) and, at the end, the backward
(``gluon_bwd.py``): when each applies, its tile from shared memory M, the TMA descriptors, the
cached module.

The forward is on by default (``FX_FLASH_GLUON=0`` turns it off): ``launch.attention_forward``
offers each forward here first, and every call this kernel cannot compute exactly (another GPU,
the interpreter, fp32, head dims other than 64 and 128, tensor operands, dropout, layouts a
row-matrix descriptor cannot address, key lengths that are not a multiple of the key tile), or
that it was not measured faster on (``not_routed``: ranged specs, short walks; at head dim 64,
keep-predicates other than causal), runs the portable kernels instead. The reason is logged on the
``fx_flash`` logger at debug level. What is routed runs ROUTED_KIND: the persistent
warp-specialized kernel (a TMA producer and two consumer warpgroups, three at head dim 64 from 16
key tiles an output tile without a keep-predicate, or causal with a score of qk and the scale alone;
one program per SM walking output tiles), the fastest of the kinds timed on the H200
(benchmarks/GLUON_NOTES.md, calls 9, 36, 39, 51, 53, 57, 59, 60), with ROUTES' flags per head dim,
mask kind and score, chosen by the call's walk (routed_config: among them the persistent kernel's
ping-pong through named barriers); the others (one partition; not persistent;
hold, early rescale) are reached through ``launch`` with their ``GluonConfig``
(benchmarks/gluon_check.py).

The backward is on by default too (``FX_FLASH_GLUON_BWD=0`` turns it off, independently of the
forward's switch): ``launch.planned_backward`` offers each backward key here first
(``routed_backward``), with the forward's rules plus dO's layout; it is routed at head dims 64
and 128 (bf16, fp16; not ranged specs; at least BWD_MIN_PAIRS_PER_SM query-head/key-tile pairs per
SM), where the H200 ran it 1.01-1.24x the portable backward (GLUON_NOTES.md, calls 14-19 and 39;
``FX_FLASH_GLUON_BWD=1`` takes every call it supports), and never under
``torch.use_deterministic_algorithms``: its dQ is summed in no fixed order.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Optional

import sympy
import torch
import triton

from fx_flash.codegen.generate import raw_max_applies
from fx_flash.codegen.gluon import INDEX_LIMIT, mask_kind, render_gluon, unsupported
from fx_flash.codegen.gluon_bwd import constant_chain_rule, render_gluon_bwd
from fx_flash.codegen.gluon_bwd import unsupported as unsupported_backward
from fx_flash.codegen.loader import cache_dir, write_atomically
from fx_flash.codegen.spec import QK, SCALE, AttentionSpec
from fx_flash.device import DeviceProfile, device_profile, interpreting

log = logging.getLogger("fx_flash")

HEAD_DIMS = (64, 128)  # one wgmma instruction's N covers the head dim; larger ones need splitting
# What is routed here: the head dims (ROUTES, below) and dtypes where the kernel was checked on the
# H200 and measured at least as fast as the portable forward (benchmarks/GLUON_NOTES.md, calls 9,
# 34, 36-37).
ROUTED_DTYPES = (torch.bfloat16, torch.float16)
ROUTED_KIND = dict(ws=True, persistent=True)  # GluonConfig flags of the routed kernel
# Fewest key tiles a program walks on average (a causal row tile walks fewer than its neighbours
# below) for the routed kernel to pay its fixed cost per output tile (Q load, fill, drain,
# epilogue). On the H200 at d = 128 (GLUON_NOTES call 34, after the epilogue's stores went two
# elements wide): 2.5 tiles (causal, N = 512) ran 217 TFLOP/s against the portable forward's 231;
# 4 (plain 512) 409 against 337; 4.5 (causal 1k) 333 against 310; 8 and more 1.15-1.26x.
# (Call 9, before: 4.5 lost, 8 won.)
MIN_WALK = 4
# Head dim 64 routes specs without a keep-predicate to three consumer warpgroups (CONSUMERS = 3)
# from MIN_WALK_D64 key tiles an output tile on. On the H200 (call 36, against the portable
# forward): 0.95x at a walk of 8 (N = 1k), 1.03 at 16, 1.02 at 32, 1.07 at 64, 1.11 at 128 (1.02x
# cuDNN at 16k). Causal ones spill there at 160 registers a thread (0.60-0.75x).
MIN_WALK_D64 = 64
# Shorter plain walks at head dim 64 (call 53, five alternating rounds, against the portable
# forward; call 51's three agreed): from MIN_WALK_D64_STORE key tiles the three consumers with
# their output stored by TMA (``tma_store``: 1.07x at 16 and 32 key tiles; without it 1.04, 1.06),
# and from MIN_WALK_D64_SHORT two consumers with it (1.07x at 8; three consumers there 0.93-1.00).
# From 64 key tiles on, three consumers without the TMA store (call 51: with it 1.01, 1.00).
# The two-consumer route takes two Q buffers a consumer (``q_buffers``, gluon's note on Q buffers):
# with the epilogue by reciprocals it ran 1.032x the same kernel with one at N = 1k (call 82, four
# alternating rounds; call 62, before the reciprocals: 1.005). Not the three-consumer routes
# (call 82: 0.986-0.998x at 2k-4k). It also reads its output tiles from the launcher's table
# (``balanced``: for plain specs the kernel's own order without the schedule's divisions; calls 84,
# 85: 1.015, 1.012x at 1k; the three-consumer routes 0.985-1.002x and d = 128 plain, geometric
# means 1.008 and 1.007, do not take it).
MIN_WALK_D64_STORE = 16
MIN_WALK_D64_SHORT = 8
# Causal specs at head dim 64 route to two consumers with the causal walk split in two loops
# (``split``: no spills), from MIN_WALK_D64_CAUSAL key tiles an output tile on (call 39, three
# rounds, against the portable forward: 0.91x at a walk of 4.5 (N = 1k), 0.98 at 8.5, 1.05 at 16.5,
# 1.06 at 32.5, 1.05 at 64.5; three consumers split 0.78-1.03x).
MIN_WALK_D64_CAUSAL = 16
# Causal specs at head dim 128 take the split walk too: in five alternating rounds (call 42) it ran
# 1.05, 1.05, 1.05, 1.03, 1.03x the one-loop walk at N = 1k-16k and 0.99x with soft-capping at 16k,
# while the plain rows, the same code in both columns, stayed within 3%. (Call 39, three rounds:
# 1.02-1.05x but 0.98-0.99x in two rows, then short of its rule.)
# Both head dim 128 routes store each consumer's output rows by TMA from a staging tile
# (``tma_store``; where the output is contiguous and N_Q a multiple of 64, else the stores of
# before), which costs a K/V stage at this head dim (3 → 2): in three alternating rounds (call 51)
# 1.07, 1.04, 1.02, 1.02, 1.00x the same kernel without it at N = 1k-16k plain, 1.08, 1.06, 1.01,
# 0.99, 0.98x causal. At head dim 64 it was not adopted: 1.03-1.06x at 1k-2k but 0.94-0.99x on the
# long walks of the routed kernels (the causal one: 0.94 at 4k and 16k).
# The consumers take turns issuing their products (``pingpong``: named barriers, gluon's note on the
# persistent ping-pong; call 57, three alternating rounds) where that ran ahead of the route before
# it by the rule written first: at head dim 128 without a keep-predicate on every walk (the
# kernel timed in two columns, the same binary for plain specs: 1.025, 1.010, 1.012, 1.016, 1.005x
# at N = 1k-16k, geometric mean 1.014); causal only below MIN_WALK_D128_CAUSAL_FREE key tiles (1k:
# 1.035x; 2k-16k 1.00, 1.00, 0.98, 1.02x); at head dim 64 on the two-consumer route (1k: 1.024x),
# not causal (0.96-0.99x). With the hold it was slower. Among three consumers (call 59, the turns
# passed round all three) on both three-consumer routes: 1.029, 1.051x at 2k, 4k with the TMA
# store, 1.046, 1.047x at 8k, 16k without (a two-consumer ping-pong there had run 0.95-0.96x).
MIN_WALK_D128_CAUSAL_FREE = 8
# Causal specs at head dim 64 whose score reads nothing but qk and the scale (QK_ONLY, below) take
# three consumers in turn with the split walk and the TMA store from the same walk (call 60, three
# rounds, against the two-consumer split kernel: 1.008, 1.039, 1.039x at N = 4k, 8k, 16k; 0.93-1.04
# of cuDNN). Other scores keep two consumers: with soft-capping the three-consumer kernel ran 0.72x
# (it spills 12 B at 160 registers, an ALiBi-like slope·(kv_idx - q_idx) 36-88 B). So does the
# plain causal one with another Triton's compile: within its registers with triton 3.6 (the H200's,
# where it was measured), 72-108 B of spills with triton 3.9's (tests/test_gluon.py compiles it on
# the CPU). A QK_ONLY route is therefore taken only with a Triton in SPILL_FREE_TRITON.
SPILL_FREE_TRITON = ("3.6", )
# With the row max before the scale (gluon's note on the row max; call 63) the two-consumer causal
# kernel with the TMA store and turns ran 1.056x the portable forward at N = 2k (a walk of 8.5),
# where a Gluon kernel had not reached rule 2's 1.03 before (call 62: 1.015); at 1k (4.5) 1.00.
# Causal specs of a score of qk and the scale take it from MIN_WALK_D64_CAUSAL_SHORTEST key tiles
# (4.5: N = 1k, until call 74 the portable forward's) with two Q buffers a consumer (``q_buffers``,
# gluon's note on Q buffers): with the diagonal's half and the epilogue by reciprocals (below) the
# kernel ran 1.053x the portable forward at 1k (call 74: 296 against 281 TFLOP/s), and its
# two-Q-buffer twin 1.020x it there (call 76, three rounds: 301 against 295; at 2k 1.000, so 2k
# kept one buffer until call 80). With the balanced order (below) two buffers ran ahead at 2k too
# (calls 79, 80: 1.027, 1.022x the balanced kernel with one), so 2k takes the 1k route's kernel.
MIN_WALK_D64_CAUSAL_SHORTEST = 4
# The two-consumer causal routes compute a consumer's last key tile on its first half where the
# rest lies past the diagonal (``half``: gluon's note on the diagonal's half). In three alternating
# rounds (call 70) against the same kernels without it: at head dim 128 1.000, 1.016, 1.013, 1.011x
# on the routed kernels at N = 1k, 2k, 4k, 16k, at head dim 64 1.017x at 2k (and 1.051x at 1k, where
# the portable forward ran until call 74: 1.028x it, short of rule 2's 1.03). Not on the three-consumer
# route, where it ran 0.82, 0.91, 0.94, 1.00x at 1k-16k (its consumer code grows to 10k SASS
# instructions), nor on the two-consumer route of other scores at head dim 64, not timed with it.
# The epilogue by reciprocals (``fast_epilogue``: gluon's note on the epilogue's arithmetic), in
# three alternating rounds (call 74) against the same kernels without it, on the routes where the
# geometric mean over the N they take was ≥ 1.01 with no row below 0.99: head dim 128 causal
# (wspstpd at 1k 1.052x; wspstd at 2k, 4k, 16k 1.008, 1.007, 1.027x), head dim 64 plain at 1k
# (wsptp 1.020x), causal with turns at 1k-2k (wspstpd 1.017, 1.017x) and among three consumers from
# 4k (wsp3stp 1.000, 1.030x at 4k, 16k). Not on head dim 128 plain (wsptp 1.009, 1.003, 0.997,
# 0.952x), nor head dim 64 plain with three consumers (wsp3tp 1.000, 1.017x at 2k, 4k; wsp3p 0.984x
# at 16k), nor the head dim 64 route of other causal scores (not timed).
# The balanced order (``balanced``: each program's output tiles from persistent_order's table; gluon's
# note on it) in four alternating rounds (call 80; call 79 in three agreed on these routes) against
# the same kernels without it: head dim 64 causal 1k 1.059x (two Q buffers), 2k 1.022x (one), and
# among three consumers 1.032, 1.026, 1.002x at 4k, 8k, 16k: those routes take it. Head dim 128
# causal 1.007x at 1k (call 79 1.041) and 1.002, 1.000, 0.988, 1.015x at 2k-16k (call 79: 1.028,
# 0.961, 0.981 at 2k-8k, the later columns then biased): the rule's 1.01 is not reached, not routed
# then (with sections of one round it is, below).
# p converted for p·v by cvt.rn.bf16x2.f32 in PTX (``pack_p``: gluon's note on p's conversion, which
# takes 32 PRMTs out of a d = 64 causal step) in four alternating rounds (call 98) against the same
# kernels without it, on the routes where the geometric mean over the N they take was ≥ 1.01 with no
# row below 0.99: head dim 64 causal at 1k-2k (wspstpdfqb 1.025, 1.032x) and among three consumers
# from 4k (0.998, 1.024, 1.045x), plain among three consumers (wsp3tp 1.017, 1.027x at 2k-4k; wsp3p
# 1.046, 1.035x at 8k-16k); head dim 128 causal (wspstpdf 1.027x at 1k; wspstdf 1.008, 1.004, 1.012,
# 1.032x at 2k-16k). Head dim 64 plain at 1k (wsptpfqb 1.007x) and head dim 128 plain (wsptp 1.020,
# 1.010, 1.007, 1.019, 0.990x: geometric mean 1.009) fell short then and take it since calls 102-103
# (six rounds: wsptpfqb 1.031x, 1.033x in call 102; wsptp 1.031, 1.010, 1.007, 1.018, 1.011x,
# geometric mean 1.015). Not the d = 64 route of other causal scores (not timed).
# The keep-predicate by its sign (``sign_mask``: gluon's note on the mask as a sign, which takes the
# predicate packing out of a masked step) in four alternating rounds (call 106) against the same
# kernels without it: head dim 64 causal at 1k-2k (wspstpdfqbk 1.021, 1.010x), which takes it. Not
# among three consumers (wsp3stpfb 1.007, 1.013, 0.994x at 4k-16k: geometric mean 1.005) nor at head
# dim 128 (wspstpdf 0.981x at 1k; wspstdf 1.023, 0.991, 0.997, 0.989x at 2k-16k; 12 B of spills).
# The head dim 128 causal route of the shortest walks (N = 1k: 4.5 key tiles) takes two Q buffers and
# the balanced order together (``q_buffers``, ``balanced``): in twelve and ten alternating rounds
# (calls 116-117) 1.021x the same kernel without them in bf16 at 1k with sections of 32 MiB, 1.022x
# / 1.006x in bf16 / fp16 in the next call (geometric mean 1.014), and with sections of one round
# (heads_per_section) 1.020x / 1.014x the kernel without them: 1.10x cuDNN's forward in both types.
# (Each alone: q 0.995x, b 1.005x in call 116; calls 76 and 79-80 had timed them on older kernels.)
# The head dim 128 causal route from 2k takes the balanced order since its sections are one round
# (call 118, six alternating rounds, both with sections of one round: 1.011, 1.021, 0.997, 0.992x
# the kernel's own order at 2k, 4k, 8k, 16k, and 1.168x at 12k, where the own order's trap is;
# 1.06, 1.06, 1.02, 1.06, 1.00x the own order with sections of 32 MiB at 2k, 4k, 8k, 12k, 16k).
# head dim: {mask kind (gluon.mask_kind: 0 no keep-predicate, 1 causal): its routes, each (the
# routed kernel's GluonConfig flags beyond ROUTED_KIND, fewest key tiles an output tile walks on
# average, the scores it takes: ANY_SCORE or QK_ONLY), longest walk first}: a call takes the first
# route its spec's score and its walk reach (routed_config). A mask kind missing at a head dim is
# not routed there; other predicates (kind 2) are ranged specs, which stay on the portable forward
# (``_not_measured``).
ANY_SCORE, QK_ONLY = "any score", "a score of qk and the scale alone"
ROUTES = {128: {0: ((dict(tma_store=True, pingpong=True, pack_p=True), MIN_WALK, ANY_SCORE), ),
                1: ((dict(split=True, tma_store=True, half=True, fast_epilogue=True, balanced=True, pack_p=True),
                     MIN_WALK_D128_CAUSAL_FREE, ANY_SCORE),
                    (dict(split=True, tma_store=True, pingpong=True, half=True, fast_epilogue=True, q_buffers=2,
                          balanced=True, pack_p=True), MIN_WALK, ANY_SCORE))},
          64: {0: ((dict(consumers=3, pingpong=True, pack_p=True), MIN_WALK_D64, ANY_SCORE),
                   (dict(consumers=3, tma_store=True, pingpong=True, pack_p=True), MIN_WALK_D64_STORE, ANY_SCORE),
                   (dict(tma_store=True, pingpong=True, fast_epilogue=True, q_buffers=2, balanced=True, pack_p=True),
                    MIN_WALK_D64_SHORT, ANY_SCORE)),
               1: ((dict(consumers=3, split=True, tma_store=True, pingpong=True, fast_epilogue=True, balanced=True,
                         pack_p=True), MIN_WALK_D64_CAUSAL, QK_ONLY),
                   (dict(split=True), MIN_WALK_D64_CAUSAL, ANY_SCORE),
                   (dict(split=True, tma_store=True, pingpong=True, half=True, fast_epilogue=True, q_buffers=2,
                     balanced=True, pack_p=True, sign_mask=True), MIN_WALK_D64_CAUSAL_SHORTEST, QK_ONLY))}}
ROUTED_HEAD_DIMS = tuple(sorted(ROUTES))
BLOCK_M = 128  # two warpgroups of 64 query rows each
CONSUMER_ROWS = 64  # query rows of a consumer warpgroup in the warp-specialized kernels (one m64 wgmma)
NUM_WARPS = 8
MAX_STAGES = 4
BARRIER_BYTES = 8
# Shared memory Triton uses to hand a warp-specialized region's captured values (pointers,
# strides, offsets) to its partitions: 216 bytes compiled for this kernel (triton 3.6 and 3.9),
# reserved with room to spare.
WS_CAPTURE_BYTES = 512
# K/V bytes of the heads in one section of the persistent kernel's causal order at most
# (FlashAttention-3's tile scheduler sizes its sections to 32 MiB of K and V, in the H100's and
# H200's 50 MB of L2): without sections, at N = 2k its programs in flight read 128 heads' K/V, each
# once. A section of the balanced table's also holds no more than one round of the grid's output
# tiles (heads_per_section), which is what bounds it on the H200.
L2_SECTION_BYTES = 32 * 1024 * 1024


def enabled() -> bool:
    """Whether forwards this kernel supports are routed to it: yes unless FX_FLASH_GLUON=0."""
    return os.environ.get("FX_FLASH_GLUON", "1") != "0"


@dataclass(frozen=True)
class GluonConfig:
    """A tile of the Gluon forward: BLOCK_M query rows per program, BLOCK_N keys per tile, STAGES
    K/V buffers; ``ws``: the warp-specialized kernel (a producer and two consumer warpgroups of
    BLOCK_M / 2 rows each) instead of one partition of two warpgroups that loads for itself."""

    BLOCK_M: int
    BLOCK_N: int
    STAGES: int
    ws: bool = False
    # ws only: the consumers take turns issuing their products (mbarriers; in the persistent kernel,
    # of two or three consumers, named hardware barriers: gluon's note on the persistent ping-pong)
    pingpong: bool = False
    early: bool = False  # rescale the accumulator while q·kᵀ runs, not after p·v
    hold: bool = False  # ws only: keep each consumer's softmax between its q·kᵀ and p·v waits (gluon._hold)
    # ws only: one program per SM walking output tiles, the next tile's loads under this one's epilogue
    persistent: bool = False
    # persistent causal only: longest tiles first across all heads, not within sections of heads
    # whose K/V fit L2_SECTION_BYTES (gluon._output_tile)
    one_section: bool = False
    # persistent only: consumer warpgroups of BLOCK_M / consumers rows each (2, or 3)
    consumers: int = 2
    # persistent only: causal specs walk their tiles below the diagonal and on it in two loops
    split: bool = False
    # persistent only: each consumer's output rows stored by TMA from a staging tile in shared
    # memory (gluon's note on the epilogue), where the output is contiguous and N_Q a multiple of
    # a consumer's rows (forward_launch)
    tma_store: bool = False
    # where the score is qk times a positive factor, the row max of qk taken before the factor (one
    # multiply-add an element; gluon's note on the row max); False: after it (benchmarks' control)
    raw_max: bool = True
    # split causal walks only: a consumer's last key tile computed on its first BLOCK_N / 2 keys where
    # the rest lie past every row of it (gluon's note on the diagonal's half)
    half: bool = False
    # persistent only: the epilogue normalizes by each row's reciprocal and takes the LSE's log2 by
    # the hardware's approximation (gluon's note on the epilogue's arithmetic)
    fast_epilogue: bool = False
    # persistent only: Q buffers a consumer (2: the next output tile's Q, and so its K/V, load while
    # this tile runs; gluon's note on Q buffers)
    q_buffers: int = 1
    # persistent only: each program's output tiles from the launcher's table (persistent_order;
    # gluon's note on the balanced order): balanced by work for causal specs, the kernel's own order
    # for specs without a keep-predicate (read without the schedule's divisions); other predicates
    # keep the kernel's schedule
    balanced: bool = False
    # p converted for p·v two elements at a time in PTX (a render option of the module; gluon's
    # note on p's conversion)
    pack_p: bool = False
    # the keep-predicate applied by its sign where it has one, without predicate registers (a render
    # option of the module; gluon's note on the mask as a sign)
    sign_mask: bool = False

    def __post_init__(self):
        if self.persistent and not self.ws:
            raise ValueError("the persistent kernel is warp-specialized")
        if self.pingpong and (not self.ws or (self.consumers != 2 and not self.persistent)):
            raise ValueError("the ping-pong is of the warp-specialized kernels' consumers (three: persistent only)")
        if (self.one_section or self.split or self.tma_store) and not self.persistent:
            raise ValueError("one_section, split and tma_store are options of the persistent kernel")
        if self.consumers not in (2, 3) or (self.consumers == 3 and not self.persistent):
            raise ValueError("three consumer warpgroups are the persistent kernel's option")
        if self.half and not self.split:
            raise ValueError("half is an option of the split causal walk")
        if self.fast_epilogue and not self.persistent:
            raise ValueError("fast_epilogue is an option of the persistent kernel")
        if self.q_buffers not in (1, 2) or (self.q_buffers == 2 and not self.persistent):
            raise ValueError("two Q buffers a consumer are the persistent kernel's option")
        if self.balanced and not self.persistent:
            raise ValueError("balanced is an option of the persistent kernel")

    @property
    def takes_views(self) -> bool:
        """Whether the kernel places each head by tma_view's numbers (the persistent one), so it
        takes (Z, N, H, d) storage too, not only (Z·H·N, d) row matrices."""
        return self.persistent

    @property
    def num_warps(self) -> int:
        """Warps of the kernel's default partition (the producer when ``ws``)."""
        return 4 if self.ws else NUM_WARPS

    @property
    def rows_per_consumer(self) -> int:
        return self.BLOCK_M // self.consumers if self.ws else self.BLOCK_M

    def __str__(self) -> str:
        flags = [name for name, on in (("ws", self.ws), ("pingpong", self.pingpong), ("early", self.early),
                                       ("hold", self.hold), ("persistent", self.persistent),
                                       ("one_section", self.one_section),
                                       ("three consumers", self.consumers == 3), ("split", self.split),
                                       ("tma store", self.tma_store), ("max after the scale", not self.raw_max),
                                       ("half diagonal", self.half), ("fast epilogue", self.fast_epilogue),
                                       ("two Q buffers", self.q_buffers == 2), ("balanced", self.balanced),
                                       ("p packed in PTX", self.pack_p), ("keep by sign", self.sign_mask))
                 if on]
        return " ".join([f"BLOCK_M={self.BLOCK_M} BLOCK_N={self.BLOCK_N} stages={self.STAGES}"] + flags)


def footprint(block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int, ws: bool = False,
              consumers: int = 2, tma_store: bool = False, q_buffers: int = 1) -> int:
    """Shared-memory bytes of one program: the Q tile(s) of its block_m rows, ``stages`` K and V
    tiles, and the mbarriers (Triton aligns each array of them to 16 bytes): Q's, and a ready one
    per K and V buffer, plus an empty one per buffer and WS_CAPTURE_BYTES for the values handed to
    the partitions when ``ws`` (with one more barrier per consumer: the ping-pong's turns,
    allocated whether or not it is on, or the persistent kernel's Q empty barriers in their
    place), and with ``tma_store`` the consumers' output staging tiles (block_m rows in all);
    ``q_buffers`` Q tiles of block_m rows, and their two barriers each a consumer. P and
    the softmax stay in registers, so this is the whole of it: tests compare it with the compiled
    kernels' own counts."""
    ring = -(-BARRIER_BYTES * stages // 16) * 16
    tiles = elem_bytes * ((q_buffers + (1 if tma_store else 0)) * block_m * head_dim
                          + 2 * stages * block_n * head_dim)
    if ws:
        return tiles + 2 * (-(-BARRIER_BYTES * consumers * q_buffers // 16) * 16) + 4 * ring + WS_CAPTURE_BYTES
    return tiles + BARRIER_BYTES + 2 * ring


def program_rows(ws: bool, consumers: int = 2) -> int:
    """Query rows of one program: CONSUMER_ROWS per consumer warpgroup when warp-specialized (two
    of them make BLOCK_M), else BLOCK_M over one partition's two warpgroups."""
    return CONSUMER_ROWS * consumers if ws else BLOCK_M


def default_config(device: DeviceProfile, head_dim: int, elem_bytes: int, ws: bool = False,
                   **flags) -> Optional[GluonConfig]:
    """The tile for ``head_dim``: program_rows (BLOCK_M = 128, or 192 with three consumers), key
    tiles of 128 (64 when 128 does not fit two stages), and the deepest ring (at most MAX_STAGES)
    whose footprint fits M. None if none fits. ``flags``: the other GluonConfig fields (pingpong,
    early, hold, persistent, one_section, consumers, split, tma_store, q_buffers…)."""
    block_m = program_rows(ws, flags.get("consumers", 2))
    for block_n in (128, 64):
        fitting = [s for s in range(2, MAX_STAGES + 1)
                   if footprint(block_m, block_n, head_dim, elem_bytes, s, ws, flags.get("consumers", 2),
                                flags.get("tma_store", False), flags.get("q_buffers", 1)) <= device.shared_memory]
        if fitting:
            return GluonConfig(block_m, block_n, max(fitting), ws, **flags)
    return None


def tma_view(t: torch.Tensor) -> Optional[tuple]:
    """How the persistent kernel's descriptor addresses (Z, H, N, d) ``t``, or None if it cannot:
    ((rows, columns) of the 2-D matrix it views, its row stride, RZ, RH, CH) where head (z, h)
    starts at row z·RZ + h·RH, column h·CH. Two layouts: heads stacked as rows (a row matrix,
    CH = 0), or heads side by side in each row ((Z, N, H, d) storage seen as (Z, H, N, d), as
    q.view(B, N, H, d).transpose(1, 2) gives, RH = 0). Rows 16-byte aligned, unit stride along d."""
    z, h, n, d = t.shape
    sz, sh, sn, sd = t.stride()
    e = t.element_size()
    if sd != 1 or sn < d or (sn * e) % 16 or t.data_ptr() % 16 or (z > 1 and sz % sn):
        return None
    rz = sz // sn if z > 1 else 0
    if h == 1 or (sh % sn == 0 and sh >= n * sn):  # heads as rows (sh ≥ N·sn: they do not overlap)
        rh = sh // sn if h > 1 else 0
        return ((z - 1) * rz + (h - 1) * rh + n, d), sn, rz, rh, 0
    if d <= sh and (h - 1) * sh + d <= sn and (sh * e) % 16 == 0:  # heads side by side in a row
        return ((z - 1) * rz + n, (h - 1) * sh + d), sn, rz, 0, sh
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
    if config.sign_mask and max(q.shape[2], k.shape[2]) >= INDEX_LIMIT:
        return "a length of 2^30 or more: the keep-predicate's sign form (sign_mask) needs indices below it"
    if config.takes_views:
        views = [tma_view(t) for t in (q, k, v)]
        if None in views or views[1] != views[2]:
            return "q, k or v is neither a (Z·H·N, d) row matrix nor (Z, N, H, d) storage (or k, v differ)"
    elif not all(row_matrix(t) for t in (q, k, v)):
        return "q, k or v is not a (Z·H·N, d) row matrix"
    return spec_reason(spec)


# Why each spec cannot run a Gluon kernel (None: it can), by direction and spec text. Deciding
# renders the kernel's source (sympy printing: 1–5 ms on a 2-core host); done on every call, that
# made the Gluon path host-bound below ~2 ms of GPU work (H200, GLUON_NOTES call 6), so each
# spec is decided once per process.
_reasons: dict[tuple[str, str], Optional[str]] = {}


def spec_reason(spec: AttentionSpec, backward: bool = False) -> Optional[str]:
    """``unsupported(spec)`` (or ``unsupported_backward``), computed once per spec and direction."""
    key = ("bwd" if backward else "fwd", spec.text)
    if key not in _reasons:
        _reasons[key] = (unsupported_backward if backward else unsupported)(spec)
    return _reasons[key]


# imported forward modules by their render options (raw_max, pack_p, sign_mask), then the spec's key
_modules: dict[tuple, dict[str, ModuleType]] = {}
_lock = threading.Lock()


def load(spec: AttentionSpec, raw_max: bool = True, pack_p: bool = False, sign_mask: bool = False) -> ModuleType:
    """The imported Gluon module of ``spec`` (written next to the portable kernels' sources), with
    the row max before the score's factor where it has one (``raw_max``), or after it, p converted
    in PTX where ``pack_p``, the keep-predicate by its sign where ``sign_mask`` (render_gluon's
    options)."""
    name = ("fx_flash_gluon" + ("" if raw_max else "_scaled_max") + ("_pack_p" if pack_p else "")
            + ("_sign_mask" if sign_mask else ""))
    return _load(spec, functools.partial(render_gluon, raw_max=raw_max, pack_p=pack_p, sign_mask=sign_mask), name,
                 _modules.setdefault((raw_max, pack_p, sign_mask), {}))


def _load(spec: AttentionSpec, render, prefix: str, modules: dict) -> ModuleType:
    """``render(spec)`` written under a name from the spec's key and the source's hash, imported
    once per process and kept in ``modules``."""
    with _lock:
        module = modules.get(spec.key)
        if module is None:
            source = render(spec)
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            path = cache_dir() / f"{prefix}_{spec.key}_{digest}.py"
            if not path.exists():
                write_atomically(path, source)
            found = importlib.util.spec_from_file_location(f"{prefix}_{spec.key}", path)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
            modules[spec.key] = module
        return module


@functools.lru_cache(maxsize=None)
def _shared_layout(block_rows: int, d: int, dtype: torch.dtype, rank: int = 2):
    """The NVMMA shared layout of a (block_rows, d) tile (built once: descriptors are made per call),
    or of the same tile as a rank-4 box (interleaved_rows): the same swizzle over its rows."""
    from triton.experimental.gluon import language as gl

    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], element)
    return layout if rank == 2 else gl.NVMMASharedLayout(layout.swizzle_byte_width, layout.element_bitwidth, rank=rank)


def interleaved_rows(rows: int, row_stride: int) -> tuple[list, list]:
    """(shape, strides) of a matrix of ``rows`` rows as DQ_INTERLEAVE's descriptor sees it: (rows //
    8, 4, 2, columns), element (b, i, j) in row 8b + 4j + i. A tile of it staged in order puts row
    4j + i of each group of 8 at row 2i + j (gluon_bwd._interleave_rows; its note on dQ)."""
    return [rows // 8, 4, 2], [8 * row_stride, row_stride, 4 * row_stride]


# Descriptor fields by (layout, block rows): every field but the base tensor, as validated once.
_descriptor_fields: dict = {}


def _descriptor(t: torch.Tensor, block_rows: int, interleaved: bool = False):
    """The TMA descriptor of ``t``'s tiles of block_rows rows: over the matrix tma_view finds; with
    ``interleaved``, over that matrix as interleaved_rows shapes it (the dQ accumulator's, with
    DQ_INTERLEAVE).

    Note (host time): building one runs tma_view and TensorDescriptor's checks (alignment, block
    shape, dtype, strides), ~5 µs, and a backward takes five per call; they depend only on t's
    layout (shape, strides, dtype, 16-byte alignment), so the checked fields are kept per layout
    and later descriptors are copies with t as their base. Only the base refers to t: nothing here
    keeps a tensor alive."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    key = (t.shape, t.stride(), t.dtype, t.data_ptr() % 16, block_rows, interleaved)
    fields = _descriptor_fields.get(key)
    if fields is not None:
        desc = object.__new__(TensorDescriptor)
        desc.__dict__.update(fields)
        desc.base = t
        return desc
    (rows, cols), row_stride = tma_view(t)[:2]
    d = t.shape[3]
    if interleaved:
        shape, strides = interleaved_rows(rows, row_stride)
        box = interleaved_rows(block_rows, d)[0]  # a tile of block_rows rows, seen the same way
        desc = TensorDescriptor(t, [*shape, cols], [*strides, 1], [*box, d], _shared_layout(block_rows, d, t.dtype, 4))
    else:
        desc = TensorDescriptor(t, [rows, cols], [row_stride, 1], [block_rows, d],
                                _shared_layout(block_rows, d, t.dtype))
    if hasattr(desc, "__dict__"):
        if len(_descriptor_fields) >= 4096:
            _descriptor_fields.clear()
        _descriptor_fields[key] = {name: value for name, value in vars(desc).items() if name != "base"}
    return desc


def heads_per_section(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, config: GluonConfig,
                      programs: int) -> int:
    """Query heads per section of the persistent kernel's order (gluon._output_tile) on ``programs``
    programs: causal, whole groups of the H_Q / H_KV query heads that read one K/V head, as many
    as share L2_SECTION_BYTES of K/V and, with the balanced table (``balanced``), make at most one
    round of the grid's output tiles; at least one group. Otherwise, or with ``one_section``, all
    of them (the other orders keep a head's query tiles together).

    Why one round (GLUON_NOTES calls 116-118): a causal section walks longest first, the last query
    tile of each of its heads, then the tile before, so a section of several rounds reads each K/V
    tile again a round later. With sections of 32 MiB of K/V (64 heads at d = 128, N = 1k) the H200
    kept too little of it in L2: the forward read 285 MB from DRAM where cuDNN's reads Q, K and V
    once (201 MB). Sections of one round read 202 MB. With the balanced table they ran 1.06x the
    routes' kernels of 32 MiB sections at d = 128 causal 1k-4k and 12k, 1.02x at 8k, 1.00x at 16k,
    and 1.01-1.03x at d = 64 causal 1k-8k, 0.99x at 16k (calls 117-118). Why the
    balanced table only: where a group's tiles are under a round but over half of one (N = 12k at
    d = 128: 96), the kernel's own order (odd rounds walk the programs backwards) hands the same
    programs the longest tiles in every round: 0.91x the 32 MiB sections there (call 118; 0.63-0.74x
    with half a round at every N, call 117). The table deals each tile to the least loaded program."""
    z, h = q.shape[:2]
    if mask_kind(spec) != 1 or config.one_section:
        return z * h
    group = h // k.shape[1]
    groups = L2_SECTION_BYTES // (2 * k.shape[2] * k.shape[3] * k.element_size())
    if config.balanced:
        groups = min(groups, programs // (triton.cdiv(q.shape[2], config.BLOCK_M) * group))
    return min(z * h, max(1, groups) * group)


# The work of an output tile in persistent_order's model: its key tiles, plus this many for what a
# tile costs besides its steps (Q's wait, the first q·kᵀ, the last p·v, the epilogue). GLUON_NOTES'
# line through d = 64 causal's times at 1k and 2k: 2.47 µs a tile against 1.16 a 128-key step.
TILE_COST_STEPS = 2


def _kernel_order(heads: int, q_tiles: int, programs: int, section: int,
                  causal: bool = True) -> list[list[tuple[int, int]]]:
    """gluon._output_tile's order in Python: each program's (flat head, query tile) in the order it
    walks them, causal (MASK = 1: the snake of longest tiles first) or not (tests check both
    against the rendered kernel's own)."""
    section_rounds = -(-section * q_tiles // programs)
    walks = [[] for _ in range(programs)]
    for g in range(-(-heads // section) * section_rounds):
        first, within_round = g // section_rounds * section, g % section_rounds * programs
        n = min(section, heads - first)
        for p in range(programs):
            within = within_round + (programs - 1 - p if causal and g & 1 else p)
            if within < n * q_tiles:
                walks[p].append((first + within % n, q_tiles - 1 - within // n) if causal
                                else (first + within // q_tiles, within % q_tiles))
    return walks


def _deal(tiles, work, programs: int) -> list[list]:
    """``tiles`` in their order, each to the program with the least modelled work so far (the
    lowest index among equals), which then grows by ``work(tile)``: each program's tiles, in order.
    The persistent kernels' tables, forward (_greedy_order) and backward (backward_order)."""
    heap = [(0, p) for p in range(programs)]
    walks = [[] for _ in range(programs)]
    for tile in tiles:
        load, p = heapq.heappop(heap)
        walks[p].append(tile)
        heapq.heappush(heap, (load + work(tile), p))
    return walks


def _greedy_order(heads: int, walk: list[int], programs: int, section: int) -> list[list[tuple[int, int]]]:
    """The tiles in _output_tile's order (sections of ``section`` heads, longest first within
    each: ``walk[m]`` key tiles for query tile m), dealt by modelled work (_deal: walk[m] +
    TILE_COST_STEPS a tile)."""
    longest_first = sorted(range(len(walk)), key=lambda m: -walk[m])
    tiles = [(hz, m) for first in range(0, heads, section) for m in longest_first
             for hz in range(first, min(first + section, heads))]
    return _deal(tiles, lambda tile: walk[tile[1]] + TILE_COST_STEPS, programs)


def _busiest(walks: list[list[tuple[int, int]]], walk: list[int]) -> int:
    return max(sum(walk[m] + TILE_COST_STEPS for _, m in tiles) for tiles in walks)


def persistent_order(h: int, walk: list[int], heads: int, programs: int, section: int,
                     causal: bool = True) -> torch.Tensor:
    """The persistent kernel's table of output tiles (ORDER: gluon's note on the balanced order), an
    int32 (rounds + 1, programs, 4) CPU tensor: entry (g, p) is (batch, head, query tile, 0) of
    program p's round-g tile, or -1s; its last round is all -1s. ``walk[m]``: key tiles of query
    tile m; ``h`` heads a batch, ``heads`` flat heads. Causal: of _output_tile's own order and the
    greedy one, the one whose busiest program has the least modelled work (_output_tile's at a
    tie); otherwise (every tile walks as far) _output_tile's own order."""
    q_tiles = len(walk)
    own = _kernel_order(heads, q_tiles, programs, section, causal)
    walks = own
    if causal:
        greedy = _greedy_order(heads, walk, programs, section)
        walks = greedy if _busiest(greedy, walk) < _busiest(own, walk) else own
    rounds, none = max(map(len, walks)) + 1, (-1, -1, -1, -1)
    return torch.tensor([[(tiles[g][0] // h, tiles[g][0] % h, tiles[g][1], 0) if g < len(tiles) else none
                          for tiles in walks] for g in range(rounds)], dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _table_on(device: torch.device, build, *args) -> torch.Tensor:
    """A persistent kernel's table, ``build(*args)`` (persistent_order's for the forward,
    backward_order's for the backward), on ``device``: built and copied once per shape (the op's
    plans keep their launch; direct launches, as the benchmarks' are, find it here)."""
    return build(*args).to(device)


@functools.lru_cache(maxsize=None)
def _no_order(device: torch.device) -> torch.Tensor:
    """What the persistent kernel takes for its table where it reads none (ORDER off)."""
    return torch.full((4, ), -1, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class ForwardLaunch:
    """What a forward launch of one call's shapes takes besides its tensors: the kernel, its grid,
    the arguments after (q, k, v descriptors, out, lse), its constexprs, the descriptors' row
    blocks (Q's, K's and V's), and the tile it was made from."""

    fn: object
    grid: tuple
    post: tuple
    constexprs: dict
    blocks: tuple
    config: Optional[GluonConfig] = None
    out_block: Optional[int] = None  # TMA_STORE: the output's descriptor rows (a consumer's)

    def descriptors(self, q, k, v) -> tuple:
        return tuple(_descriptor(t, rows) for t, rows in zip((q, k, v), self.blocks))

    def output(self, out):
        """What the kernel takes for ``out``: out itself, or with TMA_STORE its descriptor."""
        return out if self.out_block is None else _descriptor(out, self.out_block)


def forward_launch(spec: AttentionSpec, q, k, scale: float, config: GluonConfig, programs: Optional[int] = None,
                   section: Optional[int] = None, out_strides: Optional[tuple] = None) -> ForwardLaunch:
    """The ForwardLaunch of ``config`` for these shapes (the caller has checked ``unsupported_call``).
    ``programs``, ``section``: the persistent kernel's grid and heads per section of its causal
    order, by default one program per SM and heads_per_section; checks set fewer of both, so that
    each program walks many output tiles and the order has several sections. ``out_strides``: by
    default a contiguous out's."""
    z, h, n_q, d = q.shape
    out_strides = out_strides or (h * n_q * d, n_q * d, d, 1)
    if out_strides[3] != 1:
        raise ValueError(f"the Gluon forward writes outputs whose head dim is contiguous, not strides {out_strides}")
    out_strides = out_strides[:3]
    raw_max = config.raw_max and raw_max_applies(spec, scale)  # f > 0 at this scale (gluon's note on the row max)
    module = load(spec, raw_max, pack_p=config.pack_p, sign_mask=config.sign_mask)
    rows = config.rows_per_consumer
    constexprs = dict(GROUP=h // k.shape[1], HEAD_DIM=d, BLOCK_M=rows, BLOCK_N=config.BLOCK_N, STAGES=config.STAGES,
                      NUM_WARPS=config.num_warps, PINGPONG=config.pingpong, EARLY=config.early,
                      HOLD=config.hold, num_warps=config.num_warps)
    blocks = (rows, config.BLOCK_N, config.BLOCK_N)
    if config.persistent:
        q_tiles = triton.cdiv(n_q, config.BLOCK_M)  # of a head
        programs = min(q_tiles * z * h, programs or device_profile(q.device).multiprocessors)
        section = section or heads_per_section(spec, q, k, config, programs)
        section_rounds = triton.cdiv(section * q_tiles, programs)
        (q_rz, q_rh, q_ch), (kv_rz, kv_rh, kv_ch) = tma_view(q)[2:], tma_view(k)[2:]
        rounds = triton.cdiv(z * h, section) * section_rounds
        order, ordered = _no_order(q.device), config.balanced and mask_kind(spec) in (0, 1)
        if ordered:  # (a causal table balances the walks; a plain one keeps the kernel's order)
            causal = mask_kind(spec) == 1
            order = _table_on(q.device, persistent_order, h, tile_walks(n_q, k.shape[2], config, causal), z * h,
                              programs, section, causal)
            rounds = order.shape[0] - 1
        post = (order, scale, *out_strides, z, h, n_q, k.shape[2], q_tiles, section, section_rounds, rounds,
                q_rz, q_rh, q_ch, kv_rz, kv_rh, kv_ch)
        # a consumer's rows stored by TMA never cross into the next head only when N_Q is a multiple
        # of them; the descriptor addresses a contiguous output (heads as rows)
        tma_store = config.tma_store and n_q % rows == 0 and out_strides == (h * n_q * d, n_q * d, d)
        constexprs.update(CONSUMERS=config.consumers, SPLIT=config.split, TMA_STORE=tma_store, HALF=config.half,
                          FAST_EPILOGUE=config.fast_epilogue, Q_BUFFERS=config.q_buffers,
                          ORDER=ordered)
        return ForwardLaunch(module._attn_fwd_sm90_wsp, (programs, ), post, constexprs, blocks, config,
                             rows if tma_store else None)
    if not all(row_matrix(t) for t in (q, k)):  # these kernels address heads as rows only
        raise ValueError("the non-persistent Gluon kernels take (Z·H·N, d) row matrices only")
    fn = module._attn_fwd_sm90_ws if config.ws else module._attn_fwd_sm90
    grid = (triton.cdiv(n_q, config.BLOCK_M), z * h)
    return ForwardLaunch(fn, grid, (scale, *out_strides, h, n_q, k.shape[2]), constexprs, blocks, config)


def launch(spec: AttentionSpec, q, k, v, out, lse, scale: float, config: GluonConfig,
           programs: Optional[int] = None, section: Optional[int] = None) -> None:
    """Run the kernel into ``out`` (Z, H, N_Q, d) and ``lse`` (Z, H, N_Q) fp32 with tile
    ``config`` through Triton's JIT launch (see forward_launch)."""
    found = forward_launch(spec, q, k, scale, config, programs, section, tuple(out.stride()))
    found.fn[found.grid](*found.descriptors(q, k, v), found.output(out), lse, *found.post, **found.constexprs)


def tile_walks(n_q: int, n_kv: int, config: GluonConfig, causal: bool) -> tuple:
    """Key tiles each output tile of ``config`` walks (gluon._key_tiles): every one of them, or
    under a causal spec (top-left aligned) those up to its last row's diagonal, at most all."""
    return tuple(-(-min(n_kv, (i + 1) * config.BLOCK_M if causal else n_kv) // config.BLOCK_N)
                 for i in range(-(-n_q // config.BLOCK_M)))


def mean_walk(spec: AttentionSpec, n_q: int, n_kv: int, config: GluonConfig) -> float:
    """Key tiles an output tile of ``config`` walks on average (tile_walks)."""
    walks = tile_walks(n_q, n_kv, config, spec.tile_mode == "causal")
    return sum(walks) / len(walks)


def _not_measured(spec: AttentionSpec, q: torch.Tensor, head_dims: tuple, direction: str) -> Optional[str]:
    """The routing rules the forward and the backward share: head dims where the Gluon kernel was
    measured faster than the portable one on the H200, dtypes run on a GPU, and no ranged spec
    (windows, documents: the portable kernels skip the tiles their ranges exclude; these visit them)."""
    if q.shape[-1] not in head_dims:
        return f"head dim {q.shape[-1]}: the Gluon {direction} was not measured faster than the portable one"
    if q.dtype not in ROUTED_DTYPES:
        return f"{q.dtype}: not yet checked on a GPU"
    if spec.tile_mode == "ranged":
        return f"a ranged spec: the portable {direction} skips the tiles its ranges exclude"
    return None


def qk_only(spec: AttentionSpec) -> bool:
    """Whether ``spec``'s score reads nothing but qk and the scale (no functions, no indices)."""
    return spec.score.free_symbols <= {QK, SCALE} and not spec.score.atoms(sympy.Function)


def spill_free_triton() -> bool:
    """Whether this Triton is one of SPILL_FREE_TRITON, whose compile keeps the three-consumer
    causal kernel within its registers. The QK_ONLY routes were all measured with it, the
    two-consumer one from 2k too, so with another Triton none of them is taken."""
    return ".".join(triton.__version__.split(".")[:2]) in SPILL_FREE_TRITON


def takes(scores: str, spec: AttentionSpec) -> bool:
    """Whether a route for ``scores`` takes ``spec``: ANY_SCORE every score; QK_ONLY a score of qk
    and the scale alone (qk_only) with a Triton in SPILL_FREE_TRITON."""
    return scores == ANY_SCORE or (qk_only(spec) and spill_free_triton())


def routes(spec: AttentionSpec, head_dim: int) -> tuple:
    """The routes of ROUTES for ``spec``'s mask kind at ``head_dim`` that take its score (``takes``),
    (flags, fewest key tiles) each, longest walk first; empty if none."""
    return tuple((flags, walk) for flags, walk, scores in ROUTES.get(head_dim, {}).get(mask_kind(spec), ())
                 if takes(scores, spec))


def _kind(config: GluonConfig) -> tuple:
    """A tile's kernel flags (GluonConfig's fields but its sizes)."""
    sizes = ("BLOCK_M", "BLOCK_N", "STAGES")
    return tuple((f.name, getattr(config, f.name)) for f in fields(config) if f.name not in sizes)


def _route_kind(flags: dict) -> tuple:
    """The kernel flags of a route's tile (ROUTED_KIND and ``flags``)."""
    return _kind(GluonConfig(0, 0, 0, **ROUTED_KIND, **flags))


def routed_config(device: DeviceProfile, spec: AttentionSpec, head_dim: int, elem_bytes: int,
                  n_q: Optional[int] = None, n_kv: Optional[int] = None) -> Optional[GluonConfig]:
    """The tile of the kernel routed for ``spec`` at ``head_dim`` (ROUTED_KIND and a route's flags;
    ROUTED_KIND alone where it has no route), from M: for a call of ``n_q`` queries and ``n_kv``
    keys, the first route (longest walk first) whose fewest key tiles the call's mean_walk reaches,
    or the last, whose minimum not_routed then names; without sizes, the first."""
    found = [(default_config(device, head_dim, elem_bytes, **ROUTED_KIND, **flags), walk)
             for flags, walk in routes(spec, head_dim)]
    found = [(config, walk) for config, walk in found if config is not None]
    if not found:
        return default_config(device, head_dim, elem_bytes, **ROUTED_KIND)
    if n_q is not None:
        for config, walk in found:
            if mean_walk(spec, n_q, n_kv, config) >= walk:
                return config
        return found[-1][0]
    return found[0][0]


_MASK_KINDS = ("no keep-predicate", "a causal keep-predicate", "a keep-predicate that is not causal")


def not_routed(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, config: GluonConfig) -> Optional[str]:
    """Why a call the kernel could compute still runs the portable forward: where the H200 runs
    measured it slower (ROUTES: a mask kind without a route at its head dim; fewer key tiles a
    program than its route's minimum; and, unmeasured, fewer query rows than one output tile,
    where most of its rows would be idle), or where the portable forward skips what this kernel
    would visit (ranged specs: windows, documents, which it skips by per-tile ranges).
    ROUTED_DTYPES keeps the door for a dtype the kernel takes but that was never run on a GPU
    (both it takes were)."""
    reason = _not_measured(spec, q, ROUTED_HEAD_DIMS, "forward")
    if reason:
        return reason
    found = routes(spec, q.shape[-1])
    if not found:
        return f"head dim {q.shape[-1]}: specs with {_MASK_KINDS[mask_kind(spec)]} were not measured faster"
    walks = [walk for flags, walk in found if _route_kind(flags) == _kind(config)]
    if not walks:
        return f"{config} is none of the routes of head dim {q.shape[-1]}"
    min_walk = walks[0]
    if q.shape[2] < config.BLOCK_M:  # not measured; the portable forward takes narrower query tiles
        return f"N_Q = {q.shape[2]} fills less than one {config.BLOCK_M}-row output tile"
    walk = mean_walk(spec, q.shape[2], k.shape[2], config)
    if walk < min_walk:
        return f"{walk:.1f} key tiles per output tile on average, fewer than {min_walk} at head dim {q.shape[-1]}"
    return None


def routed_forward(spec: AttentionSpec, q, k, v, scale: float) -> Optional[ForwardLaunch]:
    """The ForwardLaunch of the routed kernel (ROUTED_KIND) for this call if it applies; None when
    the portable kernels must run instead (the reason logged at debug level). It depends only on
    what launch's plan key holds (spec, shapes, strides, dtypes, alignment, device), so the
    caller decides once per key."""
    config = None
    if q.is_cuda:
        config = routed_config(device_profile(q.device), spec, q.shape[-1], q.element_size(), q.shape[2],
                               k.shape[2])
    reason = unsupported_call(spec, q, k, v, config) or not_routed(spec, q, k, config)
    if reason:
        log.debug("gluon forward not used for %s: %s", spec.describe(), reason)
        return None
    return forward_launch(spec, q, k, scale, config)


# ---------------------------------------------------------------------------------------------
# The backward (gluon_bwd.py): on by default for BWD_ROUTED_HEAD_DIMS on sm_90, 1.01-1.24x the portable
# backward on the H200 at d = 128 once its dQ went by TMA reduce-adds (benchmarks/GLUON_NOTES.md, calls
# 14, 16); at d = 64 with ROWS_AHEAD, 1.03-1.17x launched directly (call 18), 1.04-1.30x through the op (19),
# and a GPT-2 small training step (4 × 2k) 3.4% faster than with FX_FLASH_GLUON_BWD=0 (call 26).

BWD_BLOCK_M = 64  # query rows per tile: P, dP and dS are (64, 128) over two warpgroups, FlashAttention-3's tile
# Query rows a step where a head dim takes more than BWD_BLOCK_M (GLUON_NOTES, call 39): at d = 64 a
# step's five products are short (64 × 128 × 64) and its fixed costs (the ring's waits, LSE and
# Delta, the dQ staging tile's barriers and reduce) weigh most; 128 rows, FlashAttention-3's d = 64
# tile, ran the backward 1.05-1.11x the 64-row step on plain and causal specs (28 B of spills
# causal, none plain). Anything more in the score needs registers the 128-row step has not: a chain
# rule per element (soft-capping: 548 B of spills, 0.88-0.90x) or positional terms (an ALiBi-like
# slope: 300 B, not timed). So only scores of qk and the scale alone take it; the others keep
# BWD_BLOCK_M, as does a device whose M cannot hold two stages of it.
BWD_ROWS = {64: 128}
BWD_BLOCK_N = 128  # keys per program: 64 per warpgroup, the height of one wgmma
BWD_NUM_WARPS = 8
# Q/dO stages: a tile's five products take ~2.5k cycles of the tensor cores alone, so one tile in
# flight beyond the current one already hides a TMA load; a third is margin (a fourth would fit
# at d = 128 and buys nothing but less L1).
BWD_MAX_STAGES = 3
BWD_PREP_ROWS = 64  # query rows per program of the Delta kernel
# The step's schedule by head dim, as measured (GLUON_NOTES, call 18; the backward alone against the
# plain schedule): at d = 128 DV_EARLY 1.00-1.02x in every row, ROWS_AHEAD 0.90-1.01x; at d = 64
# ROWS_AHEAD 1.02-1.07x, DV_EARLY 0.98-0.99x. (dQ's share staged while dK's product ran: 0.82-0.89x
# at d = 128, removed.) Then, timed in alternating rounds (calls 24, 27): keys on rows (KEYS_ON_ROWS)
# with its LSE and Delta read from shared memory (ROWS_SHARED) 1.00-1.08x DV_EARLY at d = 128 (geometric
# mean 1.04; with ROWS_AHEAD instead 0.99-1.03), so it is d = 128's default; at d = 64 0.95-0.98x
# ROWS_AHEAD, and ROWS_SHARED in the queries-on-rows step 0.99-1.02x: ROWS_AHEAD stays. At d = 64's
# 128-row step, each warpgroup on its own 64 rows (SPLIT_M) ran 1.05-1.11x the warpgroups splitting
# the keys, plain and causal, 1k-16k (call 45); backward_config drops it where a step has 64 rows.
# The causal longest-first order (LPT) ran 1.01-1.05x at d = 128 on causal and soft-capping rows,
# 1k-16k, timed beside a control column (call 52: geometric mean 1.033; in call 43, without the
# control, its 16k soft-capping row had run 0.96), and is on there; at d = 64 0.98-1.03x (calls 43,
# 45), off. dK and dV
# stored by TMA through the K/V tiles' shared memory (TMA_EPILOGUE) ran 1.00-1.09x at d = 128
# (geometric mean 1.04) and 1.02-1.09x at d = 64's 128-row step (1.05), plain and causal, 1k-16k
# (call 48).
BWD_SCHEDULES = {128: dict(KEYS_ON_ROWS=True, ROWS_SHARED=True, TMA_EPILOGUE=True, LPT=True),
                 64: dict(ROWS_AHEAD=True, SPLIT_M=True, TMA_EPILOGUE=True)}
_bwd_modules: dict[str, ModuleType] = {}


BWD_ROUTED_HEAD_DIMS = (64, 128)
# What a key tile costs the persistent backward besides its steps, in steps, for backward_order's
# model of each program's work: its K/V load, exposed at the round's start, and the dK/dV epilogue.
BWD_TILE_COST_STEPS = 1
# The persistent walk (PERSISTENT; gluon_bwd's note on it) is an option no route takes. It was
# d = 128 causal qk·scale's route from call 89 (1.011-1.028x the grid of key tiles at N = 1k-16k)
# until the grid with DQ_INTERLEAVE ran ahead of it there: 1.003, 1.016, 1.046, 1.024, 1.031x,
# geometric mean 1.024 (GLUON_NOTES call 111, four alternating rounds, each side the mean of a
# column and its control). Elsewhere it ran 0.96-1.01x (plain, soft-capping, d = 64; call 89).
# Fewest (query head, key tile) pairs per SM for which the backward is routed: below, a call is
# small enough that the Gluon path's extra host work (five descriptors, a third launch) or its few
# long programs cost more than its products save. fwd+bwd at B = 1 on the H200, against the
# portable backward: N = 2k with 16-512 pairs 0.67-1.00x (host-bound), N = 8k with 64-256 pairs
# 0.47-1.10x, with 1024-2048 pairs 1.07-1.20x; 8k with 512 pairs ran 1.06/1.17x, which this rule
# gives up (GLUON_NOTES, call 16).
BWD_MIN_PAIRS_PER_SM = 4


def backward_enabled() -> bool:
    """Whether backwards this kernel supports may be routed to it: yes unless FX_FLASH_GLUON_BWD=0
    (=1 routes every one it supports, past ``not_routed_backward``)."""
    return os.environ.get("FX_FLASH_GLUON_BWD") != "0"


@dataclass(frozen=True)
class GluonBwdConfig:
    """A tile of the Gluon backward: BLOCK_N keys per program, BLOCK_M query rows per step,
    STAGES Q/dO buffers."""

    BLOCK_M: int
    BLOCK_N: int
    STAGES: int
    # the step's schedule (gluon_bwd's note on the schedule): dV's product issued before dP is waited
    # for; each step's LSE and Delta loaded a step ahead
    DV_EARLY: bool = False
    ROWS_AHEAD: bool = False
    # the scores computed transposed, keys on rows, so that P and dS are dV's and dK's register
    # operands (gluon_bwd's note on the orientation); dV's product is then issued as DV_EARLY does
    KEYS_ON_ROWS: bool = False
    # each step's LSE and Delta loaded a few per thread a step ahead and read from shared memory
    # (gluon_bwd's note on rows); it takes the place of ROWS_AHEAD
    ROWS_SHARED: bool = False
    # causal specs: programs started longest walk first, within sections of heads whose Q, dO and
    # dQ rows share L2 (gluon_bwd's note on the order; bwd_heads_per_section)
    LPT: bool = False
    # each warpgroup its own 64 query rows of the scores and of dQ's share, not half the keys and
    # half the head dim (gluon_bwd's note on the warpgroups' shares); BLOCK_M = 128 only
    SPLIT_M: bool = False
    # dK and dV stored through the K/V tiles' shared memory by TMA, not from registers (gluon_bwd's
    # note on the epilogue)
    TMA_EPILOGUE: bool = False
    # one program per SM walking key tiles from the launcher's table, each tile's first query tiles
    # loaded during the last one's epilogue (gluon_bwd's note on the persistent walk; backward_order)
    PERSISTENT: bool = False
    # each dQ share staged with its rows interleaved within groups of 8, so that its 64-bit stores do
    # not conflict in the staging tile's banks, and added back in order by its descriptor's strides
    # (gluon_bwd's note on dQ; interleaved_rows)
    DQ_INTERLEAVE: bool = False
    takes_views = True  # its loads place each head by tma_view's numbers, as the persistent forward's
    sign_mask = False  # its keep-predicate is applied by gl.where, never by its sign (unsupported_call's guard)

    def __str__(self) -> str:
        flags = "".join(f" {name.lower()}" for name, on in self.schedule.items() if on)
        return f"BLOCK_M={self.BLOCK_M} BLOCK_N={self.BLOCK_N} stages={self.STAGES}{flags}"

    @property
    def schedule(self) -> dict:
        return dict(DV_EARLY=self.DV_EARLY, ROWS_AHEAD=self.ROWS_AHEAD, KEYS_ON_ROWS=self.KEYS_ON_ROWS,
                    ROWS_SHARED=self.ROWS_SHARED, LPT=self.LPT, SPLIT_M=self.SPLIT_M,
                    TMA_EPILOGUE=self.TMA_EPILOGUE, PERSISTENT=self.PERSISTENT, DQ_INTERLEAVE=self.DQ_INTERLEAVE)


def footprint_bwd(block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int,
                  keys_on_rows: bool = False, rows_shared: bool = False) -> int:
    """Shared-memory bytes of one backward program: K and V of its key tile, ``stages`` Q and dO
    tiles, P and dS (block_m, block_n) for the products that read them from shared memory (dS
    alone when ``keys_on_rows``: P is then a register operand), the fp32 dQ staging tile (block_m,
    head_dim) of the TMA reduce-adds, two steps' fp32 LSE and Delta when ``rows_shared``, and the
    mbarriers (K/V's, and a ready one per Q and dO buffer; Triton aligns each array to 16 bytes).
    dK, dV and the scores stay in registers, so this is the whole of it: tests compare it with the
    compiled kernel's own count."""
    ring = -(-BARRIER_BYTES * stages // 16) * 16
    scores = 1 if keys_on_rows else 2
    tiles = elem_bytes * (2 * block_n * head_dim + 2 * stages * block_m * head_dim + scores * block_m * block_n)
    rows = 2 * 2 * 4 * block_m if rows_shared else 0
    return tiles + 4 * block_m * head_dim + rows + BARRIER_BYTES + 2 * ring


def backward_rows(spec: AttentionSpec, head_dim: int) -> int:
    """Query rows a step of ``spec``'s backward at ``head_dim``: BWD_ROWS' where the head dim has
    them and the score reads only qk and the scale with a constant chain rule (qk·scale, not
    soft-capping's), else BWD_BLOCK_M. The keep-predicate does not count: causal and prefix-LM
    compile within the registers."""
    return BWD_ROWS.get(head_dim, BWD_BLOCK_M) if qk_scale_only(spec) else BWD_BLOCK_M


def backward_config(device: DeviceProfile, head_dim: int, elem_bytes: int,
                    rows: int = BWD_BLOCK_M) -> Optional[GluonBwdConfig]:
    """The backward's tile for ``head_dim``: BWD_BLOCK_N keys, ``rows`` query rows (BWD_BLOCK_M when
    two stages of ``rows`` do not fit M), and the deepest Q/dO ring (at most BWD_MAX_STAGES) whose
    footprint fits M; None if two stages of BWD_BLOCK_M do not. The head dim's schedule, with
    SPLIT_M only where a step has 64 rows per warpgroup."""
    schedule = BWD_SCHEDULES.get(head_dim, {})
    for block_m in dict.fromkeys((rows, BWD_BLOCK_M)):
        fitting = [s for s in range(2, BWD_MAX_STAGES + 1)
                   if footprint_bwd(block_m, BWD_BLOCK_N, head_dim, elem_bytes, s,
                                    schedule.get("KEYS_ON_ROWS", False), schedule.get("ROWS_SHARED", False))
                   <= device.shared_memory]
        if fitting:
            split_m = schedule.get("SPLIT_M", False) and block_m == 64 * (BWD_NUM_WARPS // 4)
            return GluonBwdConfig(block_m, BWD_BLOCK_N, max(fitting), **{**schedule, "SPLIT_M": split_m})
    return None


def qk_scale_only(spec: AttentionSpec) -> bool:
    """Whether ``spec``'s score reads nothing but qk and the scale, with a constant chain rule
    (qk·scale; not soft-capping's, nor a positional term): the backward's test (BWD_ROWS). The
    forward's qk_only differs: it refuses any function of them and does not ask for a constant
    derivative."""
    return constant_chain_rule(spec) and spec.score.free_symbols <= {QK, SCALE}


def routed_backward_config(device: DeviceProfile, spec: AttentionSpec, head_dim: int,
                           elem_bytes: int) -> Optional[GluonBwdConfig]:
    """The backward's tile for ``spec`` (backward_config at its backward_rows), without LPT where
    the spec is not causal: that order changes causal walks only (gluon_bwd._key_tile), and a
    plain call's tile should not name it; with DQ_INTERLEAVE where interleaves_dq says."""
    config = backward_config(device, head_dim, elem_bytes, backward_rows(spec, head_dim))
    if config is not None and config.LPT and mask_kind(spec) != 1:
        config = replace(config, LPT=False)
    if config is not None and interleaves_dq(spec, head_dim, config):
        config = replace(config, DQ_INTERLEAVE=True)
    return config


def interleaves_dq(spec: AttentionSpec, head_dim: int, config: GluonBwdConfig) -> bool:
    """Whether the routed backward stages dQ's rows interleaved (DQ_INTERLEAVE, gluon_bwd's note on
    dQ): where it was measured ahead on the H200 (GLUON_NOTES calls 108b-108c, the backward alone
    against the route without it, four alternating rounds, N = 1k-16k): d = 64 without a predicate
    on its 128-row tile, 1.022-1.034x; d = 128 on the causal band off the persistent walk (soft-
    capping 0.998-1.037x, geometric mean 1.027; causal qk·scale 1.00-1.05x, and 1.003-1.046x the
    persistent walk that route took before, call 111). Not: d = 128 plain (0.93-0.98x), the
    persistent walk (0.97-1.03x, mean 1.005), d = 64 causal (0.99-1.03x, 16k 0.987)."""
    kind = mask_kind(spec)
    if head_dim == 64:
        return kind == 0 and config.SPLIT_M
    return head_dim == 128 and kind == 1 and not config.PERSISTENT


def unsupported_backward_call(spec: AttentionSpec, dout, q, k, v, lse,
                              config: Optional[GluonBwdConfig]) -> Optional[str]:
    """Why this backward call cannot run the Gluon kernel, or None when it can: the forward's rules
    (device, dtype, head dim, key length a multiple of BLOCK_N, layouts ``tma_view`` addresses, the
    spec), dO laid out as q (its heads placed by the same numbers), a contiguous LSE, and a spec
    whose backward renders."""
    reason = unsupported_call(spec, q, k, v, config)
    if reason:
        return reason
    view = tma_view(dout) if dout.shape == q.shape else None
    if view is None or view[2:] != tma_view(q)[2:]:
        return "dout is not laid out as q (heads as rows, or (Z, N, H, d) storage, placed alike)"
    if not lse.is_contiguous():
        return "lse is not contiguous"
    return spec_reason(spec, backward=True)


def load_backward(spec: AttentionSpec) -> ModuleType:
    """The imported Gluon backward module of ``spec`` (cached as ``load`` caches the forward's)."""
    return _load(spec, render_gluon_bwd, "fx_flash_gluon_bwd", _bwd_modules)


@dataclass
class BackwardLaunch:
    """What a backward launch of one call's shapes takes besides its tensors: the Delta kernel
    (which also zeroes the fp32 dQ accumulator of ``dq_rows`` rows per head: N_Q rounded up to
    BLOCK_M) and the main kernel, one program per key tile and K/V head (with PERSISTENT one per
    SM, reading ``order``), each with its grid and constexprs; ``finish`` cuts dQ to N_Q rows and
    casts it to q's dtype."""

    prep: object
    prep_grid: tuple
    prep_constexprs: dict
    fn: object
    grid: tuple
    constexprs: dict
    config: GluonBwdConfig
    dq_rows: int
    views: tuple  # (Q_RZ, Q_RH, Q_CH, KV_RZ, KV_RH, KV_CH): where each head starts (tma_view)
    section: int  # K/V heads per section of the causal longest-first order (bwd_heads_per_section)
    order: torch.Tensor  # PERSISTENT: the programs' key tiles (backward_order); otherwise unread

    def buffers(self, q, k, v) -> tuple:
        """(delta, dq accumulator, dk, dv), dk and dv contiguous, as the portable backward's."""
        z, h, n_q, d = q.shape
        return (torch.empty((z, h, n_q), device=q.device, dtype=torch.float32),
                torch.empty((z, h, self.dq_rows, d), device=q.device, dtype=torch.float32),
                torch.empty(k.shape, device=k.device, dtype=k.dtype), torch.empty(v.shape, device=v.device, dtype=v.dtype))

    def prep_args(self, out, dout, delta, dq_acc) -> tuple:
        return (out, dout, delta, dq_acc, *out.stride(), *dout.stride(), out.shape[1], out.shape[2], self.dq_rows)

    def args(self, dout, q, k, v, lse, scale, delta, dq_acc, dk, dv) -> tuple:
        rows, keys = self.config.BLOCK_M, self.config.BLOCK_N
        descriptors = (_descriptor(q, rows), _descriptor(k, keys), _descriptor(v, keys), _descriptor(dout, rows),
                       _descriptor(dq_acc, rows, self.config.DQ_INTERLEAVE))
        outputs = (_descriptor(dk, keys), _descriptor(dv, keys)) if self.config.TMA_EPILOGUE else (dk, dv)
        return (*descriptors, *outputs, lse, delta, self.order, scale, *dk.stride(), *dv.stride(), q.shape[1],
                q.shape[2], k.shape[2], self.dq_rows, *self.views, self.section)

    @staticmethod
    def finish(dq_acc, q):
        return dq_acc[:, :, :q.shape[2]].to(q.dtype)


def bwd_heads_per_section(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, config: GluonBwdConfig) -> int:
    """K/V heads per section of the backward's longest-first order (gluon_bwd._key_tile): with LPT
    on a causal spec, as many as share L2_SECTION_BYTES of the rows their programs read and add
    into (each K/V head's GROUP query heads: Q and dO in the dtype, the fp32 dQ accumulator), at
    least one; otherwise all of them (the order is then the grid's own)."""
    heads = k.shape[0] * k.shape[1]
    if not config.LPT or mask_kind(spec) != 1:
        return heads
    z, h, n_q, d = q.shape
    head_bytes = h // k.shape[1] * n_q * d * (2 * q.element_size() + 4)
    return min(heads, max(1, L2_SECTION_BYTES // head_bytes))


def bwd_launch_order(n_tiles: int, heads: int, section: int, longest_first: bool) -> list[tuple[int, int]]:
    """gluon_bwd._key_tile's order in Python: (key tile, flat K/V head) of each program of the
    non-persistent grid in launch order (key tile fastest); with ``longest_first`` (LPT on a causal
    spec) every head's key tile 0, then every head's key tile 1, ..., within sections of
    ``section`` heads (tests check it against the rendered kernel's own)."""
    if not longest_first:
        return [(n, hz) for hz in range(heads) for n in range(n_tiles)]
    return [(n, first + hz) for first in range(0, heads, section) for n in range(n_tiles)
            for hz in range(min(section, heads - first))]


def backward_order(n_tiles: int, heads: int, section: int, causal: bool, lpt: bool, steps: tuple,
                   programs: int) -> torch.Tensor:
    """The persistent backward's table (gluon_bwd's note on the persistent walk), an int32 (1 +
    rounds, programs) CPU tensor: row 0 holds each program's number of rounds, row 1 + r its round-r
    key tile as ``key tile + n_tiles · flat K/V head``, or -1. The key tiles in the non-persistent
    launch order (bwd_launch_order), each to the program with the least modelled work so far
    (``steps[n]``, the query tiles key tile n's walk takes, plus BWD_TILE_COST_STEPS; the lowest
    index among equals): the hardware's own dispatch of the grid, fixed ahead. Every program gets a
    round (the kernel's prologue loads round 0's tiles), so ``programs`` is at most the key tiles."""
    if not 0 < programs <= n_tiles * heads:
        raise ValueError(f"{programs} programs for {n_tiles * heads} key tiles: each program needs one")
    tiles = [n + n_tiles * hz for n, hz in bwd_launch_order(n_tiles, heads, section, causal and lpt)]
    walks = _deal(tiles, lambda tile: steps[tile % n_tiles] + BWD_TILE_COST_STEPS, programs)
    rounds = max(map(len, walks))
    table = [[len(w) for w in walks]] + [[w[r] if r < len(w) else -1 for w in walks] for r in range(rounds)]
    return torch.tensor(table, dtype=torch.int32)


def backward_steps(n_q: int, n_kv: int, config: GluonBwdConfig, group: int, causal: bool) -> tuple:
    """Steps (query tiles, over the group's heads) each key tile of a K/V head walks
    (gluon_bwd._query_tiles): all of them, or under a causal spec those from its diagonal on."""
    n_m = -(-n_q // config.BLOCK_M)
    return tuple(group * (n_m - (min(n * (config.BLOCK_N // config.BLOCK_M), n_m) if causal else 0))
                 for n in range(n_kv // config.BLOCK_N))


def backward_launch(spec: AttentionSpec, q, k, config: GluonBwdConfig,
                    programs: Optional[int] = None) -> BackwardLaunch:
    """The BackwardLaunch of ``config`` for these shapes (the caller has checked
    ``unsupported_backward_call``). ``programs``: the persistent kernel's grid, by default one
    program per SM (checks set fewer, so that each walks many key tiles)."""
    z, h, n_q, d = q.shape
    module = load_backward(spec)
    dq_rows = triton.cdiv(n_q, config.BLOCK_M) * config.BLOCK_M
    n_tiles, heads, section = k.shape[2] // config.BLOCK_N, z * k.shape[1], bwd_heads_per_section(spec, q, k, config)
    grid, order = (n_tiles, heads), _no_order(q.device)
    if config.PERSISTENT:
        causal = mask_kind(spec) == 1
        programs = min(n_tiles * heads, programs or device_profile(q.device).multiprocessors)
        order = _table_on(q.device, backward_order, n_tiles, heads, section, causal, config.LPT,
                          backward_steps(n_q, k.shape[2], config, h // k.shape[1], causal), programs)
        grid = (programs, )
    return BackwardLaunch(
        module._attn_bwd_sm90_prep, (triton.cdiv(dq_rows, BWD_PREP_ROWS), z * h),
        dict(HEAD_DIM=d, BLOCK=BWD_PREP_ROWS, NUM_WARPS=4, num_warps=4),
        module._attn_bwd_sm90, grid,
        dict(GROUP=h // k.shape[1], HEAD_DIM=d, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, STAGES=config.STAGES,
             NUM_WARPS=BWD_NUM_WARPS, num_warps=BWD_NUM_WARPS, **config.schedule),
        config, dq_rows, (*tma_view(q)[2:], *tma_view(k)[2:]), section, order)


def launch_backward(spec: AttentionSpec, dout, q, k, v, out, lse, scale: float, config: GluonBwdConfig,
                    programs: Optional[int] = None):
    """(dq, dk, dv) of one call (the caller has checked ``unsupported_backward_call``), launched
    through ``JITFunction.run``: the BackwardLaunch's two kernels, then dQ finished. ``programs``:
    as backward_launch's."""
    launch = backward_launch(spec, q, k, config, programs)
    delta, dq_acc, dk, dv = launch.buffers(q, k, v)
    launch.prep[launch.prep_grid](*launch.prep_args(out, dout, delta, dq_acc), **launch.prep_constexprs)
    launch.fn[launch.grid](*launch.args(dout, q, k, v, lse, scale, delta, dq_acc, dk, dv), **launch.constexprs)
    return launch.finish(dq_acc, q), dk, dv


def not_routed_backward(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor,
                        config: GluonBwdConfig) -> Optional[str]:
    """Why a backward the kernel could compute still runs the portable one (FX_FLASH_GLUON_BWD=1
    skips these): head dims other than BWD_ROUTED_HEAD_DIMS (those measured on the H200), dtypes
    never run on a GPU, ranged specs (the portable backward skips the tiles their ranges exclude;
    this kernel visits them), and small calls (fewer than BWD_MIN_PAIRS_PER_SM query-head/key-tile
    pairs per SM)."""
    if os.environ.get("FX_FLASH_GLUON_BWD") == "1":
        return None
    reason = _not_measured(spec, q, BWD_ROUTED_HEAD_DIMS, "backward")
    if reason:
        return reason
    pairs = q.shape[0] * q.shape[1] * (k.shape[2] // config.BLOCK_N)
    sms = device_profile(q.device).multiprocessors
    if pairs < BWD_MIN_PAIRS_PER_SM * sms:
        return f"{pairs} (query head, key tile) pairs: fewer than {BWD_MIN_PAIRS_PER_SM} per SM"
    return None


def routed_backward(spec: AttentionSpec, dout, q, k, v, lse) -> Optional[BackwardLaunch]:
    """The BackwardLaunch for this call if the Gluon backward takes it; None when the portable
    backward must run instead (the reason logged at debug level): switched off, unsupported, not
    routed, or under ``torch.use_deterministic_algorithms`` (this kernel's dQ sum is not; the
    portable backward's separate dQ pass is). It depends only on what launch's plan key holds, so
    the caller decides once per key."""
    if not backward_enabled():
        reason = "FX_FLASH_GLUON_BWD=0"
    elif torch.are_deterministic_algorithms_enabled():
        reason = "torch.use_deterministic_algorithms(True): the portable backward's dQ is deterministic"
    else:
        config = None
        if q.is_cuda:
            config = routed_backward_config(device_profile(q.device), spec, q.shape[-1], q.element_size())
        reason = unsupported_backward_call(spec, dout, q, k, v, lse, config) or not_routed_backward(spec, q, k, config)
    if reason:
        log.debug("gluon backward not used for %s: %s", spec.describe(), reason)
        return None
    return backward_launch(spec, q, k, config)
