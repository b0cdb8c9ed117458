"""`hemat convert`: rewrite a checkpoint (a directory or a Hub id, FP8 ones included) as fp32, bf16 or
DeepSeek-V3's block FP8 safetensors, with its tokenizer, written atomically."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# what a model directory holds besides weights and config, copied along
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# fp8 is quantised from the exact fp32 values, so an FP8 source converts back to itself
LOAD_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "float32"}


def convert(source: str | Path, out: str | Path, format: str) -> Path:
    """Load `source`, write it to `out` in `format` (fp32, bf16, fp8) with its tokenizer files → out."""
    from hemat.model.hf import from_pretrained, publish_dir
    from hemat.model.hub import resolve_model_source

    out, src = Path(out), resolve_model_source(source)
    model = from_pretrained(src, dtype=LOAD_DTYPES[format])
    tmp = out.with_name(f".{out.name}.convert-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, format=format)
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
    p.add_argument("--model", required=True, metavar="SRC", help="checkpoint directory or Hub id org/name[@rev]")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--format", required=True, choices=list(LOAD_DTYPES), help="weights format to write")
    p.set_defaults(func=_convert_command)
    return {"convert"}


def _convert_command(args: argparse.Namespace) -> None:
    out = convert(args.model, args.out, args.format)
    print(f"wrote {out} ({args.format})")
