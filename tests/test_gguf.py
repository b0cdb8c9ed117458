"""GGUF in and out: hemat's exports read back by transformers' own GGUF loader and by hemat's reader, GGUF
files with llama.cpp's quant types read against independent dequantisers, split files and bad input."""

import gguf
import numpy as np
import pytest
import torch

import hemat
from hemat.cli import main
from hemat.errors import HematError
from hemat.model import gguf_io
from hemat.model.config import ModelConfig
from hemat.model.transformer import CausalLM
from hemat.tokenizer import train_tokenizer
from hf_models import YARN, YARN_V2, make_hf_model

VOCAB = 320  # the model's rows; the tokenizer has fewer, the rest are written as [PADn] tokens
CORPUS = (
    "The quick brown fox jumps over the lazy dog. 123 + 4567 = 4690.\n" * 20
    + "def f(x):\n    return x * 2\n\nSelamat pagi, apa kabar? 你好，世界！\n"
)
SAMPLES = ["The quick brown fox, 12345!", "def f(x):\n    return x\n", "<think>hmm</think> <|user|> 你好 🙂"]
MESSAGES = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5", "reasoning_content": "add"}]
Q = gguf.GGMLQuantizationType
V2_GREEDY = {"topk_method": "greedy", "n_group": 1, "topk_group": 1}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text(CORPUS)
    return train_tokenizer([corpus], 300, tmp_path_factory.mktemp("tok"), show_progress=False)


def _ids(seed=0, seq=24):
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _half_rounded(model: CausalLM) -> CausalLM:
    """What an f16 export holds: matrices rounded to float16, 1-D tensors and the router kept float32."""
    rounded = CausalLM(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim > 1 and not name.endswith("mlp.gate.weight"):
                p.copy_(p.half().float())
    return rounded


def _deepseek(**overrides) -> CausalLM:
    base = dict(
        model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=24, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
        initializer_range=0.1,
    )
    torch.manual_seed(3)
    model = CausalLM(ModelConfig(**{**base, **overrides})).eval()
    with torch.no_grad():  # a non-zero correction bias exercises exp_probs_b
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


# ---- out: transformers' own GGUF loader reads hemat's exports ------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_export_read_by_transformers_within_quantization_error(tmp_path, tokenizer, kind):
    import transformers

    # transformers' qwen3 GGUF reader ignores key_length and assumes Qwen3's head_dim of 128
    make_hf_model(kind, tmp_path / "hf", vocab_size=VOCAB, **({"head_dim": 128} if kind == "qwen3" else {}))
    model = hemat.from_pretrained(tmp_path / "hf")
    ids = _ids()
    original = _logits(model, ids)
    errors, sizes = {}, {}
    for qtype in gguf_io.EXPORT_TYPES:
        out = gguf_io.export_gguf(model, tokenizer, tmp_path / f"{kind}-{qtype}.gguf", qtype, progress=False)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        expected = _logits(reference.eval(), ids)
        got = _logits(hemat.from_pretrained(out, dtype="float32"), ids)
        assert (got - expected).abs().max().item() < 1e-4  # hemat's reader = transformers' reader, any type
        errors[qtype] = (expected - original).abs().max().item()
        sizes[qtype] = out.stat().st_size
    # logits here span about ±3; measured: f16 0.003, q8_0 0.07, q4_0 1.1-1.3
    assert errors["f16"] < 0.01 and errors["q8_0"] < 0.2 and errors["q4_0"] < 2.5
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"]
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_exported_tokenizer_read_by_transformers_and_hemat(tmp_path, tokenizer):
    import transformers

    model = CausalLM(ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    out = gguf_io.export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", progress=False)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = hemat.load_tokenizer(out)
    for text in SAMPLES:
        assert ours.encode(text) == tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=True)
        assert theirs.encode(text) == tokenizer.encode(text, add_special_tokens=True)
        assert ours.decode(ours.encode(text)) == text
    assert ours.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (0, [1], 2)
    assert ours.think_start_id == tokenizer.think_start_id and ours.vocab_size == VOCAB
    stream = ours.decode_stream()
    assert "".join(stream.step(i) for i in ours.encode(SAMPLES[2])) + stream.flush() == SAMPLES[2]
    reader = gguf.GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    assert reader.get_field("tokenizer.ggml.tokens").contents(VOCAB - 1) == f"[PAD{VOCAB - 1}]"


# ---- round trip: hemat -> GGUF -> hemat ----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "deepseek_v2", "deepseek", "deepseek_yarn_no_q_lora_mtp"])
def test_f16_round_trip_gives_the_same_logits(tmp_path, tokenizer, variant):
    if variant in ("llama", "qwen2", "qwen3", "deepseek_v2"):
        overrides = {"rope_scaling": YARN_V2, **V2_GREEDY} if variant == "deepseek_v2" else {}
        make_hf_model(variant, tmp_path / "hf", vocab_size=VOCAB, **overrides)
        model = hemat.from_pretrained(tmp_path / "hf")
    elif variant == "deepseek":
        model = _deepseek()
    else:  # MTP layers are not written (llama.cpp's converter drops them too)
        model = _deepseek(q_lora_rank=None, rope_scaling=YARN, n_group=1, topk_group=1, num_nextn_predict_layers=1)
    out = gguf_io.export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", progress=False)
    back = hemat.from_pretrained(out, dtype="float32")
    # GGUF has no initializer_range; the special ids are the tokenizer's
    expected = model.config.replace(num_nextn_predict_layers=0, extra={}, pad_token_id=tokenizer.pad_token_id,
                                    initializer_range=back.config.initializer_range)
    if not expected.is_mla:
        expected = expected.replace(head_dim=expected.dense_head_dim)
    assert _rounded(back.config.to_hf_dict()) == _rounded(expected.to_hf_dict())  # GGUF floats are float32
    ids = _ids(seed=1)
    assert (_logits(back, ids) - _logits(_half_rounded(model), ids)).abs().max().item() < 1e-4
    if model.config.is_mla:
        reader = gguf.GGUFReader(out)
        names = {t.name for t in reader.tensors}
        assert {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"} <= names
        assert not any(n.startswith("blk.3.") for n in names)
        gating = reader.get_field("deepseek2.expert_gating_func").contents()
        v3 = model.config.model_type == "deepseek_v3"
        assert gating == (gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
        assert ("blk.1.exp_probs_b.bias" in names) == v3
    assert hemat.from_pretrained(out).dtype == torch.float16  # an f16 file loads as float16 by default


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return float(f"{value:.6g}") if isinstance(value, float) else value


# ---- in: llama.cpp's quant types against independent dequantisers ---------------------------------------

# byte offsets of the float16 super-block scales in each K-quant block (ggml-common.h's block_q*_K)
K_QUANT_SCALES = {Q.Q4_K: ((0, 2), 2e-4), Q.Q5_K: ((0, 2), 2e-4), Q.Q6_K: ((208,), 2e-5)}


def _quantized(values: np.ndarray, qtype, rng) -> np.ndarray:
    """Block bytes of `qtype` for `values`: gguf's own quantiser where it has one; for the K-quants (which
    gguf-py can only dequantise) random blocks with small float16 scales."""
    if qtype not in K_QUANT_SCALES:
        return gguf.quants.quantize(values, qtype)
    shape = gguf.quant_shape_to_byte_shape(values.shape, qtype)
    blocks = rng.integers(0, 256, size=shape, dtype=np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    offsets, scale = K_QUANT_SCALES[qtype]
    for offset in offsets:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return blocks.reshape(shape)


def _write(path, model, tokenizer, tensor_bytes=None, skip=(), arch=None, extra_kv=None, **writer_args):
    """A GGUF of `model` written tensor by tensor: float32, or what `tensor_bytes(name, values)` returns
    as (bytes, type)."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch or gguf_io.GGUF_ARCH[config.model_type], **writer_args)
    gguf_io._add_metadata(writer, config, "f16", "test")
    gguf_io._add_tokenizer(writer, tokenizer, config.vocab_size)
    for key, value in (extra_kv or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
    for name, tensor in gguf_io._export_tensors(model):
        if name in skip:
            continue
        values = tensor.float().numpy()
        data, qtype = tensor_bytes(name, values) if tensor_bytes and values.ndim > 1 else (values, None)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_k_quants_and_legacy_quants_like_transformers(tmp_path, tokenizer):
    import transformers

    # K-quants pack 256 values a block: every row length here is a multiple of 256
    config = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    model = CausalLM(config).eval()
    types = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_1, Q.Q8_0, Q.Q4_0, Q.BF16, Q.F16, Q.Q5_0]
    rng, chosen, written = np.random.default_rng(0), {}, {}

    def tensor_bytes(name, values):
        qtype = chosen[name] = types[len(chosen) % len(types)]
        data = written[name] = _quantized(values, qtype, rng) if qtype != Q.F16 else values.astype(np.float16)
        return data, (qtype if qtype != Q.F16 else None)

    path = tmp_path / "quants.gguf"
    _write(path, model, tokenizer, tensor_bytes)
    assert set(types) <= set(chosen.values())
    ours = hemat.from_pretrained(path, dtype="float32")
    # tensor by tensor against gguf-py's dequantiser (the q/k rows un-permuted as llama.cpp's converter permuted them)
    reference = lambda name: torch.from_numpy(gguf.quants.dequantize(written[name], chosen[name]).astype(np.float32))
    assert torch.equal(ours.model.embed_tokens.weight, reference("token_embd.weight"))
    q_proj = gguf_io._unpermute_qk("model.layers.0.self_attn.q_proj.weight", reference("blk.0.attn_q.weight"), config)
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.weight, q_proj)
    # the whole model against transformers, whose GGUF loader dequantises with its own torch kernels
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = _ids(seed=2)
    expected = _logits(theirs.eval(), ids)
    assert (_logits(ours, ids) - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_reads_older_deepseek2_files_with_attn_kv_b(tmp_path, tokenizer):
    """Files converted before llama.cpp split kv_b for absorbed MLA: one attn_kv_b, key/value_length per head."""
    model = _deepseek(num_hidden_layers=2)
    config, path = model.config, tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2")
    gguf_io._add_metadata(writer, config, "f16", "old")
    gguf_io._add_tokenizer(writer, tokenizer, config.vocab_size)
    for key in ("deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"):
        del writer.kv_data[0][key]
    writer.add_key_length(config.qk_head_dim)
    writer.add_value_length(config.v_head_dim)
    kv_b = {f"model.layers.{i}.self_attn.kv_b_proj.weight" for i in range(config.num_hidden_layers)}
    names = gguf_io._gguf_names(config)
    for key, tensor in model.state_dict().items():
        if key in kv_b:
            writer.add_tensor(names[key][0].replace("attn_k_b", "attn_kv_b"), tensor.numpy())
    for name, tensor in gguf_io._export_tensors(model):
        if not name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = hemat.from_pretrained(path, dtype="float32")
    assert (back.config.qk_nope_head_dim, back.config.v_head_dim) == (config.qk_nope_head_dim, config.v_head_dim)
    ids = _ids(seed=4)
    assert (_logits(back, ids) - _logits(model, ids)).abs().max().item() < 1e-4


# ---- split files and bad input --------------------------------------------------------------------------


def test_split_gguf_loads_from_its_first_part(tmp_path, tokenizer):
    model = _deepseek(num_hidden_layers=2)
    _write(tmp_path / "m.gguf", model, tokenizer, split_max_tensors=10)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) >= 3
    back = hemat.from_pretrained(parts[0], dtype="float32")
    ids = _ids(seed=3)
    assert (_logits(back, ids) - _logits(model, ids)).abs().max().item() < 1e-4
    parts[1].unlink()
    with pytest.raises(HematError, match=parts[1].name):
        hemat.from_pretrained(parts[0])


def test_bad_gguf_files_raise_one_clear_error(tmp_path, tokenizer):
    model = CausalLM(ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    good = gguf_io.export_gguf(model, tokenizer, tmp_path / "good.gguf", "q8_0", progress=False)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(HematError, match="truncated.gguf"):
        hemat.from_pretrained(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(HematError, match="garbage.gguf: not a readable GGUF"):
        hemat.load_tokenizer(garbage)
    with pytest.raises(HematError, match="absent.gguf does not exist"):
        hemat.from_pretrained(tmp_path / "absent.gguf")

    _write(tmp_path / "gemma.gguf", model, tokenizer, arch="gemma")
    with pytest.raises(HematError, match="architecture 'gemma' is not supported"):
        hemat.from_pretrained(tmp_path / "gemma.gguf")
    _write(tmp_path / "spm.gguf", model, tokenizer, extra_kv={"tokenizer.ggml.model": "llama"})
    with pytest.raises(HematError, match="tokenizer.ggml.model 'llama' is not supported"):
        hemat.load_tokenizer(tmp_path / "spm.gguf")
    _write(tmp_path / "glm.gguf", model, tokenizer, extra_kv={"tokenizer.ggml.pre": "chatglm-bpe"})
    with pytest.raises(HematError, match="tokenizer.ggml.pre 'chatglm-bpe' is not supported"):
        hemat.load_tokenizer(tmp_path / "glm.gguf")
    _write(tmp_path / "missing.gguf", model, tokenizer, skip={"blk.0.ffn_down.weight"})
    with pytest.raises(HematError, match="missing.gguf: missing tensor blk.0.ffn_down.weight"):
        hemat.from_pretrained(tmp_path / "missing.gguf")
    q8_1 = lambda name, values: (gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0) if "attn_v" not in name else (
        np.zeros(gguf.quant_shape_to_byte_shape(values.shape, Q.Q8_1), dtype=np.uint8), Q.Q8_1)
    _write(tmp_path / "q8_1.gguf", model, tokenizer, q8_1)
    with pytest.raises(HematError, match="tensor blk.0.attn_v.weight has type Q8_1, which hemat cannot read"):
        hemat.from_pretrained(tmp_path / "q8_1.gguf")

    make_hf_model("deepseek_v2", tmp_path / "v2", vocab_size=VOCAB)  # group_limited_greedy over 4 groups
    with pytest.raises(HematError, match="group_limited_greedy"):
        gguf_io.export_gguf(hemat.from_pretrained(tmp_path / "v2"), tokenizer, tmp_path / "v2.gguf", progress=False)
    yarn = CausalLM(model.config.replace(rope_scaling={**YARN, "truncate": False}))
    with pytest.raises(HematError, match="plain YaRN only"):
        gguf_io.export_gguf(yarn, tokenizer, tmp_path / "yarn.gguf", progress=False)
    qwen3 = CausalLM(ModelConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=1, num_attention_heads=4, head_dim=16, attention_bias=True))
    with pytest.raises(HematError, match="qwen3 has no attention biases"):
        gguf_io.export_gguf(qwen3, tokenizer, tmp_path / "qwen3.gguf", progress=False)
    assert not (tmp_path / "qwen3.gguf").exists()


def test_export_gguf_command(tmp_path, tokenizer, capsys):
    make_hf_model("qwen2", tmp_path / "model", vocab_size=VOCAB)
    tokenizer.save(tmp_path / "model")
    out = tmp_path / "out" / "model-q4_0.gguf"
    main(["export-gguf", "--model", str(tmp_path / "model"), "--type", "q4_0", "--out", str(out)])
    assert "q4_0" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "qwen2"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert types["blk.0.attn_q.bias"] == Q.F32 and "output.weight" not in types  # tied embeddings
    assert hemat.load_tokenizer(out).encode(SAMPLES[0]) == tokenizer.encode(SAMPLES[0])
    bf16 = hemat.from_pretrained(tmp_path / "model", dtype="bfloat16")  # exported piece by piece through float32
    back = hemat.from_pretrained(gguf_io.export_gguf(bf16, tokenizer, tmp_path / "bf16.gguf", progress=False))
    for ours, theirs in zip(bf16.parameters(), back.parameters()):
        torch.testing.assert_close(theirs.float(), ours.float(), rtol=0, atol=1e-7)
    with pytest.raises(SystemExit, match="export-gguf"):
        main(["export-gguf", "--model", str(tmp_path / "nowhere"), "--out", str(out)])
