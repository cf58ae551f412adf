"""What the pass captures from attention written by hand: soft-capping, ALiBi from ``arange``,
a sliding window, a padding mask — each becomes part of one generated kernel.

    TRITON_INTERPRET=1 python examples/captured_scores.py   # CPU, through the generated kernels
    python examples/captured_scores.py                      # on a GPU (or CPU: eager oracle)
"""

import torch
import torch.nn.functional as F

import fx_flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention(q, k, v, padding, cap=30.0, window=4):
    """A decoder layer's attention as one might write it: nothing here is fx_flash-specific."""
    b, h, n, d = q.shape
    s = q @ k.transpose(-2, -1) / d ** 0.5
    s = torch.tanh(s / cap) * cap                                   # Gemma 2 soft-capping
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1, device=q.device) / h)
    i = torch.arange(n, device=q.device)
    s = s - slopes[:, None, None] * (i[:, None] - i[None, :])        # ALiBi
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # causal sliding window
    keep = keep & padding[:, None, None, :]                          # (B, N) padding mask
    return F.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    padding = torch.ones(2, 64, dtype=torch.bool, device=DEVICE)
    padding[1, :10] = False  # left padding of the second sequence
    padding[1, 10] = True

    report = fx_flash.explain(attention, q, k, v, padding)
    print(report.sites[0])  # the captured score, predicate and operands

    compiled = torch.compile(attention, backend="fx_flash")
    out, expected = compiled(q, k, v, padding), attention(q, k, v, padding)
    rows = padding[:, None, :, None].expand_as(out)  # rows with no key give NaN in eager, 0 fused
    print("max |fused - eager| on rows with a key:", (out - expected)[rows].abs().max().item())
    grads = torch.autograd.grad(out[rows].sum(), (q, k, v))
    print("gradients:", [tuple(g.shape) for g in grads])


if __name__ == "__main__":
    main()
