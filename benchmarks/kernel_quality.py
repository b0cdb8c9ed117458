"""Bits per byte of a checkpoint on a text, unquantized and in int8/int4 through each kernel: hemat's native
kernels (int8 activations in blocks of 32) and PyTorch's weight-only packed kernels (bf16 activations).
Every row goes through the kernel, as in decoding (`hemat eval --tasks bpb` would run its long rows through
the dense bf16 path instead, which both share).

    python benchmarks/kernel_quality.py --model RUN/pretrain/checkpoints/step-500 --tokenizer RUN/tokenizer \\
        --text FILE [--group-sizes 32,64,128] [--max-length 256]
"""

from __future__ import annotations

import argparse
import os

from hemat.eval.choice import bits_per_byte, read_text_file
from hemat.infer import native
from hemat.infer.quantize import PackedLinear, load_for_inference
from hemat.tokenizer import load_tokenizer


def bpb(args, tokenizer, text: str, fmt: str | None, group_size: int = 128) -> float:
    model = load_for_inference(args.model, fmt, group_size)
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.dense_rows = float("inf")
    return bits_per_byte(model, tokenizer, text, args.max_length)["bpb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", help="default: the model's directory")
    parser.add_argument("--text", required=True)
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    tokenizer, text = load_tokenizer(args.tokenizer or args.model), read_text_file(args.text)
    base = bpb(args, tokenizer, text, None)
    print(f"{args.model}, {len(text.encode())} bytes of {args.text}\n")
    print(f"| weights | hemat native kernels | PyTorch's kernels |\n|---|---|---|\n| unquantized | {base:.4f} | |")
    rows = [("int8", 128)] + [("int4", int(g)) for g in args.group_sizes.split(",")]
    for fmt, group_size in rows:
        cells = []
        for kernels in ("1", "0"):
            os.environ[native.DISABLE] = kernels
            native.kernels.cache_clear()
            value = bpb(args, tokenizer, text, fmt, group_size)
            cells.append(f"{value:.4f} ({(value / base - 1) * 100:+.2f}%)")
        name = fmt if fmt == "int8" else f"int4 group {group_size}"
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
