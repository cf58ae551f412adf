"""Compile the Gluon kernels for sm_90 without a GPU, and report what the binary holds.

    python -m tests.gluon_sm90 SPEC_TEXT HEAD_DIM BLOCK_N STAGES KIND [SPEC_TEXT HEAD_DIM BLOCK_N STAGES KIND ...]

KIND: a forward kind of tests/gluon_kinds.py (v1, ws, pp, wsp3stp, …); bwd, the backward
(gluon_bwd._attn_bwd_sm90, BLOCK_M = 64 query rows per step, bwd@128 128 of them, and BLOCK_N
keys; bwd:FLAG,FLAG with those of GluonBwdConfig's schedule flags set, e.g.
bwd:DV_EARLY,ROWS_AHEAD or bwd@128:ROWS_AHEAD; bwd: none of them), bwd-prep its Delta kernel;

prints one JSON line per kernel: the compiled shared memory, whether the PTX has wgmma and TMA
bulk-tensor copies, and the registers and spills ptxas reports (the ptxas Triton itself runs for
sm_90). Each kernel is compiled as the launcher's call specializes it at the benchmarks' shapes:
Triton turns an integer argument equal to 1 into a constant (the backward's stride_dkk,
stride_dvk: its outputs' head dim is contiguous; the forward takes no such stride, see
gluon._epilogue) and marks the pointers and the integers that are multiples of 16 (sizes and
strides at N = 2k and 8k, H = 16) as such; without that, the persistent kernel keeps the
epilogue's column offsets across its tile loop and spills them. "stores" counts the PTX's global
stores by width (st.global.b16 is one bf16 element a store). Run
as its own process by tests/test_gluon.py: under TRITON_INTERPRET=1 (how the suite runs) Gluon's
own library functions become interpreter objects at import, and the real compiler rejects them.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from fx_flash.codegen import gluon_launch
from fx_flash.codegen.gluon import render_gluon
from fx_flash.codegen.gluon_bwd import render_gluon_bwd
from fx_flash.codegen.spec import spec_from_text
from tests.gluon_kinds import KINDS

SM90 = GPUTarget("cuda", 90, 128)


def _descriptor_type(rows: int, head_dim: int, dtype: str = "bf16", interleaved: bool = False) -> str:
    """The type of the launcher's descriptor of (rows, head_dim) tiles (gluon_launch._descriptor);
    ``interleaved``: the backward's dQ tiles as DQ_INTERLEAVE has them, (rows // 8, 4, 2, head_dim)
    boxes (gluon_launch.interleaved_rows)."""
    element = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    layout = gluon_launch._shared_layout(rows, head_dim, element, 4 if interleaved else 2)
    box = [*gluon_launch.interleaved_rows(rows, head_dim)[0], head_dim] if interleaved else [rows, head_dim]
    return f"tensordesc<{dtype}[{', '.join(map(str, box))}],{layout!r}>"


def _module(source: str):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    found = importlib.util.spec_from_file_location("gluon_sm90_kernel", f.name)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def compile_sm90(spec_text: str, head_dim: int, block_n: int, stages: int, ws: bool = False, pingpong: bool = False,
                 early: bool = False, hold: bool = False, persistent: bool = False, consumers: int = 2,
                 split: bool = False, tma_store: bool = False, raw_max: bool = True, half: bool = False,
                 fast_epilogue: bool = False, q_buffers: int = 1, balanced: bool = False,
                 pack_p: bool = False, sign_mask: bool = False):
    """The compiled kernel of ``spec_text``'s Gluon forward for bf16 at ``head_dim``: the
    warp-specialized one when ``ws`` (its consumers taking turns when ``pingpong``; one program
    per SM walking output tiles when ``persistent``, with ``consumers`` consumer warpgroups, its
    output stored by TMA when ``tma_store``; the row max before the score's factor when
    ``raw_max``; the diagonal's half when ``half``; the epilogue by reciprocals when
    ``fast_epilogue``; ``q_buffers`` Q buffers a consumer; the output tiles from the launcher's
    table when ``balanced``; p converted in PTX when ``pack_p``; the keep-predicate by its sign when
    ``sign_mask``)."""
    module = _module(render_gluon(spec_from_text(spec_text), raw_max, pack_p, sign_mask))
    config = gluon_launch.GluonConfig(gluon_launch.program_rows(ws, consumers), block_n, stages, ws, pingpong,
                                      early, hold, persistent, consumers=consumers, split=split,
                                      tma_store=tma_store, half=half, fast_epilogue=fast_epilogue,
                                      q_buffers=q_buffers, balanced=balanced, pack_p=pack_p, sign_mask=sign_mask)
    block_m, warps = config.rows_per_consumer, config.num_warps
    signature = {"q_desc": _descriptor_type(block_m, head_dim), "k_desc": _descriptor_type(block_n, head_dim),
                 "v_desc": _descriptor_type(block_n, head_dim), "Out": "*bf16", "LSE": "*fp32", "sm_scale": "fp32",
                 **{name: "i32" for name in ("stride_oz", "stride_oh", "stride_om", "H", "N_Q", "N_KV")}}
    if persistent:  # the grid is the SMs, not the output tiles: the kernel takes Z, the causal order's sections
        # and the balanced order's table
        signature.update({"order": "*i32", **{name: "i32" for name in (
            "Z", "Q_TILES", "SECTION", "SECTION_ROUNDS", "ROUNDS", "Q_RZ", "Q_RH", "Q_CH", "KV_RZ", "KV_RH", "KV_CH")}})
    consts = {"GROUP": 1, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
              "STAGES": stages, "NUM_WARPS": warps, "PINGPONG": pingpong, "EARLY": early, "HOLD": hold,
              **({"CONSUMERS": consumers, "SPLIT": split, "TMA_STORE": tma_store, "HALF": half,
                  "FAST_EPILOGUE": fast_epilogue, "Q_BUFFERS": q_buffers, "ORDER": balanced} if persistent else {})}
    if tma_store:  # the output through a TMA descriptor of a consumer's rows
        signature["Out"] = _descriptor_type(block_m, head_dim)
    signature.update({name: "constexpr" for name in consts})
    kernel = module._attn_fwd_sm90_wsp if persistent else module._attn_fwd_sm90_ws if ws else module._attn_fwd_sm90
    signature = {name: signature[name] for name in kernel.arg_names if name in signature}  # in the kernel's order
    divisible = (*(() if tma_store else ("Out", )), "LSE", *(("order", ) if persistent else ()), "stride_oz",
                 "stride_oh", "stride_om", "H", "N_Q", "N_KV")
    attrs = {(kernel.arg_names.index(name), ): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(GluonASTSource(kernel, signature, consts, attrs), target=SM90,
                          options={"num_warps": warps})


def compile_sm90_bwd(spec_text: str, head_dim: int, block_n: int, stages: int, prep: bool = False,
                     schedule: tuple = (), block_m: int = gluon_launch.BWD_BLOCK_M):
    """The compiled Gluon backward of ``spec_text`` for bf16 at ``head_dim`` (its Delta kernel when
    ``prep``; ``schedule``, the GluonBwdConfig flags set, e.g. ("DV_EARLY", )), specialized as launch_backward's call at the benchmarks' shapes: last strides 1,
    the others, the sizes and the pointers multiples of 16."""
    module = _module(render_gluon_bwd(spec_from_text(spec_text)))
    if prep:
        kernel, warps = module._attn_bwd_sm90_prep, 4
        signature = {"Out": "*bf16", "DO": "*bf16", "Delta": "*fp32", "DQ": "*fp32",
                     **{name: "i32" for name in ("stride_oz", "stride_oh", "stride_om", "stride_ok", "stride_doz",
                                                 "stride_doh", "stride_dom", "stride_dok", "H", "N_Q", "DQ_ROWS")}}
        consts = {"HEAD_DIM": head_dim, "BLOCK": gluon_launch.BWD_PREP_ROWS, "NUM_WARPS": warps, "stride_ok": 1,
                  "stride_dok": 1}
        divisible = ("Out", "DO", "Delta", "DQ", "stride_oz", "stride_oh", "stride_om", "stride_doz", "stride_doh",
                     "stride_dom", "H", "N_Q", "DQ_ROWS")
    else:
        kernel, warps = module._attn_bwd_sm90, gluon_launch.BWD_NUM_WARPS
        signature = {"q_desc": _descriptor_type(block_m, head_dim), "k_desc": _descriptor_type(block_n, head_dim),
                     "v_desc": _descriptor_type(block_n, head_dim), "do_desc": _descriptor_type(block_m, head_dim),
                     "dq_desc": _descriptor_type(block_m, head_dim, "fp32", "DQ_INTERLEAVE" in schedule),
                     "DK": "*bf16", "DV": "*bf16",
                     "LSE": "*fp32", "Delta": "*fp32", "order": "*i32", "sm_scale": "fp32",
                     **{name: "i32" for name in ("stride_dkz", "stride_dkh", "stride_dkn", "stride_dkk", "stride_dvz",
                                                 "stride_dvh", "stride_dvn", "stride_dvk", "H", "N_Q", "N_KV",
                                                 "DQ_ROWS", "Q_RZ", "Q_RH", "Q_CH", "KV_RZ", "KV_RH", "KV_CH",
                                                 "SECTION")}}
        if "TMA_EPILOGUE" in schedule:  # dK and dV through TMA descriptors (gluon_bwd's note on the epilogue)
            signature.update(DK=_descriptor_type(block_n, head_dim), DV=_descriptor_type(block_n, head_dim))
        consts = {"GROUP": 1, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages,
                  "NUM_WARPS": warps, "stride_dkk": 1, "stride_dvk": 1,
                  **{name: name in schedule for name in gluon_launch.GluonBwdConfig(block_m, block_n, stages).schedule}}
        divisible = (*(() if "TMA_EPILOGUE" in schedule else ("DK", "DV")), "LSE", "Delta", "order",
                     "stride_dkz", "stride_dkh", "stride_dkn", "stride_dvz",
                     "stride_dvh", "stride_dvn", "H", "N_Q", "N_KV", "DQ_ROWS")
    signature.update({name: "constexpr" for name in consts})
    attrs = {(kernel.arg_names.index(name), ): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(GluonASTSource(kernel, signature, consts, attrs), target=SM90,
                          options={"num_warps": warps})


def _ptxas(arch: int = 90) -> str:
    """The ptxas Triton compiles sm_``arch`` with (3.9 ships two and picks by arch; 3.6 has one)."""
    from triton import knobs

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:
        return knobs.nvidia.ptxas.path


def _ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from ptxas -v (the one Triton ships), or {} if it cannot run."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", f.name, "-o", f.name + ".o"],
                              capture_output=True, text=True, timeout=120)
    except Exception:  # noqa: BLE001 - the report is extra evidence, not the test's subject
        return {}
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None}


def _sass(kernel) -> str:
    """The kernel's SASS by the nvdisasm beside ptxas; empty when it cannot run."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        nvdisasm = os.path.join(os.path.dirname(_ptxas()), "nvdisasm")
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, timeout=120).stdout
    except Exception:  # noqa: BLE001 - extra evidence, as _ptxas_report
        return ""


def _exps_between_waits(sass: str) -> list[int]:
    """For each wait for all wgmma (DEPBAR.LE gsb0, 0x0) that follows a wait leaving one in flight
    (0x1), the exponentials (MUFU.EX2) between the two in the SASS (_sass): the softmax that
    overlaps p·v. Empty when nvdisasm could not run."""
    counts, since = [], None
    for line in sass.splitlines():
        if "DEPBAR.LE gsb0, 0x1" in line:
            since = 0
        elif "MUFU.EX2" in line and since is not None:
            since += 1
        elif "DEPBAR.LE gsb0, 0x0" in line and since is not None:
            counts.append(since)
            since = None
    return counts


def main(argv: list[str]) -> None:
    for i in range(0, len(argv), 5):
        text, head_dim, block_n, stages, kind = argv[i], int(argv[i + 1]), int(argv[i + 2]), int(argv[i + 3]), argv[i + 4]
        if kind.startswith("bwd"):
            schedule = tuple(kind.split(":")[1].split(",")) if ":" in kind else ()
            rows = kind.split(":")[0].partition("@")[2]
            kernel = compile_sm90_bwd(text, head_dim, block_n, stages, prep=kind == "bwd-prep", schedule=schedule,
                                      block_m=int(rows) if rows else gluon_launch.BWD_BLOCK_M)
        else:
            kernel = compile_sm90(text, head_dim, block_n, stages, **KINDS[kind])
        ptx = kernel.asm["ptx"]
        sass = _sass(kernel)
        print(json.dumps({"spec": text, "head_dim": head_dim, "block_n": block_n, "stages": stages, "kind": kind,
                          "shared": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
                          # wgmma instructions by their n (m64nNk16): the widths of the products
                          "wgmma_n": dict(collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k",
                                                                         ptx))),
                          "tma": ptx.count("cp.async.bulk.tensor"), "exps_between_waits": _exps_between_waits(sass),
                          "turn_waits": ptx.count("mbarrier.try_wait"),
                          # the persistent ping-pong's hardware barriers, "SYNC 8" / "ARV 9" (of 256 threads),
                          # from the SASS (the PTX names them by register)
                          "named_barriers": dict(collections.Counter(
                              f"{op} {int(bar, 16)}" for op, bar in re.findall(
                                  r"BAR\.(SYNC|ARV)(?:\.DEFER_BLOCKING)? (0x[0-9a-f]+), 0x100\b", sass)
                              if int(bar, 16) >= 8)),
                          "setmaxnreg": re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx),
                          "atomics": len(re.findall(r"\b(?:red|atom)\.global\.", ptx)),
                          "stores": dict(collections.Counter(re.findall(r"\bst\.global\.(?:v\d\.)?(\w+)", ptx))),
                          "tma_reduce": ptx.count("cp.reduce.async.bulk.tensor"),
                          "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
                          "local_stores": sass.count("STL"),
                          # byte permutes: ptxas's swaps of p's bf16 halves before p·v (gluon's note on
                          # p's conversion)
                          "permutes": len(re.findall(r"\bPRMT\b", sass)),
                          # SASS instructions (0 without nvdisasm): the code the instruction cache holds
                          "instructions": len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/", sass, re.M)),
                          **_ptxas_report(ptx)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
