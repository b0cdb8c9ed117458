"""`hemat convert`: rewrite a checkpoint (a directory or a Hub id, FP8 ones included) as fp32, bf16 or
DeepSeek-V3's block FP8 safetensors, with its tokenizer, written atomically. `hemat quantize`: the same
for weight-only int8/int4 in compressed-tensors' pack-quantized layout (see pack_quantized.py)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# what a model directory holds besides weights and config, copied along
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# fp8 is quantised from the exact fp32 values, so an FP8 source converts back to itself
# int8/int4 keep the checkpoint's dtype for the scales and the tensors that stay unquantized
LOAD_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "float32", "int8": None, "int4": None}
QUANTIZED_FORMATS = ("int8", "int4")


def convert(source: str | Path, out: str | Path, format: str, group_size: int = 128) -> Path:
    """Load `source`, write it to `out` in `format` (fp32, bf16, fp8, int8, int4) with its tokenizer files
    → out. int8 and int4 refuse a source that is already int8/int4 (quantizing twice only loses)."""
    from hemat.errors import HematError
    from hemat.infer.quantize import GROUP_SIZES
    from hemat.model.hf import from_pretrained
    from hemat.model.hub import resolve_model_source

    if format == "int4" and group_size not in GROUP_SIZES:
        raise HematError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    out, src = Path(out), resolve_model_source(source)
    model = from_pretrained(src, dtype=LOAD_DTYPES[format])
    stored = getattr(model, "quantization", None)
    if format in QUANTIZED_FORMATS and stored is not None:
        raise HematError(f"{source} is already quantized ({stored['format']}); quantize the unquantized "
                         "checkpoint instead (or `hemat convert --format bf16` to dequantize it)")
    return save_with_tokenizer(model, src, out, format=format, group_size=group_size)


def save_with_tokenizer(model, src: Path, out: Path, **save_options) -> Path:
    """model.save_pretrained plus the tokenizer files of `src`, published at `out` all at once (a temporary
    directory renamed into place, so a failure leaves `out` as it was) → out."""
    from hemat.model.hf import publish_dir

    tmp = out.with_name(f".{out.name}.write-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, **save_options)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as fp32, bf16 or block-FP8 safetensors",
        description="Load a checkpoint (a directory or a Hugging Face id org/name[@revision]; DeepSeek's FP8 "
        "ones too) and write it with its tokenizer to --out: --format fp8 is DeepSeek-V3's layout (projections "
        "in float8_e4m3fn with a float32 weight_scale_inv per 128x128 block, the rest in bf16). Loads in "
        "float32 for fp32 and fp8 output (4 bytes per parameter of memory), in bf16 for bf16.",
    )
    _add_arguments(p, list(LOAD_DTYPES))
    q = subparsers.add_parser(
        "quantize", help="write a weight-only int8/int4 checkpoint (compressed-tensors pack-quantized)",
        description="Quantize every projection of a checkpoint (attention, MLP, experts, an untied head) to "
        "weight-only int8 (symmetric, per output channel) or int4 (asymmetric, per group of --group-size inputs) "
        "by rounding to nearest, and write it with its tokenizer to --out in compressed-tensors' pack-quantized "
        "layout (read by vLLM, by transformers with the compressed-tensors package, and by every hemat command).",
    )
    _add_arguments(q, QUANTIZED_FORMATS)
    return {"convert", "quantize"}


def _add_arguments(p: argparse.ArgumentParser, formats) -> None:
    p.add_argument("--model", required=True, metavar="SRC", help="checkpoint directory or Hub id org/name[@rev]")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--format", required=True, choices=formats, help="weights format to write")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.set_defaults(func=_convert_command)


def _convert_command(args: argparse.Namespace) -> None:
    out = convert(args.model, args.out, args.format, args.group_size)
    detail = f", groups of {args.group_size}" if args.format == "int4" else ""
    print(f"wrote {out} ({args.format}{detail})")
