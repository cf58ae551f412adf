"""The TMA branch of the template: tiles streamed through tensor descriptors instead of pointers.

With FX_FLASH_TMA=1 (off by default: it measured no faster on the H200) the kernels load K/V
(forward, dQ) and Q/dO (dK/dV) through ``tl.make_tensor_descriptor`` on Hopper GPUs and under the
interpreter, so its indexing (zero-filled ragged tails and padded head-dim columns instead of
load masks) is checked against the oracle here, on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from fx_flash.codegen import launch
from tests import test_decode, test_kernels
from tests.numerics import poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def tma_on(monkeypatch):
    """Force descriptors and record, per launch, whether the kernel got USE_TMA."""
    poison_outputs(monkeypatch)
    monkeypatch.setenv("FX_FLASH_TMA", "1")
    used = []
    real = launch._with_tma

    def spy(consts, *streamed):
        result = real(consts, *streamed)
        used.append(result["USE_TMA"])
        return result

    monkeypatch.setattr(launch, "_with_tma", spy)
    torch.manual_seed(0)
    return used


SHAPES = {name: test_kernels.SHAPES[name] for name in ("ragged_cross", "head_dim_80", "gqa_4_to_2", "ragged_long_kv")}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shapes(shape, causal, tma_on):
    test_kernels.check(shape, torch.float32, causal=causal)
    assert tma_on and all(tma_on), "every kernel should have run its TMA branch"


def test_mask_and_bias_gradient(tma_on):
    b, hq, hkv, nq, nk, d = SHAPES["ragged_cross"]
    test_kernels.check(SHAPES["ragged_cross"], torch.float32, causal=True,
                       attn_mask=torch.randn(b, 1, nq, nk, device=DEVICE), bias_grad=True)
    assert all(tma_on)


def test_split_kv_decoding(tma_on, monkeypatch):
    monkeypatch.setattr(launch, "SPLIT_MIN_KEYS", 48)
    monkeypatch.setattr(launch, "SPLIT_WAVES", 64)
    test_decode.check(test_decode.SHAPES["gqa_packed"])
    assert all(tma_on)


def test_unaligned_rows_fall_back_to_pointers(tma_on):
    """A head dim of 12 in fp16 gives 24-byte rows, which a descriptor cannot address: the
    kernels take the pointer branch and stay exact."""
    test_kernels.check((1, 2, 2, 20, 20, 12), torch.float16)
    assert tma_on and not any(tma_on)


def test_compatibility_rules():
    x = torch.randn(2, 3, 40, 64, device=DEVICE, dtype=torch.float16)
    assert launch._tma_compatible(x)
    assert launch._tma_compatible(x.transpose(1, 2).contiguous().transpose(1, 2))  # (B, N, H, d) storage
    assert not launch._tma_compatible(x.transpose(-1, -2))  # head dim not contiguous
    assert not launch._tma_compatible(x.view(-1)[1:].view(-1)[: 2 * 3 * 39 * 64].view(2, 3, 39, 64))  # 2-byte offset


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("FX_FLASH_TMA")
    assert not launch._tma_allowed(torch.device(DEVICE))
    monkeypatch.setenv("FX_FLASH_TMA", "1")
    assert launch._tma_allowed(torch.device(DEVICE))
