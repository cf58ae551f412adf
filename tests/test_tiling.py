"""Tiles derived from shared memory M: every candidate fits the footprint model on mocked
devices, tiles grow with M, the paper's sizes come first; the forward's model is the compiled
sm_90 kernel's count; on a GPU, compiled binaries fit M."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_flash.codegen import tiling
from fx_flash.codegen.spec import sdpa_spec, spec_from_text
from fx_flash.device import INTERPRETER_PROFILE, DeviceProfile, device_profile

ROOT = Path(__file__).resolve().parents[1]
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


def _nothing_fits(device, kernel, head_dim, elem, scratch=False) -> bool:
    """Not even the smallest tile (16 × 16, one stage) fits M: candidates must raise."""
    smallest = tiling.MIN_BLOCK
    return tiling.footprint(kernel, smallest, smallest, head_dim, elem, 1, scratch) > device.shared_memory


@pytest.mark.parametrize("scratch", [False, True], ids=["", "scratch"])
@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("device", DEVICES.values(), ids=DEVICES.keys())
def test_candidates_fit_budget(device, kernel, head_dim, elem, scratch):
    """Every candidate's modelled footprint is at most M, and registers hold its accumulators;
    where not even the smallest tile fits (d = 256 fp32 in 48 KiB), candidates raises."""
    if _nothing_fits(device, kernel, head_dim, elem, scratch):
        with pytest.raises(ValueError, match="no tile"):
            tiling.candidates(kernel, device, head_dim, elem, scratch=scratch)
        return
    configs = tiling.candidates(kernel, device, head_dim, elem, scratch=scratch)
    assert 1 <= len(configs) <= tiling.MAX_CANDIDATES
    for c in configs:
        assert tiling.footprint(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, elem, c.num_stages, scratch) <= device.shared_memory
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
    (CONSUMER, "fwd", 128, 0, (128, 64, 8, 2)),  # 98304 B of 101376 at two stages (three: 131072)
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
    rows = 16 if kernel == "fwd_split" else 0
    for waves, programs, scratch in itertools.product((0, 1, 2, 4, 8, 64), (1, 2), (False, True)):
        if _nothing_fits(device, kernel, head_dim, elem, scratch):
            continue  # test_candidates_fit_budget
        c = tiling.default_config(kernel, device, head_dim, elem, rows, waves, programs=programs, scratch=scratch)
        assert (tiling.footprint(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, elem, c.num_stages, scratch)
                <= device.shared_memory)
        assert tiling._register_fits(kernel, c.BLOCK_M, c.BLOCK_N, head_dim, c.num_warps)
        resident = c.BLOCK_N if tiling.RESIDENT_AXIS[kernel] == "n" else c.BLOCK_M
        if rows:
            assert resident == rows
        elif waves:
            assert resident <= max(32, tiling.MIN_BLOCK * waves)
        candidates = tiling.candidates(kernel, device, head_dim, elem, rows, first=c, scratch=scratch)
        assert candidates[0] == c and len(set(candidates)) == len(candidates) <= tiling.MAX_CANDIDATES


# Two programs per SM (tiling.programs_per_sm): the dense dK/dV kernel, bf16, long sequences.
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


def test_programs_per_sm():
    """Two for the forward in every tile mode and for the dense dK/dV; causal and ranged dK/dV
    (programs of different lengths), split-KV and dQ: one."""
    modes = ("dense", "causal", "ranged")
    assert [tiling.programs_per_sm("fwd", m) for m in modes] == [2, 2, 2]
    assert [tiling.programs_per_sm("bwd_dkdv", m) for m in modes] == [2, 1, 1]
    assert {tiling.programs_per_sm(k, m) for k in ("fwd_split", "bwd_dq") for m in modes} == {1}


# The forward with room for two programs per SM (at three stages: SHARED_STAGES), bf16, by the
# key length it walks (0: long).
TWO_PROGRAM_FORWARDS = [
    (H200, 128, 1024, False, (64, 64, 4, 3)),  # 114688 B ≤ M / 2 = 116224; measured 6-16% faster at 1k
    (H200, 128, 2048, False, (64, 64, 4, 3)),  # 16 key tiles of 128: shorter than LONG_WALK
    (H200, 128, 4096, False, (128, 128, 8, 3)),  # 32 key tiles of 128: one full tile (229376 B)
    (H200, 128, 0, False, (128, 128, 8, 3)),
    (H200, 64, 0, False, (128, 64, 8, 3)),  # the full-row tile already fits M / 2: kept at any length
    (H200, 64, 1024, False, (128, 64, 8, 3)),
    (H200, 256, 0, False, (128, 64, 8, 2)),  # nothing of 64 rows fits M / 2 at three stages: one program
    (H200, 128, 1024, True, (128, 64, 8, 3)),  # an operand's fp32 score tile (+16 KiB) no longer fits M / 2
    (H200, 128, 0, True, (128, 64, 8, 3)),
    (DEVICES["a100"], 128, 1024, False, (128, 64, 8, 3)),  # M / 2 = 83456: one program
]


@pytest.mark.parametrize("device, head_dim, n_kv, scratch, golden", TWO_PROGRAM_FORWARDS,
                         ids=[f"{g[0].shared_memory}-d{g[1]}-n{g[2]}{'-scratch' if g[3] else ''}"
                              for g in TWO_PROGRAM_FORWARDS])
def test_two_programs_per_sm_forward(device, head_dim, n_kv, scratch, golden):
    """The dense or causal forward's default (widen: the LONG_WALK rule applies)."""
    c = tiling.default_config("fwd", device, head_dim, 2, n_streamed=n_kv, programs=2, scratch=scratch, widen=True)
    assert (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) == golden


def test_ranged_forward_keeps_the_shared_tile_on_long_sequences():
    """A ranged spec's walk is what its tables keep, not the key length: no LONG_WALK widening."""
    assert [tiling.widens_long_walks("fwd", m) for m in ("dense", "causal", "ranged")] == [True, True, False]
    assert not any(tiling.widens_long_walks(k, "dense") for k in ("fwd_split", "bwd_dq", "bwd_dkdv"))
    c = tiling.default_config("fwd", H200, 128, 2, n_streamed=16384, programs=2)
    assert (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) == (64, 64, 4, 3)


def test_default_tile_is_no_longer_than_the_sequence():
    """A short sequence (bucket 32) gets a 32-row resident and a 32-key streamed tile."""
    c = tiling.default_config("fwd", H200, 64, 2, 0, 0, n_resident=32, n_streamed=32)
    assert (c.BLOCK_M, c.BLOCK_N) == (32, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_launch_asks_two_programs_for_the_dense_dkdv_kernel(causal, monkeypatch):
    """The launches pass programs_per_sm of the spec's tile mode to the default rule."""
    from fx_flash.codegen import launch

    asked = []
    rule = tiling.default_config

    def recording(kernel, *args, **kwargs):
        asked.append((kernel, args[7] if len(args) >= 8 else kwargs.get("programs", 1)))
        return rule(kernel, *args, **kwargs)

    monkeypatch.setattr(tiling, "default_config", recording)
    launch.CHOSEN.clear()
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    spec = sdpa_spec(causal=causal)
    out, lse = launch.attention_forward(q, k, v, [], None, 0.0, 0.25, spec)
    launch.attention_backward(torch.randn_like(out), q, k, v, out, lse, [], None, 0.0, 0.25, spec)
    assert ("bwd_dkdv", 1 if causal else 2) in asked and ("fwd", 2) in asked


# The forward footprint against the compiled kernel (sm_90, bf16, tests/portable_sm90.py): the two-
# program rule's fit at d = 128 (114688 of M / 2 = 116224 B) leaves 1.3% of margin, so the model
# must be the compiler's count, not a bound. (spec, head dim, tile, whether it reads a score tile)
_BIAS = "score=qk*scale + t0; keep=kv_idx <= q_idx; t0=float[0, 0, q_idx, kv_idx]"
_MASK = "score=qk*scale; keep=t0 & (kv_idx <= q_idx); t0=bool[b, 0, q_idx, kv_idx]"
COMPILED_FORWARDS = [
    ("score=qk*scale; keep=kv_idx <= q_idx", 128, (64, 64, 4, 3)),
    ("score=qk*scale; keep=kv_idx <= q_idx", 128, (128, 64, 8, 3)),
    ("score=qk*scale; keep=(kv_idx <= q_idx) & (q_idx - kv_idx < 1024)", 64, (128, 64, 8, 3)),
    ("score=qk*scale; dropout", 128, (128, 64, 8, 2)),
    (_BIAS, 128, (64, 64, 4, 3)),
    (_MASK, 128, (128, 64, 8, 3)),
]


@pytest.fixture(scope="module")
def compiled_forwards():
    """One process compiles COMPILED_FORWARDS for sm_90 (why a process: tests/portable_sm90.py)."""
    args = []
    for text, d, tile in COMPILED_FORWARDS:
        args += [text, str(d), *map(str, tile)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-m", "tests.portable_sm90", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("i", range(len(COMPILED_FORWARDS)),
                         ids=[f"{'bias' if t == _BIAS else 'mask' if t == _MASK else t.split('; ')[-1][:12]}-d{d}-"
                              f"{'x'.join(map(str, tile[:2]))}/{tile[2]}/{tile[3]}" for t, d, tile in COMPILED_FORWARDS])
def test_forward_footprint_is_the_compiled_shared_memory(compiled_forwards, i):
    """tiling.footprint("fwd") equals the shared memory of the forward compiled for sm_90: Q and
    the K/V stages, plus one fp32 score tile where an operand is read along both axes."""
    text, d, (m, n, w, s) = COMPILED_FORWARDS[i]
    report = compiled_forwards[i]
    assert report["spec"] == text and report["tile"] == [d, m, n, w, s]
    scratch = spec_from_text(text).reads_score_tiles
    assert scratch == (text in (_BIAS, _MASK))
    assert report["shared"] == tiling.footprint("fwd", m, n, d, 2, s, scratch)
