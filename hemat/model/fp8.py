"""FP8 training of the big linear projections, with DeepSeek-V3's fine-grained scaling (§3.3.2):
activations are quantised to e4m3 per 1×128 tile (one scale per token per 128 input channels), weights
per 128×128 block, and the matmul multiplies each tile pair's partial sum by both scales in fp32.
A tile's scale maps its largest magnitude to e4m3's largest value (448), so one outlier only coarsens
its own 128 values instead of the whole tensor.

The forward GEMM runs in FP8: on CUDA through torch's block-scaled `_scaled_mm` (cuBLAS, sm90), on CPU
(tests, `--tiny` benchmarks) as the same arithmetic emulated: the operands quantised to float8 and
dequantised, then one fp32 matmul. The backward GEMMs run in bf16 (the autocast dtype): the input
gradient uses the weight as stored, the weight gradient uses the saved FP8 input dequantised (the FP8
copy is what is kept for backward, half the bytes of a bf16 activation).

`convert_to_fp8(model)` swaps eligible nn.Linear modules for FP8Linear, which shares their parameters:
state dicts, checkpoints and the optimizer see nothing new. Only projections whose input and output
sizes are multiples of 128 qualify; the output head, embeddings, router, norms and the routed experts'
grouped GEMMs stay in bf16. FP8Linear computes in FP8 only in training mode; in eval (validation, the
engine's rollouts) it is an ordinary nn.Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hemat.errors import HematError

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
EXCLUDED = ("lm_head",)  # by module name; embeddings, norms and the router are not nn.Linear


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 128) → (e4m3 [M, K], dequantisation scales [M, K/128] fp32) with
    x ≈ q · scale per 1×128 tile."""
    tiles = x.float().unflatten(-1, (-1, BLOCK))  # [M, K/128, 128]
    scale = tiles.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2), scale.squeeze(-1)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (e4m3 [N, K], dequantisation scales [⌈N/bn⌉, ⌈K/bk⌉] fp32) with w ≈ q · scale per
    bn×bk block (DeepSeek-V3's checkpoint layout, `weight_scale_inv`); blocks at the edges may be partial."""
    blocks = _padded_blocks(w.float(), block)  # zero padding leaves each block's largest magnitude as is
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return _unpadded(q, w.shape), scale.view(blocks.shape[0], blocks.shape[2])


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.unflatten(-1, (-1, BLOCK)).float() * scale[..., None]).flatten(-2).to(dtype)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize_blocks: q [N, K] times its block's scale, in fp32, then cast to dtype."""
    blocks = _padded_blocks(q.float(), block).mul_(scale.float()[:, None, :, None])
    return _unpadded(blocks, q.shape).to(dtype)


def _padded_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [N, K] zero-padded to whole blocks, viewed as [⌈N/bn⌉, bn, ⌈K/bk⌉, bk]."""
    (n, k), (bn, bk) = x.shape, block
    x = F.pad(x, (0, -k % bk, 0, -n % bn))
    return x.view(x.shape[0] // bn, bn, x.shape[1] // bk, bk)


def _unpadded(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows, bn, cols, bk = blocks.shape
    return blocks.reshape(rows * bn, cols * bk)[: shape[0], : shape[1]].contiguous()


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """x · wᵀ from the quantised operands (x per 1×128 tile, w per 128×128 block) → [M, N] out_dtype."""
    if not xq.is_cuda:  # the reference: dequantise, one fp32 matmul
        return (dequantize_tiles(xq, x_scale) @ dequantize_blocks(wq, w_scale).t()).to(out_dtype)
    # cuBLAS wants the activation scales outer-dim-major and the weight scales as [K/128 padded to 4, N/128]
    a_scale = x_scale.t().contiguous().t()
    pad = -w_scale.shape[1] % 4
    b_scale = F.pad(w_scale, (0, pad), value=1.0).t()
    recipe = getattr(F, "ScalingType", None) or getattr(F, "_ScalingType", None)
    if hasattr(F, "scaled_mm") and recipe is not None:  # torch >= 2.10: the recipes named explicitly
        return F.scaled_mm(xq, wq.t(), a_scale, recipe.BlockWise1x128, b_scale, recipe.BlockWise128x128,
                           output_dtype=out_dtype)
    return torch._scaled_mm(xq, wq.t(), a_scale, b_scale, out_dtype=out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x · wᵀ with an FP8 forward GEMM and bf16 (the gradient's dtype) backward GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = quantize_tiles(x.reshape(-1, shape[-1]))
        wq, w_scale = quantize_blocks(weight.detach())
        ctx.save_for_backward(xq, x_scale, weight)
        ctx.x_dtype = x.dtype
        return fp8_matmul(xq, x_scale, wq, w_scale, out_dtype).view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, x_scale, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad2 @ weight.to(grad.dtype)).view(*grad.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad2.t() @ dequantize_tiles(xq, x_scale, grad.dtype)).to(weight.dtype)
        return grad_x, grad_w, None


class FP8Linear(nn.Linear):
    """nn.Linear whose training-mode forward is FP8LinearFunction (bias added in the output dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = FP8LinearFunction.apply(x, self.weight, out_dtype)
            return y if self.bias is None else y + self.bias.to(out_dtype)


def eligible(name: str, module: nn.Module) -> bool:
    return (type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in EXCLUDED
            and module.in_features % BLOCK == 0 and module.out_features % BLOCK == 0)


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Swap every eligible nn.Linear for an FP8Linear sharing its parameters → the names converted."""
    converted = []
    for name, module in list(model.named_modules()):
        if not eligible(name, module):
            continue
        fp8 = FP8Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        fp8.weight, fp8.bias = module.weight, module.bias
        fp8.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
        converted.append(name)
    return converted


def check_fp8_device(device: torch.device) -> None:
    """Raise unless block-scaled FP8 matmuls run on `device` (a CUDA GPU that cuBLAS supports: sm90) and
    agree with the emulated product on operands whose tiles have scales six decades apart, so that a
    scale layout the library reads differently fails here instead of training on wrong products."""
    if device.type != "cuda":
        raise HematError(f"train.fp8 needs a CUDA GPU (block-scaled FP8 matmuls through torch._scaled_mm); "
                         f"this run is on {device.type}")
    gen = torch.Generator(device=device).manual_seed(0)
    decades = 10.0 ** torch.randint(-3, 4, (256 + 3 * BLOCK, 4), device=device, generator=gen)
    x = torch.randn(256, 512, device=device, generator=gen) * decades[:256].repeat_interleave(BLOCK, 1)
    w = torch.randn(384, 512, device=device, generator=gen) * decades[256::BLOCK].repeat_interleave(
        BLOCK, 0).repeat_interleave(BLOCK, 1)
    (xq, x_scale), (wq, w_scale) = quantize_tiles(x), quantize_blocks(w)
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    where = f"this GPU ({name}, sm_{capability[0]}{capability[1]}) with torch {torch.__version__}"
    try:
        got = fp8_matmul(xq, x_scale, wq, w_scale, torch.bfloat16).float()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise HematError(f"train.fp8: {where} cannot run DeepSeek-style block-scaled FP8 matmuls "
                         f"(cuBLAS supports them on sm90: H100/H200): {e}") from None
    expected = dequantize_tiles(xq, x_scale) @ dequantize_blocks(wq, w_scale).t()
    error = ((got - expected).norm() / expected.norm()).item()
    if not error < 0.01:
        raise HematError(f"train.fp8: on {where} the block-scaled FP8 matmul is off from its reference by "
                         f"{error:.1%} (a scale layout this torch reads differently?)")
