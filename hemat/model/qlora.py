"""QLoRA (Dettmers et al., 2023): LoRA over a frozen base whose projections are stored in int8 or int4, applied
from outside like the adapters themselves: `quantize_base(model, "int4", group_size)` replaces every linear
layer of the decoder layers by a FrozenQuantizedLinear and every stack of routed experts by a
FrozenQuantizedExperts, one module at a time (each full-precision weight is freed as its module is swapped, so
quantizing needs little more memory than the bf16 model itself: +160 MiB on the 1.5B shape), and add_adapters
then wraps those as it wraps nn.Linear and RoutedExperts.

Routed experts are quantized expert by expert (int8: a scale per output channel of each expert; int4: per group
of inputs) and run through RoutedExperts' looped reference path, which reads a weight only through `project`:
each expert that receives tokens is dequantized alone, in the forward and again in the backward, so no
full-precision stack of a layer's experts exists during training. Their LoRA (LoraExperts) adds each expert's
low-rank term to that expert's matmul instead of merging ΔW into the stacks as it does over a bf16 base.

The formats are the inference ones (hemat.infer.quantize's quantizers: int8 with one scale per output channel,
int4 with a scale and zero point per group of inputs), stored in layouts that dequantize in a few elementwise
passes. Training multiplies by the weight dequantized per call in the activations' dtype rather than through
the packed inference kernels: for training-sized inputs (thousands of rows) one dequantization and one bf16
matmul is several times faster than the packed kernels, which are built for the few rows of decoding
(benchmarks/qlora_memory.py --kernels measures it). The backward pass dequantizes again for dX = dY · W: the
weight gets no gradient, and no dequantized copy outlives the call that made it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hemat.infer.quantize import FORMATS, GROUP_SIZES, QuantizationError, quantize_int4, quantize_int8
from hemat.model.moe import RoutedExperts


class _DequantizedMatmul(torch.autograd.Function):
    """y = x · Wᵀ with W = layer.dequantize(x.dtype) made in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FrozenQuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class FrozenQuantizedLinear(nn.Module):
    """A frozen linear layer in int8 (q [out, in], w = q · scale per output row) or int4 (two 4-bit values per
    byte, [out, in/2], inputs 2j in the low nibble and 2j+1 in the high; w = q · scale + offset per group of
    `group_size` inputs, offset = -zero_point · scale). `weight` is the dequantized weight in `dtype` (what
    MLA's absorbed attention and the inference forms read; not a Parameter, so merging refuses it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.format, self.group_size, self.dtype = fmt, group_size, weight.dtype
        if fmt == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale[:, None])  # [out, 1]
            self.register_buffer("offset", None)
        else:
            q, scale, zero_point = quantize_int4(weight, group_size)
            self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))
            self.register_buffer("scale", scale)  # [out, in/g]
            self.register_buffer("offset", -zero_point.float() * scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.offset is None:
            return self.qweight.to(dtype) * self.scale.to(dtype)
        # the nibbles written straight into the output, then scaled in place: fewer passes than stack + addcmul
        w = torch.empty(self.out_features, self.in_features // 2, 2, dtype=dtype, device=self.qweight.device)
        w[..., 0], w[..., 1] = self.qweight & 15, self.qweight >> 4
        w = w.view(self.out_features, -1, self.group_size)
        torch.addcmul(self.offset.to(dtype)[..., None], w, self.scale.to(dtype)[..., None], out=w)
        return w.view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}{group}"


class FrozenQuantizedExperts(RoutedExperts):
    """Frozen routed experts: each expert's weight of each stack ([E, out, in]) a FrozenQuantizedLinear of its
    own (int8: a scale per output channel per expert; int4: a scale and offset per group of inputs). Only the
    looped reference path runs (RoutedExperts.looped through `project`), so each matmul dequantizes one expert,
    only for an expert that receives tokens, and again in the backward: no full-precision stack exists in a
    forward or backward pass. LoraExperts passes its low-rank terms in as `adapter` (W + ΔW is never formed).
    `gate_up_proj` and `down_proj` are the dequantized stacks, made on request (for the inference forms)."""

    def __init__(self, experts: RoutedExperts, fmt: str, group_size: int):
        nn.Module.__init__(self)  # not RoutedExperts': its stacked parameters are what this replaces
        self.n_experts, self.hidden_size = experts.n_experts, experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.quantized = nn.ModuleDict({
            name: nn.ModuleList(FrozenQuantizedLinear(w, None, fmt, group_size) for w in getattr(experts, name))
            for name in ("gate_up_proj", "down_proj")})
        self.adapter = None  # set for the length of a forward by LoraExperts: (x, name, expert) → low-rank term

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                counts: torch.Tensor | None = None, adapter=None) -> torch.Tensor:
        self.adapter = adapter
        try:
            return super().forward(x, weights, ids, counts)
        finally:
            self.adapter = None

    def sorted_forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.looped(routed, counts)

    def project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        out = self.quantized[name][expert](x)
        return out if self.adapter is None else out + self.adapter(x, name, expert)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return torch.stack([layer.weight for layer in self.quantized["gate_up_proj"]])

    @property
    def down_proj(self) -> torch.Tensor:
        return torch.stack([layer.weight for layer in self.quantized["down_proj"]])

    def extra_repr(self) -> str:
        layer = self.quantized["down_proj"][0]
        group = f", group_size={layer.group_size}" if layer.format == "int4" else ""
        return f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, " \
               f"{layer.format}{group}"


def check_quantize_settings(fmt: str, group_size: int) -> None:
    """lora.quantize and lora.group_size, the names the errors give."""
    if fmt not in FORMATS:
        raise QuantizationError(f"lora.quantize must be one of {', '.join(FORMATS)} (or empty for a bf16/fp32 "
                                f"base), got {fmt!r}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"lora.group_size must be one of {GROUP_SIZES}, got {group_size}")


def quantize_base(model: nn.Module, fmt: str, group_size: int) -> list[str]:
    """Replace every nn.Linear of the decoder layers (attention, MLA's projections, dense MLPs, shared
    experts) with a FrozenQuantizedLinear and every stack of routed experts with a FrozenQuantizedExperts, in
    place, before adapters are added; embeddings, norms, routers and the output head stay. → the names replaced."""
    check_quantize_settings(fmt, group_size)
    names = []
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if type(module) is nn.Linear:
            inputs = {name: module.in_features}
        elif type(module) is RoutedExperts:
            inputs = {f"{name}.gate_up_proj": module.hidden_size, f"{name}.down_proj": module.intermediate_size}
        else:
            continue
        for weight, in_features in inputs.items():
            if fmt == "int4" and in_features % group_size:
                raise QuantizationError(f"int4 group size {group_size} does not divide the input dimension "
                                        f"{in_features} of {weight} (choose one of {GROUP_SIZES} that does)")
        names.append(name)
    with torch.no_grad():
        for name in names:  # by name: no reference to a replaced module outlives its swap, so its weights are freed
            parent, _, child = name.rpartition(".")
            module = model.get_submodule(name)
            frozen = FrozenQuantizedLinear(module.weight, module.bias, fmt, group_size) \
                if type(module) is nn.Linear else FrozenQuantizedExperts(module, fmt, group_size)
            setattr(model.get_submodule(parent), child, frozen.train(module.training))
    for p in model.parameters():
        p.requires_grad_(False)
    return names
