"""benchmarks/ncu_sass.py, the summary of Nsight Compute's per-instruction stall samples that
located the forward's one-element stores (GLUON_NOTES call 31), on a small report of known
contents."""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import ncu_sass  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
          "stall_wait", "stall_long_sb (Not Issued)"]
INSTRUCTIONS = [  # (source, samples, executed, long_sb, wait)
    ("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", 1, 8, 0, 1),
    ("HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR8].tnspB, R88", 30, 64, 0, 30),
    ("@!P5  STG.E.U16 desc[UR54][R6.64], R3", 20, 128, 20, 0),
    ("USETMAXREG.DEALLOC.CTAPOOL 0x78", 0, 8, 0, 0),
    ("USETMAXREG.DEALLOC.CTAPOOL 0x18", 0, 4, 0, 0),
    ("@!P0  BRA 0x7fa1b57b1a20", 49, 500, 49, 0),
    ("EXIT", 0, 4, 0, 0),
]


def test_summary_of_a_known_report(tmp_path):
    path = tmp_path / "report.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["Kernel Name", "_attn_fwd_sm90_wsp"])
        out.writerow(HEADER)
        for i, (source, samples, executed, long_sb, wait) in enumerate(INSTRUCTIONS):
            out.writerow([hex(i * 16), source, samples, executed, long_sb, wait, long_sb])
        out.writerow(["Kernel Name", "cudnn_kernel"])  # a second profiled kernel: a block of its own
        out.writerow(HEADER)
        out.writerow([hex(0), "EXIT", 3, 4, 3, 0, 3])
    kernels = ncu_sass.read(str(path))
    assert list(kernels) == ["_attn_fwd_sm90_wsp", "cudnn_kernel"] and len(kernels["cudnn_kernel"]) == 1
    rows = kernels["_attn_fwd_sm90_wsp"]
    assert len(rows) == len(INSTRUCTIONS)
    assert ncu_sass.reasons(rows) == {"long_sb": 69, "wait": 31}  # the "Not Issued" columns are not counted twice
    labels = {(a, b): label for a, b, label in ncu_sass.partitions(rows)}
    assert labels[(0, 3)] == "raise to 240 registers"
    assert labels[(4, 6)] == "lower to 24 registers"
    assert ncu_sass.store_widths(rows) == {"STG.E.U16": 128}
    text = ncu_sass.summary(rows, top=2)
    assert "instructions 0-2, raise to 240 registers: 51.0% of samples" in text
    assert "instructions 4-5, lower to 24 registers: 49.0% of samples" in text
    assert text.splitlines()[-1] == "global stores executed by opcode: STG.E.U16 128"


def test_samples_by_function_of_the_generated_module(tmp_path):
    """``--source``: the export with the source lines beside the SASS, a block per source file; the
    generated module's lines are summed by the function they lie in (found in the module as this
    checkout renders the spec), other files by file; SASS rows (no line number) are not counted."""
    from fx_flash.codegen.gluon import render_gluon
    from fx_flash.codegen.spec import spec_from_text

    spec = "score=qk*scale; keep=kv_idx <= q_idx"
    module = render_gluon(spec_from_text(spec)).splitlines()
    line = {name: next(i for i, text in enumerate(module, 1) if text.startswith(f"def {name}(")) + 3
            for name in ("_epilogue", "_step")}
    header = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)"]
    path = tmp_path / "report.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerows([["File Path", "/site-packages/triton/language/standard.py"], ["Function Name", "k"], header,
                       ["12", "return max", "-", "-", "5"], ["", "", "0x10", "FMNMX", "5"],
                       ["File Path", "/cache/fx_flash_gluon_abc.py"], ["Function Name", "k"], header,
                       [str(line["_epilogue"]), "x", "-", "-", "10"], ["", "", "0x20", "MUFU.RCP", "10"],
                       [str(line["_step"]), "y", "-", "-", "25"], [str(line["_step"] + 1), "z", "-", "-", "10"]])
    text = ncu_sass.by_function(str(path), spec, top=2)
    assert text.splitlines()[:4] == ["50 samples", "   70.0% _step", "   20.0% _epilogue",
                                     "   10.0% (file standard.py)"]
    assert f"   50.0% {line['_step']} _step: y" in text
