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
    python benchmarks/ncu_sass.py X_cuda_sass.csv --source "score=qk*scale; keep=kv_idx <= q_idx"

(the second: the export with the source lines, ``--print-source cuda,sass``, summed by the
generated module's functions: GLUON_NOTES call 78).

This is how GLUON_NOTES calls 31-32 split the forward's samples between its consumers, its
producer and the epilogue's stores (`benchmarks/ncu_gluon_fwd_call3*.txt`).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str) -> dict[str, list[dict]]:
    """Each kernel's instruction rows as dicts, by kernel name: the CSV holds a block per profiled
    kernel, a "Kernel Name" line and a line of columns, then its instructions."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kernels, header, name = {}, None, None
    for i, row in enumerate(rows):
        if row and row[0] == "Kernel Name":
            name, header = row[1], rows[i + 1]
            kernels[name] = []
        elif header is not None and len(row) == len(header) and row[0] != header[0]:  # not the columns' line
            kernels[name].append(dict(zip(header, row)))
    return kernels


def by_function(path: str, spec_text: str, top: int = 25, backward: bool = False) -> str:
    """Stall samples of the source export with the high-level source beside the SASS (``ncu -i R
    --page source --print-source cuda,sass --csv``): a block per source file, one line per source
    line with its samples, then its SASS. The lines of the generated Gluon module (the module of
    ``spec_text`` as this checkout renders it, the backward's with ``backward``, which must be the
    code profiled) are summed by the
    function they lie in (every gluon.jit function is inlined, so these are where the samples
    fall in the source, not calls); other files (Triton's own library: the reductions) by file."""
    import sys

    sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
    from fx_flash.codegen.gluon import render_gluon
    from fx_flash.codegen.gluon_bwd import render_gluon_bwd
    from fx_flash.codegen.spec import spec_from_text

    render, module = (render_gluon_bwd, "fx_flash_gluon_bwd") if backward else (render_gluon, "fx_flash_gluon")
    function, current = {}, None
    for number, text in enumerate(render(spec_from_text(spec_text)).splitlines(), 1):
        found = re.match(r"def (\w+)\(", text)
        current = found.group(1) if found else current
        function[number] = current
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    starts = [i for i, row in enumerate(rows) if row and row[0] == "File Path"] + [len(rows)]
    functions, lines, files = collections.Counter(), collections.Counter(), collections.Counter()
    for a, b in zip(starts, starts[1:]):
        source_file = rows[a][1]
        header = rows[a + 2]
        column = header.index(SAMPLES)
        for row in rows[a + 3:b]:
            if len(row) > column and row[0]:  # a source line (its SASS rows have no line number)
                samples = int(row[column]) if row[column].isdigit() else 0
                name = source_file.rsplit("/", 1)[-1]
                if name.startswith(module) and (backward or not name.startswith("fx_flash_gluon_bwd")):
                    functions[function.get(int(row[0]))] += samples
                    lines[(int(row[0]), row[1].strip()[:70])] += samples
                else:
                    files[source_file.rsplit("/", 1)[-1]] += samples
    total = sum(functions.values()) + sum(files.values()) or 1
    out = [f"{total} samples"]
    out += [f"  {n / total:6.1%} {name}" for name, n in functions.most_common()]
    out += [f"  {n / total:6.1%} (file {name})" for name, n in files.most_common()]
    out.append(f"top {top} source lines:")
    out += [f"  {n / total:6.1%} {number} {function.get(number)}: {text}"
            for (number, text), n in lines.most_common(top)]
    return "\n".join(out)


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
    ap.add_argument("--source", metavar="SPEC_TEXT",
                    help="the CSV is the cuda,sass export: samples by function of this spec's module")
    ap.add_argument("--backward", action="store_true", help="with --source: the spec's Gluon backward module")
    args = ap.parse_args()
    if args.source:
        print(by_function(args.csv, args.source, args.top, args.backward))
        return
    for name, rows in read(args.csv).items():
        print(f"=== {name}\n{summary(rows, args.top)}\n")


if __name__ == "__main__":
    main()
