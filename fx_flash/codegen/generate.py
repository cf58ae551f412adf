"""Spec → Triton source: fill the template's placeholders from an AttentionSpec.

The score expression and keep-predicate are printed as Triton tile expressions under a binding
of each symbol (rows are queries in the forward and dQ kernels, keys in the dK/dV kernel). Each
operand becomes kernel arguments (a pointer, a stride per batch·head dimension, a query and a
key stride), a per-program head pointer and one load per tile, shaped by the axes it varies
along. The backward's chain rule comes from differentiating the score with sympy:
d(score)/d(qk) scales dS on the way to dQ and dK (folded into one final multiply when it is a
constant), and d(score)/d(t_i) is operand i's gradient, reduced over the axes it does not vary
along before it is added into the gradient buffer.
"""

from __future__ import annotations

import functools
import math
import os
import textwrap
from string import Template

import sympy
from sympy.printing.str import StrPrinter

from fx_flash.codegen.spec import B_IDX, H_IDX, KV_IDX, N_KV, N_Q, Q_IDX, QK, SCALE, AttentionSpec, Operand, exact_arithmetic
from fx_flash.codegen.template import TEMPLATE

LOG2E_SYM, QK_SCALE, SM_SCALE = sympy.symbols("LOG2E qk_scale sm_scale", positive=True)

# How the per-element symbols read inside a tile: rows are queries ("mn") or keys ("nm").
BINDINGS = {
    "mn": {Q_IDX: "offs_m[:, None]", KV_IDX: "offs_n[None, :]", B_IDX: "off_z", H_IDX: "off_h"},
    "nm": {Q_IDX: "offs_m[None, :]", KV_IDX: "offs_n[:, None]", B_IDX: "off_z", H_IDX: "off_h"},
}
SIZES = {N_Q: "size_q", N_KV: "size_kv"}  # set from N_Q/N_KV in each kernel, passed to helpers
_FUNCTIONS = {"exp": "tl.exp", "log": "tl.log", "Abs": "tl.abs", "sigmoid": "tl.sigmoid"}


class TritonPrinter(StrPrinter):
    """Prints sympy expressions as Triton tile arithmetic under a symbol → text binding."""

    def __init__(self, binding: dict):
        super().__init__()
        self.binding = {**SIZES, **binding}

    def _print_Symbol(self, expr):
        return self.binding.get(expr, expr.name)

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Piecewise(self, expr):
        *branches, (last, cond) = expr.args
        if cond is not sympy.true:
            raise ValueError(f"{expr} has no default branch")
        text = self._print(last)
        for value, c in reversed(branches):
            text = f"tl.where({self._print(c)}, {self._print(value)}, {text})"
        return text

    def _print_Min(self, expr):
        return self._nest("tl.minimum", expr.args)

    def _print_Max(self, expr):
        return self._nest("tl.maximum", expr.args)

    def _nest(self, fn, args):
        text = self._print(args[0])
        for a in args[1:]:
            text = f"{fn}({text}, {self._print(a)})"
        return text

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"

    def _print_ITE(self, expr):
        c, a, b = (self._print(x) for x in expr.args)
        return f"tl.where({c}, {a}, {b})"

    def _print_Mod(self, expr):
        return f"({self._print(expr.args[0])} % {self._print(expr.args[1])})"

    def _print_floor(self, expr):
        arg = expr.args[0]
        num, den = arg.as_numer_denom()
        if den.is_Integer and den > 1 and num.is_integer:
            return f"(({self._print(num)}) // {den})"
        return f"tl.floor({self._print(arg)})"

    def _print_ceiling(self, expr):
        return f"tl.ceil({self._print(expr.args[0])})"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and exp > 0:
            return "(" + " * ".join([self._print(base)] * int(exp)) + ")"
        if exp.is_Integer and exp < 0:
            return f"(1.0 / {self._print(base ** -exp)})"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if exp == sympy.Rational(-1, 2):
            return f"(1.0 / tl.sqrt({self._print(base)}))"
        if base == sympy.E:
            return f"tl.exp({self._print(exp)})"
        if base.is_Number and base > 0:  # c**x = exp2(log2(c)·x): ALiBi's slopes 2**(-8h/H)
            return f"tl.math.exp2({float(sympy.log(base, 2))!r} * ({self._print(exp)}))"
        if exp.is_Number:  # x**c = exp2(c·log2 x): NaN for x < 0, as torch.pow gives
            return f"tl.math.exp2({float(exp)!r} * tl.math.log2({self._print(base)}))"
        raise ValueError(f"power {expr} has no Triton form: fx_flash prints constant powers")

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name == "tanh":  # tanh(x) = 2·sigmoid(2x) − 1: Triton has sigmoid on every backend
            return f"(2.0 * tl.sigmoid(2.0 * {self._print(expr.args[0])}) - 1.0)"
        if name not in _FUNCTIONS:
            raise ValueError(f"function {name} has no Triton form: fx_flash prints {sorted(_FUNCTIONS) + ['tanh']}")
        return f"{_FUNCTIONS[name]}({', '.join(self._print(a) for a in expr.args)})"

    def _print_Float(self, expr):
        value = float(expr)
        if value in (float("inf"), float("-inf")):
            return f'float("{value}")'
        return repr(value)

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return 'float("-inf")'

    def _print_Exp1(self, expr):
        return repr(float(sympy.E))


# ---------------------------------------------------------------------------------------------
# Operands: arguments, head pointers, loads


def _params(op: Operand, prefix: str = "T") -> list[str]:
    """Kernel arguments of one operand: pointer, a stride per batch·head dimension, q and kv strides."""
    base = f"{prefix}{op.name[1:]}"
    return [base] + [f"{base}_l{i}" for i, _ in enumerate(op.lead)] + [f"{base}_sq", f"{base}_sk"]


def _arg_list(names: list[str]) -> str:
    return "".join(f"{n}, " for n in names)


def _head_lines(op: Operand, binding: dict, prefix: str = "T") -> str:
    base = f"{prefix}{op.name[1:]}"
    printer = TritonPrinter(binding)
    terms = [f"({printer.doprint(e)}) * {base}_l{i}" for i, (_, e) in enumerate(op.lead)]
    return f"{base}_head = {' + '.join([base] + terms)}"


def _uses_sizes(spec: AttentionSpec) -> bool:
    return bool((spec.score.free_symbols | spec.keep.free_symbols) & {N_Q, N_KV})


def _heads(spec: AttentionSpec, binding: dict, grads: bool = False) -> str:
    lines = ["size_q = N_Q", "size_kv = N_KV"] if _uses_sizes(spec) else []
    lines += [_head_lines(op, binding) for op in spec.operands]
    if grads:
        lines += [_head_lines(op, binding, "DT") for op in spec.grad_operands]
    return "\n".join(lines) or "pass"


def _tile_offsets(op: Operand, orient: str, base: str) -> tuple[str, str]:
    """(pointer expression, load mask) of ``op``'s tile in orientation ``orient``."""
    rows_q = orient == "mn"
    q_off = "offs_m[:, None]" if rows_q else "offs_m[None, :]"
    kv_off = "offs_n[None, :]" if rows_q else "offs_n[:, None]"
    q_ok = "row_ok[:, None]" if rows_q else "row_ok[None, :]"
    kv_ok = "col_ok[None, :]" if rows_q else "col_ok[:, None]"
    ptr = f"{base}_head"
    if op.along_q and op.along_kv:
        return f"{ptr} + {q_off} * {base}_sq + {kv_off} * {base}_sk", "tile_ok"
    if op.along_q:
        return f"{ptr} + {q_off} * {base}_sq", q_ok
    if op.along_kv:
        return f"{ptr} + {kv_off} * {base}_sk", kv_ok
    # A (1, 1) tile rather than a scalar: the same in compiled code, and Triton's interpreter
    # cannot combine a scalar bool with a tile (seen with triton 3.9).
    return f"{ptr} + tl.zeros([1, 1], dtype=tl.int32)", ""


def _load(op: Operand, orient: str) -> str:
    base = f"T{op.name[1:]}"
    ptr, mask = _tile_offsets(op, orient, base)
    load = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
    convert = {"float": ".to(tl.float32)", "bool": " != 0", "int": ""}[op.kind]
    return f"{op.name} = {load}{convert}"


# ---------------------------------------------------------------------------------------------
# Score, predicate, chain rule


def _score_expr(spec: AttentionSpec):
    """The score as the kernel computes it: in log2 units with log2 e folded into qk_scale, or
    in natural units with qk_scale = scale."""
    if spec.score_in_log2:
        if QK not in sympy.diff(spec.score, QK).free_symbols:  # linear in qk: one FMA per element
            return sympy.expand(sympy.expand(spec.score * LOG2E_SYM).subs(SCALE, QK_SCALE / LOG2E_SYM))
        # A function of qk (soft-capping): its argument stays the one the backward's chain rule
        # computes (qk·sm_scale), so the compiler shares the function between them; log2 e
        # multiplies the result. (Folding it inside tanh made the backward 18% slower on the H200.)
        return LOG2E_SYM * spec.score.subs(SCALE, SM_SCALE)
    return spec.score.subs(SCALE, QK_SCALE)


@functools.lru_cache(maxsize=None)
def raw_factor(spec: AttentionSpec):
    """The factor f of a score qk·f whose f reads only the scale and positive constants (in the
    kernel's log2 units), with a -inf fill, or None for any other score: the forwards take such a
    score's row max of qk and multiply it by f (the template's note on the row max). Cached: a
    sympy simplify, asked once per plan key by the portable and the Gluon launches."""
    if not spec.score_in_log2 or spec.fill != float("-inf"):
        return None
    factor = sympy.simplify(_score_expr(spec) / QK)
    if not factor.free_symbols <= {QK_SCALE, LOG2E_SYM} or factor.atoms(sympy.Function):
        return None
    coefficient = factor.subs({QK_SCALE: 1, LOG2E_SYM: 1})
    return factor if coefficient.is_number and coefficient > 0 else None


def raw_max_applies(spec: AttentionSpec, scale: float) -> bool:
    """Whether a call of ``spec`` at ``scale`` takes the row max before the score's factor: the
    spec has one (raw_factor), and it is > 0 at this scale (with f ≤ 0 the identity fails, and a
    masked -inf times 0 is NaN). FX_FLASH_RAW_MAX=0 takes it after the factor everywhere."""
    factor = raw_factor(spec)
    return (factor is not None and os.environ.get("FX_FLASH_RAW_MAX", "1") != "0"
            and (QK_SCALE not in factor.free_symbols or scale > 0))


FLOAT32_MAX = 3.4028234663852886e38


def _fill_score(spec: AttentionSpec) -> str:
    """The fill in the units of s (template's FILL_S): log2 units when the score is kept in
    them, clamped to -finfo(float32).max, where finfo.min·log2 e would overflow to -inf."""
    if spec.fill == float("-inf"):
        return 'float("-inf")'
    fill = float(spec.fill) * math.log2(math.e) if spec.score_in_log2 else float(spec.fill)
    return repr(max(fill, -FLOAT32_MAX))


def _score_block(spec: AttentionSpec, orient: str, raw: bool = False) -> str:
    """Lines computing ``s`` (the masked score tile) from ``qk`` in orientation ``orient``;
    ``raw`` (a score with a raw_factor, the forward's RAW_MAX): ``s`` is qk itself, masked, the
    factor applied by the caller (the template's note on the row max).

    ``tile_ok`` (set by the template) bounds the loads; tiles with PREDICATE=True apply the keep-
    predicate and the tensors' bounds. Tiles without it hold kept elements only, by construction
    (the kernels' tile ranges, see the template's note on interior tiles). Elements outside the
    tensors are always -inf; elements the predicate drops take ``fill``, the fill in the units
    of s that the template passes (per row in the backward: see its note on filled rows).
    """
    printer = TritonPrinter(BINDINGS[orient])
    lines = [_load(op, orient) for op in spec.operands]
    lines.append(f"s = {'qk' if raw else printer.doprint(_score_expr(spec))}")
    if spec.fill != float("-inf"):
        # Note (finite fills): a dropped element's score is the constant fill, so its gradient is
        # 0: keep_ok also masks dS in the backward (the chain rule and operand gradients).
        predicated = [f"keep_ok = {printer.doprint(spec.keep)}", "s = tl.where(keep_ok, s, fill)"]
        if orient == "mn":
            # The dK/dV kernel ("nm") needs no -inf outside the tensors: its out-of-bounds key
            # rows are never stored and load K as 0 (so add nothing to an atomic dQ), its
            # out-of-bounds query columns have LSE +inf (p = 0), and operand gradients mask
            # tile_ok themselves. That saves a select per element on every predicated tile.
            predicated.append('s = tl.where(tile_ok, s, float("-inf"))')
        elif spec.positional_keep is not None:
            # A positional key tile (the template's note on the dK/dV loop): its filled elements
            # weigh exactly 0, as -inf ones do.
            positional = [f"keep_ok = {printer.doprint(spec.positional_keep)}", 's = tl.where(keep_ok, s, float("-inf"))']
            predicated = ["if POSITIONAL:", *_indent(positional), "else:", *_indent(predicated)]
        lines += ["if PREDICATE:", *_indent(predicated), "else:", "    keep_ok = tile_ok"]
    elif spec.keep is sympy.true:
        lines += ["if PREDICATE:", '    s = tl.where(tile_ok, s, float("-inf"))']
    else:
        predicated = [f's = tl.where(tile_ok & {printer.doprint(spec.keep)}, s, float("-inf"))']
        if orient == "nm" and spec.positional_keep is not None:
            positional = [f's = tl.where(tile_ok & {printer.doprint(spec.positional_keep)}, s, float("-inf"))']
            predicated = ["if POSITIONAL:", *_indent(positional), "else:", *_indent(predicated)]
        lines += ["if PREDICATE:", *_indent(predicated)]
    return "\n".join(lines)


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def _keep_block(spec: AttentionSpec) -> str:
    """Lines of the tile-summary kernel: ``kept``, the in-bounds elements of a (queries, keys)
    tile the keep-predicate holds on, from the operand loads the predicate needs."""
    printer = TritonPrinter(BINDINGS["mn"])
    lines = [_load(spec.operands[i], "mn") for i in spec.keep_operands]
    lines.append(f"kept = tile_ok & ({printer.doprint(spec.keep)})")
    if spec.positional_keep is not None:
        lines.append(f"kept_positional = tile_ok & ({printer.doprint(spec.positional_keep)})")
    return "\n".join(lines)


def _constant_per_launch(expr) -> bool:
    """True when ``expr`` is the same for every element of every program (a number or scale)."""
    return not (expr.free_symbols - {SCALE})


def _chain_rule(spec: AttentionSpec) -> dict:
    """Lines multiplying dS into d(qk): per element, or once at the end when constant.

    With a finite fill, dS is also zeroed where the fill replaced the score (its gradient is 0;
    ``keep_ok`` comes from the score block), on the tiles that evaluate the predicate only.
    """
    d_qk = sympy.diff(spec.score, QK)
    finite = spec.fill != float("-inf")
    if _constant_per_launch(d_qk):
        factor = TritonPrinter({SCALE: "sm_scale"}).doprint(d_qk)
        fold = {"DQK_FACTOR": f"({factor})", "DQ_FINAL": f"    dq = dq * ({factor})",
                "DK_FINAL": f"    dk = dk * ({factor})"}
        if not finite:
            return {"SCORE_GRAD": "    g = 1.0", "DS_CHAIN": "", "DS_CHAIN_T": "", **fold}
        masked_g = "g = tl.where(keep_ok, 1.0, 0.0)"
        return {"SCORE_GRAD": f"    if PREDICATE:\n        {masked_g}\n    else:\n        g = 1.0",
                "DS_CHAIN": "        ds = ds * g",
                # A positional key tile needs no select: p is 0 where the fill is.
                "DS_CHAIN_T": "        if PREDICATE:\n            if not POSITIONAL:\n"
                              "                dsT = tl.where(keep_ok, dsT, 0.0)", **fold}
    if finite:
        d_qk = sympy.Piecewise((d_qk, sympy.Symbol("keep_ok")), (0, True))
    per_tile = {o: TritonPrinter({**BINDINGS[o], SCALE: "sm_scale"}).doprint(d_qk) for o in BINDINGS}
    # The queries-on-rows factor g is computed in _scores, where qk and the loads live.
    return {"SCORE_GRAD": f"    g = {per_tile['mn']}", "DS_CHAIN": "        ds = ds * g",
            "DS_CHAIN_T": f"        dsT = dsT * ({per_tile['nm']})",
            "DQK_FACTOR": "1.0", "DQ_FINAL": "", "DK_FINAL": ""}


@exact_arithmetic
def operand_derivative(spec: AttentionSpec, op: Operand):
    """d(score)/d(operand element), checked to be printable (raises ValueError otherwise)."""
    d = sympy.diff(spec.score, op.symbol)
    if d.has(sympy.Derivative, sympy.Subs):
        raise ValueError(f"the score {spec.score} has no derivative by {op.name} that fx_flash can print")
    return d


def _operand_grad_block(spec: AttentionSpec) -> str:
    """dK/dV kernel lines adding each operand's share of dS into its gradient buffer, after
    summing the tile over the axes the operand does not vary along (keys are rows, queries
    columns). Several programs add into one element (broadcast axes, other key tiles): atomics."""
    lines = []
    printer = TritonPrinter({**BINDINGS["nm"], SCALE: "sm_scale"})
    for op in spec.grad_operands:
        base = f"DT{op.name[1:]}"
        d = operand_derivative(spec, op)
        share = "dsT" if d == 1 else f"dsT * ({printer.doprint(d)})"
        ok = "tile_ok & keep_ok" if spec.fill != float("-inf") else "tile_ok"
        lines.append(f"d{op.name} = tl.where({ok}, {share}, 0.0)  # (BLOCK_N, BLOCK_M)")
        if op.along_q and op.along_kv:
            ptr, mask = _tile_offsets(op, "nm", base)
        elif op.along_q:
            lines.append(f"d{op.name} = tl.sum(d{op.name}, 0)  # (BLOCK_M,)")
            ptr, mask = f"{base}_head + offs_m * {base}_sq", "row_ok"
        elif op.along_kv:
            lines.append(f"d{op.name} = tl.sum(d{op.name}, 1)  # (BLOCK_N,)")
            ptr, mask = f"{base}_head + offs_n * {base}_sk", "col_ok"
        else:
            lines.append(f"d{op.name} = tl.sum(tl.sum(d{op.name}, 1), 0)")
            ptr, mask = f"{base}_head", ""
        lines.append(f"tl.atomic_add({ptr}, d{op.name}" + (f", mask={mask})" if mask else ")"))
    return "\n".join(lines)


@exact_arithmetic
def render(spec: AttentionSpec) -> str:
    """The complete Python/Triton module source for ``spec``."""
    lead = {B_IDX: "off_z", H_IDX: "off_h"}
    operand_params = _arg_list([p for op in spec.operands for p in _params(op)])
    grad_params = _arg_list([p for op in spec.grad_operands for p in _params(op, "DT")])
    # The score may read the program's batch and head (b, h): helpers get them beside the operands.
    uses_lead = bool((spec.score.free_symbols | spec.keep.free_symbols) & {B_IDX, H_IDX})
    ops = _arg_list((["off_z", "off_h"] if uses_lead else []) + (["size_q", "size_kv"] if _uses_sizes(spec) else []) + [
        n for op in spec.operands for n in (f"T{op.name[1:]}_head", f"T{op.name[1:]}_sq", f"T{op.name[1:]}_sk")])
    dops = _arg_list([n for op in spec.grad_operands for n in (f"DT{op.name[1:]}_head", f"DT{op.name[1:]}_sq",
                                                                f"DT{op.name[1:]}_sk")])
    factor = raw_factor(spec)
    fields = {
        "SPEC_DESCRIPTION": spec.describe(),
        "SPEC_KEY": spec.key,
        "OPERAND_PARAMS": operand_params,
        "GRAD_PARAMS": grad_params,
        "OPS": ops,
        "DOPS": dops,
        "HEADS": textwrap.indent(_heads(spec, lead), " " * 4),
        # Split-KV rows belong to different heads: off_h becomes (BLOCK_M, 1) for what follows.
        "HEADS_SPLIT": textwrap.indent(_heads(spec, {**lead, H_IDX: "off_h[:, None]"}) + "\noff_h = off_h[:, None]", " " * 4),
        "HEADS_GROUP": textwrap.indent(_heads(spec, lead, grads=True), " " * 8),
        "SCORE_FWD": textwrap.indent(_score_block(spec, "mn"), " " * 8),
        # Without a raw factor (no call of the spec has RAW_MAX: raw_max_applies), the score
        # itself and a factor of 1: the same arithmetic as the branch without RAW_MAX.
        "SCORE_RAW": textwrap.indent(_score_block(spec, "mn", raw=factor is not None), " " * 8),
        "RAW_FACTOR": TritonPrinter(BINDINGS["mn"]).doprint(1 if factor is None else factor),
        "SCORE_BWD_T": textwrap.indent(_score_block(spec, "nm"), " " * 8),
        "OPERAND_GRADS_T": textwrap.indent(_operand_grad_block(spec), " " * 8),
        "KEEP_TILE": textwrap.indent(_keep_block(spec), " " * 8),
        "FINITE_FILL": str(spec.fill != float("-inf")),
        "FILL_VALUE": repr(float(spec.fill)) if spec.fill != float("-inf") else "0.0",
        "FILL_SCORE": _fill_score(spec),
        "POSITIONAL_PART": str(spec.positional_keep is not None),
        **_chain_rule(spec),
    }
    return Template(TEMPLATE).substitute(fields)
