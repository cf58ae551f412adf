"""Where a kernel's warps stall, from Nsight Compute's per-instruction samples: the SASS page of a
report exported as CSV (``ncu -i REPORT.ncu-rep --page source --print-source sass --csv > X.csv``,
see benchmarks/ncu_forward.py) summarized as

- the stall reasons over all samples;
- the code of each partition of a warp-specialized kernel (ranges cut where a partition
  reallocates its registers: consumers raise theirs, the producer lowers its own), its share of
  the samples and its reasons;
- the instructions with the most samples, each with its top reasons;
- the global stores by width (STG.E.U16 is one bf16 element a store: GLUON_NOTES call 31).

    python benchmarks/ncu_sass.py X.csv [--top 25]

This is how GLUON_NOTES calls 31-32 split the forward's samples between its consumers, its
producer and the epilogue's stores (`benchmarks/ncu_gluon_fwd_call3*.txt`).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str) -> list[dict]:
    """The CSV's instruction rows as dicts (the first line names the kernel, the second the columns)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[1]
    return [dict(zip(header, row)) for row in rows[2:] if len(row) == len(header)]


def _count(row: dict, column: str) -> int:
    value = row.get(column, "") or "0"
    return int(value) if value.isdigit() else 0


def reasons(rows: list[dict]) -> dict:
    """Stall samples by reason (the ``stall_*`` columns, issued and not), largest first."""
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("stall_") and "Not Issued" not in c]
    totals = {c[len("stall_"):]: sum(_count(r, c) for r in rows) for c in columns}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def partitions(rows: list[dict]) -> list[tuple[int, int, str]]:
    """(start, end, label) instruction ranges cut at each register reallocation (``USETMAXREG``,
    which each warp-specialized partition runs on entry and exit) and each EXIT. A range is labelled
    by the register count its first instruction sets (a consumer raises to 240, the producer drops
    to 24, see gluon.CONSUMER_REGISTERS); what follows the last EXIT is the out-of-line retry loops
    of mbarrier waits, which belong to whichever partition branched there."""
    cuts = [i for i, row in enumerate(rows) if re.search(r"\b(USETMAXREG|EXIT)\b", row.get("Source", ""))]
    bounds = [0] + cuts + [len(rows)]
    ranges = []
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        source = rows[a].get("Source", "")
        count = re.search(r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d+,\s*)?(0x[0-9a-f]+)", source)
        if count:
            label = f"{'raise' if count.group(1).startswith('TRY') else 'lower'} to {int(count.group(2), 16)} registers"
        elif "EXIT" in source:
            label = "after an EXIT" + (" (out-of-line wait loops)" if a == cuts[-1] else "")
        else:
            label = "entry"
        ranges.append((a, b, label))
    return ranges


def store_widths(rows: list[dict]) -> dict:
    """Executed global stores by SASS opcode (STG.E, STG.E.U16, STG.E.64, ...)."""
    widths = collections.Counter()
    for row in rows:
        match = re.search(r"\b(STG\.[A-Z0-9.]+)", row.get("Source", ""))
        if match:
            widths[match.group(1)] += _count(row, "Instructions Executed")
    return dict(widths)


def summary(rows: list[dict], top: int = 25) -> str:
    total = sum(_count(r, SAMPLES) for r in rows) or 1

    def shares(d: dict) -> str:
        t = sum(d.values()) or 1
        return " ".join(f"{k}={v / t:.0%}" for k, v in d.items() if v / t >= 0.02)

    lines = [f"{len(rows)} instructions, {total} samples", "all: " + shares(reasons(rows))]
    for a, b, label in partitions(rows):
        part = rows[a:b]
        mine = sum(_count(r, SAMPLES) for r in part)
        if mine / total >= 0.005:  # ranges of a few instructions between two reallocations drop out
            lines.append(f"instructions {a}-{b - 1}, {label}: {mine / total:.1%} of samples; "
                         + shares(reasons(part)))
    lines.append(f"top {top} instructions:")
    for i in sorted(range(len(rows)), key=lambda i: -_count(rows[i], SAMPLES))[:top]:
        why = reasons([rows[i]])
        lines.append(f"  {i:5d} {_count(rows[i], SAMPLES) / total:6.2%} {rows[i].get('Source', '').strip()[:60]:60s} "
                     + " ".join(f"{k}:{v}" for k, v in list(why.items())[:3] if v))
    lines.append("global stores executed by opcode: " + (", ".join(f"{k} {v}" for k, v in store_widths(rows).items())
                                                         or "none"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(summary(read(args.csv), args.top))


if __name__ == "__main__":
    main()
