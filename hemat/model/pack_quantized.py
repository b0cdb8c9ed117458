"""Weight-only int8/int4 checkpoints in compressed-tensors' "pack-quantized" layout, the one llm-compressor
writes and vLLM and transformers (with the `compressed-tensors` package) read. Every projection
`X.weight` (`*_proj`, the experts', and an untied `lm_head`) is stored as
- `X.weight_packed` int32 [out, ceil(in · bits / 32)]: 32 / bits values per int32, lowest bits first,
  each the signed value q plus 2^(bits-1);
- `X.weight_scale` [out, 1] (int8: symmetric, per output channel) or [out, in / g] (int4: per group of g
  inputs), in the checkpoint's dtype;
- `X.weight_zero_point` int32 [ceil(out · bits / 32), in / g] (int4, asymmetric): the signed zero
  points, packed the same way along the output dimension;
- `X.weight_shape` [2] = (out, in).
The weight is (q - zero_point) · scale. hemat reads such a checkpoint back dequantized (from_pretrained)
and quantizes again at load time (infer/quantize.py); round to nearest gives back the same values."""

from __future__ import annotations

import math
import re

import torch

from hemat.errors import HematError

FORMATS = {"int8": 8, "int4": 4}  # format → bits
QUANTIZED_KEY = re.compile(r"(_proj(_with_mqa)?|^lm_head)\.weight$")
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def quantization_config(format: str, group_size: int) -> dict:
    """config.json's quantization_config for `format` (int8 per channel, int4 per group)."""
    weights = {"num_bits": FORMATS[format], "type": "int", "symmetric": format == "int8", "dynamic": False,
               "strategy": "channel" if format == "int8" else "group",
               "group_size": None if format == "int8" else group_size, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": [], "kv_cache_scheme": None}


def read_quantization(quantization: dict, where: str) -> tuple[str, int]:
    """(format, group size) of a pack-quantized quantization_config hemat wrote or can read."""
    groups = quantization.get("config_groups") or {}
    if quantization.get("format") != "pack-quantized" or len(groups) != 1:
        raise HematError(f"{where}: compressed-tensors format {quantization.get('format')!r} with "
                         f"{len(groups)} config group(s) is not supported; hemat reads 'pack-quantized' "
                         "weight-only int8/int4 with one config group")
    weights = next(iter(groups.values())).get("weights") or {}
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if weights.get("type") != "int" or (bits, strategy) not in ((8, "channel"), (4, "group"), (4, "channel")):
        raise HematError(f"{where}: weights {weights} are not supported (int8 per channel or int4 per group)")
    return ("int8" if bits == 8 else "int4"), weights.get("group_size") or 0


def compress_state(state: dict[str, torch.Tensor], format: str, group_size: int,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A disk state dict with every projection in the pack-quantized layout, the rest cast to dtype."""
    from hemat.infer.quantize import quantize_int4, quantize_int8

    out = {}
    for key, tensor in state.items():
        if tensor.dim() != 2 or not QUANTIZED_KEY.search(key):
            out[key] = tensor.float() if key.endswith("e_score_correction_bias") else tensor.to(dtype)
            continue
        base = key.removesuffix("weight")
        out[base + "weight_shape"] = torch.tensor(tensor.shape, dtype=torch.int64)
        if format == "int8":
            q, scale = quantize_int8(tensor)
            out[base + "weight_packed"] = pack_int32(q, 8)
            out[base + "weight_scale"] = scale[:, None].to(dtype)
            continue
        if tensor.shape[1] % group_size:
            raise HematError(f"int4 group size {group_size} does not divide the input dimension "
                             f"{tensor.shape[1]} of {key} (choose a group size that does)")
        q, scale, zero_point = quantize_int4(tensor, group_size)
        out[base + "weight_packed"] = pack_int32(q.to(torch.int8) - 8, 4)
        out[base + "weight_scale"] = scale.to(dtype)
        out[base + "weight_zero_point"] = pack_int32(zero_point.to(torch.int8) - 8, 4, dim=0)
    return out


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed int8 values [R, C] → int32, 32 / bits of them per int32 along `dim`, lowest bits first."""
    unsigned = (values.int() + (1 << (bits - 1))).t() if dim == 0 else values.int() + (1 << (bits - 1))
    per_word = 32 // bits
    rows, cols = unsigned.shape
    padded = torch.nn.functional.pad(unsigned, (0, math.ceil(cols / per_word) * per_word - cols))
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    packed = (padded.view(rows, -1, per_word) << shifts).sum(dim=-1, dtype=torch.int32)
    return packed.t().contiguous() if dim == 0 else packed


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """pack_int32's inverse: → signed values (int32), `length` of them along `dim`."""
    words = packed.t() if dim == 0 else packed
    shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
    values = ((words[..., None] >> shifts) & ((1 << bits) - 1)).flatten(1)[:, :length] - (1 << (bits - 1))
    return values.t() if dim == 0 else values


class Dequantized:
    """Stands for a safetensors handle of the dequantized `X.weight` of one packed projection (from_pretrained
    reads every tensor through `get_tensor`)."""

    def __init__(self, handles: dict, base: str, format: str):
        self.handles, self.base, self.format = handles, base, format

    def get_tensor(self, key: str) -> torch.Tensor:
        def read(suffix: str) -> torch.Tensor:
            return self.handles[self.base + suffix].get_tensor(self.base + suffix)

        out_features, in_features = read("weight_shape").tolist()
        bits = FORMATS[self.format]
        q = unpack_int32(read("weight_packed"), bits, in_features).float()
        scale = read("weight_scale").float()
        groups = scale.shape[1]
        zero = 0.0
        if self.base + "weight_zero_point" in self.handles:
            zero = unpack_int32(read("weight_zero_point"), bits, out_features, dim=0).float()[..., None]
        w = (q.view(out_features, groups, -1) - zero) * scale[..., None]
        return w.view(out_features, in_features)


def dequantizing_keys(keys: dict, format: str, where: str) -> dict:
    """The checkpoint's key → handle map with each packed projection's tensors replaced by one
    `X.weight` that reads dequantized."""
    bases = {k.removesuffix("weight_packed") for k in keys if k.endswith("weight_packed")}
    if not bases:
        raise HematError(f"{where}: quantization_config says pack-quantized, but no tensor ends in weight_packed")
    out = {k: h for k, h in keys.items() if not k.endswith(SUFFIXES)}
    for base in bases:
        missing = [base + s for s in ("weight_scale", "weight_shape") if base + s not in keys]
        if missing:
            raise HematError(f"{where}: {base}weight_packed has no {', '.join(missing)}")
        out[base + "weight"] = Dequantized(keys, base, format)
    return out
