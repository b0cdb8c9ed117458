"""Parameter counts: the analytic counter against published DeepSeek-V3 totals, hand counts of tiny
configs, and the model itself built on the meta device."""

import json

import pytest

from hemat.cli import main
from hemat.errors import HematError
from hemat.model.config import ModelConfig
from hemat.model.params import build_meta_model, classify, count_module_parameters, count_parameters
from hemat.presets import load_model_config

TINY_MLA = dict(
    model_type="deepseek_v3", vocab_size=100, hidden_size=16, intermediate_size=40, moe_intermediate_size=8,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
    qk_rope_head_dim=4, v_head_dim=6, num_nextn_predict_layers=1,
)

CONFIGS = {
    "tiny-mla": ModelConfig(**TINY_MLA),
    "mla-no-q-lora-no-shared-all-moe": ModelConfig(
        **{**TINY_MLA, "q_lora_rank": None, "n_shared_experts": None, "first_k_dense_replace": 0}
    ),
    "mla-dense-mtp2": ModelConfig(**{**TINY_MLA, "n_routed_experts": None, "num_nextn_predict_layers": 2}),
    "llama-gqa-bias": ModelConfig(
        model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, n_routed_experts=None,
    ),
    "qwen2-tied-headdim": ModelConfig(
        model_type="qwen2", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True, n_routed_experts=None,
    ),
    "qwen3-bias-headdim": ModelConfig(
        model_type="qwen3", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, attention_bias=True, n_routed_experts=None,
    ),
    "deepseek-v2-no-q-lora-greedy": ModelConfig(
        **{**TINY_MLA, "model_type": "deepseek_v2", "q_lora_rank": None, "num_nextn_predict_layers": 0,
           "topk_method": "greedy"}
    ),
}

# Published configurations (config.json on the hub) and the totals their model cards quote
DEEPSEEK_V2 = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, n_routed_experts=160, n_shared_experts=2,
    num_experts_per_tok=6, n_group=8, topk_group=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=16.0, topk_method="group_limited_greedy",
)
DEEPSEEK_V2_LITE = {**DEEPSEEK_V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                    "num_hidden_layers": 27, "num_attention_heads": 16, "n_routed_experts": 64, "n_group": 1,
                    "topk_group": 1, "q_lora_rank": None, "routed_scaling_factor": 1.0, "topk_method": "greedy"}
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
QWEN3_0_6B = {**QWEN3_8B, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
              "num_attention_heads": 16, "tie_word_embeddings": True}


def within(value, target, rel):
    return abs(value - target) <= rel * target


def test_deepseek_v3_matches_published_totals():
    """DeepSeek-V3 paper §1 / README_WEIGHTS: 671B main, 36.7B (≈37B) active, 685B in the HF checkpoint
    (main + MTP with its own embedding and head copies), MTP 11.5B unique and 2.4B active incl. shared."""
    c = count_parameters(load_model_config("deepseek-v3-671b"))
    assert within(c.main, 671.0e9, 0.005)
    assert within(c.active, 37e9, 0.015) and within(c.active, 36.7e9, 0.005)
    assert within(c.checkpoint_total, 685e9, 0.003)
    assert 13e9 < c.mtp_with_shared < 14e9  # "14B MTP module"
    assert c.embedding == c.lm_head == 129280 * 7168
    # README_WEIGHTS' 11.5B unique / 2.4B active MTP figures leave out eh_proj (2·7168², 0.1B):
    eh_proj = 2 * 7168 * 7168
    assert within(c.mtp - eh_proj, 11.5e9, 0.005)
    assert within(c.mtp_active_with_shared - eh_proj, 2.4e9, 0.02)
    assert c.total == c.main + c.mtp
    assert sum(c.breakdown.values()) == c.total


def test_gpu_reference_matches_measured_counts():
    """ANCHORS 'Measured here': 702M total, 184M active (transformers builds no MTP, so main)."""
    c = count_parameters(load_model_config("gpu-reference"))
    assert within(c.main, 702e6, 0.002)
    assert within(c.active, 184e6, 0.005)


def test_tiny_mla_by_hand():
    c = count_parameters(CONFIGS["tiny-mla"])
    h, heads, V = 16, 2, 100
    attn = (h * 12 + 12 + 12 * heads * 10) + (h * (10 + 4) + 10 + 10 * heads * (6 + 6)) + heads * 6 * h
    assert attn == 1110
    expert = 3 * h * 8
    dense_layer = attn + 2 * h + 3 * h * 40
    moe_layer = attn + 2 * h + 4 * h + 4 * expert + expert
    assert c.breakdown["attention"] == 3 * attn
    assert c.main == 2 * V * h + h + dense_layer + 2 * moe_layer
    assert c.active == c.main - V * h - 2 * 2 * expert  # 2 of 4 routed experts idle in each MoE layer
    assert c.routed_experts == 2 * 4 * expert
    mtp = moe_layer + 3 * h + 2 * h * h  # MTP layer index 3 >= first_k_dense_replace: MoE
    assert c.mtp == mtp and c.mtp_active == mtp - 2 * expert
    assert c.mtp_with_shared == mtp + 2 * V * h


def test_dense_models_by_hand():
    llama = count_parameters(CONFIGS["llama-gqa-bias"])
    h, d = 16, 4
    attn = h * 4 * d + 2 * h * 2 * d + 4 * d * h + (4 * d + 2 * 2 * d) + h  # q/k/v/o weights + biases
    layer = attn + 2 * h + 3 * h * 40
    assert llama.main == llama.total == 2 * 100 * h + h + 2 * layer
    assert llama.active == llama.main - 100 * h
    assert llama.mtp == llama.routed_experts == 0

    qwen = count_parameters(CONFIGS["qwen2-tied-headdim"])
    attn = h * 4 * 8 + 2 * h * 1 * 8 + 4 * 8 * h + (4 * 8 + 2 * 8)  # q/k/v bias, no o bias
    assert qwen.lm_head == 0
    assert qwen.main == 100 * h + h + 2 * (attn + 2 * h + 3 * h * 40)
    assert qwen.active == qwen.main  # the tied head still runs: its V×H counts as active


def test_qwen3_and_deepseek_v2_by_hand():
    qwen = count_parameters(CONFIGS["qwen3-bias-headdim"])
    h, d = 16, 6
    attn = h * 4 * d + 2 * h * 2 * d + 4 * d * h + (4 * d + 2 * 2 * d + h) + 2 * d  # weights, q/k/v/o biases, q/k norms
    assert qwen.breakdown["attention"] == 2 * attn
    assert qwen.main == 2 * 100 * h + h + 2 * (attn + 2 * h + 3 * h * 40)

    v2 = count_parameters(CONFIGS["deepseek-v2-no-q-lora-greedy"])
    heads = 2
    attn = h * heads * 10 + (h * (10 + 4) + 10 + 10 * heads * (6 + 6)) + heads * 6 * h  # q_proj, kv, o_proj
    expert = 3 * h * 8
    moe_layer = attn + 2 * h + 4 * h + 4 * expert + expert  # router weight only: V2 has no correction bias
    assert v2.main == v2.total == 2 * 100 * h + h + (attn + 2 * h + 3 * h * 40) + 2 * moe_layer
    assert v2.active == v2.main - 100 * h - 2 * 2 * expert and v2.mtp == 0


@pytest.mark.parametrize("config, total, active, non_embedding", [
    (DEEPSEEK_V2, 236e9, 21e9, None),  # DeepSeek-V2 paper: 236B total, 21B activated
    (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9, None),  # DeepSeek-V2-Lite model card: 15.7B, 2.4B activated
    (QWEN3_8B, 8.2e9, None, 6.95e9),  # Qwen3-8B model card: 8.2B, 6.95B non-embedding
    (QWEN3_0_6B, 0.6e9, None, 0.44e9),  # Qwen3-0.6B model card: 0.6B, 0.44B non-embedding (tied head)
])
def test_qwen3_and_deepseek_v2_match_published_totals(config, total, active, non_embedding):
    c = count_parameters(ModelConfig.from_hf_dict(config))
    assert within(c.main, total, 0.01)
    if active:
        assert within(c.active, active, 0.025)
    if non_embedding:
        assert within(c.main - c.embedding - c.lm_head, non_embedding, 0.005)


def test_mtp_ignored_for_dense_model_types():
    c = ModelConfig(**{**{k: v for k, v in CONFIGS["llama-gqa-bias"].__dict__.items() if k != "extra"},
                       "num_nextn_predict_layers": 1})
    assert count_parameters(c).mtp == 0


@pytest.mark.parametrize("name", [*CONFIGS, "cpu-tiny", "gpu-reference", "deepseek-v3-671b"])
def test_analytic_count_matches_model_built_on_meta(name):
    config = CONFIGS[name] if name in CONFIGS else load_model_config(name)
    model = build_meta_model(config)
    assert model is not None, "hemat.model.transformer is missing"
    assert count_module_parameters(model) == count_parameters(config)


def test_unknown_parameter_name_is_an_error():
    assert classify("model.layers.3.mlp.experts.gate_up_proj", 3) == ("routed_experts", True)
    assert classify("model.layers.3.eh_proj.weight", 3) == ("mtp", True)
    assert classify("model.layers.0.self_attn.kv_b_proj.weight", 3) == ("attention", False)
    with pytest.raises(HematError, match="model.layers.0.mlp.mystery"):
        classify("model.layers.0.mlp.mystery.weight", 3)


def test_params_cli_on_preset(capsys):
    main(["params", "deepseek-v3-671b"])
    out = capsys.readouterr().out
    for text in ("671.03B", "36.63B", "11.61B", "13.46B", "684.49B", "matches the model built on the meta device"):
        assert text in out


def test_params_cli_on_config_json_and_checkpoint_dir(tmp_path, capsys):
    config = CONFIGS["llama-gqa-bias"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    expected = f"{count_parameters(config).main:,}"
    for target in (tmp_path / "config.json", tmp_path):
        main(["params", str(target), "--no-build"])
        assert expected in capsys.readouterr().out


def test_params_cli_bad_input():
    with pytest.raises(SystemExit, match="no preset 'nope'"):
        main(["params", "nope"])
