"""Helpers for tests that need the kernels' internals: the exact dropout mask of a seed."""

from __future__ import annotations

import torch

from fx_flash.ops import _reference_keep, runs_kernels


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The bool (B, H, Nq, Nk) mask of weights that ``attn_fwd`` keeps for ``seed``.

    The same function of (seed, batch·head, row, column) that the forward and backward kernels
    evaluate, so a test can hand it to ``reference.attention_reference(dropout_keep=...)``.
    """
    if not runs_kernels(seed.device):
        return _reference_keep(seed, shape, dropout_p)
    from fx_flash.codegen.launch import dropout_keep_mask as kernel_mask

    return kernel_mask(seed, shape, dropout_p)
