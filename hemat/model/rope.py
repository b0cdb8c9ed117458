"""Rotary position embeddings, with YaRN context extension (DeepSeek-V3 §4.3, DeepSeek-V2 App. B).

DeepSeek (V2, V3) checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; Llama and Qwen rotate the
two halves (x_i, x_{i+d/2}). Both are the same rotation on a different layout of the dimensions."""

from __future__ import annotations

import math

import torch
from torch import nn

from hemat.model.config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, theta: float, yarn: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies after YaRN: high-frequency dimensions (many rotations within the original
    context) keep their frequency, low-frequency ones are interpolated by 1/factor, with a linear ramp
    between the dimensions that make beta_fast and beta_slow rotations. Returns the frequencies and
    the factor that scales cos/sin: `attention_factor` when given (transformers' field), else YaRN's
    0.1·ln(factor) + 1 (with mscale / mscale_all_dim: their ratio, 1.0 for DeepSeek-V3), times `attn_factor`
    (vLLM's and SGLang's multiplier, which DeepSeek-R1-0528-Qwen3-8B sets; transformers ignores it).
    `truncate` false (transformers) keeps the ramp's ends fractional."""
    factor = yarn["factor"]
    original = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = extrapolation / factor * ramp + extrapolation * (1 - ramp)
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None:
        attention_factor = yarn["attention_factor"]
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor * yarn.get("attn_factor", 1.0)


class RotaryEmbedding(nn.Module):
    """Maps positions [B, T] to the tables apply_rope takes, float32: (cos, sin) [B, T, 1, dim] (each
    frequency's value repeated over the two dimensions it rotates, sin signed so that the rotation is
    x·cos + swap(x)·sin) and, at inference with a small dim, the same rotation as one matrix per token
    [B, T, dim, dim] (else None): one matmul instead of five elementwise calls. Computed once per
    forward, shared by every layer."""

    MAX_MATRIX_ELEMENTS = 1 << 22  # rotation matrices only while B·T·dim² stays below this

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.rope_dim
        self.theta = config.rope_theta
        self.yarn = config.yarn
        self.interleaved = config.is_mla and config.rope_interleave
        self.register_buffer("inv_freq", torch.empty(self.dim // 2), persistent=False)
        self.register_buffer("swap", torch.empty(self.dim, dtype=torch.long), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # computed on the CPU and copied, whatever device the buffers are on: arithmetic on the meta device (a
        # model built to be loaded) imports the compiler, torch._dynamo, which costs 1.3 s and 0.14 GB
        with torch.device("cpu"):
            if self.yarn:
                inv_freq, self.attention_factor = yarn_inv_freq(self.dim, self.theta, self.yarn)
            else:
                inv_freq = 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
            half = self.dim // 2  # swap: the other dimension of each rotated pair
            swap = torch.arange(self.dim) ^ 1 if self.interleaved else (torch.arange(self.dim) + half) % self.dim
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)
            self.swap.copy_(swap)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        angles = positions.float()[..., None] * self.inv_freq.float()
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ...: x0' = x0·c - x1·s, x1' = x1·c + x0·s
            cos, sin = cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:  # halves: x_i' = x_i·c - x_{i+d/2}·s, x_{i+d/2}' = x_{i+d/2}·c + x_i·s
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        rotation = None
        if not torch.is_grad_enabled() and positions.numel() * self.dim**2 <= self.MAX_MATRIX_ELEMENTS:
            # x' = x · R with R[j, j] = cos_j and R[swap(j), j] = sin_j
            rotation = torch.diag_embed(cos) + torch.diag_embed(sin).index_select(-2, self.swap)
        return cos[:, :, None], sin[:, :, None], rotation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None, *,
               interleaved: bool) -> torch.Tensor:
    """x [B, T, heads, dim] with the tables of RotaryEmbedding → x·cos + swap(x)·sin, where swap exchanges
    the two dimensions of each rotated pair; as x · rotation when the matrices are given."""
    if rotation is not None:
        return torch.matmul(x, rotation if rotation.dtype == x.dtype else rotation.to(x.dtype))
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = x.roll(x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, swapped, sin)
