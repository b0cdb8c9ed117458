"""The int8/int4 linears over hemat's own CPU kernels (vnni.c: the weights times int8 activations with
AVX-512 VNNI, llama.cpp's way), compiled on first use with the system's C compiler into a cache directory
and loaded with ctypes. They replace the weight-only forms of quantize.py where `kernels()` loads: it is
None, with the reason printed once, where they cannot run (no compiler, a CPU without AVX-512 VNNI, not
Linux x86-64) or where HEMAT_NATIVE_KERNELS=0 asks for PyTorch's packed kernels instead.

Quantizing the activations changes the numbers slightly (each block of 32 inputs in 8 bits: about 0.5% of
a projection's output norm on random inputs), the way llama.cpp's q8_0 activations do."""

from __future__ import annotations

import ctypes
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

from hemat.infer.quantize import Int4Linear, Int8Linear, PackedLinear, quantize_int4, quantize_int8, row_chunks

SOURCE = Path(__file__).with_name("vnni.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni", "-mfma"]
DISABLE = "HEMAT_NATIVE_KERNELS"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hemat" / "kernels"


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None (the reason printed once to stderr)."""
    try:
        return _load()
    except _Unavailable as reason:
        print(f"hemat: int8/int4 use PyTorch's packed kernels ({reason})", file=sys.stderr)
        return None


class _Unavailable(Exception):
    pass


def _load() -> ctypes.CDLL:
    if os.environ.get(DISABLE, "1") == "0":
        raise _Unavailable(f"{DISABLE}=0")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise _Unavailable(f"hemat's VNNI kernels are built for Linux x86-64, not {sys.platform} {platform.machine()}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise _Unavailable("no C compiler found to build hemat's VNNI kernels (install gcc, or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / f"vnni-{key}.so"
    if not library.exists():
        _build(compiler, library)
    torch.get_num_threads()  # torch's libgomp is loaded first, so the library's OpenMP is the same runtime
    lib = ctypes.CDLL(str(library))
    if not lib.hemat_vnni_supported():
        raise _Unavailable("this CPU lacks AVX-512 VNNI")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.hemat_int4_linear.argtypes = [pointer, size, size, pointer, pointer, pointer, size, size, pointer, ctypes.c_int]
    lib.hemat_int8_linear.argtypes = [pointer, size, size, pointer, pointer, size, pointer, ctypes.c_int]
    return lib


def _build(compiler: str, library: Path) -> None:
    """Compile into a temporary file and rename it into place, so that concurrent first uses never load a
    half-written library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        out = Path(tmp) / library.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if result.returncode:
            raise _Unavailable(f"{compiler} could not build {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(out, library)


def available(in_features: int) -> bool:
    """Whether the kernels load and take rows of this length (whole chunks of 64 inputs)."""
    return in_features % 64 == 0 and kernels() is not None


class VnniInt8Linear(Int8Linear):
    """Int8Linear's numbers (symmetric per output channel) over vnni.c, the values stored as q + 128."""

    kernel_dtype = torch.float32
    dense_rows = 24

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
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


class VnniInt4Linear(Int4Linear):
    """Int4Linear's numbers (asymmetric per group) over vnni.c: w = q · scale - offset, the 0..15 values
    packed two a byte, row by row (vnni.c's layout)."""

    kernel_dtype = torch.float32
    dense_rows = 80

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        PackedLinear.__init__(self, weight, bias)
        self.group_size = group_size
        packed, scale, offset = zip(*(self.pack(chunk) for chunk in row_chunks(weight)))
        self.register_buffer("weight_packed", torch.cat(packed))
        self.register_buffer("scale", torch.cat(scale))
        self.register_buffer("offset", torch.cat(offset))

    def pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, scale, zero_point = quantize_int4(weight, self.group_size)
        halves = q.view(len(q), -1, 2, 32)  # each chunk of 64 inputs: the first 32 low nibbles, the rest high
        return (halves[:, :, 0] | halves[:, :, 1] << 4).flatten(1), scale, zero_point * scale

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.hemat.int4_linear(rows, self.weight_packed, self.scale, self.offset, self.group_size)

    def unpacked(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows [n, in/2] → their 0..15 values [n, in]."""
        chunks = packed.view(len(packed), -1, 32)
        return torch.stack((chunks & 15, chunks >> 4), dim=-2).view(len(packed), self.in_features)

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype) -> torch.Tensor:
        q = self.unpacked(packed).view(len(packed), -1, self.group_size).to(dtype)
        return (q * scale[..., None].to(dtype) - offset[..., None].to(dtype)).flatten(1)

    def dequantized_t(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.dequantize(self.weight_packed[start:stop], self.scale[start:stop], self.offset[start:stop],
                               dtype).t()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(self.weight_packed[ids], self.scale[ids], self.offset[ids], torch.float32).to(dtype)


# ---- the kernels as PyTorch operators: a dispatcher call costs ~2 us more than ctypes alone (a custom_op
# ~9 us more), and torch.compile keeps a decode step that calls them in one graph ----------------------
_LIBRARY = torch.library.Library("hemat", "DEF")
_LIBRARY.define("int8_linear(Tensor rows, Tensor weight, Tensor scale) -> Tensor")
_LIBRARY.define("int4_linear(Tensor rows, Tensor packed, Tensor scale, Tensor offset, int group_size) -> Tensor")


def _int8_linear(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    _check(kernels().hemat_int8_linear(rows.data_ptr(), rows.shape[0], rows.shape[1], weight.data_ptr(),
                                       scale.data_ptr(), weight.shape[0], out.data_ptr(), torch.get_num_threads()))
    return out


def _int4_linear(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    out = rows.new_empty(rows.shape[0], packed.shape[0])
    _check(kernels().hemat_int4_linear(rows.data_ptr(), rows.shape[0], rows.shape[1], packed.data_ptr(),
                                       scale.data_ptr(), offset.data_ptr(), packed.shape[0], group_size,
                                       out.data_ptr(), torch.get_num_threads()))
    return out


def _check(status: int) -> None:
    if status:
        raise MemoryError("hemat's VNNI kernel could not allocate its int8 activations")


_LIBRARY.impl("int8_linear", _int8_linear, "CPU")
_LIBRARY.impl("int4_linear", _int4_linear, "CPU")
torch.library.register_fake("hemat::int8_linear", lambda rows, weight, scale: rows.new_empty(len(rows), len(weight)),
                            lib=_LIBRARY)
torch.library.register_fake("hemat::int4_linear", lambda rows, packed, scale, offset, group_size:
                            rows.new_empty(len(rows), len(packed)), lib=_LIBRARY)
