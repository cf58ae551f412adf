"""Real models from ``transformers``, unmodified, built from tiny random configs (no downloads).

Every attention block is fused (count = number of attention blocks) and outputs and parameter
gradients equal eager's. The inner compiler is "eager" to keep the suite fast; the Inductor
composition is tested in test_backend.py. transformers is a test extra, not a dependency.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fx_flash.backend import backend
from fx_flash.codegen.spec import spec_from_text

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, attn_implementation="eager")


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **TINY)
    return transformers.GPT2LMHeadModel(config), (torch.randint(0, 64, (2, 16)),), 2


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 11:] = 0
    return transformers.BertModel(config), (torch.randint(0, 64, (2, 16)), padding), 2


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32, **TINY)
    return transformers.LlamaForCausalLM(config), (torch.randint(0, 64, (2, 16)),), 2


def t5():
    config = transformers.T5Config(num_layers=1, num_decoder_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64, dropout_rate=0.0, **TINY)
    ids = torch.randint(0, 64, (2, 16))
    # encoder self, decoder self, decoder cross: three attention blocks
    return transformers.T5Model(config), (ids, torch.ones(2, 16, dtype=torch.long), ids[:, :8]), 3


def vit():
    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTModel(config), (torch.randn(2, 3, 16, 16),), 2


def _ids(n=16):
    return torch.randint(0, 64, (2, n))


def _padding():
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 11:] = 0
    return padding


def gemma2():
    # Soft-capping before the mask, and a sliding-window layer beside a global one.
    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=None, query_pre_attn_scalar=8, **TINY)
    return transformers.Gemma2ForCausalLM(config), (_ids(),), 2


def gpt_neox():
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32, **TINY)
    return transformers.GPTNeoXForCausalLM(config), (_ids(),), 2


def falcon():
    # ALiBi added after the scale, and one K/V head broadcast by the products (multi-query).
    config = transformers.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, alibi=True, hidden_dropout=0.0, attention_dropout=0.0, **TINY)
    return transformers.FalconForCausalLM(config), (_ids(),), 2


def gptj():
    config = transformers.GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, **TINY)
    return transformers.GPTJForCausalLM(config), (_ids(),), 2


def bloom():
    # baddbmm with the ALiBi tensor, (B·H, N, N) scores viewed to (B, H, N, N) for the mask.
    config = transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=4, hidden_dropout=0.0, attention_dropout=0.0, **TINY)
    return transformers.BloomForCausalLM(config), (_ids(), {"attention_mask": _padding()}), 2


def _bart_config(cls):
    return cls(encoder_layers=1, decoder_layers=1, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **TINY)


def bart():
    # encoder self, decoder self, decoder cross
    return transformers.BartModel(_bart_config(transformers.BartConfig)), (_ids(), _padding()), 3


def mbart():
    return transformers.MBartModel(_bart_config(transformers.MBartConfig)), (_ids(), _padding()), 3


def distilbert():
    config = transformers.DistilBertConfig(n_layers=2, dim=32, n_heads=4, hidden_dim=64, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, **TINY)
    return transformers.DistilBertModel(config), (_ids(), _padding()), 2


def _swin_config(cls):
    return cls(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[2], window_size=4, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")


def swin():
    # A learned relative position bias and, in the shifted block, the window mask in a 5-D view.
    return transformers.SwinModel(_swin_config(transformers.SwinConfig)), (torch.randn(2, 3, 16, 16),), 2


def swinv2():
    # Cosine attention with a learned per-head logit scale (clamped, then exp).
    return transformers.Swinv2Model(_swin_config(transformers.Swinv2Config)), (torch.randn(2, 3, 16, 16),), 2


MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5, "vit": vit, "gemma2": gemma2, "gpt_neox": gpt_neox,
          "falcon": falcon, "gptj": gptj, "bloom": bloom, "bart": bart, "mbart": mbart, "distilbert": distilbert,
          "swin": swin, "swinv2": swinv2}


def first_tensor(output):
    return output.logits if hasattr(output, "logits") and output.logits is not None else output.last_hidden_state


def compile_counting(model):
    counts = []
    fx_backend = backend("eager", on_pass=lambda gm, result: counts.append((result.count, result.missed)))
    return torch.compile(model, backend=fx_backend), counts


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_model_every_attention_fused_outputs_and_gradients_equal(name):
    """Each attention block of the unmodified HF model becomes one op; outputs and grads match eager."""
    torch.manual_seed(0)
    model, args, blocks = MODELS[name]()
    model.train()
    compiled, counts = compile_counting(model)
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    args = args[:-1] if kwargs else args
    got, expected = first_tensor(compiled(*args, **kwargs)), first_tensor(model(*args, **kwargs))
    fused = sum(c for c, _ in counts)
    assert fused == blocks, [str(m) for _, missed in counts for m in missed]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got.square().mean(), params, allow_unused=True)
    g_expected = torch.autograd.grad(expected.square().mean(), params, allow_unused=True)
    for a, b in zip(g_got, g_expected):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_gpt2_output_attentions_is_not_fused():
    """``output_attentions=True`` returns the weights: every block is missed, with the reason."""
    model, args, _ = gpt2()
    compiled, counts = compile_counting(model.eval())
    with torch.no_grad():
        out = compiled(*args, output_attentions=True)
    assert sum(c for c, _ in counts) == 0
    assert {m.check for _, missed in counts for m in missed} == {"weights_used_once"}
    assert len(out.attentions) == 2


class NanoGPTBlock(nn.Module):
    """nanoGPT's CausalSelfAttention, verbatim in spirit: a tril buffer sliced [:, :, :T, :T]."""

    def __init__(self, n_embd=32, n_head=4, block_size=32, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def test_nanogpt_block_is_causal_with_no_mask_tensor():
    """nanoGPT's tril buffer is proved lower-triangular: is_causal=True, outputs and grads match."""
    torch.manual_seed(0)
    model = NanoGPTBlock()
    graphs = []
    fx_backend = backend("eager", on_pass=lambda gm, result: graphs.append((gm, result)))
    x = torch.randn(2, 16, 32)
    got, expected = torch.compile(model, backend=fx_backend)(x), model(x)
    (gm, result), = graphs
    assert result.count == 1
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.fx_flash.attention.default]
    assert op.args[3] == [] and spec_from_text(op.args[7]).causal
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(got.sum(), list(model.parameters())), torch.autograd.grad(expected.sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nanogpt_untrusted_buffer_stays_a_mask():
    """With trust_buffers=False the buffer is not read: the sliced mask is passed (still correct)."""
    model = NanoGPTBlock().eval()
    graphs = []
    fx_backend = backend("eager", trust_buffers=False, on_pass=lambda gm, r: graphs.append(gm))
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(torch.compile(model, backend=fx_backend)(x), model(x), atol=1e-5, rtol=1e-4)
    (op,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fx_flash.attention.default]
    assert len(op.args[3]) == 1 and not spec_from_text(op.args[7]).causal


def test_position_masks_build_no_quadratic_tensor():
    """LLaMA with a padding mask: transformers builds its causal + padding mask from aranges;
    after the rewrite no node of the graph holds an (Nq, Nk) tensor (nor a (B, 1, Nq, Nk) mask)."""
    torch.manual_seed(0)
    model, _, _ = llama()
    ids = torch.randint(0, 64, (2, 24))  # 24: no projection of this tiny model is 24 wide
    graphs = []
    fx_backend = backend("eager", on_pass=lambda gm, result: graphs.append((gm, result)))
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[1, :5] = 0  # left padding, as generation pads
    with torch.no_grad():
        got = torch.compile(model.eval(), backend=fx_backend)(ids, attention_mask=padding).logits
        torch.testing.assert_close(got, model(ids, attention_mask=padding).logits, atol=1e-4, rtol=1e-4)
    assert sum(r.count for _, r in graphs) == 2
    for gm, _ in graphs:
        for node in gm.graph.nodes:
            t = node.meta.get("example_value")
            if isinstance(t, torch.Tensor) and node.op not in ("placeholder", "output"):
                assert not (t.dim() >= 2 and tuple(t.shape[-2:]) == (24, 24)), f"{node.name}: {tuple(t.shape)}"
