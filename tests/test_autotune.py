"""The tune stage: each key benchmarked once, remembered in memory and in a JSON record on disk.

No GPU needed: ``bench`` is injected, so these tests count its calls. The last test drives the
tuned launch path through Triton's interpreter with a fake timer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import triton

import fx_flash
from fx_flash.codegen import autotune, launch, loader, skipping, tiling
from fx_flash.codegen.spec import sdpa_spec
from fx_flash.codegen.tiling import TileConfig
from fx_flash.device import INTERPRETER_PROFILE, interpreting
from tests.numerics import assert_against_reference

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 3), TileConfig(64, 128, 8, 2), TileConfig(32, 32, 4, 1)]
TIMES = {CANDIDATES[0]: 3.0, CANDIDATES[1]: 2.0, CANDIDATES[2]: 1.5, CANDIDATES[3]: 4.0}  # the third is fastest


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache directory and no choices in memory."""
    monkeypatch.setenv("FX_FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FX_FLASH_AUTOTUNE_CACHE", raising=False)
    autotune.clear_memory()
    launch.CHOSEN.clear()
    yield
    autotune.clear_memory()
    launch.CHOSEN.clear()


def _key(**changes) -> dict:
    key = {"module": "fx_flash_0123456789abcdef_a1b2c3d4e5f6", "source_sha256": "feedfacecafebeef",
           "device": "NVIDIA H100 80GB HBM3", "shared_memory": 232448, "multiprocessors": 132,
           "capability": [9, 0], "triton": "3.6.0", "torch": "2.11.0", "dtype": "torch.bfloat16",
           "elem_bytes": 2, "constexprs": {"HEAD_DIM": 128, "GROUP": 1, "N_Q_BUCKET": 2048, "N_KV_BUCKET": 2048},
           "waves_bucket": 64}
    key.update(changes)
    return key


class Bench:
    """A fake benchmark: returns ``times[config]`` (or raises for configs in ``fail``), counting calls."""

    def __init__(self, fail=(), error=None, times=None):
        self.calls: list[TileConfig] = []
        self.fail, self.error, self.times = set(fail), error, times or TIMES

    def __call__(self, config: TileConfig) -> float:
        self.calls.append(config)
        if config in self.fail:
            raise self.error or autotune.COMPILE_ERRORS[0](300000, 232448, "shared memory")
        return self.times[config]


def _record_files(root: Path) -> list[Path]:
    return sorted((root / "autotune").glob("*.json")) if (root / "autotune").exists() else []


def test_first_call_benchmarks_every_candidate_and_picks_the_fastest(tmp_path):
    """A new key times each candidate once, returns the fastest and records every timing on disk."""
    bench = Bench()
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, bench) == CANDIDATES[2]
    assert bench.calls == CANDIDATES
    (path,) = _record_files(tmp_path)
    assert path == autotune.record_path("_attn_fwd", _key(), CANDIDATES) and path.name.startswith("_attn_fwd-")
    record = json.loads(path.read_text())
    assert record["best"] == {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    assert [t["ms"] for t in record["timings"]] == [TIMES[c] for c in CANDIDATES]
    assert record["key"]["device"] == "NVIDIA H100 80GB HBM3" and len(record["key"]["candidates"]) == 4


def test_ties_go_to_the_earlier_candidate():
    """Equal times keep tiling's preference order (the paper's pick comes first)."""
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, lambda c: 1.0) == CANDIDATES[0]


def test_second_call_in_the_same_process_does_not_benchmark():
    """The in-process layer answers a key already tuned, without touching the bench."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    again = Bench()
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, again) == CANDIDATES[2]
    assert again.calls == []


SPEC = sdpa_spec(causal=True)


def _launch_key(n_q: int, n_kv: int, head_dim: int = 64, dtype=torch.float16) -> dict:
    """The key launch builds for the forward kernel at these sizes."""
    spec = SPEC
    q = torch.empty(2, 8, n_q, head_dim, dtype=dtype)
    k = torch.empty(2, 2, n_kv, head_dim, dtype=dtype)
    consts, _ = launch._common(spec, q, k)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), 2 * 8)  # noqa: E731 - the forward's grid
    return launch._tuning_key(loader.load(spec), q, launch.tuning_consts(consts), launch._waves(grid, q))


def test_lengths_in_one_bucket_share_a_choice():
    """N_Q 1000 and 1020 (both in the 1024 bucket) share one result; 1025 is tuned anew."""
    first = Bench()
    autotune.choose("_attn_fwd", _launch_key(1000, 1000), CANDIDATES, first)
    same_bucket = Bench()
    autotune.choose("_attn_fwd", _launch_key(1020, 999), CANDIDATES, same_bucket)
    next_bucket = Bench()
    autotune.choose("_attn_fwd", _launch_key(1025, 1000), CANDIDATES, next_bucket)
    assert (len(first.calls), len(same_bucket.calls), len(next_bucket.calls)) == (4, 0, 4)


def test_launch_key_holds_what_changes_the_answer():
    """The launch key names the generated source, device, versions, dtype, head dim, GROUP, the
    length buckets and the waves bucket, and leaves out the exact lengths and head count."""
    key = _launch_key(1000, 300, head_dim=80, dtype=torch.bfloat16)
    source = Path(loader.load(SPEC).__file__)  # loaded once per process, maybe by an earlier test
    assert key["module"] == source.stem and SPEC.key in key["module"]
    assert key["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    assert key["dtype"] == "torch.bfloat16" and key["elem_bytes"] == 2
    assert {"device", "shared_memory", "triton", "torch"} <= key.keys()
    consts = key["constexprs"]
    assert (consts["HEAD_DIM"], consts["GROUP"], consts["N_Q_BUCKET"], consts["N_KV_BUCKET"]) == (80, 4, 1024, 512)
    assert not launch.EXACT_SIZES & consts.keys()
    assert key["waves_bucket"] == 2 * 8 * 1024 // tiling.MIN_BLOCK  # Z·H·N_Q/MIN_BLOCK programs, one SM
    json.dumps(key)  # the record must be able to hold it


def test_failing_config_scores_inf_and_is_skipped(tmp_path):
    """A candidate that fails to compile (out of shared memory) or times as inf is never chosen."""
    bench = Bench(fail={CANDIDATES[2]}, times={**TIMES, CANDIDATES[1]: math.inf})
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, bench) == CANDIDATES[0]
    assert bench.calls == CANDIDATES
    timings = json.loads(_record_files(tmp_path)[0].read_text())["timings"]
    assert timings[2]["ms"] is None and "OutOfResources" in timings[2]["error"]
    assert timings[1]["ms"] is None and "inf" in timings[1]["error"]


def test_all_failing_raises_a_clear_error(tmp_path):
    """When no candidate runs, the error names the kernel and each candidate's reason; nothing is stored."""
    with pytest.raises(autotune.TuningError, match=r"_attn_bwd_dkdv.*BLOCK_M=32 BLOCK_N=32.*OutOfResources"):
        autotune.choose("_attn_bwd_dkdv", _key(), CANDIDATES, Bench(fail=CANDIDATES))
    assert _record_files(tmp_path) == []


def test_a_bug_in_the_benchmark_is_not_scored_inf():
    """Only compile/resource errors mean "this tile does not fit"; anything else propagates."""
    with pytest.raises(ZeroDivisionError):
        autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench(fail=[CANDIDATES[0]], error=ZeroDivisionError()))


def test_a_fresh_process_reads_the_disk_record(tmp_path):
    """A new Python process with the same FX_FLASH_CACHE_DIR takes the record and never benchmarks."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    child = f"""
import sys
from fx_flash.codegen import autotune
from fx_flash.codegen.tiling import TileConfig
def bench(config):
    sys.exit("benchmarked " + str(config))
print(autotune.choose("_attn_fwd", {_key()!r}, {CANDIDATES!r}, bench))
"""
    env = {**os.environ, "FX_FLASH_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(CANDIDATES[2])


def test_the_disk_layer_answers_after_memory_is_cleared():
    """Within one process too, a cleared memory falls back to the record, not to benchmarking."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    autotune.clear_memory()
    again = Bench()
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, again) == CANDIDATES[2]
    assert again.calls == []


@pytest.mark.parametrize("change", [
    dict(module="fx_flash_0123456789abcdef_ffffffffffff"),  # the template changed: new source hash
    dict(source_sha256="0000000000000000"),
    dict(device="NVIDIA H200"),
    dict(shared_memory=101376),
    dict(triton="3.9.0"),
    dict(dtype="torch.float16"),
    dict(constexprs={"HEAD_DIM": 64, "GROUP": 1, "N_Q_BUCKET": 2048, "N_KV_BUCKET": 2048}),
    dict(waves_bucket=1),  # a small batch: its tile starved the full batch (issue 11)
], ids=lambda c: next(iter(c)))
def test_a_changed_key_field_misses(change):
    """Any field of the key that differs (source, device, versions, dtype, shapes, occupancy) is
    tuned anew, in memory and on disk."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    autotune.clear_memory()
    other = Bench()
    autotune.choose("_attn_fwd", _key(**change), CANDIDATES, other)
    assert other.calls == CANDIDATES
    assert autotune.record_path("_attn_fwd", _key(**change), CANDIDATES) != autotune.record_path(
        "_attn_fwd", _key(), CANDIDATES)


def test_a_changed_candidate_list_or_kernel_misses():
    """New tiling candidates, or another kernel under the same key, never reuse an old winner."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    fewer, other_kernel = Bench(), Bench()
    autotune.choose("_attn_fwd", _key(), CANDIDATES[:3], fewer)
    autotune.choose("_attn_bwd_dq", _key(), CANDIDATES, other_kernel)
    assert (fewer.calls, other_kernel.calls) == (CANDIDATES[:3], CANDIDATES)


def test_cache_off_writes_nothing_but_still_remembers(tmp_path, monkeypatch):
    """FX_FLASH_AUTOTUNE_CACHE=0: no file is read or written; the process still tunes once."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())  # a record the next calls must not read
    autotune.clear_memory()
    monkeypatch.setenv("FX_FLASH_AUTOTUNE_CACHE", "0")
    before = {p: p.read_text() for p in _record_files(tmp_path)}
    first, second = Bench(), Bench()
    other = _key(device="NVIDIA H200")
    autotune.choose("_attn_fwd", _key(), CANDIDATES, first)
    autotune.choose("_attn_fwd", other, CANDIDATES, Bench())
    autotune.choose("_attn_fwd", other, CANDIDATES, second)
    assert (first.calls, second.calls) == (CANDIDATES, [])
    assert {p: p.read_text() for p in _record_files(tmp_path)} == before


@pytest.mark.parametrize("content", [
    '{"key": {"format": 1, "kernel": "_attn_f',  # cut off mid-write (a crash without atomic rename)
    "",
    "[1, 2, 3]",
    '{"key": {}, "best": {"BLOCK_M": 64}}',  # another key's record (a hash collision)
    "\udcff",  # not UTF-8
], ids=["half", "empty", "list", "other_key", "binary"])
def test_a_corrupt_record_is_a_miss_and_is_overwritten(content, tmp_path):
    """A damaged record is re-tuned and replaced with a valid one, never a crash."""
    path = autotune.record_path("_attn_fwd", _key(), CANDIDATES)
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    bench = Bench()
    assert autotune.choose("_attn_fwd", _key(), CANDIDATES, bench) == CANDIDATES[2]
    assert bench.calls == CANDIDATES
    assert json.loads(path.read_text())["best"]["BLOCK_N"] == 128
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_record_of_the_previous_format_is_a_miss(tmp_path, monkeypatch):
    """A record written under an older FORMAT (before waves_bucket) is re-tuned, not reused."""
    current = autotune.FORMAT
    monkeypatch.setattr(autotune, "FORMAT", 1)
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    monkeypatch.setattr(autotune, "FORMAT", current)
    autotune.clear_memory()
    bench = Bench()
    autotune.choose("_attn_fwd", _key(), CANDIDATES, bench)
    assert bench.calls == CANDIDATES
    assert sorted(json.loads(p.read_text())["key"]["format"] for p in _record_files(tmp_path)) == [1, current]


@pytest.mark.parametrize("grid, multiprocessors, bucket", [
    ((1, 1), 132, 1),
    ((1, 132), 132, 1),  # one full wave
    ((1, 133), 132, 2),  # one program more takes a second wave
    ((64, 1 * 4), 132, 2),  # the (1, 4, 1024, 64) forward at MIN_BLOCK rows: 64 query tiles × Z·H
    ((64, 16 * 32), 132, 256),  # the (16, 32, 1024, 64) forward, 2.3x slower on the former's tile
    ((1, 2, 33), 132, 1),  # split-KV decoding's three-axis grid counts every axis
    ((3, 2, 33), 132, 2),
])
def test_waves_bucket_is_the_power_of_two_at_or_above_the_waves(grid, multiprocessors, bucket):
    """waves_bucket is ceil(the grid's programs / SMs) rounded up to a power of two."""
    assert autotune.waves_bucket(grid, multiprocessors) == bucket


def test_a_record_naming_a_config_outside_the_candidates_is_a_miss():
    """A hand-edited record whose best tile is not a candidate is not trusted."""
    autotune.choose("_attn_fwd", _key(), CANDIDATES, Bench())
    path = autotune.record_path("_attn_fwd", _key(), CANDIDATES)
    record = json.loads(path.read_text())
    record["best"]["BLOCK_M"] = 256
    path.write_text(json.dumps(record))
    autotune.clear_memory()
    bench = Bench()
    autotune.choose("_attn_fwd", _key(), CANDIDATES, bench)
    assert bench.calls == CANDIDATES


@pytest.mark.skipif(not interpreting(), reason="drives the tuned launch path through the CPU interpreter")
def test_tuned_launch_zeroes_atomic_buffers_and_launches_the_choice(monkeypatch):
    """The GPU launch path, run in the interpreter with a fake timer that runs each trial twice:
    buffers filled by atomics (dQ, dBias) are zeroed before each trial and before the real launch,
    the winner (here the last candidate, not the default) gives right gradients, and later calls
    time nothing."""
    monkeypatch.setenv("FX_FLASH_DQ", "atomic")
    monkeypatch.setattr(launch, "_tunes", lambda q: True)
    zeroed = []  # the kernels' accumulators are allocated by torch.zeros: keep a handle on them
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **kw: zeroed.append(real_zeros(*a, **kw)) or zeroed[-1])
    trials = []

    def fake_time_ms(call):
        call()
        after_one = [t.clone() for t in zeroed]
        call()  # zeroed first, so it leaves what one trial leaves
        assert all(torch.equal(a, t) for a, t in zip(after_one, zeroed)), "a trial did not start from zero"
        trials.append(call)
        return 1.0 / len(trials)  # each candidate "faster" than the one before: the last one wins

    monkeypatch.setattr(launch, "_time_ms", fake_time_ms)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 40, 40, requires_grad=True)
    dout = torch.randn(1, 2, 40, 16)
    for step in range(2):
        out = fx_flash.flash_attention(q, k, v, bias, 0.0, True)
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        assert_against_reference(out, grads, q, k, v, bias, dout, dtype=torch.float32, same_dtype=torch.float32,
                                 is_causal=True, bias_grad=True)
        if step == 0:
            tuned = len(trials)
    assert tuned == len(trials) > 0  # the second step launched from memory
    names = {key[1]: (chosen.config, key[5]) for key, chosen in launch.CHOSEN.items()}
    assert set(names) == {"_attn_fwd", "_attn_bwd_dkdv"}
    config, waves = names["_attn_bwd_dkdv"]
    default = tiling.default_config("bwd_dkdv", INTERPRETER_PROFILE, 16, 4, 0, waves, 64, 64)
    assert config == tiling.candidates("bwd_dkdv", INTERPRETER_PROFILE, 16, 4, first=default)[-1] != default


FOUR_SMS = dataclasses.replace(INTERPRETER_PROFILE, multiprocessors=4)


def _tuned_forwards(monkeypatch, batches) -> list[int]:
    """Run the tuned forward launch path (interpreter, four SMs, a fake timer) on (Z, 1, 16, 16)
    inputs for each Z of ``batches``; returns how many candidates each call timed."""
    monkeypatch.setattr(launch, "_tunes", lambda q: True)
    monkeypatch.setattr(launch, "device_profile", lambda device: FOUR_SMS)
    trials = []
    monkeypatch.setattr(launch, "_time_ms", lambda call: trials.append(call) or float(len(trials)))
    timed = []
    for z in batches:
        before = len(trials)
        q, k, v = (torch.randn(z, 1, 16, 16) for _ in range(3))
        fx_flash.flash_attention(q, k, v)
        timed.append(len(trials) - before)
    return timed


@pytest.mark.skipif(not interpreting(), reason="drives the tuned launch path through the CPU interpreter")
def test_batches_in_different_occupancy_buckets_are_tuned_apart(monkeypatch, tmp_path):
    """Z=4 and Z=5 (one 16-row tile each, on four SMs: one wave and two) get a benchmark, a
    record file and an in-memory choice each."""
    n = len(tiling.candidates("fwd", FOUR_SMS, 16, 4))
    assert _tuned_forwards(monkeypatch, [4, 5]) == [n, n]
    assert len(_record_files(tmp_path)) == 2
    assert sorted(key[5] for key in launch.CHOSEN) == [1, 2]


@pytest.mark.skipif(not interpreting(), reason="drives the tuned launch path through the CPU interpreter")
def test_batches_in_one_occupancy_bucket_share_a_choice(monkeypatch, tmp_path):
    """Z=1 and Z=4 both fit one wave of four SMs: the second call times nothing, and a fresh
    process (memory cleared) at Z=3 reads the one record instead of timing."""
    n = len(tiling.candidates("fwd", FOUR_SMS, 16, 4))
    assert _tuned_forwards(monkeypatch, [1, 4]) == [n, 0]
    assert len(_record_files(tmp_path)) == 1 and len(launch.CHOSEN) == 1
    launch.CHOSEN.clear()
    autotune.clear_memory()
    assert _tuned_forwards(monkeypatch, [3]) == [0]


@pytest.fixture
def _tuning_switch(monkeypatch):
    """Tests of the tuning switch start from its default (no FX_FLASH_AUTOTUNE, no override)."""
    monkeypatch.delenv("FX_FLASH_AUTOTUNE", raising=False)
    previous = autotune.set_autotune(None)
    yield
    autotune.set_autotune(previous)


# What _tunes reads of a CUDA tensor (its device), for the switch's tests on a CPU-only machine.
CUDA_Q = types.SimpleNamespace(device=torch.device("cuda", 0))


def test_tuning_is_off_by_default(_tuning_switch, monkeypatch):
    """Without FX_FLASH_AUTOTUNE or set_autotune, GPU launches run the default tile untimed."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert not autotune.requested() and not launch.autotuning() and not launch._tunes(CUDA_Q)


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("", False)])
def test_env_var_turns_tuning_on(_tuning_switch, monkeypatch, value, on):
    """FX_FLASH_AUTOTUNE=1 turns tuning on for GPU launches; any other value leaves it off."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setenv("FX_FLASH_AUTOTUNE", value)
    assert launch.autotuning() is on and launch._tunes(CUDA_Q) is on


def test_set_autotune_overrides_the_env_var(_tuning_switch, monkeypatch):
    """set_autotune(True/False) wins over the variable; set_autotune(None) hands back to it."""
    monkeypatch.setenv("FX_FLASH_AUTOTUNE", "0")
    assert fx_flash.set_autotune(True) is None and launch.autotuning()
    assert fx_flash.set_autotune(False) is True and not launch.autotuning()
    monkeypatch.setenv("FX_FLASH_AUTOTUNE", "1")
    fx_flash.set_autotune(None)
    assert launch.autotuning()


def test_backend_option_turns_tuning_on(_tuning_switch):
    """backend(autotune=True) switches tuning on when it compiles a graph (as the variable does)."""

    def f(x):
        return x.sin() + 1

    torch.compile(f, backend=fx_flash.backend(inner="eager"))(torch.randn(3))
    assert not launch.autotuning()  # the option left unset leaves the switch alone
    torch._dynamo.reset()
    torch.compile(f, backend=fx_flash.backend(inner="eager", autotune=True))(torch.randn(3))
    assert launch.autotuning()


def test_cudagraphs_option_patches_inductor_and_refuses_other_compilers():
    """backend(cudagraphs=True) is Inductor's triton.cudagraphs patch; with another inner
    compiler it is an error rather than a silent no-op."""
    with pytest.raises(ValueError, match="cudagraphs=True needs inner='inductor'"):
        fx_flash.backend(inner="eager", cudagraphs=True)
    seen = {}

    def fake_compile_fx(gm, inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    import torch._inductor.compile_fx as compile_fx_module

    real = compile_fx_module.compile_fx
    compile_fx_module.compile_fx = fake_compile_fx
    try:
        torch.compile(lambda x: x.cos(), backend=fx_flash.backend(cudagraphs=True))(torch.randn(3))
    finally:
        compile_fx_module.compile_fx = real
    assert seen == {"triton.cudagraphs": True}


@pytest.mark.skipif(not interpreting(), reason="drives the tuned launch path through the CPU interpreter")
def test_nothing_is_timed_inside_a_cuda_graph_capture(monkeypatch, tmp_path):
    """With tuning on, a launch while a capture is reported runs the default tile without timing
    and is not remembered; the next call outside the capture tunes; after that a capture (memory
    cleared, as in a new process) reads the record instead of timing."""
    monkeypatch.setattr(launch, "_tunes", lambda q: True)
    capturing = [True]
    monkeypatch.setattr(launch, "capturing", lambda: capturing[0])
    trials = []

    def time_ms(call):
        assert not capturing[0], "a candidate was timed inside a capture"
        trials.append(call)
        return 1.0 / len(trials)  # the last candidate wins: not the default

    monkeypatch.setattr(launch, "_time_ms", time_ms)
    launched = []
    real_launch = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda chosen, *a, **kw: launched.append(chosen.config)
                        or real_launch(chosen, *a, **kw))
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    default = tiling.default_config("fwd", INTERPRETER_PROFILE, 16, 4, 0, autotune.waves_bucket((3, 2), 1), 64, 64)
    out = fx_flash.flash_attention(q, k, v)
    assert trials == [] and launched == [default] and not launch.CHOSEN and not _record_files(tmp_path)
    capturing[0] = False
    fx_flash.flash_attention(q, k, v)
    assert len(trials) == len(tiling.candidates("fwd", INTERPRETER_PROFILE, 16, 4, first=default)) > 1
    (tuned,) = [c.config for c in launch.CHOSEN.values()]
    assert tuned != default and launched[-1] == tuned and len(_record_files(tmp_path)) == 1
    launch.CHOSEN.clear()
    autotune.clear_memory()
    capturing[0] = True
    again = fx_flash.flash_attention(q, k, v)
    assert len(trials) == len(tiling.candidates("fwd", INTERPRETER_PROFILE, 16, 4, first=default))
    assert launched[-1] == tuned and [c.config for c in launch.CHOSEN.values()] == [tuned]
    torch.testing.assert_close(again, out)


MANY_SMS = dataclasses.replace(INTERPRETER_PROFILE, multiprocessors=132)


@pytest.mark.skipif(not interpreting(), reason="runs the untuned launch path through the CPU interpreter")
@pytest.mark.parametrize("batch, block_m", [(1, 32), (16, 64), (32, 128)])
def test_untuned_tile_follows_occupancy(monkeypatch, batch, block_m):
    """On a mocked 132-SM device the untuned forward of (Z, 2, 256, 16) runs 32-row tiles at
    Z = 1 (32 programs at 16 rows: one wave), 64 at Z = 16 (512: four waves), 128 at Z = 32;
    each result matches the reference."""
    monkeypatch.setattr(launch, "device_profile", lambda device: MANY_SMS)
    q, k, v = (torch.randn(batch, 2, 256, 16) for _ in range(3))
    out = fx_flash.flash_attention(q, k, v, is_causal=True)
    (chosen,) = launch.CHOSEN.values()
    assert chosen.config.BLOCK_M == block_m
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


class _FakeKernel:
    """A compiled kernel's launch surface (what JITFunction.run calls), recording each launch."""

    function, packed_metadata = "function", "packed metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)

    def launch_metadata(self, grid, stream, *args):
        return None


class _FakeJIT:
    """A JITFunction with the real generated forward's signature: ``fn[grid](...)`` records the
    bound call (as Triton's binder binds it) and returns the one compiled kernel."""

    def __init__(self, fn):
        self.signature, self.pre_run_hooks, self.kernel, self.calls = inspect.signature(fn), [], _FakeKernel(), []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            params = {k: v for k, v in kwargs.items() if k in self.signature.parameters}
            bound = self.signature.bind(*args, **params)
            bound.apply_defaults()
            self.calls.append((grid, tuple(bound.arguments.values())))
            return self.kernel
        return run


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


def _forward_call(n_q: int = 40, offset: int = 0):
    """The forward kernel's launch arguments, as attention_forward builds them."""
    spec = SPEC
    q = torch.randn(2 * 4 * n_q * 16 + offset)[offset:].view(2, 4, n_q, 16)
    k, v, out = (torch.randn(2, 4, n_q, 16) for _ in range(3))
    lse = torch.empty(2, 4, n_q)
    consts, _ = launch._forward_common(spec, q, k, 0.25)
    tables = tuple(skipping.unranged(q).values())  # a dense spec's (unread) tile-table arguments
    args = (q, k, v, out, lse, q, 0.25, 0.0, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tables)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), 2 * 4)  # noqa: E731
    return grid, args, consts


def test_direct_launch_passes_what_triton_binds(monkeypatch):
    """After one launch through the JIT function, a launch with an equal argument signature calls
    the compiled kernel's launcher directly with exactly the values Triton's binder would pass
    (positional arguments, then the remaining parameters in order, constexprs included); a
    misaligned tensor or another stride goes through the JIT function again."""
    monkeypatch.setattr(launch, "_driver", lambda: _FakeDriver())
    fake = _FakeJIT(getattr(loader.load(SPEC)._attn_fwd, "fn", loader.load(SPEC)._attn_fwd))
    config = TileConfig(32, 64, 4, 3)
    chosen = launch.Launch(fake, config, launch._meta(config))
    grid, args, consts = _forward_call()
    launch._launch(chosen, grid, args, consts)
    assert len(fake.calls) == 1 and fake.kernel.launches == []
    grid, args, consts = _forward_call()  # new tensors, same shapes, strides and alignment
    launch._launch(chosen, grid, args, consts)
    assert len(fake.calls) == 1
    (launched,) = fake.kernel.launches
    expected = fake.signature.bind(*args, **{k: v for k, v in {**consts, **chosen.meta}.items()
                                             if k in fake.signature.parameters})
    expected.apply_defaults()
    bound = tuple(expected.arguments.values())
    assert launched[:7] == (*grid(chosen.meta), 1, 1234, "function", "packed metadata", None)
    values = launched[9:]
    assert len(values) == len(bound) and all(a is b if isinstance(a, torch.Tensor) else a == b
                                             for a, b in zip(values, bound))
    fake.calls.clear()
    grid, args, consts = _forward_call(offset=1)  # q starts 4 bytes into its storage: not 16-aligned
    launch._launch(chosen, grid, args, consts)
    grid, args, consts = _forward_call(n_q=41)  # other strides
    launch._launch(chosen, grid, args, consts)
    assert len(fake.calls) == 2 and len(fake.kernel.launches) == 1
