"""hemat's native kernels (quantized_linear.cpp through native.py, AVX-512 VNNI or AVX2): the int8/int4 linears
against their dequantized weights times the same int8 activations (exact up to the order of fp32 sums), their
dense path, rows and embedding, whole models and the compiled decode step over them, and PyTorch's kernels where
they are turned off."""

import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from hemat.infer import native, quantize
from hemat.infer.engine import Engine
from hemat.infer.quantize import Int4Linear, Int8Linear, PackedEmbedding, prepare_for_inference
from tests.test_compiled_decode import greedy_tokens
from tests.test_engine import prompt
from tests.test_quantize import llama_config, model_of

CPU_FLAGS = quantize.cpu_flags()
CPU_RUNS_KERNELS = {"avx512_vnni", "avx512bw"} <= CPU_FLAGS or {"avx2", "fma"} <= CPU_FLAGS
needs_native_kernels = pytest.mark.skipif(not CPU_RUNS_KERNELS, reason="this CPU has neither AVX-512 VNNI nor AVX2")


def test_the_kernels_load_where_the_cpu_has_vnni_or_avx2_and_a_compiler():
    assert native.kernels() == (CPU_RUNS_KERNELS and shutil.which("g++") is not None)
    assert native.target() == ("AVX-512 VNNI" if "avx512_vnni" in CPU_FLAGS else "AVX2" if CPU_RUNS_KERNELS else None)


@contextmanager
def pytorch_kernels(monkeypatch):
    """HEMAT_NATIVE_KERNELS=0 within, as a user would set it before starting hemat."""
    monkeypatch.setenv(native.DISABLE, "0")
    native.kernels.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv(native.DISABLE)
        native.kernels.cache_clear()


def int8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the kernels multiply: each block of inputs rounded to 255 levels of its largest magnitude."""
    blocks = x.view(len(x), -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = amax / 127
    q = (blocks * torch.where(amax > 0, 127 / amax, 0)).round().clamp(-128, 127)
    return (q * scale).view_as(x)


def forms(weight, bias, group_sizes):
    return [native.NativeInt8Linear(weight, bias)] + [native.NativeInt4Linear(weight, bias, g) for g in group_sizes]


@needs_native_kernels
@pytest.mark.parametrize("rows", [1, 5, 23])
@pytest.mark.parametrize("inputs,group_sizes", [(192, (32, 64)), (512, (128, 256))])  # 192: a last block of 64
def test_kernels_compute_the_dequantized_weight_times_int8_activations(rows, inputs, group_sizes):
    torch.manual_seed(0)
    weight, bias = torch.randn(97, inputs) * 0.05, torch.randn(97)  # 97 outputs: a partial tile of 4 rows
    x = torch.randn(rows, inputs) * torch.linspace(0.1, 4, inputs)  # blocks of different ranges
    x[0, :32] = 0  # an all-zero block
    for module in forms(weight, bias, group_sizes):
        assert rows < module.dense_rows
        got = module(x)
        block = min(module.group_size, 128) if isinstance(module, Int4Linear) else 32  # as quantized_linear.cpp
        expected = F.linear(int8_activations(x, block), module.dequantized()) + bias
        assert got.dtype == torch.float32 and got.shape == (rows, 97)
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        # the activations' rounding is all that separates it from the unquantized input
        assert (got - (F.linear(x, module.dequantized()) + bias)).norm() <= 0.01 * expected.norm()
        step = 1 / 127 if isinstance(module, Int8Linear) else 1 / 15
        assert (module.dequantized() - weight).abs().max() <= step * weight.abs().max()


@needs_native_kernels
@pytest.mark.parametrize("inputs,group_size", [(192, 32), (192, 64), (512, 128), (512, 256)])
def test_int4_weights_dequantize_to_bf16_of_the_reference(inputs, group_size):
    torch.manual_seed(0)
    module = native.NativeInt4Linear(torch.randn(130, inputs) * 0.05, None, group_size)
    for start, stop in ((0, 130), (64, 130)):  # as the dense path's tiles slice the rows
        got = torch.ops.hemat.int4_dequantize(module.weight_packed[start:stop], module.scale[start:stop],
                                              module.offset[start:stop], group_size)
        expected = module.dequantized()[start:stop]
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        # q · scale - offset in one fused rounding, then to the nearest bf16: within bf16's half step
        assert ((got.float() - expected).abs() <= expected.abs() * (2**-8 + 2**-16) + 1e-7).all()


@needs_native_kernels
@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])
def test_dense_path_rows_and_embedding_read_the_same_values(dense_dtype, monkeypatch):
    monkeypatch.setattr(quantize, "DENSE_DTYPE", dense_dtype)
    torch.manual_seed(0)
    weight = torch.randn(130, 192) * 0.05
    x = torch.randn(90, 192)
    ids = torch.tensor([0, 7, 64, 129])
    for module in forms(weight, None, (32, 64)):
        assert len(x) >= module.dense_rows
        dense, reference = module(x), F.linear(x, module.dequantized())  # dense: tile by tile
        assert (dense - reference).norm() <= 0.01 * reference.norm()
        assert (module.packed(x) - reference).norm() <= 0.01 * reference.norm()
        assert torch.equal(module.rows(ids, torch.float32), module.dequantized()[ids])
        embedding = PackedEmbedding(module, torch.float32)
        assert torch.equal(embedding(ids[None])[0], module.dequantized()[ids])


@needs_native_kernels
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_models_over_the_kernels_match_models_over_pytorchs(weights, monkeypatch):
    model = model_of(llama_config(hidden_size=128, intermediate_size=256, vocab_size=256))
    ours = prepare_for_inference(model, weights, group_size=64)
    assert isinstance(ours.lm_head, native.NativeInt8Linear if weights == "int8" else native.NativeInt4Linear)
    with pytorch_kernels(monkeypatch):
        theirs = prepare_for_inference(model, weights, group_size=64)
    assert not any(isinstance(m, (native.NativeInt8Linear, native.NativeInt4Linear)) for m in theirs.modules())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours(ids), theirs(ids)
    assert (got - expected).norm() <= 0.02 * expected.norm()  # int8 activations vs bf16 ones


@needs_native_kernels
def test_the_compiled_decode_step_takes_the_kernels():
    model = prepare_for_inference(model_of(llama_config(hidden_size=128, intermediate_size=256, vocab_size=256)),
                                  "int4", group_size=64)
    prompts = [prompt(n, seed=n) for n in (5, 19, 11)]
    expected = greedy_tokens(Engine(model, max_batch_size=2, page_size=4, speculative="off"), prompts)
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off", compile_decode=True)
    assert greedy_tokens(engine, prompts) == expected  # while the buckets compile
    engine.static_decode.compiled.wait()
    steps = engine.stats()["decode_compiled_steps"]
    assert greedy_tokens(engine, prompts) == expected
    stats = engine.stats()
    assert not stats["decode_compile_failed"] and stats["decode_compiled_steps"] - steps == 23  # every step


def test_turned_off_they_leave_pytorchs_kernels_and_say_so_once(monkeypatch, capsys):
    with pytorch_kernels(monkeypatch):
        model = prepare_for_inference(model_of(llama_config()), "int4", group_size=32)
        prepare_for_inference(model_of(llama_config()), "int8")
    assert isinstance(model.lm_head, Int4Linear) and not isinstance(model.lm_head, native.NativeInt4Linear)
    assert capsys.readouterr().err.count(f"attention gathers the KV cache ({native.DISABLE}=0)") == 1
