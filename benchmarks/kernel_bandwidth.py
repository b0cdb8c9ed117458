"""How close the int8/int4 kernels come to the memory bandwidth when, as in decoding, their weights come from
memory: one token (batch 1) through the projections of every decoder layer of a model shape (each layer its
own weights, so nothing stays in cache between tokens), beside bf16 weights and a plain sum over 1 GiB, in
one run (best of --repeats). Reports ms per token and the weight bytes read per second.

    python benchmarks/kernel_bandwidth.py [--shape r1-distill-qwen-1.5b] [--group-size 128] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from hemat.infer.quantize import weight_bytes
from hemat.model.config import ModelConfig
from local_decode import bandwidth_gbs
from quantized_rows import SHAPES, best_ms, linear_forms, projection_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="r1-distill-qwen-1.5b")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_file(SHAPES[args.shape])
    shapes = projection_shapes(config)[:-1]  # one layer's, without the head
    forms = linear_forms(args.group_size)
    print(f"{args.shape}: one token through the projections of {config.num_hidden_layers} layers, "
          f"{args.threads} threads, best of {args.repeats}; memory read bandwidth {bandwidth_gbs():.1f} GB/s "
          "(sum over 1 GiB)\n")
    print("| weights | ms per token | GB read | GB/s |\n|---|---|---|---|")
    rows = {shape[1]: torch.randn(1, shape[1]) for shape in shapes}
    layers = [[torch.randn(shape, dtype=torch.bfloat16) * 0.02 for shape in shapes]
              for _ in range(config.num_hidden_layers)]
    ms = best_ms(lambda: [F.linear(rows[w.shape[1]].bfloat16(), w) for layer in layers for w in layer], args.repeats)
    nbytes = sum(w.numel() * 2 for layer in layers for w in layer)
    print(f"| bf16 | {ms:.1f} | {nbytes / 1e9:.3f} | {nbytes / ms / 1e6:.1f} |")
    for name, build in forms.items():
        modules = [build(w.float()) for layer in layers for w in layer]
        nbytes = weight_bytes(nn.ModuleList(modules))
        ms = best_ms(lambda: [m.packed(rows[m.in_features].to(m.kernel_dtype)) for m in modules], args.repeats)
        print(f"| {name} | {ms:.1f} | {nbytes / 1e9:.3f} | {nbytes / ms / 1e6:.1f} |")
        del modules


if __name__ == "__main__":
    main()
