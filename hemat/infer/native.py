"""hemat's own CPU kernels, compiled on first use with the system's C++ compiler against torch's headers into
a cache directory (about 30 s, once), and the int8/int4 linears over them. quantized_linear.cpp multiplies the
weights by int8 activations, llama.cpp's way (the operators hemat::int8_linear and hemat::int4_linear), and
dequantizes int4 weights to bf16 for the dense path (hemat::int4_dequantize); paged_attention.cpp attends
straight from the paged KV cache (hemat::paged_attention, which cache.py calls). Both are written over simd.h's
vectors and built for AVX-512 VNNI where the CPU has it, else for AVX2 and FMA (TARGETS).
They replace the weight-only forms of quantize.py and the cache's gather where `kernels()` is true; it is
false, with the reason printed once, where they cannot run (no compiler, a CPU with neither instruction set,
not Linux x86-64) or where HEMAT_NATIVE_KERNELS=0 asks for PyTorch's kernels instead.
Being operators, they cost ~2 us a call and torch.compile keeps a decode step that calls them in one graph.

Quantizing the activations changes the numbers slightly (each block of 32 inputs in 8 bits, of 128 against int4
groups of 128 or more: about 0.5% of a projection's output norm on random inputs), the way llama.cpp's q8_0 and
q8_K activations do."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hemat.infer.quantize import (Int4Linear, Int8Linear, PackedLinear, QuantizationError, cpu_flags, quantize_int4,
                                  quantize_int8, row_chunks)

SOURCES = [Path(__file__).with_name(name) for name in ("quantized_linear.cpp", "paged_attention.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]
# The instruction sets simd.h builds the kernels for, best first: name → (CPU flags it needs, compiler flags)
TARGETS = {
    "AVX-512 VNNI": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
                     ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]),
    "AVX2": (("avx2", "fma"), ["-mavx2", "-mfma"]),
}
DISABLE = "HEMAT_NATIVE_KERNELS"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hemat" / "kernels"


@functools.cache
def kernels() -> bool:
    """Whether hemat's operators are loaded (built first if need be); where they cannot be, the reason is
    printed once to stderr."""
    try:
        _load()
        return True
    except _Unavailable as reason:
        print(f"hemat: int8/int4 use PyTorch's packed kernels and attention gathers the KV cache ({reason})",
              file=sys.stderr)
        return False


class _Unavailable(Exception):
    pass


def _load() -> None:
    if os.environ.get(DISABLE, "1") == "0":
        raise _Unavailable(f"{DISABLE}=0")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise _Unavailable(f"hemat's kernels are built for Linux x86-64, not {sys.platform} {platform.machine()}")
    isa = target()
    if isa is None:
        raise _Unavailable("this CPU has neither AVX-512 VNNI nor AVX2 with FMA")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise _Unavailable("no C++ compiler found to build hemat's kernels (install g++, or set CXX)")
    torch_dir = Path(torch.__file__).parent
    command = [compiler, "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", *TARGETS[isa][1], "-w",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{torch_dir / 'include'}",
               *map(str, SOURCES), f"-L{torch_dir / 'lib'}", "-ltorch", "-ltorch_cpu", "-lc10"]
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join([torch.__version__, *command]).encode()).hexdigest()[:16]
    library = cache_dir() / f"hemat-kernels-{key}.so"
    if not library.exists():
        _build(command, library)
    torch.ops.load_library(str(library))
    # their output shapes, for torch.compile's tracing
    torch.library.register_fake("hemat::int8_linear", lambda rows, weight, scale: rows.new_empty(len(rows), len(weight)))
    torch.library.register_fake("hemat::int4_linear", lambda rows, packed, scale, offset, group_size:
                                rows.new_empty(len(rows), len(packed)))
    torch.library.register_fake("hemat::int4_dequantize", lambda packed, scale, offset, group_size:
                                packed.new_empty(len(packed), packed.shape[1] * 2, dtype=torch.bfloat16))
    torch.library.register_fake("hemat::paged_attention", lambda q, k, v, table, q_pos, total, page_size, scale:
                                q.new_empty(*q.shape[:3], v.shape[-1]))


def target() -> str | None:
    """The best of TARGETS this CPU runs, or None."""
    flags = cpu_flags()
    return next((name for name, (needed, _) in TARGETS.items() if flags.issuperset(needed)), None)


def _build(command: list[str], library: Path) -> None:
    """Compile (about 30 s, once per source and torch version) into a temporary file renamed into place, so
    that concurrent first uses never load a half-written library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        out = Path(tmp) / library.name
        result = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True)
        if result.returncode:
            raise _Unavailable(f"{command[0]} could not build hemat's kernels: {result.stderr.strip()[-500:]}")
        os.replace(out, library)


def available(in_features: int) -> bool:
    """Whether the kernels load and take rows of this length (whole chunks of 64 inputs)."""
    return in_features % 64 == 0 and kernels()


def _require_kernels(in_features: int) -> None:
    if not available(in_features):
        raise QuantizationError(f"hemat's int8/int4 kernels do not run here or take {in_features} inputs "
                                "(a multiple of 64); quantize.py's forms do")


class NativeInt8Linear(Int8Linear):
    """Int8Linear's numbers (symmetric per output channel) over quantized_linear.cpp, the values stored as q + 128."""

    kernel_dtype = torch.float32
    dense_rows = 24

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        _require_kernels(weight.shape[1])
        PackedLinear.__init__(self, weight, bias)
        q, scale = (torch.cat(parts) for parts in zip(*map(quantize_int8, row_chunks(weight))))
        self.register_buffer("weight", (q.to(torch.int16) + 128).to(torch.uint8))
        self.register_buffer("scale", scale)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.hemat.int8_linear(rows, self.weight, self.scale)

    def values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.weight[start:stop].to(torch.int16) - 128

    def dense_tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The int8 values are exact in bf16; the scales apply to the output columns."""
        return F.linear(rows, self.values(start, stop).to(rows.dtype)) * self.scale[start:stop].to(rows.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.values().float() * self.scale[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return ((self.weight[ids].float() - 128) * self.scale[ids, None]).to(dtype)


class NativeInt4Linear(Int4Linear):
    """Int4Linear's numbers (asymmetric per group) over quantized_linear.cpp: w = q · scale - offset, the
    0..15 values packed two a byte, row by row (quantized_linear.cpp's layout)."""

    kernel_dtype = torch.float32
    dense_rows = 80

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        _require_kernels(weight.shape[1])
        PackedLinear.__init__(self, weight, bias)
        self.group_size = group_size
        packed, scale, offset = zip(*(self.pack(chunk) for chunk in row_chunks(weight)))
        self.register_buffer("weight_packed", torch.cat(packed))
        self.register_buffer("scale", torch.cat(scale))
        self.register_buffer("offset", torch.cat(offset))

    def pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """quantized_linear.cpp's layout: each block of 128 inputs as 64 bytes, the first 64 inputs in the low nibbles
        and the rest in the high ones; a last block of 64 inputs the same way in 32 bytes."""
        q, scale, zero_point = quantize_int4(weight, self.group_size)
        blocks = [q[:, start:stop].reshape(len(q), -1, 2, half) for start, stop, half in self.blocks()]
        return torch.cat([(b[:, :, 0] | b[:, :, 1] << 4).flatten(1) for b in blocks], dim=1), scale, zero_point * scale

    def blocks(self) -> list[tuple[int, int, int]]:
        """(first input, last input + 1, half a block) of the blocks of 128 inputs and of a last block of 64."""
        whole = self.in_features // 128 * 128
        return [(0, whole, 64)] * (whole > 0) + [(whole, self.in_features, 32)] * (whole < self.in_features)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.hemat.int4_linear(rows, self.weight_packed, self.scale, self.offset, self.group_size)

    def dense_tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """rows (DENSE_DTYPE) times output rows start:stop of the weight, dequantized to bf16 by
        quantized_linear.cpp."""
        weight = torch.ops.hemat.int4_dequantize(self.weight_packed[start:stop], self.scale[start:stop],
                                                 self.offset[start:stop], self.group_size)
        return F.linear(rows, weight.to(rows.dtype))

    def unpacked(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows [n, in/2] → their 0..15 values [n, in]."""
        parts = []
        for start, stop, half in self.blocks():
            b = packed[:, start // 2:stop // 2].reshape(len(packed), -1, half)
            parts.append(torch.stack((b & 15, b >> 4), dim=-2).flatten(1))
        return torch.cat(parts, dim=1)

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype) -> torch.Tensor:
        q = self.unpacked(packed).view(len(packed), -1, self.group_size).to(dtype)
        return (q * scale[..., None].to(dtype) - offset[..., None].to(dtype)).flatten(1)

    def dequantized_t(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.dequantize(self.weight_packed[start:stop], self.scale[start:stop], self.offset[start:stop],
                               dtype).t()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(self.weight_packed[ids], self.scale[ids], self.offset[ids], torch.float32).to(dtype)
