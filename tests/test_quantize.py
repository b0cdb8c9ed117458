"""prepare_for_inference: each inference form against the computation it replaces (packed int8/int4
linears against their dequantized weights, the fused MLP, the routed experts, folded and unfolded
MLA), whole models against the fp32 reference, the engine over prepared models, and the bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hemat.infer import quantize
from hemat.infer.cache import PagedCache
from hemat.infer.engine import Engine
from hemat.infer.quantize import (
    DenseLinear,
    FoldedMLA,
    FusedMLP,
    FusedQKVAttention,
    InferenceExperts,
    Int4Linear,
    Int8Linear,
    PackedEmbedding,
    QuantizationError,
    load_for_inference,
    prepare_for_inference,
    quantize_int4,
    unpack_int4_t,
)
from hemat.infer.sampling import SamplingParams
from hemat.model.config import ModelConfig
from hemat.model.hf import from_pretrained
from hemat.model.transformer import CausalLM


def mla_config(**overrides) -> ModelConfig:
    base = dict(
        model_type="deepseek_v3", vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.05,
    )
    return ModelConfig(**{**base, **overrides})


def llama_config(**overrides) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05,
                tie_word_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def model_of(config: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(config).eval()


def kernel_reference(module, x: torch.Tensor) -> torch.Tensor:
    """What a packed linear computes: bf16 activations times its dequantized weight, accumulated in fp32."""
    return F.linear(x.bfloat16().float(), module.dequantized()) + (0 if module.bias is None else module.bias)


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 rows: more than one kernel call
def test_packed_linears_match_their_dequantized_weights(rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128) * 0.05, torch.randn(96)
    x = torch.randn(rows, 128)
    for module in (Int8Linear(weight, bias), Int4Linear(weight, bias, 32), Int4Linear(weight, None, 128)):
        got, expected = module(x), kernel_reference(module, x)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()  # bf16 output rounding
        # and the dequantized weight is the weight to quantization accuracy
        step = 1 / 127 if isinstance(module, Int8Linear) else 1 / 15
        assert (module.dequantized() - weight).abs().max() <= step * weight.abs().max()


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])  # with bf16 matmul instructions, without
def test_dense_path_matches_the_packed_kernels_tile_by_tile(dense_dtype, monkeypatch):
    """From dense_rows rows on, the weight is dequantized a tile at a time (tiles made small here: several,
    the last holding int4's partial block of 16 outputs) and multiplied densely: the kernels' numbers."""
    monkeypatch.setattr(quantize, "DENSE_TILE", 64 * 128)
    monkeypatch.setattr(quantize, "DENSE_DTYPE", dense_dtype)
    torch.manual_seed(0)
    weight, bias = torch.randn(208, 128) * 0.05, torch.randn(208)
    x = torch.randn(130, 128)
    for module in (Int8Linear(weight, bias), Int4Linear(weight, bias, 32)):
        assert x.shape[0] >= module.dense_rows
        got, expected = module(x), kernel_reference(module, x)
        packed = module.packed(x.bfloat16()).float() + bias
        assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
        assert (got - packed).abs().max() <= 1e-2 * expected.abs().max()
    assert torch.equal(module.dequantized_t(torch.float32, 192, 208), module.dequantized()[192:].t())


@pytest.mark.parametrize("weights,tied", [("int8", True), ("int4", True), ("int4", False)])
def test_quantized_models_read_the_embedding_from_packed_rows(weights, tied):
    model = model_of(llama_config(vocab_size=128, tie_word_embeddings=tied))  # 128: whole int4 blocks of 64
    prepared = prepare_for_inference(model, weights, group_size=32)
    embedding, reference = prepared.model.embed_tokens, model.model.embed_tokens.weight
    assert isinstance(embedding, PackedEmbedding) and isinstance(model.model.embed_tokens, nn.Embedding)
    # a tied head's values serve both (one copy); an untied model's embedding gets int8 rows of its own
    assert (embedding.linear is prepared.lm_head) == tied
    assert isinstance(embedding.linear, Int4Linear if weights == "int4" and tied else Int8Linear)
    ids = torch.tensor([[0, 5, 95], [3, 127, 64]])
    got = embedding(ids)
    assert got.dtype == reference.dtype and got.shape == (2, 3, 64)
    assert torch.allclose(got, embedding.dequantized()[ids], rtol=0, atol=1e-6)
    levels = 15 if isinstance(embedding.linear, Int4Linear) else 127  # a step: the row's range over its levels
    assert ((got - reference[ids]).abs() <= 2 * reference[ids].abs().amax(-1, keepdim=True) / levels).all()


@pytest.mark.parametrize("weights,config", [("int8", llama_config()), ("int4", llama_config()),
                                            ("int4", mla_config())])
def test_quantizing_while_loading_gives_the_logits_of_quantizing_after(tmp_path, weights, config):
    model_of(config).save_pretrained(tmp_path)
    loaded = load_for_inference(tmp_path, weights, group_size=32)
    after = prepare_for_inference(from_pretrained(tmp_path), weights, group_size=32)
    # no full-precision projection or embedding is left
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in loaded.modules())
    assert (loaded.weight_format, loaded.weight_bytes) == (after.weight_format, after.weight_bytes)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), after(ids))


def test_int4_unpack_reads_the_packed_layout_back():
    for out_features in (16, 48, 64, 112, 192):  # whole blocks (64 rows with AVX-512, 32 with AVX2), a remainder, both
        q = torch.randint(0, 16, (out_features, 64), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(unpack_int4_t(packed, out_features, 64).t().int(), q)


def test_int4_quantizer_is_min_max_per_group_with_exact_zero():
    w = torch.tensor([[-1.5, 0.0, 0.5, 3.0, 0.1, 0.2, 0.3, 0.4]])
    q, scale, zero_point = quantize_int4(w, 4)
    assert torch.allclose(scale[0], torch.tensor([4.5 / 15, 0.4 / 15]))
    assert q[0, 1] == zero_point[0, 0]  # 0.0 is exact
    assert q[0, 0] == 0 and q[0, 3] == 15


@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_prepared_mla_model_matches_the_reference(weights):
    model = model_of(mla_config())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
        prepared = prepare_for_inference(model, weights, group_size=32)
        got = prepared(ids)
    kinds = {type(m) for m in prepared.modules()}
    assert {FoldedMLA, FusedMLP, InferenceExperts} <= kinds
    assert ({Int8Linear} if weights == "int8" else {Int4Linear} if weights == "int4" else {DenseLinear}) <= kinds
    # relative to the largest logit; int4 rounding of random Gaussian weights moves them ~15% over 2 layers
    tolerance = {None: 1e-4, "int8": 0.03, "int4": 0.3}[weights]
    assert (got - reference).abs().max() <= tolerance * reference.abs().max()
    assert prepared.weight_format == (weights or "float32")
    assert all(type(m) is not FoldedMLA for m in model.modules())  # the reference model is untouched


def test_unfolded_mla_form_matches_the_reference_decode():
    """kv_lora_rank too large to fold: the form applies W_UK and W_UV per head between the projections."""
    model = model_of(mla_config(kv_lora_rank=48))
    prepared = prepare_for_inference(model)
    forms = [m for m in prepared.modules() if isinstance(m, FoldedMLA)]
    assert forms and all(f.w_uk is not None for f in forms)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    assert (decode_with_paged_cache(prepared, ids) - full).abs().max() <= 1e-4


def decode_with_paged_cache(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill 6 tokens, then decode the rest one at a time through a PagedCache → logits [B, T, V]."""
    b, t = ids.shape
    cache = PagedCache(model.config, num_pages=20, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    tables = [[1 + i + b * j for j in range(8)] for i in range(b)]
    pieces = []
    with torch.inference_mode():
        for start, n in [(0, 6)] + [(s, 1) for s in range(6, t)]:
            positions = cache.begin_step(tables, [start] * b, [n] * b)
            pieces.append(model(ids[:, start : start + n], positions=positions, cache=cache))
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q, k and v biases
def test_fused_qkv_attention_matches_the_reference(model_type):
    model = model_of(llama_config(model_type=model_type))
    prepared = prepare_for_inference(model)
    forms = [m for m in prepared.modules() if isinstance(m, FusedQKVAttention)]
    assert len(forms) == 2 and (forms[0].qkv_proj.bias is not None) == (model_type == "qwen2")
    assert not any(isinstance(m, FusedQKVAttention) for m in model.modules())  # the reference is untouched
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids), model(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode_with_paged_cache(prepared, ids), model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_llama_decodes_like_its_full_forward(weights):
    model = prepare_for_inference(model_of(llama_config()), weights, group_size=32)
    assert isinstance(model.lm_head, Int8Linear if weights == "int8" else Int4Linear)  # the tied head too
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    assert (decode_with_paged_cache(model, ids) - full).abs().max() <= 0.02 * full.abs().max()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_engine_generates_greedily_from_a_quantized_model(weights):
    model = prepare_for_inference(model_of(mla_config()), weights, group_size=32)
    prompt = torch.randint(2, 96, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off")
    assert engine.model is model  # already prepared: used as it is
    out = engine.generate([prompt], params)[0].outputs[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_engine_follows_training_of_the_model_it_was_given():
    """The engine prepares its own copy: the trained model keeps its reference modules, and a later
    engine sees the new weights (GRPO builds one per rollout)."""
    model = model_of(mla_config())
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    Engine(model, max_batch_size=1, page_size=4, speculative="off").generate([prompt], params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(torch.randint(0, 96, (2, 10))).logsumexp(-1).sum().backward()
    optimizer.step()
    model.eval()
    out = Engine(model, max_batch_size=1, page_size=4, speculative="off").generate([prompt], params)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.outputs[0].token_ids == ids[len(prompt):]


def test_bad_formats_and_group_sizes_are_named():
    model = model_of(llama_config())
    with pytest.raises(QuantizationError, match="unknown weight format 'int3'"):
        prepare_for_inference(model, "int3")
    with pytest.raises(QuantizationError, match="group size must be one of"):
        prepare_for_inference(model, "int4", group_size=48)
    with pytest.raises(QuantizationError, match=r"group size 128 does not divide the input dimension 64 of "
                                                r"lm_head"):  # the tied head, made first from the embedding
        prepare_for_inference(model, "int4", group_size=128)
    int8 = prepare_for_inference(model, "int8")
    assert prepare_for_inference(int8, "int8") is int8
    with pytest.raises(QuantizationError, match="already prepared with int8"):
        prepare_for_inference(int8, "int4")


def test_int4_falls_back_to_int8_by_name_when_outputs_do_not_tile(capsys, monkeypatch):
    from tests.test_native_kernels import pytorch_kernels

    with pytorch_kernels(monkeypatch):  # PyTorch's int4 layout tiles outputs by 16; hemat's native one takes any
        model = prepare_for_inference(model_of(llama_config(vocab_size=90)), "int4", group_size=32)
    assert isinstance(model.lm_head, Int8Linear)
    assert "int8 instead for lm_head (90 outputs)" in capsys.readouterr().out


def test_weight_bytes_shrink_with_the_format():
    model = model_of(llama_config(hidden_size=128, intermediate_size=256))
    sizes = {w: prepare_for_inference(model, w, group_size=32).weight_bytes for w in (None, "int8", "int4")}
    assert sizes[None] > 2 * sizes["int8"] and sizes["int8"] > sizes["int4"]


def test_engine_stats_and_metrics_report_the_weight_format():
    from hemat.serve.metrics import _EngineCollector

    model = prepare_for_inference(model_of(llama_config()), "int8")
    stats = Engine(model, max_batch_size=1, page_size=4).stats()
    assert stats["weight_format"] == "int8" and stats["weight_bytes"] == model.weight_bytes
    families = {f.name: f for f in _EngineCollector(lambda: stats).collect()}
    assert families["hemat_engine_weight_bytes"].samples[0].value == model.weight_bytes
    assert families["hemat_engine_weight_format"].samples[0].labels == {"format": "int8"}


def test_int8_rows_whose_length_is_not_a_multiple_of_16():
    """torch's int8 kernel crashed on several rows of 24 inputs (the tiny MLA configs' q_b_proj): padded."""
    torch.manual_seed(0)
    weight = torch.randn(72, 24)
    layer = Int8Linear(weight, None)
    x = torch.randn(5, 24)
    expected = x.to(torch.bfloat16).float() @ layer.dequantized().t()
    assert torch.allclose(layer(x), expected, rtol=0.02, atol=0.05)
    assert layer.dequantized().shape == (72, 24)
