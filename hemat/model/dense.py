"""Building blocks shared by every architecture (RMSNorm, the SwiGLU MLP) and the grouped-query
attention of Llama, Qwen2 and Qwen3."""

from __future__ import annotations

import functools
import weakref

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
            if x.is_cpu and not torch.is_grad_enabled():  # fastest for the small rows of decoding
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
        if cpu_inference(x):
            gate_up = transposed(self, "gate_up", self.gate_proj.weight, self.up_proj.weight)
            down = transposed(self, "down", self.down_proj.weight)
            if gate_up is not None and down is not None:
                gate, up = (x @ gate_up).chunk(2, dim=-1)  # both projections in one matmul
                return (F.silu(gate) * up) @ down
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- weights derived for inference ---------------------------------------------------------------------
DERIVED_BUDGET_BYTES = 1 << 30  # derived copies of all live models together; past it, the plain paths run
_derived_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner module → bytes it keeps
_generation = 0  # bumped by weights_changed()


def cpu_inference(x: torch.Tensor) -> bool:
    return x.is_cpu and not torch.is_grad_enabled()


def weights_changed() -> None:
    """Tell derived() that parameters changed in place without their version counters moving (fused
    optimizer kernels do that): the trainer calls it after every optimizer step. The stale derived
    tensors are dropped at once, so a training process does not keep them."""
    global _generation
    _generation += 1
    for owner in list(_derived_bytes.keys()):
        owner.__dict__.pop("_derived", None)
    _derived_bytes.clear()


def derived(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build) -> torch.Tensor | None:
    """build() (a tensor computed from `sources`, at most twice their size: e.g. two weight matrices
    multiplied together for inference), kept on `owner` and rebuilt when a source moves, is modified in
    place or weights_changed(). None when it could take all derived tensors past DERIVED_BUDGET_BYTES."""
    key = (_generation, *((t.data_ptr(), t._version, t.dtype) for t in sources))
    cache = owner.__dict__.setdefault("_derived", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        cache.pop(name, None)
        kept = sum(t.numel() * t.element_size() for _, t in cache.values() if t is not None)
        bound = 2 * sum(t.numel() * t.element_size() for t in sources)
        value = None
        if sum(_derived_bytes.values()) - _derived_bytes.get(owner, 0) + kept + bound <= DERIVED_BUDGET_BYTES:
            with torch.no_grad():
                value = build()
            kept += value.numel() * value.element_size()
        _derived_bytes[owner] = kept
        hit = cache[name] = (key, value)
    return hit[1]


def transposed(owner: nn.Module, name: str, *weights: torch.Tensor) -> torch.Tensor | None:
    """The weights' rows concatenated, as a contiguous [in, out] matrix: on CPU, MKL multiplies a few rows
    by it 20-30% faster than by the transposed view F.linear uses, and two projections of one input
    become one matmul."""
    return derived(owner, name, weights, lambda: torch.cat(weights).t().contiguous())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, T, H, d], k [B, S, H, d], v [B, S, H, dv] → [B, T, H, dv]. Causal when mask is None,
    else mask [B, T, S] (True = attend), as a KV cache hands it over."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dv = v.shape[-1]
    if q.is_cpu and dv < q.shape[-1]:  # CPU's flash kernel needs one head size; the fallback is slower
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
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
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, interleaved=False), apply_rope(k, *rope, interleaved=False)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return self.o_proj(attend(q, k, v, mask, self.scale).reshape(b, t, -1))
