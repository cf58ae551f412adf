"""Tile skipping at launch: the tables of tile ranges that RANGED kernels read.

A spec whose keep-predicate is neither ``true`` nor exactly causal (``spec.tile_mode ==
"ranged"``) is launched with one table per kernel: for each tile of the kernel's own axis
(query tiles in the forward and dQ kernels, key tiles in dK/dV), four int32 (lo, flo, fhi, hi)
in elements of the other axis, and the order in which programs take the tiles (see the
template's note on tile ranges).

The table comes from the class of every (query tile, key tile) pair, 0 empty, 1 partial, 2 full:
- a predicate over positions alone (windows, prefix-LM, chunks, bottom-right causal) is
  classified on the host, symbolically (``tiles.class_grid``): no device work, cached per
  (predicate, lengths, tile);
- a predicate that reads tensors (a padding ``attention_mask``, a user's bool mask, document ids)
  is summarized on the device by the spec's generated ``_tile_classes`` kernel, which evaluates
  the predicate on every element once. Axes the predicate does not vary on stay broadcast: a
  padding mask gives one table per batch, not per head. The summary is cached for the tensors it
  read, keyed by their storage, offset, shape, strides and version counter, so a mask changed in
  place is summarized again; entries die with the storage (a weak reference), so a new tensor at
  a freed address never reuses an old summary.

Note (CUDA graphs): inside a capture nothing is read from or written to these caches, for
position masks too. A captured launch must read tables whose memory lives as long as the graph:
a cached table could be evicted and its memory reused while the graph still replays, and a
host-side classification would need a host-to-device copy, which a capture forbids. So the
summary kernel (which evaluates any predicate, positions alone included) and the range
arithmetic are captured with the attention, allocate from the graph's pool and re-run on every
replay: a mask tensor refilled between replays is summarized again.

Note (what may be skipped): an empty tile's elements take the fill. With a -inf fill they weigh 0,
so skipping them is exact, fully masked rows included (they stay at output 0, LSE -inf). A finite
fill is weighed by softmax: a row whose every element is filled averages them uniformly, as eager
does. Empty tiles are then skipped only where that cannot change the row: the fill is at most
SKIPPABLE_FILL (its weight exp(fill - max) is 0 beside a kept score above fill + 104) and every row
of the query tile keeps some key (the summary checks this per tile); otherwise they run as partial
tiles. Full tiles skip the predicate and the bounds checks (ragged tiles are never full).

Note (positional programs): a predicate such as transformers' ``t0 & (kv_idx <= q_idx)`` (padding
and causal) has a positional part and tensor conjuncts. On a tile where the summary finds the
predicate equal to its positional part on every element, the tensors change nothing there. A key
tile all of whose non-empty query tiles are such tiles (with a finite fill, also tiles whose
rows all keep a key, and a fill at most SKIPPABLE_FILL: its weight is then exactly 0, as -inf's
is) is marked positional in the dK/dV kernel's table: that program walks its query tiles as the
causal kernel does, in one loop predicated by the positional part with a -inf fill, instead of a
loop for its full tiles and another, restarting the software pipeline, for its partial ones
(the template's note on the dK/dV loop). An unpadded batch then runs the causal kernel's loop.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable

import torch

from fx_flash.codegen import loader, tiles
from fx_flash.codegen.spec import B_IDX, H_IDX, SKIPPABLE_FILL, AttentionSpec
from fx_flash.device import capturing

# Tile classes as integers: tiles.class_grid's codes, which the _tile_classes kernel writes too.
EMPTY, PARTIAL, FULL = (tiles.CODES[c] for c in (tiles.EMPTY, tiles.PARTIAL, tiles.FULL))
CACHE_SIZE = 64  # tables of positional predicates; tensor summaries
SUMMARY_WARPS = 4


def _lru_put(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def lead_extent(spec: AttentionSpec, z: int, h: int) -> tuple[int, int]:
    """(Zr, Hr): the batch and head extents the predicate varies on (1 where it does not)."""
    symbols = set(spec.keep.free_symbols)
    for i in spec.keep_operands:
        for _, e in spec.operands[i].lead:
            symbols |= e.free_symbols
    return (z if B_IDX in symbols else 1), (h if H_IDX in symbols else 1)


# ---- classes ------------------------------------------------------------------------------------

_POSITIONAL: OrderedDict = OrderedDict()


def _positional_classes(spec: AttentionSpec, n_q: int, n_kv: int, block_m: int, block_n: int,
                        device: torch.device) -> torch.Tensor:
    key = (spec.keep, spec.fill, n_q, n_kv, block_m, block_n, device)
    cls = _POSITIONAL.get(key)
    if cls is None:
        grid = tiles.class_grid(tiles.classifier(spec.keep, n_q, n_kv), n_q, n_kv, block_m, block_n)
        cls = torch.tensor(grid, dtype=torch.int8).reshape(1, 1, len(grid), -1)
        if n_q % block_m:  # ragged tiles need the bounds checks: never full
            cls[..., -1, :].clamp_(max=PARTIAL)
        if n_kv % block_n:
            cls[..., :, -1].clamp_(max=PARTIAL)
        if spec.fill != float("-inf"):
            # A position-only predicate is not proved to keep a key in every row (simplify turns a
            # low fill into -inf where it is): empty tiles run as partial ones.
            cls.clamp_(min=PARTIAL)
        cls = cls.to(device)
        _lru_put(_POSITIONAL, key, cls)
    return cls


class _Summary:
    """A cached tensor summary, alive while its storages are: classes (Zr, Hr, T_q, T_kv) int8, and
    for specs with a positional part, positional (the same shape, bool): the tiles on which the
    predicate may be read as its positional part with a -inf fill (see the module's note)."""

    def __init__(self, storages, classes, positional):
        self.refs = [weakref.ref(s) for s in storages]
        self.classes = classes
        self.positional = positional
        self.tables = {}  # axis → kernel keywords

    def alive(self, storages) -> bool:
        return all(r() is s for r, s in zip(self.refs, storages))


_SUMMARIES: OrderedDict = OrderedDict()


def _tensor_identity(t: torch.Tensor):
    """(storage, key part) of an operand, or None when it cannot be cached (inference tensors
    keep no version counter)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    storage = t.untyped_storage()
    return storage, (id(storage), storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                     version)


def _tensor_classes(spec: AttentionSpec, operands, operand_args, z, h, n_q, n_kv, block_m, block_n,
                    device: torch.device):
    """The cache entry holding the classes of every tile from the spec's summary kernel (see the
    module's note); a fresh, uncached one inside a capture or for tensors without a version."""
    idents = [_tensor_identity(operands[i]) for i in spec.keep_operands]
    cacheable = not capturing() and all(x is not None for x in idents)
    key = None
    if cacheable:
        key = (spec.text, z, h, n_q, n_kv, block_m, block_n, device, tuple(x[1] for x in idents))
        entry = _SUMMARIES.get(key)
        if entry is not None and entry.alive([x[0] for x in idents]):
            return entry
    zr, hr = lead_extent(spec, z, h)
    t_q, t_kv = -(-n_q // block_m), -(-n_kv // block_n)
    classes = torch.empty((zr, hr, t_q, t_kv), dtype=torch.int8, device=device)
    same = torch.empty_like(classes) if spec.positional_keep is not None else classes
    rows_keep = torch.empty((zr * hr, t_q), dtype=torch.int8, device=device)
    loader.load(spec)._tile_classes[(t_q, zr * hr)](
        classes, same, rows_keep, *operand_args, classes.stride(0), classes.stride(1), hr, n_q, n_kv, t_kv,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=SUMMARY_WARPS)
    every_row_keeps = (rows_keep != 0).reshape(zr, hr, t_q, 1)
    positional = None
    if spec.fill != float("-inf"):
        if spec.fill <= SKIPPABLE_FILL:
            # Query tiles with a row that keeps no key: that row averages its fills, keep every tile.
            classes = torch.where((classes == EMPTY) & ~every_row_keeps, PARTIAL, classes).to(torch.int8)
            if spec.positional_keep is not None:
                positional = (same != 0) & every_row_keeps
        else:
            classes = classes.clamp(min=PARTIAL)
    elif spec.positional_keep is not None:
        positional = same != 0
    entry = _Summary([x[0] for x in idents] if cacheable else [], classes, positional)
    if cacheable:
        _lru_put(_SUMMARIES, key, entry)
    return entry


# ---- ranges -------------------------------------------------------------------------------------

def ranges_from_classes(classes: torch.Tensor, block: int, n: int,
                        positional: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranges (..., R, 5) int32, order (R,) int32) from classes (..., R, C) over C tiles of
    ``block`` elements, ``n`` in all: per row, its first and last non-empty tiles bound [lo, hi)
    and its first run of full tiles is [flo, fhi) (rows with none: flo = fhi = hi); the fifth
    field is 1 when ``positional`` (bool, like classes) holds on every tile of [lo, hi), else 0.
    The order lists rows by descending work summed over the leading axes, ties in index order.
    Device ops only: no host sync."""
    cols = classes.shape[-1]
    idx = torch.arange(cols, device=classes.device, dtype=torch.int32)
    nonempty, full = classes != EMPTY, classes == FULL
    lo = torch.where(nonempty, idx, cols).amin(-1)
    hi = torch.where(nonempty, idx + 1, 0).amax(-1)
    lo = torch.minimum(lo, hi)  # a row with no non-empty tile: [0, 0)
    flo = torch.where(full, idx, cols).amin(-1)
    fhi = torch.where(~full & (idx >= flo.unsqueeze(-1)), idx, cols).amin(-1)
    none = flo >= cols
    flo, fhi = torch.where(none, hi, flo), torch.where(none, hi, fhi)
    if positional is None:
        flag = torch.zeros_like(lo)
    else:
        outside = (idx < lo.unsqueeze(-1)) | (idx >= hi.unsqueeze(-1))
        flag = (positional | outside).all(-1).to(lo.dtype)
    bounds = (torch.stack([lo, flo, fhi, hi], -1) * block).clamp(max=n)
    ranges = torch.cat([bounds, flag.unsqueeze(-1)], -1).to(torch.int32).contiguous()
    work = (hi - lo).reshape(-1, hi.shape[-1]).sum(0)
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    return ranges, order


def _keywords(ranges: torch.Tensor, order: torch.Tensor) -> dict:
    zr, hr = ranges.shape[0], ranges.shape[1]
    return {"Ranges": ranges, "Order": order,
            "stride_rz": ranges.stride(0) if zr > 1 else 0, "stride_rh": ranges.stride(1) if hr > 1 else 0}


def unranged(q: torch.Tensor) -> dict:
    """The table keywords of a launch that reads none (dense and causal specs): never read."""
    return {"Ranges": q, "Order": q, "stride_rz": 0, "stride_rh": 0}


def table_keywords(spec: AttentionSpec, operands, operand_args, q: torch.Tensor, k: torch.Tensor,
                   axis: str) -> Callable[[dict], dict]:
    """For a kernel of ``axis`` ("q": one program per query tile; "kv": per key tile), the
    function of its launch meta (BLOCK_M, BLOCK_N) giving the table keywords it reads."""
    z, h, n_q = q.shape[0], q.shape[1], q.shape[2]
    n_kv = k.shape[2]
    reads_tensors = bool(spec.keep_operands)

    def keywords(meta: dict) -> dict:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        if reads_tensors or capturing():
            # Inside a CUDA-graph capture every table is made by device ops in the graph's own
            # memory (see the module's note), never taken from a cache the graph would outlive.
            entry = _tensor_classes(spec, operands, operand_args, z, h, n_q, n_kv, bm, bn, q.device)
            found = entry.tables.get(axis)
            if found is None:
                found = entry.tables[axis] = _axis_keywords(entry.classes, axis, bm, bn, n_q, n_kv,
                                                            entry.positional)
            return found
        key = ("tables", spec.keep, spec.fill, n_q, n_kv, bm, bn, axis, q.device)
        found = _POSITIONAL.get(key)
        if found is None:
            classes = _positional_classes(spec, n_q, n_kv, bm, bn, q.device)
            found = _axis_keywords(classes, axis, bm, bn, n_q, n_kv)
            _lru_put(_POSITIONAL, key, found)
        return found

    return keywords


def _axis_keywords(classes, axis, bm, bn, n_q, n_kv, positional=None) -> dict:
    """The table keywords of ``axis`` from the classes; positional programs (the template's note on
    the dK/dV loop) for the dK/dV kernel's axis only, where the causal-style walk pays."""
    if axis == "q":
        return _keywords(*ranges_from_classes(classes, bn, n_kv))
    if positional is not None:
        positional = positional.transpose(-1, -2)
    return _keywords(*ranges_from_classes(classes.transpose(-1, -2), bm, n_q, positional))
