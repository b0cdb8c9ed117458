"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values are compressed into one latent c_KV (kv_lora_rank) per token, normalised by its own
RMSNorm, plus one RoPE key k_pe (qk_rope_head_dim) shared by all heads. Only (c_KV, k_pe) need to be
cached. Without a cache (training, full forward) the latent is expanded into per-head keys and
values; with a cache, W_UK is absorbed into the query and W_UV into the output, so cached tokens are
never expanded:  scores = (q_nope · W_UK) · c_KV + q_pe · k_pe,  out = (P · c_KV) · W_UV."""

from __future__ import annotations

import torch
from torch import nn

from hemat.model.config import ModelConfig
from hemat.model.dense import RMSNorm, attend
from hemat.model.rope import apply_rope


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.q_rank = config.q_lora_rank
        self.interleaved = config.rope_interleave
        self.scale = config.softmax_scale
        h, qk = config.hidden_size, config.qk_head_dim
        if self.q_rank:
            self.q_a_proj = nn.Linear(h, self.q_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_rank else self.q_proj(x)
        q_nope, q_pe = q.view(b, t, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope, interleaved=self.interleaved)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe[:, :, None], *rope, interleaved=self.interleaved)[:, :, 0]
        if cache is None:
            out = self._expanded(q_nope, q_pe, latent, k_pe)
        else:
            latent, k_pe, mask = cache.update(self.layer_idx, latent, k_pe)
            out = self.absorbed(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.reshape(b, t, -1))

    def _expanded(self, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1)
        return attend(q, k, v, None, self.scale)

    def absorbed(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """q_nope [B,T,H,nope], q_pe [B,T,H,rope], latent [B,S,r], k_pe [B,S,rope], mask [B,T,S] → [B,T,H,v]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = torch.einsum("bthr,bsr->bhts", q_latent, latent) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        scores = (scores * self.scale).masked_fill(~mask[:, None], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
