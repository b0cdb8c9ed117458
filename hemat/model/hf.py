"""Hugging Face checkpoints as hemat's native format: config.json + model.safetensors (or shards with
model.safetensors.index.json) + generation_config.json. Safetensors only: pickle checkpoints are refused.

On disk, routed experts keep DeepSeek's per-expert keys (`mlp.experts.E.{gate,up,down}_proj.weight`),
which transformers, vLLM and SGLang all read; in memory they are stacked (see moe.RoutedExperts).

DeepSeek-V3's own FP8 layout is read and written too: each projection weight stored as float8_e4m3fn with
a float32 `<weight>_scale_inv` per block of `quantization_config.weight_block_size` (weight ≈ fp8 ·
scale_inv), everything else in bf16. So are weight-only int8/int4 checkpoints in compressed-tensors'
pack-quantized layout (pack_quantized.py). Both are dequantised tensor by tensor while loading; a
pack-quantized model remembers its format in `model.quantization` so that inference quantizes it again."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from hemat.errors import HematError
from hemat.model import fp8, pack_quantized
from hemat.model.config import ModelConfig
from hemat.model.hub import is_hub_id, resolve_model_source
from hemat.model.transformer import CausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 1024**3

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# save_pretrained formats: a dtype for every tensor, or DeepSeek-V3's block FP8 projections
FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": None, "int8": None, "int4": None}
SCALE_SUFFIX = "_scale_inv"
# the projections DeepSeek-V3 stores in FP8; MTP's eh_proj, the router, embeddings and head stay bf16
_FP8_PROJECTION = re.compile(r"(?<!\.eh)_proj(_with_mqa)?\.weight$")


class CheckpointError(HematError):
    pass


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _weight_files(path: Path, name: str | Path) -> list[Path]:
    """The safetensors files of the checkpoint at path (`name` in errors: the path or the Hub id)."""
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path / INDEX_NAME} lists shard(s) that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{name} holds only pickle weights ({', '.join(pickles)}); hemat loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them with a tool you trust into model.safetensors."
        )
    raise CheckpointError(f"{name} has no {WEIGHTS_NAME} or {INDEX_NAME} (hemat loads safetensors weights only)")


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json")
    return ModelConfig.from_file(path / "config.json")


def from_pretrained(source: str | Path, device=None, dtype=None, prepare=None) -> CausalLM:
    """Load a checkpoint directory (hemat's, any Hugging Face one, DeepSeek's FP8 ones dequantised), a
    .gguf file (through hemat.model.gguf_io) or a Hub id `org/name[@revision]`. dtype defaults to the
    one in config.json (float32 if none); the router stays in float32 whatever the dtype. The model is
    built on the meta device and materialised one unit at a time (the embedding, each decoder layer, the
    final norm, the head), its tensors read one at a time, so loading needs little more memory than the
    result. prepare(name, unit) → module, if given, replaces each unit as soon as its tensors are in: a
    model can be quantized while it loads without its full-precision form ever existing whole (a .gguf
    file or an adapter directory is loaded whole first). A checkpoint without its MTP layers loads as a
    model without MTP. A LoRA adapter directory (a LoRA run's checkpoint) loads as its base model with
    the adapter merged in."""
    if str(source).lower().endswith(".gguf"):
        from hemat.model.gguf_io import load_gguf_model

        return _prepare_units(load_gguf_model(source, device, dtype), prepare)
    path = resolve_model_source(source)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from hemat.model.adapter_io import load_merged

        return _prepare_units(load_merged(path, device, dtype), prepare)
    config = read_checkpoint_config(path)
    files = _weight_files(path, source if is_hub_id(source) else path)
    raw = json.loads((path / "config.json").read_text())
    quantization = raw.get("quantization_config") or {}
    packed = stored_quantization(path)
    block = None if packed else _fp8_block(quantization, path)
    # the model in memory is dequantised: its config must not claim otherwise when saved again
    config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    dtype = parse_dtype(dtype) or parse_dtype(raw.get("dtype") or raw.get("torch_dtype")) or torch.float32
    device = torch.device(device or "cpu")

    with _open_all(files) as handles:
        keys = {k: h for h in handles for k in h.keys()}
        scales = _fp8_scales(keys, block, {k: f for f, h in zip(files, handles) for k in h.keys()})
        keys = {k: h for k, h in keys.items() if not k.endswith(SCALE_SUFFIX)}
        if packed:
            keys = pack_quantized.dequantizing_keys(keys, packed[0], path)
        n = config.num_hidden_layers
        if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in keys):
            config = config.replace(num_nextn_predict_layers=0)
        model = meta_model(config).to(dtype)
        for moe in model.moe_layers():
            moe.gate.float()
        _load_state(model, keys, path, scales, block, device, prepare)
    model.reset_buffers()  # to_empty left the non-persistent buffers uninitialised
    model.quantization = None if packed is None else {"format": packed[0], "group_size": packed[1]}
    return model.eval()


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips torch.nn.init's functions on meta tensors, which hold no values to initialise: run there, the
    random ones import the compiler (torch's meta normal_ goes through torch._dynamo, 1.3 s and 0.14 GB of
    resident memory for every process that loads a model). A mode, not a patch: it acts in this thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = kwargs.get("tensor", args[0] if args else None)  # torch.nn.init passes it by name
        if getattr(func, "__module__", None) == "torch.nn.init" and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


def meta_model(config: ModelConfig) -> CausalLM:
    """The model on the meta device, uninitialised: shapes only, for a loader to fill (see to_empty)."""
    with torch.device("meta"), _SkipInitOnMeta():
        return CausalLM(config)


def to_empty(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module.to_empty(device=device) for a module on the meta device, without torch.empty_like: on a meta
    tensor that runs in Python and imports sympy (0.3 s and 36 MB resident for every process that loads)."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def stored_quantization(source: str | Path) -> tuple[str, int] | None:
    """(format, group size) of a checkpoint directory stored in compressed-tensors' pack-quantized layout,
    else None."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return None
    return pack_quantized.read_quantization(quantization, f"{config}: quantization_config")


def units(model: CausalLM):
    """Yields (name, module) of the parts a model is loaded (and prepared for inference) by, the embedding
    first: every tensor is in one of them. A generator holding no part it has yielded, so that a part
    replaced while it runs is freed."""
    for name in list(model.model._modules):
        if name == "layers":
            yield from ((f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers))
        else:
            yield f"model.{name}", getattr(model.model, name)
    if model.lm_head is not None:
        yield "lm_head", model.lm_head


def _prepare_units(model: CausalLM, prepare) -> CausalLM:
    """A model loaded whole, with each unit replaced by prepare(name, unit) if given."""
    for name, unit in units(model) if prepare else ():
        model.set_submodule(name, prepare(name, unit))
    return model


def _fp8_block(quantization: dict | None, path: Path) -> tuple[int, int] | None:
    """The FP8 block shape from config.json's quantization_config, or None for an unquantised checkpoint."""
    if not quantization:
        return None
    where = f"{path / 'config.json'}: quantization_config"
    method, fmt = quantization.get("quant_method"), quantization.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise CheckpointError(f"{where} (quant_method {method!r}, fmt {fmt!r}) is not supported; hemat reads "
                              "block-wise FP8 as DeepSeek-V3 ships it (quant_method 'fp8', fmt 'e4m3')")
    if quantization.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{where}.activation_scheme {quantization['activation_scheme']!r} is not supported "
                              "(only 'dynamic': no stored activation scales)")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.weight_block_size must be two positive integers, got {block!r}")
    return tuple(block)


def _fp8_scales(keys: dict, block: tuple[int, int] | None, file_of: dict[str, Path]) -> dict[str, object]:
    """weight name → the handle holding its `_scale_inv`, after checking every FP8 weight has a scale of
    the right shape and every scale a weight: from the headers, before any tensor is read."""
    scales = {}
    for scale_key in (k for k in keys if k.endswith(SCALE_SUFFIX)):
        key, file = scale_key.removesuffix(SCALE_SUFFIX), file_of[scale_key]
        if block is None:
            raise CheckpointError(f"{file}: tensor {scale_key} is an FP8 scale, but config.json has no "
                                  "quantization_config")
        if key not in keys:
            raise CheckpointError(f"{file}: tensor {scale_key} has no weight {key} in the checkpoint")
        weight, scale_shape = keys[key].get_slice(key), keys[scale_key].get_slice(scale_key).get_shape()
        if weight.get_dtype() != "F8_E4M3":
            raise CheckpointError(f"{file_of[key]}: tensor {key} has a {SCALE_SUFFIX} but dtype {weight.get_dtype()}, "
                                  "not float8_e4m3fn")
        shape = weight.get_shape()
        expected = [math.ceil(n / b) for n, b in zip(shape, block)]
        if len(shape) != 2 or scale_shape != expected:
            raise CheckpointError(f"{file}: tensor {scale_key} has shape {tuple(scale_shape)}, but {key} "
                                  f"{tuple(shape)} in blocks of {block} needs {tuple(expected)}")
        scales[key] = keys[scale_key]
    for key, handle in keys.items():
        if key not in scales and handle.get_slice(key).get_dtype().startswith("F8"):
            raise CheckpointError(f"{file_of[key]}: tensor {key} is float8 but has no {key}{SCALE_SUFFIX}")
    return scales


class _open_all:
    def __init__(self, files: list[Path]):
        self.files = files

    def __enter__(self):
        self.handles = []
        for f in self.files:
            try:
                # pread, not mmap: tensors read are plain memory, and the file's pages are not mapped into
                # this process (counted as resident until the handle closes)
                self.handles.append(safe_open(str(f), framework="pt", backend="pread"))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return self.handles

    def __exit__(self, *exc):
        self.handles.clear()


def _expected_disk_keys(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """Names and shapes as a checkpoint stores them (per-expert keys, no lm_head when tied)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            e, two_i, h = tensor.shape
            for j in range(e):
                out[f"{prefix}.{j}.gate_proj.weight"] = (two_i // 2, h)
                out[f"{prefix}.{j}.up_proj.weight"] = (two_i // 2, h)
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for j in range(tensor.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = tuple(tensor.shape[1:])
        else:
            out[name] = tuple(tensor.shape)
    return out


def _is_shared_duplicate(key: str, config: ModelConfig) -> bool:
    """DeepSeek's MTP layers on disk repeat the embedding and head (`model.layers.61.embed_tokens`,
    `shared_head.head`); hemat shares the main model's, as the paper does. Old checkpoints may also
    carry rotary inv_freq buffers."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$", key)
    return bool(m) and int(m.group(1)) >= config.num_hidden_layers


def _load_state(model: CausalLM, keys: dict, path: Path, scales: dict, block: tuple[int, int] | None,
                device: torch.device, prepare=None) -> None:
    """Check the checkpoint's keys and shapes against the model (on the meta device), then materialise
    and fill it unit by unit (see from_pretrained for `prepare`)."""
    config = model.config
    expected = _expected_disk_keys(model)
    fused = {k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if fused:  # transformers may save experts already stacked; accept both layouts
        for k in fused:
            prefix = k.rsplit(".", 1)[0]
            for j in range(config.n_routed_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    expected.pop(f"{prefix}.{j}.{proj}.weight", None)
            expected[k] = tuple(model.state_dict()[k].shape)
    if config.tie_word_embeddings:
        keys = {k: h for k, h in keys.items() if k != "lm_head.weight"}
    present = {k for k in keys if not _is_shared_duplicate(k, config)}
    missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s): {_listing(missing)}")
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor(s) for this config: {_listing(extra)}")
    by_unit: dict[str, list[str]] = {}
    for key in sorted(present):
        by_unit.setdefault(_unit_of(key), []).append(key)
    for name, unit in units(model):
        to_empty(unit, device)  # memory not touched until written: most of it is replaced below
        state = unit.state_dict(prefix=f"{name}.")
        read = {}
        with torch.no_grad():
            for key in by_unit.get(name, ()):
                tensor = keys[key].get_tensor(key)
                if key in scales:  # exact in fp32; the cast below rounds once to the model's dtype
                    tensor = fp8.dequantize_blocks(tensor, scales[key].get_tensor(key + SCALE_SUFFIX), block)
                if tuple(tensor.shape) != expected[key]:
                    raise CheckpointError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config "
                                          f"expects {expected[key]}")
                if _EXPERT_KEY.match(key):
                    _copy_expert(state, key, tensor)
                else:  # the tensor read becomes the parameter: no second copy (none at all in the model's dtype)
                    read[key.removeprefix(f"{name}.")] = tensor.to(state[key].device, state[key].dtype)
            unit.load_state_dict(read, strict=False, assign=True)
            if prepare is not None:
                model.set_submodule(name, prepare(name, unit))


def _unit_of(key: str) -> str:
    """The name of the units() entry holding checkpoint tensor `key`."""
    parts = key.split(".")
    return ".".join(parts[:3] if key.startswith("model.layers.") else parts[:-1])


def _copy_expert(state: dict[str, torch.Tensor], key: str, tensor: torch.Tensor) -> None:
    """Copy one expert's projection from the checkpoint into the model's stacked tensors."""
    prefix, j, proj = _EXPERT_KEY.match(key).groups()
    if proj == "down_proj":
        state[f"{prefix}.down_proj"][int(j)].copy_(tensor)
    else:
        half = tensor.shape[0]
        rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
        state[f"{prefix}.gate_up_proj"][int(j), rows].copy_(tensor)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def disk_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names, experts split per expert."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("tokens_per_expert"):
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            for j in range(tensor.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = gate[j]
                out[f"{prefix}.{j}.up_proj.weight"] = up[j]
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for j in range(tensor.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = tensor[j]
        else:
            out[name] = tensor
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
    }


def fp8_state_dict(state: dict[str, torch.Tensor], block: tuple[int, int] = (fp8.BLOCK, fp8.BLOCK)) -> dict:
    """A disk state dict in DeepSeek-V3's FP8 layout: projections as e4m3 + `_scale_inv` per block, the
    router's correction bias in fp32 and every other tensor in bf16, as DeepSeek's checkpoints have them."""
    out = {}
    for key, tensor in state.items():
        if tensor.dim() == 2 and _FP8_PROJECTION.search(key):
            out[key], out[key + SCALE_SUFFIX] = fp8.quantize_blocks(tensor, block)
        else:
            out[key] = tensor.float() if key.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16)
    return out


def save_pretrained(model: CausalLM, path: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    format: str | None = None, group_size: int = 128) -> None:
    """Write the checkpoint atomically: everything goes into a temporary directory beside `path`,
    is fsynced, and replaces `path` by a rename, so a crash never leaves a half-written checkpoint.
    Files already in `path` that the checkpoint does not write (a tokenizer, hemat.json) are kept.
    format: None keeps the model's dtype, "bf16"/"fp32" cast every tensor, "fp8" writes DeepSeek-V3's
    block FP8 layout (see fp8_state_dict) with its quantization_config, "int8"/"int4" compressed-tensors'
    pack-quantized layout (int4 in groups of `group_size` inputs; see pack_quantized.py)."""
    if format not in (None, *FORMATS):
        raise CheckpointError(f"checkpoint format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if path.is_dir():
            for f in path.iterdir():
                if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json"):
                    shutil.copy2(f, tmp / f.name)
        state = disk_state_dict(model)
        config = model.config.to_hf_dict()
        config.pop("quantization_config", None)
        dtype = FORMATS[format] if format else model.dtype
        if format == "fp8":
            state, dtype = fp8_state_dict(state), torch.bfloat16
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
        elif format in pack_quantized.FORMATS:
            dtype = model.dtype
            state = pack_quantized.compress_state(state, format, group_size, dtype)
            config["quantization_config"] = pack_quantized.quantization_config(format, group_size)
        elif format:
            state = {k: v.to(dtype) for k, v in state.items()}
        config["dtype"] = str(dtype).removeprefix("torch.")
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(model.config))
        shards = _shard(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place: fsync everything in it, rename the old one aside, rename
    the new one in, then delete the old one. A crash in between leaves either the old or the new
    directory complete."""
    for f in sorted(src.rglob("*"), reverse=True):  # files before the directories holding them
        _fsync(f)
    _fsync(src)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    _fsync(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    return shards


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
