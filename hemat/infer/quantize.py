"""Inference forms of a built model, applied from outside as module swaps (the way torchao's `quantize_`
and PEFT's adapters are applied): `prepare_for_inference(model, weights)` returns a model whose
projections are replaced by their inference forms, leaving the reference model untouched (it shares
the modules no form replaces: norms, routers, an fp embedding). A swap is a pure function of the weights at
the time it is applied, so training never sees these forms and nothing has to be invalidated.

The forms, by weight format:
- None: the weights copied once as contiguous [in, out] matrices (on CPU, MKL multiplies a few rows by
  them 20-30% faster than by the transposed view F.linear uses), within COPY_BUDGET_BYTES; past it the
  reference modules stay.
- "int8": weight-only, symmetric, one scale per output channel (PyTorch's `_weight_int8pack_mm`).
- "int4": weight-only, asymmetric, one scale and zero point per group of `group_size` inputs
  (PyTorch's `_weight_int4pack_mm_for_cpu`, the tinygemm layout: w = (q - 8) · scale + zero).
Activations stay in the model's dtype; the packed kernels compute in bf16 and accumulate in fp32. They are
fast for a few rows (decode); from a measured row count on (prefill, eval, batched decode), the weight is
dequantized a tile at a time for a dense matmul (DENSE_DTYPE) instead. An int8/int4 model's embedding is read from
packed rows (PackedEmbedding: a tied head's, else int8 rows of its own). `load_for_inference` quantizes a
checkpoint while it loads, unit by unit, so that the full-precision model never exists whole.

Every layout also gets the structural inference forms: the SwiGLU gate and up projections as one
matrix (FusedMLP), routed experts as one FusedMLP per expert, and MLA with W_UK folded into the query
projection and W_UV into o_proj where that at most doubles them (FoldedMLA), so the cache stores only
(c_KV, k_pe) and the projections that remain are plain linears to quantize."""

from __future__ import annotations

import copy
import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hemat.errors import HematError
from hemat.model.dense import MLP, GQAttention
from hemat.model.hf import from_pretrained, read_checkpoint_config, stored_quantization, units
from hemat.model.hub import resolve_model_source
from hemat.model.lora import LoraExperts, LoraLinear
from hemat.model.mla import MLAttention, attend_latent, compressed_inputs
from hemat.model.moe import RoutedExperts
from hemat.model.rope import apply_rope

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the CPU int4 kernel takes
INT8_ALIGN = 16  # the int8 kernel's row length must be a multiple of this (see Int8Linear)
KERNEL_ROWS = 16  # the packed kernels are fast for a few rows and slow for many: longer inputs run in chunks
DENSE_TILE = 1 << 18  # elements of the weight dequantized at a time by the dense path (see PackedLinear.dense)
QUANTIZE_CHUNK = 1 << 20  # weights are quantized this many elements at a time: small temporaries
COPY_BUDGET_BYTES = 1 << 30  # transposed fp copies of one model, at most
COMPUTE_DTYPE = torch.bfloat16  # the packed kernels' activation dtype (their fp32 paths are ~10x slower)


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo shows (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return set(next((line.split(":")[1].split() for line in text.splitlines() if line.startswith("flags")), []))


# The dense path's dtype: bf16 where the CPU multiplies it natively (AMX, AVX-512 BF16), else fp32. Without those
# instructions PyTorch's bf16 matmul measured 5.6x slower than fp32 (512 rows, 2-core AMD EPYC with AVX2).
DENSE_DTYPE = torch.bfloat16 if cpu_flags() & {"amx_bf16", "avx512_bf16"} else torch.float32


class QuantizationError(HematError):
    """A weight format, group size or model that cannot be quantized; the message names the value."""


# ---- quantizers (round to nearest) ---------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] → (q int8 [out, in], scale fp32 [out]): w ≈ q · scale, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] → (q uint8 in 0..15 [out, in], scale fp32 [out, in/g], zero point uint8 [out, in/g]):
    w ≈ (q - zero_point) · scale, min-max per group of g inputs (the range always holds 0, so zeros stay exact)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-12)
    zero_point = (-low / scale).round().clamp(0, 15)
    q = ((w / scale[..., None]).round() + zero_point[..., None]).clamp(0, 15)
    return q.view(out_features, in_features).to(torch.uint8), scale, zero_point.to(torch.uint8)


def row_chunks(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """weight [out, in] split into blocks of about QUANTIZE_CHUNK elements, whole rows, a multiple of 64 of
    them (int4's packed blocks)."""
    return weight.detach().split(max(1, QUANTIZE_CHUNK // weight.shape[1] // 64) * 64)


# ---- linear forms: each has in_features, out_features, forward and dequantized() -----------------------
class DenseLinear(nn.Module):
    """y = x · W + b over a contiguous [in, out] copy of the weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight_t.t()


class PackedLinear(nn.Module):
    """Shared by the packed forms: bf16 activations through `kernel`, KERNEL_ROWS rows per call, or from
    `dense_rows` rows on (prefill, eval, batched decode) through the weight dequantized tile by tile and a
    dense matmul in DENSE_DTYPE: each form's `dense_rows` is where that was measured faster on a 2-core Xeon with AMX
    (benchmarks/quantized_rows.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    kernel_dtype = COMPUTE_DTYPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self.dense(rows.to(DENSE_DTYPE)) if rows.shape[0] >= self.dense_rows else \
            self.packed(rows.to(self.kernel_dtype).contiguous())
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def packed(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] <= KERNEL_ROWS:
            return self.kernel(rows)
        return torch.cat([self.kernel(chunk) for chunk in rows.split(KERNEL_ROWS)])

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """rows times the dequantized weight, a tile of DENSE_TILE elements at a time (whole rows, a multiple
        of 64 of them: int4's blocks): a small tile is reused from the heap and stays in cache, where a fresh
        dequantized copy of a whole large weight costs more in page faults than the matmul itself."""
        step = max(1, DENSE_TILE // self.in_features // 64) * 64
        tiles = [self.dense_tile(rows, start, min(start + step, self.out_features))
                 for start in range(0, self.out_features, step)]
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)


class Int8Linear(PackedLinear):
    dense_rows = 24

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        q, scale = (torch.cat(parts) for parts in zip(*map(quantize_int8, row_chunks(weight))))
        # `_weight_int8pack_mm` reads past the end of rows whose length is not a multiple of 16 when it is
        # given several rows (a segfault in torch 2.13 on CPU): zero columns pad the inputs to the next multiple
        self.pad = -self.in_features % INT8_ALIGN
        self.register_buffer("weight", F.pad(q, (0, self.pad)) if self.pad else q)
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self.pad:
            rows = F.pad(rows, (0, self.pad))
        return torch._weight_int8pack_mm(rows, self.weight, self.scale)

    def dense_tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The int8 values are exact in bf16; the scales apply to the output columns."""
        return F.linear(rows, self.weight[start:stop, :self.in_features].to(rows.dtype)) * self.scale[start:stop]

    def dequantized(self) -> torch.Tensor:
        return self.weight[:, :self.in_features].float() * self.scale.float()[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` [n] of the dequantized weight → [n, in] in dtype."""
        return (self.weight[ids, :self.in_features].float() * self.scale[ids, None].float()).to(dtype)


class Int4Linear(PackedLinear):
    dense_rows = 80

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        super().__init__(weight, bias)
        self.group_size = group_size
        packed, scales_and_zeros = zip(*(self.pack(chunk) for chunk in row_chunks(weight)))
        self.register_buffer("weight_packed", torch.cat(packed))
        self.register_buffer("scales_and_zeros", torch.cat(scales_and_zeros, dim=1))

    def pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the weight (a multiple of 64 but the last: the packed layout's blocks) → their packed
        values and tinygemm's [in/g, rows, 2] (scale, zero), w = (q - 8) · scale + zero."""
        q, scale, zero_point = quantize_int4(weight, self.group_size)
        zero = (8 - zero_point.float()) * scale
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1),
                torch.stack((scale, zero), dim=-1).transpose(0, 1).to(COMPUTE_DTYPE))

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_packed, self.group_size,
                                                          self.scales_and_zeros)

    def dense_tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return rows @ self.dequantized_t(rows.dtype, start, stop)

    def dequantized_t(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Output rows start:stop of the weight (start a multiple of 64), transposed to [in, rows], in
        `dtype`: q · scale + (zero - 8 · scale) per group."""
        stop = self.out_features if stop is None else stop
        q = unpack_int4_t(self.weight_packed[start:stop], stop - start, self.in_features).to(dtype)
        scale, zero = self.scales_and_zeros[:, start:stop].float().unbind(-1)  # [in/g, rows] each
        offset = (zero - 8 * scale).to(dtype)
        w = torch.addcmul(offset[:, None], q.view(len(scale), self.group_size, -1), scale.to(dtype)[:, None])
        return w.view(self.in_features, stop - start)

    def dequantized(self) -> torch.Tensor:
        return self.dequantized_t(torch.float32).t()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` [n] of the dequantized weight → [n, in] in dtype, out a multiple of 64 (whole packed
        blocks of B rows, see unpack_int4_t): row o is in block o // B, byte column o % (B/2), high nibble if
        o % B >= B/2."""
        block = int4_pack_block()
        half = block // 2
        packed = self.weight_packed.view(-1, self.in_features, half)[ids // block, :, ids % half]  # [n, in]
        q = (packed >> (ids // half % 2 * 4)[:, None]) & 15
        scale, zero = self.scales_and_zeros[:, ids].float().unbind(-1)  # [in/g, n] each
        w = (q.float().view(len(ids), -1, self.group_size) - 8) * scale.t()[..., None] + zero.t()[..., None]
        return w.view(len(ids), self.in_features).to(dtype)


@functools.cache
def int4_pack_block() -> int:
    """B, the rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout: PyTorch picks it by the
    instruction set it runs (64 with AVX-512, 32 with AVX2), so it is read off a probe once."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32, 16):
        if torch.equal(unpack_int4_t(packed, 128, 64, block).t(), q.to(torch.uint8)):
            return block
    raise QuantizationError("PyTorch's int4 packing on this machine is not in blocks of 64, 32 or 16 rows, the "
                            "layouts hemat reads; quantize to int8 instead")


def unpack_int4_t(packed: torch.Tensor, out_features: int, in_features: int, block: int | None = None) -> torch.Tensor:
    """The 0..15 values of `_convert_weight_to_int4pack_for_cpu`'s layout, transposed: [in, out]. Rows
    come in blocks of B (int4_pack_block), byte [c, j] of a block holding rows j (low nibble) and j + B/2
    (high) of input c; the last out % B rows as one block whose byte [c, j] holds rows 2j (low) and 2j + 1
    (high)."""
    block = block or int4_pack_block()
    full = out_features // block * block
    parts = []
    if full:
        blocks = packed[:full].view(full // block, in_features, block // 2).transpose(0, 1)  # [in, out / B, B/2]
        parts.append(torch.cat((blocks & 15, blocks >> 4), dim=-1).view(in_features, full))
    rest = out_features - full
    if rest:
        pairs = packed[full:].view(in_features, rest // 2)
        parts.append(torch.stack((pairs & 15, pairs >> 4), dim=-1).view(in_features, rest))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class PackedEmbedding(nn.Module):
    """An embedding read from the rows of a packed linear, dequantized on lookup to `dtype`: a tied head's
    (one copy of the values for both), or an Int8Linear made of the embedding's weight. A lookup gathers
    a few rows, so this costs nothing next to the projections."""

    def __init__(self, linear: PackedLinear, dtype: torch.dtype):
        super().__init__()
        self.linear, self.dtype, self.embedding_dim = linear, dtype, linear.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear.rows(ids.flatten(), self.dtype).view(*ids.shape, self.embedding_dim)

    def dequantized(self) -> torch.Tensor:
        return self.linear.dequantized()


# ---- structural forms ----------------------------------------------------------------------------------
class FusedMLP(nn.Module):
    """SwiGLU with the gate and up projections as one linear: down(silu(gate) * up)."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class FusedQKVAttention(GQAttention):
    """GQAttention with q, k and v from one linear over the three weights concatenated: one kernel call where
    three each paid a fixed cost (~8 µs a call for the int4 kernel at decode, whatever its size)."""

    def __init__(self, attn: GQAttention, qkv_proj: nn.Module, o_proj: nn.Module):
        nn.Module.__init__(self)
        self.layer_idx, self.scale, self.head_dim = attn.layer_idx, attn.scale, attn.head_dim
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x).split(self.sizes, dim=-1)


class InferenceExperts(nn.Module):
    """The routed experts as one FusedMLP each, run over the tokens routed to them (RoutedExperts'
    interface: x [N, H], routing weights and ids [N, k] → [N, H]). In the fp layout the experts' weights
    are views of two stacked tensors, through which a compiled forward runs on static shapes."""

    def __init__(self, experts: list[FusedMLP], stacked: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        gate_up, down = stacked if stacked is not None else (None, None)  # [E, H, 2I], [E, I, H] or None (packed)
        self.register_buffer("gate_up_stacked", gate_up, persistent=False)
        self.register_buffer("down_stacked", down, persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, counts=None) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.gate_up_stacked is not None:
            return self.gathered(x, weights, ids)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token_of = order // ids.shape[1]
        routed = x[token_of]
        out = torch.empty_like(routed)
        start = 0
        for expert, n in enumerate(torch.bincount(flat, minlength=len(self.experts)).tolist()):
            if n:
                out[start : start + n] = self.experts[expert](routed[start : start + n])
                start += n
        out *= weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, chosen expert) pair through that expert's gathered weights: shapes that do not
        depend on the routing (the loop's row counts do), for torch.compile."""
        gate_up, down = self.gate_up_stacked, self.down_stacked
        k, flat = ids.shape[1], ids.flatten()
        rows = x.repeat_interleave(k, dim=0)[:, None]  # [N k, 1, H]
        gate, up = torch.bmm(rows, gate_up[flat]).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, down[flat])[:, 0] * weights.flatten()[:, None].to(x.dtype)
        return out.view(-1, k, x.shape[-1]).sum(dim=1)


class FoldedMLA(nn.Module):
    """MLA at inference, always in its absorbed form (MLAttention.absorbed, with a causal mask when there
    is no cache). `down` computes [q_a(x) ; kv_a(x)] (or kv_a(x) alone) in one matmul. With `folded`, W_UK
    sits inside the query projection (per head: [q_nope · W_UK ; q_pe] at once) and W_UV inside o_proj;
    otherwise the per-head W_UK [H, nope, r] and W_UV [H, v, r] are applied between them."""

    def __init__(self, attn: MLAttention, down: nn.Module, q_proj: nn.Module, o_proj: nn.Module,
                 w_uk: torch.Tensor | None, w_uv: torch.Tensor | None):
        super().__init__()
        self.layer_idx, self.n_heads, self.scale = attn.layer_idx, attn.n_heads, attn.scale
        self.q_rank, self.kv_rank, self.rope_dim = attn.q_rank, attn.kv_rank, attn.rope_dim
        self.nope_dim, self.v_dim, self.interleaved = attn.nope_dim, attn.v_dim, attn.interleaved
        self.down, self.q_proj, self.o_proj = down, q_proj, o_proj
        self.q_a_layernorm = attn.q_a_layernorm if attn.q_rank else None
        self.kv_a_layernorm = attn.kv_a_layernorm
        self.register_buffer("w_uk", w_uk)
        self.register_buffer("w_uv", w_uv)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        q_in, latent, k_pe = compressed_inputs(self, self.down(x), x, rope)
        q = self.q_proj(q_in).view(b, t, self.n_heads, -1)
        if self.w_uk is None:
            q_latent, q_pe = q.split([self.kv_rank, self.rope_dim], dim=-1)
        else:
            q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
            q_latent = self.absorb_keys(q_nope)
        q = torch.cat((q_latent, apply_rope(q_pe, *rope, interleaved=self.interleaved)), dim=-1)
        if cache is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril().expand(b, t, t)
            out = attend_latent(q, latent, k_pe, mask, self.scale)  # [B, T, H, r]
        else:
            out = cache.attend(self.layer_idx, attend_latent, q, (latent, k_pe), self.scale)
        if self.w_uv is not None:
            out = self.expand_values(out)
        return self.o_proj(out.reshape(b, t, -1))

    def absorb_keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, H, nope] → its latent query [B, T, H, r] (through W_UK, per head)."""
        b, t = q_nope.shape[:2]
        q_latent = torch.bmm(q_nope.reshape(b * t, self.n_heads, -1).transpose(0, 1), self.w_uk)
        return q_latent.transpose(0, 1).reshape(b, t, self.n_heads, -1)

    def expand_values(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output in the latent space [B, T, H, r] → values [B, T, H, v] (through W_UV)."""
        b, t = out.shape[:2]
        out = torch.bmm(out.reshape(b * t, self.n_heads, -1).transpose(0, 1), self.w_uv.transpose(1, 2))
        return out.transpose(0, 1).reshape(b, t, self.n_heads, -1)


def stack_dense(experts: list[FusedMLP]) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' DenseLinear weights moved into two stacked tensors [E, in, out], which each expert's
    weight_t then views (one copy of the weights, two ways to read them)."""
    stacked = []
    for attr in ("gate_up", "down"):
        linears = [getattr(e, attr) for e in experts]
        whole = torch.stack([lin.weight_t for lin in linears])
        for e, lin in enumerate(linears):
            lin.weight_t = whole[e]
        stacked.append(whole)
    return tuple(stacked)


# ---- the swap ------------------------------------------------------------------------------------------
class _Builder:
    """Makes the inference forms of one model, unit by unit (hf.units: the embedding first, then each layer,
    the norm, an untied head); keeps the fp copies within the budget."""

    def __init__(self, weights: str | None, group_size: int, tied: bool, fold_mla: bool = True):
        self.weights, self.group_size, self.tied, self.fold_mla = weights, group_size, tied, fold_mla
        self.copied = 0
        self.fallbacks: list[str] = []
        self.tied_head: nn.Module | None = None

    def unit(self, name: str, module: nn.Module) -> nn.Module:
        """The inference form of one unit, which may be changed in place (a copy's, or one being loaded). A
        tied head gets its own form, made from the embedding; an int8/int4 model's embedding reads the rows
        of its tied head, or else (or when int4 blocks do not tile the vocabulary) of int8 rows of its own."""
        if name != "model.embed_tokens":
            form = self.form(name, module)
            if form is None:
                _swap(module, f"{name}.", self)
            return form or module
        if self.tied and self.fits(module.weight):
            self.tied_head = self.linear("lm_head", module.weight)
        if self.weights is None:
            return module
        head = self.tied_head
        if not (isinstance(head, Int8Linear) or isinstance(head, Int4Linear) and head.out_features % 64 == 0):
            head = Int8Linear(module.weight, None)
        return PackedEmbedding(head, module.weight.dtype)

    def finish(self, model):
        """The prepared model, with its tied head, `weight_format` and `weight_bytes`."""
        if self.tied:
            model.lm_head = self.tied_head
        if self.fallbacks:
            print(f"hemat: int4 needs outputs in multiples of 16; int8 instead for {', '.join(self.fallbacks)}")
        model.weight_format = self.weights or str(model.dtype).removeprefix("torch.")
        model.weight_bytes = weight_bytes(model)
        return model

    def fits(self, *tensors: torch.Tensor) -> bool:
        """For the fp layout: whether copies of these tensors fit the budget (and count them if so)."""
        if self.weights is not None:
            return True
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.copied + size > COPY_BUDGET_BYTES:
            return False
        self.copied += size
        return True

    def linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
        from hemat.infer import native  # its forms subclass this module's

        out_features, in_features = weight.shape
        if self.weights is None:
            return DenseLinear(weight, bias)
        if self.weights == "int4" and in_features % self.group_size:
            raise QuantizationError(f"int4 group size {self.group_size} does not divide the input dimension "
                                    f"{in_features} of {name} (choose one of {GROUP_SIZES} that does)")
        if native.available(in_features):
            return native.NativeInt8Linear(weight, bias) if self.weights == "int8" else \
                native.NativeInt4Linear(weight, bias, self.group_size)
        if self.weights == "int8":
            return Int8Linear(weight, bias)
        if out_features % 16:  # the packed int4 layout tiles outputs by 16
            self.fallbacks.append(f"{name} ({out_features} outputs)")
            return Int8Linear(weight, bias)
        return Int4Linear(weight, bias, self.group_size)

    def mlp(self, name: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> FusedMLP:
        return FusedMLP(self.linear(f"{name}.gate_up_proj", torch.cat((gate, up))),
                        self.linear(f"{name}.down_proj", down))

    def gqa(self, name: str, attn: GQAttention) -> FusedQKVAttention:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None
        qkv = self.linear(f"{name}.qkv_proj", torch.cat([p.weight.detach() for p in projections]), bias)
        o_proj = self.linear(f"{name}.o_proj", attn.o_proj.weight.detach(), attn.o_proj.bias)
        return FusedQKVAttention(attn, qkv, o_proj)

    def mla(self, name: str, attn: MLAttention) -> FoldedMLA:
        h, r, rope, nope, v = attn.n_heads, attn.kv_rank, attn.rope_dim, attn.nope_dim, attn.v_dim
        q_proj = attn.q_b_proj if attn.q_rank else attn.q_proj
        kv_b = attn.kv_b_proj.weight.detach().view(h, nope + v, r)
        w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
        down_weights = (attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight) if attn.q_rank else \
            (attn.kv_a_proj_with_mqa.weight,)
        down = self.linear(f"{name}.q_a_kv_a_proj", torch.cat(down_weights).detach())
        # fold W_UK into the query projection and W_UV into o_proj while that at most doubles them
        if not (self.fold_mla and r + rope <= 2 * (nope + rope) and r <= 2 * v):
            return FoldedMLA(attn, down, self.linear(f"{name}.q_proj", q_proj.weight),
                             self.linear(f"{name}.o_proj", attn.o_proj.weight),
                             w_uk.contiguous().clone(), w_uv.contiguous().clone())
        # per head: rows [W_UKᵀ · W_q,nope ; W_q,pe] of the query projection, columns W_o,h · W_UV[h] of o_proj
        w_q = q_proj.weight.detach().view(h, nope + rope, -1)
        folded_q = torch.cat((torch.bmm(w_uk.transpose(1, 2), w_q[:, :nope]), w_q[:, nope:]), dim=1).flatten(0, 1)
        w_o = attn.o_proj.weight.detach().view(-1, h, v).transpose(0, 1)  # [H, hidden, v]
        folded_o = torch.bmm(w_o, w_uv).transpose(0, 1).flatten(1)  # [hidden, H r]
        return FoldedMLA(attn, down, self.linear(f"{name}.q_proj_folded", folded_q),
                         self.linear(f"{name}.o_proj_folded", folded_o), None, None)

    def form(self, name: str, module: nn.Module) -> nn.Module | None:
        """The inference form of `module`, or None to keep it (and look inside)."""
        if isinstance(module, MLP):
            weights = (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight)
            return self.mlp(name, *weights) if self.fits(*weights) else module
        if isinstance(module, (RoutedExperts, LoraExperts)):  # adapters folded in: W + ΔW
            gate_ups, downs = module.effective_weights() if isinstance(module, LoraExperts) else \
                (module.gate_up_proj, module.down_proj)
            if not self.fits(gate_ups, downs):
                return module
            experts = [FusedMLP(self.linear(f"{name}.{e}.gate_up_proj", gate_up), self.linear(f"{name}.{e}.down_proj", down))
                       for e, (gate_up, down) in enumerate(zip(gate_ups.detach(), downs.detach()))]
            return InferenceExperts(experts, stack_dense(experts) if self.weights is None else None)
        if isinstance(module, MLAttention):
            return self.mla(name, module) if self.fits(*module.parameters()) else module
        if isinstance(module, GQAttention) and self.fits(*module.parameters()):
            return self.gqa(name, module)  # else its linears one by one
        if isinstance(module, (nn.Linear, LoraLinear)):  # FP8Linear too (in eval an ordinary linear); LoRA folded
            return self.linear(name, module.weight.detach(), module.bias) if self.fits(module.weight) else module
        return None


def prepare_for_inference(model, weights: str | None = None, group_size: int = 128, fold_mla: bool = True):
    """A copy of `model` (a CausalLM) with its projections in their inference forms (see the module
    docstring); the modules no form replaces are shared with `model`, which is left as it was. A model
    that is already prepared comes back as it is when `weights` agrees. fold_mla=False keeps W_UK and
    W_UV apart from the query and output projections (adapters.py adds per-row updates to each).
    → the prepared model, with `weight_format` ("int8", "int4" or its dtype's name) and `weight_bytes`."""
    _check_format(weights, group_size)
    prepared = getattr(model, "weight_format", None)
    if prepared is not None:
        if weights in (None, prepared):
            return model
        raise QuantizationError(f"this model is already prepared with {prepared} weights; "
                                f"start from the unquantized model to make {weights} weights")
    _check_device(weights, model.device)
    builder = _Builder(weights, group_size, model.lm_head is None, fold_mla)
    out = _shell_copy(model)
    with torch.no_grad():
        for name, unit in units(out):
            out.set_submodule(name, builder.unit(name, unit))
    return builder.finish(out)


def load_for_inference(source, quantize: str | None = None, group_size: int = 128, device=None, dtype=None,
                       lora=None):
    """A checkpoint (see hf.from_pretrained) prepared for inference in `quantize`, by default in the
    int8/int4 format it was stored in, else in its dtype. A checkpoint directory is quantized while it
    loads, unit by unit, so that its full-precision form never exists whole; a LoRA adapter to merge
    (`lora`, a directory), a .gguf file or the dtype's forms load the model whole first."""
    path = Path(source) if str(source).lower().endswith(".gguf") else resolve_model_source(source)
    stored = stored_quantization(path)
    if quantize is None and stored is not None:
        quantize, group_size = stored[0], stored[1] or group_size
    _check_format(quantize, group_size)
    if quantize is None or lora is not None or not (path / "config.json").is_file():
        prepared = prepare_for_inference(_load_whole(path, device, dtype, lora), quantize, group_size)
    else:
        _check_device(quantize, torch.device(device or "cpu"))
        builder = _Builder(quantize, group_size, read_checkpoint_config(path).tie_word_embeddings)
        prepared = builder.finish(from_pretrained(path, device=device, dtype=dtype, prepare=builder.unit))
    _release_freed_heap()  # the full-precision tensors replaced are free by now
    return prepared


def _load_whole(path: Path, device, dtype, lora):
    from hemat.model.adapter_io import load_adapter

    model = from_pretrained(path, device=device, dtype=dtype)
    if lora is not None:  # prepare_for_inference folds it into the weights: no cost per token
        load_adapter(model, lora)
    return model


def _release_freed_heap() -> None:
    """Hand the heap memory that loading freed back to the system: glibc keeps freed blocks under 32 MB
    (the quantizers' temporaries) for reuse, and they would stay resident for the life of the process."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _check_format(weights: str | None, group_size: int) -> None:
    if weights is not None and weights not in FORMATS:
        raise QuantizationError(f"unknown weight format {weights!r}: choose one of {', '.join(FORMATS)}")
    if weights == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


def _check_device(weights: str | None, device: torch.device) -> None:
    if weights is not None and device.type != "cpu":
        raise QuantizationError(f"int8/int4 weights have packed kernels on CPU only in hemat for now; "
                                f"the model is on {device} (load it with --device cpu)")


def _shell_copy(module: nn.Module) -> nn.Module:
    """A new module tree with the same parameters and buffers (no tensor is copied)."""
    new = copy.copy(module)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    new._modules = {name: None if child is None else _shell_copy(child) for name, child in module._modules.items()}
    return new


def _swap(module: nn.Module, prefix: str, builder: _Builder) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        form = builder.form(path, child)
        if form is None:
            _swap(child, f"{path}.", builder)
        elif form is not child:
            setattr(module, name, form)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each tensor once."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + [
            b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ---- command-line use ----------------------------------------------------------------------------------
def add_quantize_arguments(parser) -> None:
    """--quantize and --group-size, for the commands that load a model to run it."""
    parser.add_argument("--quantize", choices=FORMATS, default=None,
                        help="weight-only int8 (per channel) or int4 (per group) at load time, CPU only "
                        "(default: the checkpoint's own format, else its dtype)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")


def prepare_loaded(model, quantize: str | None, group_size: int = 128, fold_mla: bool = True):
    """A model from from_pretrained prepared for inference in `quantize`, or by default in the int8/int4
    format its checkpoint was stored in (model.quantization), else in its dtype (see load_for_inference,
    which quantizes while loading)."""
    stored = getattr(model, "quantization", None)
    if quantize is None and stored is not None:
        quantize, group_size = stored["format"], stored["group_size"] or group_size
    return prepare_for_inference(model, quantize, group_size, fold_mla)
