"""int8/int4 checkpoints in compressed-tensors' pack-quantized layout: written by `hemat quantize`, read
back by hemat (and quantized again to the same values), read by transformers through the
compressed-tensors package, and the bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import hemat
from hemat.cli import main
from hemat.errors import HematError
from hemat.infer.quantize import Int4Linear, Int8Linear, load_for_inference, prepare_loaded
from hemat.model.config import ModelConfig
from hemat.model.pack_quantized import pack_int32, unpack_int32
from hemat.model.transformer import CausalLM

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.05)
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4,
                n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
                max_position_embeddings=64, initializer_range=0.05)


def source(tmp_path, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**config))
    model.save_pretrained(tmp_path / "src")
    return model.eval()


def test_int32_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = torch.randint(-8, 8, (48, 40), dtype=torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_int32(values, 4, dim), pack_to_int32(values, 4, packed_dim=dim))
        assert torch.equal(unpack_int32(pack_int32(values, 4, dim), 4, values.shape[dim], dim).to(torch.int8), values)
    values = torch.randint(-127, 128, (16, 30), dtype=torch.int8)
    assert torch.equal(pack_int32(values, 8), pack_to_int32(values, 8))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_writes_pack_quantized_that_hemat_reads_back_exactly(tmp_path, capsys, fmt):
    reference = source(tmp_path, DEEPSEEK)
    main(["quantize", "--model", str(tmp_path / "src"), "--format", fmt, "--group-size", "32",
          "--out", str(tmp_path / "q")])
    assert f"wrote {tmp_path / 'q'} ({fmt}" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.1.mlp.experts.3.down_proj"
    assert tensors[f"{key}.weight_packed"].dtype == torch.int32 and f"{key}.weight" not in tensors
    assert tensors[f"{key}.weight_scale"].shape == (64, 1)  # per channel, or in = 32: one group
    assert ("model.layers.0.self_attn.q_a_proj.weight_zero_point" in tensors) == (fmt == "int4")
    assert "model.layers.1.mlp.gate.weight" in tensors  # the router stays as it was

    loaded = hemat.from_pretrained(tmp_path / "q")
    assert loaded.quantization == {"format": fmt, "group_size": 32 if fmt == "int4" else 0}
    direct = prepare_loaded(reference, fmt, 32)  # quantizing in memory and quantizing a reload agree
    from_disk = prepare_loaded(loaded, None)
    assert from_disk.weight_format == fmt
    # every stored projection quantizes to what it was; MLA's folded ones are products of two, rounded again
    kind = Int8Linear if fmt == "int8" else Int4Linear
    pairs = [(a, b) for (name, a), b in zip(direct.named_modules(), from_disk.modules())
             if isinstance(a, kind) and not name.endswith(("self_attn.q_proj", "self_attn.o_proj"))]
    # MLA down projections, dense + expert + shared MLPs, head, and in int8 the embedding's rows
    assert len(pairs) == 2 + 2 * (1 + 4 + 1) + 1 + (fmt == "int8")
    assert all(torch.allclose(a.dequantized(), b.dequantized(), rtol=0, atol=1e-6) for a, b in pairs)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = direct(ids)
        tolerance = 0.05 if fmt == "int8" else 0.3  # int4 of random weights, rounded twice in MLA
        assert (from_disk(ids) - expected).abs().max() <= tolerance * expected.abs().max()
        # quantized again while loading, in the stored format by default: the same model
        assert torch.equal(load_for_inference(tmp_path / "q")(ids), from_disk(ids))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_transformers_reads_the_quantized_checkpoint(tmp_path, fmt):
    """transformers (with compressed-tensors) decompresses the checkpoint to the weights hemat reads."""
    import transformers

    source(tmp_path, LLAMA)
    main(["quantize", "--model", str(tmp_path / "src"), "--format", fmt, "--group-size", "32", "--out",
          str(tmp_path / "q")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    ours = hemat.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1)


def test_bad_quantize_inputs_are_named(tmp_path, capsys):
    source(tmp_path, LLAMA)
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tmp_path / "src"), "--format", "int3", "--out", str(tmp_path / "q")])
    assert "argument --format: invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--group-size must be one of 32, 64, 128, 256, got 48"):
        main(["quantize", "--model", str(tmp_path / "src"), "--format", "int4", "--group-size", "48",
              "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="group size 128 does not divide the input dimension 64 of "
                                         "model.layers.0.self_attn.q_proj.weight"):
        main(["quantize", "--model", str(tmp_path / "src"), "--format", "int4", "--out", str(tmp_path / "q")])
    main(["quantize", "--model", str(tmp_path / "src"), "--format", "int8", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="is already quantized \\(int8\\)"):
        main(["quantize", "--model", str(tmp_path / "q"), "--format", "int4", "--group-size", "32",
              "--out", str(tmp_path / "q2")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]  # nothing half-written


def test_a_quantized_model_is_not_prepared_in_another_format(tmp_path):
    source(tmp_path, LLAMA)
    main(["quantize", "--model", str(tmp_path / "src"), "--format", "int8", "--out", str(tmp_path / "q")])
    model = prepare_loaded(hemat.from_pretrained(tmp_path / "q"), None)
    with pytest.raises(HematError, match="already prepared with int8"):
        prepare_loaded(model, "int4", 32)
