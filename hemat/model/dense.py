"""Building blocks shared by every architecture (RMSNorm, the SwiGLU MLP) and the grouped-query
attention of Llama, Qwen2 and Qwen3."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hemat.model.config import ModelConfig
from hemat.model.rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same arithmetic in fewer calls
            # fastest for the small rows of eager decoding (a compiled graph fuses F.rms_norm instead)
            if x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                eps, inv_dim = _norm_constants(self.eps, x.shape[-1])
                return x * torch.rsqrt(torch.addcmul(eps, x.pow(2).sum(-1, keepdim=True), inv_dim)) * self.weight
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32 for stability, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@functools.cache
def _norm_constants(eps: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(eps), torch.tensor(1.0 / dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, T, H, d], k [B, S, Hkv, d], v [B, S, Hkv, dv] → [B, T, H, dv], each group of H / Hkv query
    heads attending to one key/value head (SDPA's enable_gqa reads them without repeating). Causal when
    mask is None, else mask [B, T, S] (True = attend), as a KV cache hands it over."""
    gqa = k.shape[2] != q.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dv = v.shape[-1]
    if q.is_cpu and dv < q.shape[-1]:  # CPU's flash kernel needs one head size; the fallback is slower
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out[..., :dv].transpose(1, 2)


def additive_mask(mask: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, T, S] (True = attend) → 0 / -inf [B, T * heads, S], the rows in (token, head) order.
    Every layer of one forward gets the same mask object from the cache: it is converted once, and the
    result lives as long as the mask (an attribute of it)."""
    key = (heads, dtype)
    cached = getattr(mask, "_hemat_additive", None)
    if cached is None or cached[0] != key:
        b, t, s = mask.shape
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        cached = mask._hemat_additive = (key, bias[:, :, None].expand(b, t, heads, s).reshape(b, t * heads, s))
    return cached[1]


class GQAttention(nn.Module):
    """Grouped-query attention with RoPE on every head (Llama, Qwen2, Qwen3). Qwen2 has q/k/v biases;
    Llama and Qwen3 have biases on all four projections when attention_bias is set. Qwen3 RMS-normalises
    each query and key head (q_norm, k_norm) before RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.dense_head_dim
        self.scale = config.softmax_scale
        qkv_bias = config.model_type == "qwen2" or config.attention_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k, v = k.view(b, t, self.n_kv_heads, self.head_dim), v.view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, interleaved=False), apply_rope(k, *rope, interleaved=False)
        if cache is None:
            out = attend(q, k, v, None, self.scale)
        else:
            out = cache.attend(self.layer_idx, attend, q, (k, v), self.scale)
        return self.o_proj(out.reshape(b, t, -1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, heads · head_dim] (quantize.py's inference form computes them in one matmul)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)
