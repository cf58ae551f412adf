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
    rows = ncu_sass.read(str(path))
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
