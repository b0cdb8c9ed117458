"""Where the dense path of the int8/int4 linears (the weight dequantized tile by tile, a matmul in DENSE_DTYPE)
overtakes their kernels (PyTorch's weight-only packed kernels, KERNEL_ROWS rows per call; hemat's native
kernels where they load): per row count, the time of each over one decoder layer's projections and the head
of a model shape, beside weights in DENSE_DTYPE (bf16, or fp32 on CPUs without bf16 instructions), in one run
(best of --repeats). Each form's `dense_rows` in hemat/infer/quantize.py and native.py comes from it.

    python benchmarks/quantized_rows.py [--shape smollm-135m] [--rows 1,2,4,8,16,64,512] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hemat.infer import native
from hemat.infer.quantize import DENSE_DTYPE, Int4Linear, Int8Linear
from hemat.model.config import ModelConfig

SHAPES = {path.stem: path for path in (Path(__file__).parent / "shapes").glob("*.json")}


def projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one llama/qwen decoder layer's projections (gate and up fused) and the head."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    return [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d), (2 * config.intermediate_size, h),
            (h, config.intermediate_size), (config.vocab_size, h)]


def linear_forms(group_size: int) -> dict[str, Callable[[torch.Tensor], torch.nn.Module]]:
    """name → a builder of that int8/int4 form from a weight: PyTorch's kernels, and hemat's where they load."""
    forms = {"int8": lambda w: Int8Linear(w, None), "int4": lambda w: Int4Linear(w, None, group_size)}
    if native.kernels():
        forms["int8 native"] = lambda w: native.NativeInt8Linear(w, None)
        forms["int4 native"] = lambda w: native.NativeInt4Linear(w, None, group_size)
    return forms


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm-135m")
    parser.add_argument("--rows", default="1,2,4,8,16,64,512")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_file(SHAPES[args.shape])
    weights = [torch.randn(shape) * 0.02 for shape in projection_shapes(config)]
    forms = {name: [build(w) for w in weights] for name, build in linear_forms(args.group_size).items()}
    print(f"{args.shape}: one layer's projections + the head, ms (best of {args.repeats}), {args.threads} threads")
    dense = [w.to(DENSE_DTYPE) for w in weights]
    columns = " | ".join(f"{form} kernel | {form} dense" for form in forms)
    print(f"| rows | {str(DENSE_DTYPE).removeprefix('torch.')} weights | {columns} |")
    print("|---" * (2 + 2 * len(forms)) + "|")
    for rows in map(int, args.rows.split(",")):
        x = [torch.randn(rows, w.shape[1], dtype=DENSE_DTYPE) for w in weights]
        cells = [best_ms(lambda: [torch.nn.functional.linear(v, w) for w, v in zip(dense, x)], args.repeats)]
        for layers in forms.values():
            inputs = [v.to(layers[0].kernel_dtype) for v in x]
            cells.append(best_ms(lambda: [layer.packed(v) for layer, v in zip(layers, inputs)], args.repeats))
            cells.append(best_ms(lambda: [layer.dense(v) for layer, v in zip(layers, x)], args.repeats))
        print(f"| {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
