"""Tile skipping with nothing asked of the user: a sliding window built from ``arange`` and packed
documents compared as a doc-id tensor. ``explain()`` says how each site's tiles are chosen, and the
launch tables show how many (query tile, key tile) pairs the forward visits.

    TRITON_INTERPRET=1 python examples/tile_skipping.py   # CPU, through the generated kernels
    python examples/tile_skipping.py                      # on a GPU (or CPU: eager oracle)
"""

import torch
import torch.nn.functional as F

import fx_flash
from fx_flash.codegen import launch, skipping
from fx_flash.codegen.spec import spec_from_text

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sliding_window(q, k, v, window=48):
    i = torch.arange(q.shape[2], device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.softmax((q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf")), -1) @ v


def documents(q, k, v, doc):
    keep = doc[:, None] == doc[None, :]
    return F.softmax((q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf")), -1) @ v


def visited(spec_text, q, k, operands=()):
    """Key tiles the forward visits, of all, from the table its launch reads (at 32 x 32 tiles)."""
    spec = spec_from_text(spec_text)
    operands = list(operands)
    tables = skipping.table_keywords(spec, operands, launch._operand_args(spec, operands), q, k, "q")(
        {"BLOCK_M": 32, "BLOCK_N": 32})
    lo, hi = tables["Ranges"][..., 0], tables["Ranges"][..., 3]
    return ((hi - lo + 31) // 32).sum().item(), -(-q.shape[2] // 32) * -(-k.shape[2] // 32)


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(4, device=DEVICE), torch.tensor([32, 96, 64, 64], device=DEVICE))
    for fn, extra in ((sliding_window, ()), (documents, (doc,))):
        site = fx_flash.explain(fn, q, k, v, *extra).sites[0]
        compiled = torch.compile(fn, backend="fx_flash")
        out, expected = compiled(q, k, v, *extra), fn(q, k, v, *extra)
        out.sum().backward()
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
        print(f"{fn.__name__}: {site.spec}\n    tiles: {site.tiles}; matches eager")
        # The same spec's table (the documents' spec reads the doc ids twice: as t0[kv], t1[q]).
        tiles, total = visited(site.spec, q, k, [doc, doc] if extra else [])
        print(f"    the forward visits {tiles} of {total} tiles of 32 x 32")

if __name__ == "__main__":
    main()
