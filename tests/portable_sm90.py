"""Compile fx_flash's portable forward kernel for sm_90 without a GPU, and report its shared memory.

    python -m tests.portable_sm90 SPEC_TEXT HEAD_DIM BLOCK_M BLOCK_N WARPS STAGES [SPEC_TEXT ...]

prints one JSON line per (spec, tile): the compiled kernel's shared memory (bytes per program), at
bf16 as the launcher specializes it (the unit head-dim strides are constants; the
pointers, sizes and other strides multiples of 16, as at N = 4k and H = 16). tests/test_tiling.py
compares it with tiling.footprint("fwd", ...), on which the untuned rule's two-programs-per-SM fit
depends. A process of its own: under TRITON_INTERPRET=1 (how the suite runs) the kernels load as
interpreter objects, which the real compiler does not take.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fx_flash.codegen import launch, loader
from fx_flash.codegen.spec import spec_from_text

SM90 = GPUTarget("cuda", 90, 128)
_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "LSE": "*fp32", "Seed": "*i64",
             "Ranges": "*i32", "Order": "*i32"}
_FLOATS = ("sm_scale", "dropout_p")
_UNIT_STRIDES = ("stride_qk", "stride_kk", "stride_vk", "stride_ok")


def compile_forward(spec_text: str, head_dim: int, block_m: int, block_n: int, warps: int, stages: int,
                    n: int = 4096, raw_max: bool = True):
    """The compiled forward (``_attn_fwd``) of ``spec_text`` at this tile, bf16 inputs and float
    operands, N_Q = N_KV = n, H = 16, the constexprs from launch._forward_common as a launch takes them;
    RAW_MAX where the spec has a raw factor and ``raw_max`` (the template's note on the row max)."""
    spec = spec_from_text(spec_text)
    fn = loader.load(spec)._attn_fwd
    qk = torch.empty((1, 16, n, head_dim), device="meta", dtype=torch.bfloat16)
    values, _ = launch._forward_common(spec, qk, qk, head_dim ** -0.5)
    values.update(BLOCK_M=block_m, BLOCK_N=block_n, RAW_MAX=raw_max and values["RAW_MAX"])
    kinds = {o.name.upper(): o.kind for o in spec.operands}
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[(i,)] = values[name] if param.is_constexpr else 1
            continue
        if name in kinds:  # an operand's pointer
            signature[name] = {"float": "*bf16", "int": "*i64", "bool": "*i1"}[kinds[name]]
        else:
            signature[name] = _POINTERS.get(name, "fp32" if name in _FLOATS else "i32")
        if name not in _FLOATS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=SM90, options=dict(num_warps=warps, num_stages=stages))


def main(argv: list[str]) -> None:
    for i in range(0, len(argv), 6):
        text, (d, m, n, w, s) = argv[i], map(int, argv[i + 1:i + 6])
        kernel = compile_forward(text, d, m, n, w, s)
        print(json.dumps({"spec": text, "tile": [d, m, n, w, s], "shared": kernel.metadata.shared}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
