"""SD3's T5-free mode at a quarter of the cost: the zero T5 tokens folded into one.

A StableDiffusion3Pipeline without T5 (``text_encoder_3`` null, SD3's documented low-memory mode)
conditions on 77 CLIP tokens followed by ``max_sequence_length`` (256) zero tokens
(``_get_t5_prompt_embeds``). Those tokens are identical all through SD3Transformer2DModel: the
context gets no position embedding, and every layer but joint attention acts on each token alone.
So attention over the 256 copies is attention over one of them whose logit has ``log 256`` added,
and the transformer computes the same function on 78 context tokens instead of 333 (about 4x
fewer tokens per block at SD3's small latent grids; conditioning.py then stores 78 tokens a prompt).

``RepeatedTokenJointAttnProcessor`` does that only for a context of exactly the compact length and
is diffusers' own ``JointAttnProcessor2_0`` for anything else (a full 333-token context, SD3.5's
image-only ``attn2``), so a transformer that carries it still runs stock pipeline calls unchanged.
tests/test_sd3.py pins the compact call to the plain one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RepeatedTokenJointAttnProcessor:
    """``JointAttnProcessor2_0`` for a context of ``context_tokens`` tokens whose last one stands for
    ``repeat`` identical tokens: that token's key gets ``log(repeat)`` added to the attention logits,
    which is exactly attention over ``repeat`` copies of it."""

    def __init__(self, context_tokens: int, repeat: int):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.context_tokens = int(context_tokens)
        self.log_repeat = math.log(repeat)
        self.plain = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if (encoder_hidden_states is None or attention_mask is not None
                or encoder_hidden_states.shape[1] != self.context_tokens):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeat
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, -1), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[-1] * attn.heads).to(q.dtype)
        out, ctx = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, ctx


def fold_zero_tokens(transformer: nn.Module, context_tokens: int, repeat: int) -> None:
    """Give every attention layer of an SD3 transformer ``RepeatedTokenJointAttnProcessor``."""
    transformer.set_attn_processor(RepeatedTokenJointAttnProcessor(context_tokens, repeat))


def unfold_zero_tokens(transformer: nn.Module) -> None:
    """Back to diffusers' ``JointAttnProcessor2_0``."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
