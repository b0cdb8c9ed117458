"""LoRA adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors, tensors named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, routed experts as PEFT's nested
`target_parameters` wrappers. `peft.PeftModel.from_pretrained` loads hemat's adapters onto the transformers
model, and hemat loads PEFT's. Also `hemat merge`: base + adapter → a full checkpoint."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hemat.model.lora import (LoraConfig, LoraError, LoraExperts, adapter_modules, add_adapters,
                              adapter_state_dict, merge_adapters)
from hemat.model.moe import RoutedExperts

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT nests one wrapper per expert parameter, in the order the experts module declares them
_EXPERT_NAMES = {"gate_up_lora.": "base_layer.", "down_lora.": ""}
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none"}


def _peft_name(name: str) -> str:
    for ours, peft in _EXPERT_NAMES.items():
        name = name.replace(f".{ours}", f".{peft}")
    return PREFIX + name


def _peft_config(model, config: LoraConfig, base_model: str | None) -> dict:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in adapter_modules(model).items()
                     if not isinstance(m, LoraExperts)})
    experts = sorted({re.sub(r"^model\.layers\.\d+\.", "", n) for n, m in adapter_modules(model).items()
                      if isinstance(m, LoraExperts)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "target_modules": linear or None,
        "target_parameters": [f"{e}.{p}" for e in experts for p in ("gate_up_proj", "down_proj")] or None,
        "init_lora_weights": True, "inference_mode": True,
        **_UNSUPPORTED,
    }


def save_adapter(model, path: str | Path) -> Path:
    """Write the model's adapters to the directory `path` atomically (a temporary directory renamed)."""
    from hemat.model.hf import publish_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_adapter_files(model, tmp)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_adapter_files(model, directory: Path) -> None:
    """adapter_config.json and adapter_model.safetensors into an existing directory (checkpoints use it)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LoraError("the model has no LoRA adapters to save")
    state = {_peft_name(n): p.detach().contiguous().cpu() for n, p in adapter_state_dict(model).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = _peft_config(model, config, getattr(model, "lora_base", None))
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")


def read_adapter_config(path: str | Path) -> tuple[LoraConfig, dict]:
    """(LoraConfig, the raw JSON) of the adapter directory `path`; refuses PEFT options hemat does not run."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise LoraError(f"{path} is not a LoRA adapter: it has no {CONFIG_NAME}")
    raw = json.loads(file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{file}: peft_type {raw['peft_type']!r} is not supported (LORA only)")
    for key, default in _UNSUPPORTED.items():
        if raw.get(key, default) not in (default, None, False, {}, [], "none"):
            raise LoraError(f"{file}: {key} = {raw[key]!r} is not supported by hemat")
    if not (path / WEIGHTS_NAME).is_file():
        raise LoraError(f"{path} has no {WEIGHTS_NAME} (hemat loads safetensors adapters only)")
    config = LoraConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                        dropout=float(raw.get("lora_dropout") or 0.0), rslora=bool(raw.get("use_rslora", False)))
    return config, raw


def _module_names(keys: list[str], file: Path) -> list[str]:
    """The adapted modules named by the tensor keys, in hemat's names."""
    names = set()
    for key in keys:
        hit = re.fullmatch(r"base_model\.model\.(.+?)\.(base_layer\.)?lora_[AB](\.default)?\.weight", key)
        if hit is None:
            raise LoraError(f"{file}: tensor {key!r} is not a LoRA A/B weight")
        names.add(hit.group(1))
    return sorted(names)


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_NAME
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k.replace(".default.", "."): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing or corrupt files
        raise LoraError(f"{file}: unreadable ({e})") from None


def load_adapter(model, path: str | Path) -> LoraConfig:
    """Add the adapter stored in `path` (hemat's or PEFT's) to `model`. Errors name the file and the tensor
    when the adapter was made for another base (a module it lacks, or other shapes)."""
    path = Path(path)
    config, raw = read_adapter_config(path)
    file = path / WEIGHTS_NAME
    tensors = read_adapter_tensors(path)
    names = _module_names(list(tensors), file)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise LoraError(f"{file} adapts modules this model does not have ({', '.join(missing[:4])}): "
                        f"the adapter was made for another base model")
    dropout = config.dropout if not any(isinstance(modules[n], RoutedExperts) for n in names) else 0.0
    config = LoraConfig(rank=config.rank, alpha=config.alpha, dropout=dropout, rslora=config.rslora,
                        targets=tuple(names))
    try:
        add_adapters(model, config, names, base_model=raw.get("base_model_name_or_path"))
        load_adapter_state(model, tensors, file)
    except LoraError:
        remove_adapters(model)
        raise
    return config


def load_adapter_state(model, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy PEFT-named tensors into the model's adapters, every one of them checked by name and shape."""
    expected = {_peft_name(n): p for n, p in adapter_state_dict(model).items()}
    for key, param in expected.items():
        if key not in tensors:
            raise LoraError(f"{file} has no tensor {key}")
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise LoraError(f"{file}: {key} has shape {tuple(tensors[key].shape)}, this model needs "
                            f"{tuple(param.shape)}: the adapter was made for another base model")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise LoraError(f"{file} has tensors for modules this model does not adapt: {', '.join(extra[:4])}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])


def remove_adapters(model) -> None:
    """Put the base modules back (the model as it was before a failed load)."""
    for name, wrapper in adapter_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper.base_layer)
    model.__dict__.pop("lora_config", None)
    model.__dict__.pop("lora_base", None)


def load_merged(path: str | Path, device=None, dtype=None):
    """The base model named by the adapter's base_model_name_or_path, with the adapter merged in."""
    from hemat.model.hf import from_pretrained

    path = Path(path)
    _, raw = read_adapter_config(path)
    base = raw.get("base_model_name_or_path")
    if not base:
        raise LoraError(f"{path / CONFIG_NAME} names no base_model_name_or_path; load the base and pass the "
                        "adapter separately (e.g. hemat generate --model BASE --lora DIR)")
    model = from_pretrained(base, device, dtype)
    load_adapter(model, path)
    return merge_adapters(model)


def merge(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Load `base`, add and merge the adapter, write a full checkpoint (with the base's tokenizer) to `out`."""
    from hemat.model.convert import save_with_tokenizer
    from hemat.model.hf import from_pretrained, read_checkpoint_config
    from hemat.model.hub import resolve_model_source

    src, out = resolve_model_source(base), Path(out)
    quantization = read_checkpoint_config(src).extra.get("quantization_config")
    if quantization:
        raise LoraError(f"{src} is a quantized checkpoint ({quantization.get('quant_method', 'quantized')}); "
                        "merge the adapter into an unquantized base (hemat convert --format bf16 first)")
    model = from_pretrained(src)
    load_adapter(model, adapter)
    merge_adapters(model)
    return save_with_tokenizer(model, src, out)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "merge", help="fold a LoRA adapter into its base model and write a full checkpoint",
        description="Load --model, add the LoRA adapter in --adapter (hemat's or PEFT's format), fold it into "
        "the weights and write a full Hugging Face checkpoint with the base's tokenizer to --out (atomically). "
        "A quantized base is refused: merge into its unquantized checkpoint.",
    )
    p.add_argument("--model", required=True, metavar="BASE", help="base checkpoint directory or Hub id")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (adapter_config.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.set_defaults(func=_merge_command)
    return {"merge"}


def _merge_command(args: argparse.Namespace) -> None:
    print(f"wrote {merge(args.model, args.adapter, args.out)}")
