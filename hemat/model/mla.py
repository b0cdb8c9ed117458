"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values are compressed into one latent c_KV (kv_lora_rank) per token, normalised by its own
RMSNorm, plus one RoPE key k_pe (qk_rope_head_dim) shared by all heads. Only (c_KV, k_pe) need to be
cached. Without a cache (training, full forward) the latent is expanded into per-head keys and
values; with a cache, W_UK is absorbed into the query and W_UV into the output, so cached tokens are
never expanded:  scores = [q_nope · W_UK ; q_pe] · [c_KV ; k_pe],  out = (P · c_KV) · W_UV, where the
cached [c_KV ; k_pe] act as one key shared by every head (one batched matmul for all heads).

On CUDA the expanded (training / uncached) attention runs on the fastest SDPA backend that takes MLA's
head sizes (q·k over qk_nope + qk_rope, v smaller): cuDNN first, then flash with V zero-padded to the
qk head size (flash needs one head size; the padded output columns are zero and sliced off), then
memory-efficient, then math. The choice is probed once per head sizes, dtype and device."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hemat.model.config import ModelConfig
from hemat.model.dense import RMSNorm, additive_mask, attend
from hemat.model.rope import apply_rope


def compressed_inputs(attn, compressed: torch.Tensor, x: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
    """MLA's low-rank stage from the down-projection [q_a(x) ; kv_a(x)] (kv_a(x) alone without a query rank):
    the query input (q_a's output normalised, or x itself), the normalised KV latent and the rotated shared
    key k_pe. `attn`: an MLAttention, or an inference form of one with its sizes and norms."""
    if attn.q_rank:
        q_in, latent, k_pe = compressed.split([attn.q_rank, attn.kv_rank, attn.rope_dim], dim=-1)
        q_in = attn.q_a_layernorm(q_in)
    else:
        q_in = x
        latent, k_pe = compressed.split([attn.kv_rank, attn.rope_dim], dim=-1)
    k_pe = apply_rope(k_pe[:, :, None], *rope, interleaved=attn.interleaved)[:, :, 0]
    return q_in, attn.kv_a_layernorm(latent), k_pe


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
        compressed = self._down_project(x) if self.q_rank else self.kv_a_proj_with_mqa(x)
        q_in, latent, k_pe = compressed_inputs(self, compressed, x, rope)
        q = (self.q_b_proj if self.q_rank else self.q_proj)(q_in)
        q_nope, q_pe = q.view(b, t, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope, interleaved=self.interleaved)
        if cache is None:
            out = self._expanded(q_nope, q_pe, latent, k_pe)
        else:
            out = self.absorbed(q_nope, q_pe, latent, k_pe, cache)
        return self.o_proj(out.reshape(b, t, -1))

    def _down_project(self, x: torch.Tensor) -> torch.Tensor:
        """[q_a(x) ; kv_a_proj_with_mqa(x)] as one matmul over the weights concatenated (the gradient splits
        back), or two matmuls when a projection computes in FP8 (fp8.py)."""
        if type(self.q_a_proj) is type(self.kv_a_proj_with_mqa) is nn.Linear:
            return F.linear(x, torch.cat((self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight)))
        return torch.cat((self.q_a_proj(x), self.kv_a_proj_with_mqa(x)), dim=-1)

    def _expanded(self, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1)
        return causal_attention(q, k, v, self.scale)

    def absorbed(self, q_nope, q_pe, latent, k_pe, cache) -> torch.Tensor:
        """q_nope [B,T,H,nope], q_pe [B,T,H,rope], the new tokens' latent [B,T,r] and k_pe [B,T,rope] → [B,T,H,v],
        attending through the cache to every cached token."""
        b, t, h, _ = q_nope.shape
        w_uk, w_uv = self._kv_b_heads()
        # per head: q_latent[h] = q_nope[h] · W_UK[h], as one batched matmul over the heads
        q_latent = torch.bmm(q_nope.reshape(b * t, h, -1).transpose(0, 1), w_uk).transpose(0, 1)
        q = torch.cat((q_latent.reshape(b, t, h, -1), q_pe), dim=-1)
        out_latent = cache.attend(self.layer_idx, attend_latent, q, (latent, k_pe), self.scale)  # [B, T, H, r]
        out = torch.bmm(out_latent.view(b * t, h, -1).transpose(0, 1), w_uv.transpose(1, 2))
        return out.transpose(0, 1).reshape(b, t, h, self.v_dim)

    def _kv_b_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj per head: W_UK [H, nope, r] and W_UV [H, v, r] (views)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]


def attend_latent(q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """q [B,T,H,r+rope] against the one key [c_KV ; k_pe] [B,S,r+rope] all heads share → P · c_KV [B,T,H,r]."""
    b, t, h, d = q.shape
    kv = _joined(latent, k_pe)
    scores = torch.baddbmm(additive_mask(mask, h, q.dtype), q.reshape(b, t * h, d), kv.transpose(1, 2), alpha=scale)
    if scores.dtype != torch.float32:  # the softmax in fp32
        return torch.bmm(scores.float().softmax(dim=-1).to(latent.dtype), latent).view(b, t, h, -1)
    return torch.bmm(scores.softmax(dim=-1), latent).view(b, t, h, -1)


def _joined(latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """[latent ; k_pe] as one [B, S, r + rope] tensor: a view when a cache handed out the two halves of
    one buffer (the paged cache stores them side by side) and no gradient is wanted, else a copy."""
    b, s, r = latent.shape
    width = r + k_pe.shape[-1]
    if torch.compiler.is_compiling():  # no data pointers in a compiled graph; the compiler fuses the copy away
        return torch.cat((latent, k_pe), dim=-1)
    if (not torch.is_grad_enabled() and latent.stride() == k_pe.stride() == (s * width, width, 1)
            and k_pe.data_ptr() == latent.data_ptr() + r * latent.element_size() and latent.dtype == k_pe.dtype):
        return latent.as_strided((b, s, width), latent.stride())
    return torch.cat((latent, k_pe), dim=-1)


# ---- the expanded attention's SDPA backend on CUDA ------------------------------------------------------
SDPA_BACKENDS = {  # in the order they are tried
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash_padded_v": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention, q and k [B, T, H, d_qk], v [B, T, H, d_v] → [B, T, H, d_v]: dense.attend on CPU
    (unchanged), on CUDA the backend sdpa_backend picked for these sizes."""
    if not q.is_cuda:
        return attend(q, k, v, None, scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = sdpa_backend(q.shape[-1], v.shape[-1], str(q.dtype), str(q.device), grad)
    return attention_with(backend, q, k, v, scale)


def attention_with(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA restricted to one backend of SDPA_BACKENDS; "flash_padded_v" zero-pads V to the qk
    head size and slices the output back (zero value columns only add zero output columns)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dv = v.shape[-1]
    if backend == "flash_padded_v" and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[..., :dv].transpose(1, 2)


def sdpa_backend(d_qk: int, d_v: int, dtype: str, device: str, grad: bool) -> str:
    """The first backend of SDPA_BACKENDS that runs causal attention with these head sizes (forward,
    and backward when `grad`) and agrees with the math backend in fp32; probed once on random inputs."""
    return _probe_sdpa_backend(d_qk, d_v, dtype, device, grad)


# torch.compile runs it while tracing and keeps the answer. This is the mark torch.compiler.assume_constant_result
# sets, set directly: that decorator imports torch._dynamo, 1.3 s and 0.14 GB on every start-up for all users.
sdpa_backend._dynamo_marked_constant = True


@functools.cache
def _probe_sdpa_backend(d_qk: int, d_v: int, dtype: str, device: str, grad: bool) -> str:
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (2, 256, 4)  # batch, tokens, heads
    q, k = (torch.randn(*shape, d_qk, generator=gen, device=device).to(torch_dtype) for _ in "qk")
    v = torch.randn(*shape, d_v, generator=gen, device=device).to(torch_dtype)
    tolerance = 1e-4 if torch_dtype == torch.float32 else 5e-2  # relative to the largest reference value

    def run(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        out = attention_with(name, *inputs, d_qk**-0.5)
        if grad:
            out.float().square().sum().backward()
        return [out.float()] + [t.grad.float() for t in inputs if grad]

    with torch.enable_grad():
        expected = run("math", torch.float32)
        for name in SDPA_BACKENDS:
            try:
                got = run(name, torch_dtype)
            except RuntimeError:  # no kernel for these sizes, dtype or device
                continue
            if all((g - e).abs().max() <= tolerance * e.abs().max() for g, e in zip(got, expected)):
                return name
    return "math"
