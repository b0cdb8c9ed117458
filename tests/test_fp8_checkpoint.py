"""DeepSeek-V3's own FP8 checkpoints (float8_e4m3fn projections + float32 weight_scale_inv per block,
the rest in bf16): loaded dequantised against transformers on the dequantised weights, written back."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import hemat
from hemat.cli import main
from hemat.model.config import ModelConfig
from hemat.model.hf import CheckpointError, disk_state_dict
from hemat.model.transformer import CausalLM

# every projection dimension leaves a partial 128-block: 160, 200, 136, 56 (kv_lora + rope), 72
CONFIG = dict(
    model_type="deepseek_v3", vocab_size=128, hidden_size=160, intermediate_size=200, moe_intermediate_size=72,
    num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, q_lora_rank=136, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64,
    initializer_range=0.1,
)
# what DeepSeek-V3 stores in FP8, written out here independently of hemat's own rule
FP8_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")


def _quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe, block by block: scale_inv = amax / 448, fp8 = w / scale_inv."""
    (n, k), (bn, bk) = w.shape, block
    scale = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max().clamp(min=1e-12) / 448
    return (w / _expand(scale, block, w.shape)).to(torch.float8_e4m3fn), scale


def _expand(scale: torch.Tensor, block, shape) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def write_fp8_checkpoint(path, block=(128, 128), shards=2, seed=0):
    """A random tiny DeepSeek-V3 in DeepSeek's FP8 layout at `path` (sharded, with an index) → (config,
    the dequantised state dict in fp32: what any correct loader must end up with)."""
    torch.manual_seed(seed)
    config = ModelConfig(**CONFIG)
    model = CausalLM(config)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    on_disk, dequantised = {}, {}
    for key, w in disk_state_dict(model).items():
        name = key.rsplit(".", 2)[-2]
        if name in FP8_PROJECTIONS and key.endswith(".weight") and not key.endswith("eh_proj.weight"):
            q, scale = _quantise(w, block)
            on_disk[key], on_disk[key + "_scale_inv"] = q, scale
            dequantised[key] = q.float() * _expand(scale, block, w.shape)
        else:
            on_disk[key] = w if key.endswith("e_score_correction_bias") else w.to(torch.bfloat16)
            dequantised[key] = on_disk[key].float()
    path.mkdir(parents=True)
    names = sorted(on_disk)
    weight_map = {}
    for i in range(shards):  # interleaved, so that some scales sit in another shard than their weight
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: on_disk[k] for k in names[i::shards]}, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names[i::shards]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = config.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(hf))
    return config, dequantised


def _ids(seq=24):
    return torch.randint(0, CONFIG["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("block", [(128, 128), (32, 48)])
def test_fp8_checkpoint_loads_as_its_dequantised_weights(tmp_path, block):
    import transformers

    config, dequantised = write_fp8_checkpoint(tmp_path / "fp8", block)
    model = hemat.from_pretrained(tmp_path / "fp8", dtype="float32")
    loaded = disk_state_dict(model)
    assert loaded.keys() == dequantised.keys()
    for key, tensor in dequantised.items():  # fp8 × scale in fp32, exactly; eh_proj and the rest as stored
        assert torch.equal(loaded[key], tensor), key
    assert "quantization_config" not in model.config.to_hf_dict()

    # the reference: transformers' DeepseekV3ForCausalLM holding the dequantised weights
    (tmp_path / "ref").mkdir()
    save_file(dequantised, str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": "float32"}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reference(_ids()).logits - model(_ids())).abs().max().item() <= 1e-5

    default = hemat.from_pretrained(tmp_path / "fp8")  # config.json's torch_dtype: bf16, router in fp32
    assert default.dtype == torch.bfloat16 and default.moe_layers()[0].gate.weight.dtype == torch.float32


def test_fp8_save_round_trips_and_other_formats_drop_the_quantization_config(tmp_path):
    write_fp8_checkpoint(tmp_path / "fp8")
    model = hemat.from_pretrained(tmp_path / "fp8", dtype="float32")
    model.save_pretrained(tmp_path / "again", format="fp8")

    source = {k: v for f in sorted((tmp_path / "fp8").glob("*.safetensors")) for k, v in load_file(f).items()}
    written = load_file(tmp_path / "again" / "model.safetensors")
    assert written.keys() == source.keys()
    for key, tensor in source.items():  # same layout, same dtypes, the same fp8 bytes and scales
        assert written[key].dtype == tensor.dtype and torch.equal(written[key].float(), tensor.float()), key
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    reloaded = hemat.from_pretrained(tmp_path / "again", dtype="float32")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), model(_ids()))

    model.save_pretrained(tmp_path / "bf16", format="bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_convert_command_writes_fp8_with_the_tokenizer(tmp_path, capsys):
    CausalLM(ModelConfig(**CONFIG)).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--format", "fp8"])
    assert "wrote" in capsys.readouterr().out
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert weights["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)  # 136 x 160
    assert weights["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16
    assert weights["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing temporary left


SCALE = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"


@pytest.mark.parametrize("damage, message", [
    ("wrong_scale_shape", "has shape (1, 1), but model.layers.1.mlp.experts.2.up_proj.weight (72, 160)"),
    ("missing_scale", "tensor model.layers.1.mlp.experts.2.up_proj.weight is float8 but has no "
                      "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"),
    ("missing_weight", f"tensor {SCALE} has no weight model.layers.1.mlp.experts.2.up_proj.weight"),
    ("unquantised_weight", "tensor model.layers.1.mlp.experts.2.up_proj.weight has a _scale_inv but dtype BF16"),
])
def test_damaged_fp8_checkpoints_name_the_tensor_and_file(tmp_path, damage, message):
    write_fp8_checkpoint(tmp_path / "fp8", shards=1)
    file = tmp_path / "fp8" / "model-00001-of-00001.safetensors"
    weights = load_file(file)
    if damage == "wrong_scale_shape":
        weights[SCALE] = torch.ones(1, 1)
    elif damage == "missing_scale":
        del weights[SCALE]
    elif damage == "unquantised_weight":
        weights[SCALE.removesuffix("_scale_inv")] = weights[SCALE.removesuffix("_scale_inv")].bfloat16()
    else:
        del weights[SCALE.removesuffix("_scale_inv")]
    save_file(weights, str(file))
    with pytest.raises(CheckpointError) as error:
        hemat.from_pretrained(tmp_path / "fp8")
    assert message in str(error.value) and str(file) in str(error.value)


def test_unsupported_quantization_config_is_refused(tmp_path):
    write_fp8_checkpoint(tmp_path / "fp8", shards=1)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weight_block_size must be two positive integers, got \[128\]"):
        hemat.from_pretrained(tmp_path / "fp8")


def test_fp8_save_is_what_transformers_fp8_loader_reads(tmp_path):
    import transformers

    # whole 128-blocks only: transformers' dequantize path derives the block from the scale grid's shape,
    # which is wrong for partial edge blocks (DeepSeek's own kernels and hemat take it from the config)
    whole = dict(CONFIG, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_attention_heads=8,
                 q_lora_rank=128, kv_lora_rank=112, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                 num_nextn_predict_layers=0)
    torch.manual_seed(0)
    CausalLM(ModelConfig(**whole)).save_pretrained(tmp_path / "fp8", format="fp8")
    model = hemat.from_pretrained(tmp_path / "fp8", dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp8", quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert (reference(_ids()).logits - model(_ids())).abs().max().item() <= 1e-5
