"""Tiles derived from shared memory M: every candidate fits the footprint model on mocked
devices, tiles grow with M, the paper's sizes come first; on a GPU, compiled binaries fit M."""

from __future__ import annotations

import itertools

import pytest
import torch

from fx_flash.codegen import tiling
from fx_flash.codegen.spec import sdpa_spec
from fx_flash.device import INTERPRETER_PROFILE, DeviceProfile, device_profile

DEVICES = {
    "default_48k": DeviceProfile("48 KiB default", 49152, 80, (8, 0)),
    "ada_rtx": DeviceProfile("Ada RTX", 101376, 128, (8, 9)),
    "a100": DeviceProfile("A100", 166912, 108, (8, 0)),
    "h100": DeviceProfile("H100", 232448, 132, (9, 0)),
}
KERNELS = list(tiling.FOOTPRINT)


def test_paper_formula():
    """B_c = ceil(M / 4d), B_r = min(B_c, d), with M in elements (H100, bf16, d = 128)."""
    assert tiling.paper_blocks(232448, 128, 2) == (128, 227)
    assert tiling.paper_blocks(49152, 64, 4) == (48, 48)


@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("device", DEVICES.values(), ids=DEVICES.keys())
def test_candidates_fit_budget(device, kernel, head_dim, elem):
    """Every candidate's modelled footprint is at most M, and registers hold its accumulators."""
    if device.shared_memory < 60000 and head_dim == 256 and elem == 4:
        with pytest.raises(ValueError, match="no tile"):
            tiling.candidates(kernel, device, head_dim, elem)
        return
    configs = tiling.candidates(kernel, device, head_dim, elem)
    assert 1 <= len(configs) <= tiling.MAX_CANDIDATES
    for c in configs:
        assert tiling.footprint(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, elem, c.num_stages) <= device.shared_memory
        assert c.BLOCK_M >= tiling.MIN_BLOCK and c.BLOCK_N >= tiling.MIN_BLOCK
        assert c.BLOCK_M & (c.BLOCK_M - 1) == 0 and c.BLOCK_N & (c.BLOCK_N - 1) == 0  # powers of two


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tiles_grow_with_shared_memory(kernel, head_dim):
    """More shared memory never shrinks the largest tile or the deepest pipeline on offer."""
    ordered = sorted(DEVICES.values(), key=lambda d: d.shared_memory)
    biggest = [max(c.BLOCK_M * c.BLOCK_N * c.num_stages for c in tiling.candidates(kernel, d, head_dim, 2))
               for d in ordered]
    assert biggest == sorted(biggest)
    assert biggest[-1] > biggest[0]


def test_first_candidate_is_papers_pick():
    """On an H100 in bf16 at d = 128 the forward starts from (B_r, B_c) = (128, 227) → (128, 128)."""
    first = tiling.candidates("fwd", DEVICES["h100"], 128, 2)[0]
    assert (first.BLOCK_M, first.BLOCK_N) == (128, 128)
    assert tiling.footprint("fwd", 128, 128, 128, 2, first.num_stages) <= 232448


def test_max_stages_solves_footprint():
    """The stage count solved with sympy is the largest s with footprint(s) ≤ M."""
    s = tiling.max_stages("fwd", 128, 64, 128, 2, 232448)
    assert tiling.footprint("fwd", 128, 64, 128, 2, s) <= 232448 < tiling.footprint("fwd", 128, 64, 128, 2, s + 1) \
        or s == tiling.STAGES[-1]


def test_head_dim_padding():
    """Head dims pad to the next power of two, at least 16 (80 → 128, 8 → 16)."""
    assert [tiling.pad_head_dim(d) for d in (8, 16, 80, 96, 128, 256)] == [16, 16, 128, 128, 128, 256]


def test_cpu_uses_interpreter_profile():
    """CPU tensors get the documented interpreter profile."""
    assert device_profile(torch.device("cpu")) == INTERPRETER_PROFILE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_compiled_kernels_fit_device(head_dim):
    """On a real GPU the default configuration compiles and its binary's shared memory ≤ M."""
    import fx_flash
    from fx_flash.codegen import launch, loader

    q, k, v = (torch.randn(1, 2, 256, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fx_flash.flash_attention(q, k, v)
    m = device_profile(q.device).shared_memory
    fn = loader.load(sdpa_spec())._attn_fwd
    shared = [kern.metadata.shared for cache in fn.device_caches.values() for kern in cache[0].values()]
    assert shared and max(shared) <= m


# The untuned default (tiling.default_config): golden picks per mocked device, bf16. On the H200
# (and H100: same M and SMs) the d = 64 forward and the dQ picks are the tuner's measured choices
# at N = 8k (benchmarks/RESULTS.md, tiles against M; the d = 128 forward's was (128, 128, 8, 2));
# dK/dV keeps 128 keys resident, as FlexAttention's sm90 default does.
H200 = DeviceProfile("NVIDIA H200", 232448, 132, (9, 0))
CONSUMER = DeviceProfile("consumer 101376 B", 101376, 128, (8, 9))
GOLDEN = [
    # device, kernel, head dim, waves bucket → (BLOCK_M, BLOCK_N, warps, stages)
    (H200, "fwd", 64, 0, (128, 64, 8, 3)),
    (H200, "fwd", 128, 0, (128, 64, 8, 3)),
    (H200, "bwd_dq", 64, 0, (128, 64, 8, 3)),
    (H200, "bwd_dq", 128, 0, (128, 64, 8, 3)),
    (H200, "bwd_dkdv", 64, 0, (64, 128, 8, 3)),
    (H200, "bwd_dkdv", 128, 0, (64, 128, 8, 3)),
    (H200, "bwd_dkdv", 256, 0, (64, 64, 8, 2)),  # two 256-wide accumulators: 64 keys need 8 warps
    (H200, "fwd", 128, 64, (128, 64, 8, 3)),  # (16, 32, 1024, 64)-like: 64 waves of 16-row tiles
    (H200, "fwd", 64, 4, (64, 64, 4, 3)),  # few programs: 64-row tiles keep ~one wave
    (H200, "fwd", 64, 2, (32, 64, 4, 3)),  # (1, 4, 1024, 64): 256 programs at 16 rows on 132 SMs
    (H200, "bwd_dkdv", 128, 1, (64, 32, 4, 3)),  # the resident axis is the keys: BLOCK_N shrinks
    (DEVICES["a100"], "fwd", 128, 0, (128, 64, 8, 3)),
    (DEVICES["a100"], "bwd_dq", 128, 0, (128, 64, 8, 2)),  # 3 stages no longer fit 166912 B
    (DEVICES["a100"], "bwd_dkdv", 128, 0, (64, 128, 8, 2)),
    (CONSUMER, "fwd", 64, 0, (128, 64, 8, 3)),
    (CONSUMER, "fwd", 128, 0, (64, 64, 4, 2)),  # 101376 B: the resident tile halves first
    (CONSUMER, "bwd_dq", 128, 0, (32, 64, 4, 2)),
    (CONSUMER, "bwd_dkdv", 128, 0, (64, 32, 4, 2)),
]


@pytest.mark.parametrize("device, kernel, head_dim, waves, golden", GOLDEN,
                         ids=[f"{g[0].shared_memory}-{g[1]}-d{g[2]}-w{g[3]}" for g in GOLDEN])
def test_default_tile_matches_golden_choice(device, kernel, head_dim, waves, golden):
    """The default tile per mocked device, kernel, head dim and occupancy is the pinned choice."""
    c = tiling.default_config(kernel, device, head_dim, 2, 0, waves)
    assert (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) == golden


@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("device", [*DEVICES.values(), H200], ids=[*DEVICES, "h200"])
def test_default_tile_fits_m_and_is_the_tuners_first_candidate(device, kernel, head_dim, elem):
    """The default fits M and the register model at every occupancy, keeps about a wave of
    programs (resident rows ≤ 16·waves, down to 32), and leads the tuner's candidate list."""
    if device.shared_memory < 60000 and head_dim == 256 and elem == 4:
        return  # no tile fits (test_candidates_fit_budget)
    rows = 16 if kernel == "fwd_split" else 0
    for waves, programs in itertools.product((0, 1, 2, 4, 8, 64), (1, 2)):
        c = tiling.default_config(kernel, device, head_dim, elem, rows, waves, programs=programs)
        assert tiling.footprint(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, elem, c.num_stages) <= device.shared_memory
        assert tiling._register_fits(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, c.num_warps)
        resident = c.BLOCK_N if tiling.RESIDENT_AXIS[kernel] == "n" else c.BLOCK_M
        if rows:
            assert resident == rows
        elif waves:
            assert resident <= max(32, tiling.MIN_BLOCK * waves)
        candidates = tiling.candidates(kernel, device, head_dim, elem, rows, first=c)
        assert candidates[0] == c and len(set(candidates)) == len(candidates) <= tiling.MAX_CANDIDATES


# Two programs per SM (tiling.programs_per_sm: the dense dK/dV kernel), bf16, long sequences.
TWO_PROGRAMS = [
    (H200, 128, (64, 64, 4, 2)),  # measured 8-10% faster than (64, 128, 8, 3) at N = 1k-16k
    (H200, 64, (64, 128, 8, 3)),  # the one-program tile already fits M / 2 (114688 B)
    (H200, 256, (64, 64, 8, 2)),  # no tile of >= 64 keys fits M / 2: the one-program rule
    (DEVICES["a100"], 64, (64, 64, 4, 3)),
    (DEVICES["a100"], 128, (64, 128, 8, 2)),  # nothing fits 83456 B at two stages
]


@pytest.mark.parametrize("device, head_dim, golden", TWO_PROGRAMS,
                         ids=[f"{g[0].shared_memory}-d{g[1]}" for g in TWO_PROGRAMS])
def test_two_programs_per_sm_default(device, head_dim, golden):
    """With room for two programs per SM asked for, the dK/dV default is the pinned choice."""
    c = tiling.default_config("bwd_dkdv", device, head_dim, 2, programs=2)
    assert (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) == golden


def test_only_the_dense_dkdv_kernel_asks_for_two_programs():
    """Causal and ranged dK/dV (programs of different lengths) and every other kernel: one."""
    assert tiling.programs_per_sm("bwd_dkdv", "dense") == 2
    assert [tiling.programs_per_sm("bwd_dkdv", m) for m in ("causal", "ranged")] == [1, 1]
    assert {tiling.programs_per_sm(k, "dense") for k in ("fwd", "fwd_split", "bwd_dq")} == {1}


def test_default_tile_is_no_longer_than_the_sequence():
    """A short sequence (bucket 32) gets a 32-row resident and a 32-key streamed tile."""
    c = tiling.default_config("fwd", H200, 64, 2, 0, 0, n_resident=32, n_streamed=32)
    assert (c.BLOCK_M, c.BLOCK_N) == (32, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_launch_asks_two_programs_for_the_dense_dkdv_kernel(causal, monkeypatch):
    """The backward's launch passes programs_per_sm of its spec's tile mode to the default rule."""
    from fx_flash.codegen import launch

    asked = []
    rule = tiling.default_config

    def recording(kernel, *args, **kwargs):
        asked.append((kernel, args[-1] if len(args) >= 8 else kwargs.get("programs", 1)))
        return rule(kernel, *args, **kwargs)

    monkeypatch.setattr(tiling, "default_config", recording)
    launch.CHOSEN.clear()
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    spec = sdpa_spec(causal=causal)
    out, lse = launch.attention_forward(q, k, v, [], None, 0.0, 0.25, spec)
    launch.attention_backward(torch.randn_like(out), q, k, v, out, lse, [], None, 0.0, 0.25, spec)
    assert ("bwd_dkdv", 1 if causal else 2) in asked and ("fwd", 1) in asked
