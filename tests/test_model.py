"""The model against transformers' own classes, and the checkpoint format's contract."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import hemat
from hemat.model.config import ConfigError, ModelConfig
from hemat.model.hf import CheckpointError
from hemat.model.moe import Router
from hemat.model.transformer import CausalLM
from hemat.presets import load_model_config
from hf_models import YARN, YARN_V2, YARN_V2_UNEQUAL, make_hf_model

DEEPSEEK_VARIANTS = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "groups_dense0": {"first_k_dense_replace": 0, "n_group": 4, "topk_group": 2},
    "all_dense": {"first_k_dense_replace": 3},
    "yarn": {"rope_scaling": YARN},
    "yarn_no_q_lora_ungrouped": {"rope_scaling": YARN, "q_lora_rank": None, "n_group": 1, "topk_group": 1},
}
DEEPSEEK_V2_VARIANTS = {
    "q_lora_group_limited": {},
    "no_q_lora_greedy": {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    "greedy_ignores_groups": {"topk_method": "greedy"},  # n_group 4, topk_group 2 in the config, unused
    "yarn_v2_mscale": {"rope_scaling": YARN_V2},
    "yarn_unequal_mscale_no_q_lora_greedy": {"rope_scaling": YARN_V2_UNEQUAL, "q_lora_rank": None,
                                             "topk_method": "greedy"},
    "dense0_scaling1": {"first_k_dense_replace": 0, "routed_scaling_factor": 1.0},
}
QWEN3_VARIANTS = {
    "untied_head_dim_24": {},  # head_dim 24, hidden 64 / 4 heads = 16
    "tied": {"tie_word_embeddings": True},
    "attention_bias_yarn": {"attention_bias": True, "rope_scaling": YARN},
    "yarn_attention_factor_untruncated": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.9,
                                                           "original_max_position_embeddings": 64, "truncate": False}},
}


def _ids(seed=0, batch=2, seq=48, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(reference, model, ids):
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", list(DEEPSEEK_VARIANTS))
def test_deepseek_v3_matches_transformers_both_ways(tmp_path, variant):
    import transformers

    reference = make_hf_model("deepseek_v3", tmp_path / "hf", **DEEPSEEK_VARIANTS[variant])
    model = hemat.from_pretrained(tmp_path / "hf")
    _assert_logits_close(reference, model, _ids())
    model.save_pretrained(tmp_path / "hemat")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hemat").float().eval()
    _assert_logits_close(reloaded, model, _ids(seed=1))


def _assert_transformers_reloads(tmp_path, model, architecture):
    """hemat's save_pretrained → transformers loads the same model class and computes the same logits."""
    import transformers

    model.save_pretrained(tmp_path / "hemat")
    config = json.loads((tmp_path / "hemat" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hemat").float().eval()
    assert type(reloaded).__name__ == architecture
    _assert_logits_close(reloaded, model, _ids(seed=1))
    return config


@pytest.mark.parametrize("variant", list(DEEPSEEK_V2_VARIANTS))
def test_deepseek_v2_matches_transformers_both_ways(tmp_path, variant):
    reference = make_hf_model("deepseek_v2", tmp_path / "hf", **DEEPSEEK_V2_VARIANTS[variant])
    model = hemat.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == "deepseek_v2" and model.config.scoring_func == "softmax"
    assert all(moe.gate.e_score_correction_bias is None for moe in model.moe_layers())
    _assert_logits_close(reference, model, _ids())
    config = _assert_transformers_reloads(tmp_path, model, "DeepseekV2ForCausalLM")
    assert config["topk_method"] == reference.config.topk_method
    on_disk = load_file(tmp_path / "hemat" / "model.safetensors")
    assert not any("e_score_correction_bias" in k for k in on_disk)
    assert hemat.from_pretrained(tmp_path / "hemat").config == model.config


@pytest.mark.parametrize("variant", list(QWEN3_VARIANTS))
def test_qwen3_matches_transformers_both_ways(tmp_path, variant):
    reference = make_hf_model("qwen3", tmp_path / "hf", **QWEN3_VARIANTS[variant])
    if reference.config.attention_bias:  # transformers initialises biases to zero; make them count
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)
        reference.save_pretrained(tmp_path / "hf")
    model = hemat.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == "qwen3" and model.config.dense_head_dim == 24
    _assert_logits_close(reference, model, _ids())
    config = _assert_transformers_reloads(tmp_path, model, "Qwen3ForCausalLM")
    assert config["head_dim"] == 24 and config["tie_word_embeddings"] == reference.config.tie_word_embeddings
    on_disk = load_file(tmp_path / "hemat" / "model.safetensors")
    assert ("lm_head.weight" in on_disk) != reference.config.tie_word_embeddings
    assert "model.layers.0.self_attn.q_norm.weight" in on_disk


def test_qwen3_yarn_attn_factor_multiplies_the_attention_factor_as_vllm_does(tmp_path):
    """DeepSeek-R1-0528-Qwen3-8B's config sets rope_scaling.attn_factor 0.8782 (= 1 / (0.1 ln 4 + 1)), which
    vLLM and SGLang multiply into YaRN's cos/sin factor and transformers ignores. hemat follows vLLM: the
    checkpoint computes as transformers does with attention_factor = (0.1 ln 4 + 1) · attn_factor (= 1.0)."""
    attn_factor = 0.8782488562869419
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    reference = make_hf_model("qwen3", tmp_path / "hf", rope_scaling={
        **yarn, "attention_factor": (0.1 * math.log(4.0) + 1) * attn_factor})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config.get("rope_scaling") or config["rope_parameters"]
    del rope["attention_factor"]
    rope["attn_factor"] = attn_factor
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    model = hemat.from_pretrained(tmp_path / "hf")
    assert model.model.rotary_emb.attention_factor == pytest.approx(1.0, abs=1e-6)
    _assert_logits_close(reference, model, _ids())


def test_qwen3_without_head_dim_means_128_as_in_transformers():
    config = ModelConfig.from_hf_dict({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
                                       "num_hidden_layers": 1})
    assert config.dense_head_dim == 128 and config.qk_norm
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf_dict({"model_type": "qwen3", "use_sliding_window": True})


def test_deepseek_v2_config_defaults_and_errors():
    v2 = {"model_type": "deepseek_v2", "vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4,
          "intermediate_size": 96, "num_hidden_layers": 2, "n_routed_experts": 8, "num_experts_per_tok": 2,
          "n_group": None, "topk_group": None}
    config = ModelConfig.from_hf_dict(v2)
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob, config.n_group) == ("softmax", "greedy",
                                                                                                False, 1)
    assert config.first_k_dense_replace == 0 and config.is_moe_layer(0)
    assert ModelConfig(model_type="deepseek_v3").scoring_func == "sigmoid"
    for bad, field in [({"moe_layer_freq": 2}, "moe_layer_freq"), ({"scoring_func": "sigmoid"}, "scoring_func"),
                       ({"topk_method": "noaux_tc"}, "topk_method"), ({"num_nextn_predict_layers": 1}, "nextn"),
                       ({"norm_topk_prob": True}, "norm_topk_prob"),
                       ({"attention_bias": True}, "attention_bias")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_hf_dict({**v2, **bad})


def test_group_limited_greedy_scores_a_group_by_its_best_expert():
    """DeepSeek-V2 keeps the groups holding the best single experts (V3 sums a group's best two): here
    group 0 has one strong expert, group 1 two good ones; V2 keeps group 0."""
    config = _tiny_config(model_type="deepseek_v2", num_nextn_predict_layers=0, n_routed_experts=4, n_group=2,
                          topk_group=1, num_experts_per_tok=1, topk_method="group_limited_greedy",
                          routed_scaling_factor=1.0)
    router = Router(config)
    x = torch.zeros(1, 48)
    x[0, 0] = 1.0
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.log(torch.tensor([0.4, 0.0001, 0.3, 0.2999]))  # softmax → these scores
    weights, ids, scores = router(x)
    assert ids.tolist() == [[0]] and torch.allclose(scores.sum(), torch.tensor(1.0))
    assert weights.item() == pytest.approx(0.4, rel=1e-4)  # norm_topk_prob false: the raw softmax score


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_and_qwen2_match_transformers_both_ways(tmp_path, kind):
    import transformers

    reference = make_hf_model(kind, tmp_path / "hf")
    model = hemat.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == kind
    _assert_logits_close(reference, model, _ids())
    model.save_pretrained(tmp_path / "hemat")
    if kind == "qwen2":  # tied embeddings: no lm_head on disk
        assert "lm_head.weight" not in load_file(tmp_path / "hemat" / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hemat").float().eval()
    _assert_logits_close(reloaded, model, _ids(seed=1))


def _tiny_config(**overrides) -> ModelConfig:
    base = dict(
        model_type="deepseek_v3", vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=3, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128,
    )
    return ModelConfig(**{**base, **overrides})


def test_mtp_layers_round_trip_and_transformers_ignores_them(tmp_path):
    import transformers

    model = CausalLM(_tiny_config()).eval()
    ids = _ids(vocab=96, seq=20)
    logits, mtp = model(ids, return_mtp=True)
    assert logits.shape == (2, 20, 96) and len(mtp) == 1 and mtp[0].shape == (2, 19, 96)
    model.save_pretrained(tmp_path / "ckpt")
    on_disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert {"model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
            "model.layers.2.shared_head.norm.weight", "model.layers.2.self_attn.kv_b_proj.weight"} <= set(on_disk)
    loaded = hemat.from_pretrained(tmp_path / "ckpt")
    logits2, mtp2 = loaded(ids, return_mtp=True)
    assert torch.equal(logits, logits2) and torch.equal(mtp[0], mtp2[0])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    with torch.no_grad():
        assert (reference(ids).logits - logits).abs().max() <= 1e-4


def test_checkpoint_without_mtp_layers_loads_without_mtp(tmp_path):
    model = CausalLM(_tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.2.")},
              tmp_path / "ckpt" / "model.safetensors")
    loaded = hemat.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.num_nextn_predict_layers == 0 and not loaded.mtp_layers
    ids = _ids(vocab=96, seq=10)
    assert torch.equal(loaded(ids), model.eval()(ids))


def test_deepseek_style_duplicated_mtp_embedding_and_head_are_accepted(tmp_path):
    model = CausalLM(_tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["model.layers.2.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.layers.2.shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    assert hemat.from_pretrained(tmp_path / "ckpt").mtp_layers


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model = CausalLM(_tiny_config()).eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())["eos_token_id"] == 1
    ids = _ids(vocab=96, seq=12)
    assert torch.equal(hemat.from_pretrained(tmp_path / "ckpt")(ids), model(ids))


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    model = CausalLM(_tiny_config())
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left


def test_dtype_argument_and_fp32_router(tmp_path):
    CausalLM(_tiny_config()).save_pretrained(tmp_path / "ckpt")
    model = hemat.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.moe_layers()[0].gate.weight.dtype == torch.float32
    assert model(_ids(vocab=96, seq=8)).dtype == torch.bfloat16


def test_pickle_checkpoints_are_refused(tmp_path):
    CausalLM(_tiny_config()).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        hemat.from_pretrained(tmp_path / "ckpt")


def test_unknown_model_type_is_refused(tmp_path):
    CausalLM(_tiny_config()).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json.*'gpt2'"):
        hemat.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_tensor_errors_name_the_tensor(tmp_path, damage):
    CausalLM(_tiny_config()).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    weights = load_file(path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    if damage == "missing":
        del weights[name]
        pattern = f"missing tensor.*{name}"
    elif damage == "extra":
        weights["model.layers.1.mlp.experts.9.up_proj.weight"] = torch.zeros(24, 48)
        pattern = r"unexpected tensor.*experts\.9\.up_proj"
    else:
        weights[name] = torch.zeros(17, 16)
        pattern = rf"{name} has shape \(17, 16\).*\(48, 16\)"
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=pattern):
        hemat.from_pretrained(tmp_path / "ckpt")


def test_group_masking_uses_minus_infinity_not_zero():
    """transformers used to mask dropped groups with 0.0, DeepSeek's reference with -inf. They differ
    when the kept groups' biased scores are negative: masking with 0.0 then picks a dropped expert."""
    config = _tiny_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()  # every sigmoid score is 0.5
        router.e_score_correction_bias.copy_(torch.tensor([-0.6, -0.7, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0]))
    weights, ids, _ = router(torch.zeros(1, 48))
    assert sorted(ids[0].tolist()) == [0, 1]  # both from the one kept group (biased scores -0.1, -0.2)
    biased = 0.5 + router.e_score_correction_bias
    zero_masked = torch.where(torch.arange(8) < 2, biased, torch.zeros(8))
    assert set(zero_masked.topk(2).indices.tolist()) != {0, 1}  # what 0.0-masking would have picked
    assert torch.allclose(weights.sum(), torch.tensor(config.routed_scaling_factor))


def test_expert_load_is_counted_for_the_trainer():
    model = CausalLM(_tiny_config()).eval()
    model(_ids(vocab=96, seq=10), return_mtp=True)
    assert all(moe.tokens_per_expert.sum() == 0 for moe in model.moe_layers())  # inference does not count
    model.train()
    model(_ids(vocab=96, seq=10), return_mtp=True)
    main_moe, mtp_moe = model.moe_layers()
    assert main_moe.tokens_per_expert.sum().item() == 2 * 10 * 2  # tokens × top-k
    assert mtp_moe.tokens_per_expert.sum().item() == 2 * 9 * 2  # MTP depth 1 sees one token fewer


def test_sequence_balance_loss_is_computed_when_enabled():
    model = CausalLM(_tiny_config()).train()
    moe = model.moe_layers()[0]
    moe.balance_alpha = 0.01
    model(_ids(vocab=96, seq=10))
    assert moe.balance_loss is not None and moe.balance_loss.item() > 0 and moe.balance_loss.requires_grad


class ContiguousCache:
    """The smallest cache satisfying the model's protocol, to check cached attention paths."""

    def __init__(self):
        self.store = {}

    def attend(self, layer_idx, attention, q, new, scale):
        old = self.store.get(layer_idx)
        full = new if old is None else tuple(torch.cat((o, n), dim=1) for o, n in zip(old, new))
        self.store[layer_idx] = full
        t, s = new[0].shape[1], full[0].shape[1]
        mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        return attention(q, *full, mask.expand(new[0].shape[0], t, s), scale)


@pytest.mark.parametrize("kind", ["deepseek_v3", "llama"])
def test_absorbed_cached_decode_equals_full_forward(kind):
    config = _tiny_config() if kind == "deepseek_v3" else ModelConfig(
        model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(config).eval()
    ids = _ids(vocab=96, seq=16)
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousCache()
        pieces = [model(ids[:, :10], cache=cache)]
        for t in range(10, 16):
            pieces.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-4
    if kind == "deepseek_v3":  # only the latent and the shared RoPE key are cached
        latent, k_pe = cache.store[0]
        assert latent.shape == (2, 16, config.kv_lora_rank) and k_pe.shape == (2, 16, config.qk_rope_head_dim)


def test_yarn_softmax_scale_for_deepseek_v3():
    config = load_model_config("deepseek-v3-671b")
    mscale = 0.1 * math.log(40) + 1
    assert abs(mscale - 1.3689) < 1e-4
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="topk_group"):
        _tiny_config(n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match="hidden_size"):
        _tiny_config(hidden_size=0)


def test_grouped_gemm_experts_equal_the_per_expert_loop():
    """The GPU path (torch._grouped_mm over tokens sorted by expert) against the CPU loop, forward on CPU."""
    config = _tiny_config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=6)
    moe = CausalLM(config).moe_layers()[0]
    x = torch.randn(40, 64)
    with torch.no_grad():
        weights, ids, _ = moe.gate(x)
        counts = torch.bincount(ids.flatten(), minlength=6)
        routed = x[ids.flatten().argsort(stable=True) // ids.shape[1]]
        assert (moe.experts.grouped(routed, counts) - moe.experts.looped(routed, counts)).abs().max() <= 1e-5
