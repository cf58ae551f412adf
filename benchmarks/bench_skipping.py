"""Tile skipping on the GPU: masks written the way models write them, through
``backend="fx_flash"``, beside FlexAttention with the equivalent BlockMask and beside fx_flash's own
``is_causal`` / unpadded calls.

    python benchmarks/bench_skipping.py [--cases causal,window,padding_causal,padding_bert,documents]

Cases (bf16, d = 128, 16 heads, batch·N = 16k):
  causal          is_causal=True; masked_fill(~tril); transformers' sdpa_mask tensor (arange
                  comparisons, a gathered all-ones padding mask, 0 / finfo.min)
  window          Mistral's 1k sliding window at N = 16k, a bool mask from arange
  padding_causal  transformers' mask with the second half of every sequence padded (right
                  padding), against the same call unpadded
  padding_bert    BERT's additive (1 - attention_mask)·finfo.min, half padded, against unpadded
  documents       4 packed documents in one 8k sequence, from a doc-id vector
Numerics of every variant are checked first (bench_capture's rule); TFLOP/s count kept elements.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fx_flash  # noqa: E402,F401  (registers the backend)
from bench_capture import DEV, DT, MIN, _check, _time, print_table  # noqa: E402

H, D = 16, 128


def _scores(q, k):
    return torch.matmul(q, k.transpose(2, 3)) * D ** -0.5


def is_causal(q, k, v):
    """fx_flash's own is_causal path: the public SDPA-signature op (the baseline of the rows)."""
    return torch.ops.fx_flash.flash_attention(q, k, v, is_causal=True)


def tril_spelling(q, k, v):
    n = q.shape[2]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    return torch.matmul(F.softmax(_scores(q, k).masked_fill(~keep, float("-inf")), dim=-1), v)


def hf_mask(q, k, v, pad):
    """transformers' sdpa_mask (no vmap): arange comparisons & padding[b, kv] → 0 / finfo.min."""
    b, n = q.shape[0], q.shape[2]
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    qi, ki = torch.arange(n, device=q.device)[None, None, :, None], torch.arange(n, device=q.device)[None, None, None, :]
    mask = (ki <= qi) & pad[bi, ki]
    low = torch.finfo(q.dtype).min  # transformers' min_dtype
    additive = torch.where(mask.expand(b, -1, n, n), torch.zeros((), dtype=q.dtype, device=q.device), low)
    w = F.softmax(_scores(q, k) + additive, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def bert_mask(q, k, v, pad):
    """BERT: (1 - attention_mask)[:, None, None, :] · finfo.min added to the scores."""
    additive = (1.0 - pad[:, None, None, :].to(torch.float32)) * MIN
    w = F.softmax(_scores(q, k).float() + additive, dim=-1).to(q.dtype)
    return torch.matmul(w, v)


def window_mask(q, k, v, window=1024):
    n = q.shape[2]
    i = torch.arange(n, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return torch.matmul(F.softmax(_scores(q, k).masked_fill(~keep, float("-inf")), dim=-1), v)


def documents(q, k, v, doc):
    keep = doc[:, None] == doc[None, :]
    return torch.matmul(F.softmax(_scores(q, k).masked_fill(~keep, float("-inf")), dim=-1), v)


def _flex(mask_fn, b, n):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_fn, b, None, n, n, device=DEV)
    flex = torch.compile(flex_attention)
    return lambda q, k, v, *_: flex(q, k, v, block_mask=block_mask)


# The fx_flash variant whose spelling a case's Flex BlockMask is checked against.
REFERENCE = {"causal": "tril", "window": "fx_flash", "padding_causal": "half_padded", "padding_bert": "half_padded",
             "documents": "fx_flash"}


def case(name):
    """(variants: name → (fn, extra inputs, kept elements), b, n)."""
    if name == "causal":
        b, n = 4, 4096
        pad = torch.ones(b, n, dtype=torch.bool, device=DEV)
        kept = b * n * (n + 1) / 2
        return {"is_causal": (is_causal, [], kept), "tril": (tril_spelling, [], kept),
                "hf_tensor": (hf_mask, [pad], kept),
                "flex": (_flex(lambda bb, hh, qi, ki: ki <= qi, None, n), [], kept)}, b, n
    if name == "window":
        b, n, w = 1, 16384, 1024
        kept = b * (w * (w + 1) / 2 + (n - w) * w)
        return {"fx_flash": (window_mask, [], kept),
                "flex": (_flex(lambda bb, hh, qi, ki: (ki <= qi) & (qi - ki < w), None, n), [], kept)}, b, n
    if name in ("padding_causal", "padding_bert"):
        b, n = 4, 4096
        half = torch.ones(b, n, dtype=torch.bool, device=DEV)
        half[:, n // 2:] = False
        full = torch.ones(b, n, dtype=torch.bool, device=DEV)
        if name == "padding_causal":
            fn, kept_full, kept_half = hf_mask, b * n * (n + 1) / 2, b * (n // 2 * (n // 2 + 1) / 2 + n // 2 * n // 2)
            lengths = torch.full((b,), n // 2, device=DEV)
            mask_fn = lambda bb, hh, qi, ki: (ki <= qi) & (ki < lengths[bb])  # noqa: E731
        else:
            fn, kept_full, kept_half = bert_mask, b * n * n, b * n * n / 2
            lengths = torch.full((b,), n // 2, device=DEV)
            mask_fn = lambda bb, hh, qi, ki: ki < lengths[bb]  # noqa: E731
        return {"unpadded": (fn, [full], kept_full), "half_padded": (fn, [half], kept_half),
                "flex_half": (_flex(mask_fn, b, n), [], kept_half)}, b, n
    if name == "documents":
        b, n = 2, 8192
        doc = torch.repeat_interleave(torch.arange(4, device=DEV), n // 4)
        kept = b * 4 * (n // 4) ** 2
        return {"fx_flash": (documents, [doc], kept),
                "flex": (_flex(lambda bb, hh, qi, ki: doc[qi] == doc[ki], None, n), [], kept)}, b, n
    raise ValueError(name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="causal,window,padding_causal,padding_bert,documents")
    args = parser.parse_args()
    rows = []
    for name in args.cases.split(","):
        variants, b, n = case(name)
        torch.manual_seed(0)
        inputs = [torch.randn(b, H, n, D, device=DEV, dtype=DT, requires_grad=True) for _ in range(3)]
        do = torch.randn_like(inputs[0])
        print(f"{name}: B={b} H={H} N={n} d={D} bf16", flush=True)
        for variant, (fn, extra, kept) in variants.items():
            flex = variant.startswith("flex")
            compiled = fn if flex or fn is is_causal else torch.compile(fn, backend="fx_flash")
            ref_fn, ref_extra, _ = variants[REFERENCE[name]] if flex or fn is is_causal else (fn, extra, kept)
            user = lambda *qkv, f=ref_fn, e=ref_extra: f(*qkv, *e)  # noqa: E731
            run = lambda *qkv, c=compiled, e=extra: c(*qkv, *e)  # noqa: E731
            try:
                ok = _check(variant, run, user, inputs, do)
                rows.append((name, variant, ok, *_time(run, inputs, do, 4 * kept * H * D)))
            except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the table
                print(f"  {variant}: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
    print_table(rows)


if __name__ == "__main__":
    main()
